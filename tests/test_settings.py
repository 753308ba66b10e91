"""configuration.yaml as the services read it: BentoML's overrides included, and what cannot work refused at start
with one line naming the file and key."""

from __future__ import annotations

import json
import re

import pytest

from stable_audio_bento.config import ServiceSettings


@pytest.fixture(autouse=True)
def no_overrides(monkeypatch):
    for variable in ("BENTOML_CONFIG_OPTIONS", "BENTOML_CONFIG_OVERRIDES", "STABLE_AUDIO_BATCHING"):
        monkeypatch.delenv(variable, raising=False)


def test_batching_mode_comes_from_configuration_and_environment(tmp_path, monkeypatch):
    config = tmp_path / "configuration.yaml"
    config.write_text("services:\n  StableAudioEngine:\n    batching:\n      mode: whole\n")
    monkeypatch.delenv("STABLE_AUDIO_BATCHING", raising=False)
    assert ServiceSettings.load(config).batching == "whole"
    assert ServiceSettings.load(tmp_path / "absent.yaml").batching == "continuous"
    monkeypatch.setenv("STABLE_AUDIO_BATCHING", "continuous")
    assert ServiceSettings.load(config).batching == "continuous"
    monkeypatch.setenv("STABLE_AUDIO_BATCHING", "sometimes")
    with pytest.raises(ValueError, match="STABLE_AUDIO_BATCHING"):
        ServiceSettings.load(config)


@pytest.mark.parametrize("value", ["0", "-2", "2.5", "eight", "true"])
def test_an_unusable_batch_setting_is_named(tmp_path, value):
    config = tmp_path / "configuration.yaml"
    config.write_text(f"services:\n  StableAudioEngine:\n    batching:\n      max_batch_size: {value}\n")
    with pytest.raises(ValueError, match=r"services.StableAudioEngine.batching.max_batch_size must be a whole number"):
        ServiceSettings.load(config)


def test_bentomls_own_overrides_change_the_timeout_and_what_is_derived_from_it(tmp_path, monkeypatch):
    """BentoML cut direct requests at an overridden timeout while jobs ran to the file's, and the result calls kept
    the file's wait."""
    config = tmp_path / "configuration.yaml"
    config.write_text("services:\n  StableAudio:\n    traffic:\n      timeout: 900\n")
    assert ServiceSettings.load(config).request_timeout_s == 900
    monkeypatch.setenv("BENTOML_CONFIG_OPTIONS", "services.StableAudio.traffic.timeout=10")
    assert (ServiceSettings.load(config).request_timeout_s, ServiceSettings.load(config).result_wait_s) == (10, 5)
    monkeypatch.delenv("BENTOML_CONFIG_OPTIONS")
    monkeypatch.setenv("BENTOML_CONFIG_OVERRIDES", json.dumps({"services": {"StableAudio": {"traffic": {"timeout": 60}},
                                                                             "StableAudioEngine": {"batching": {
                                                                                 "max_batch_size": 4}}}}))
    settings = ServiceSettings.load(config)
    assert (settings.request_timeout_s, settings.max_batch_size) == (60, 4)


@pytest.mark.parametrize(("text", "message"), [
    # a result call waits up to 20 s: an engine timeout of 10 made every longer generation a 503
    ("services:\n  StableAudioEngine:\n    traffic:\n      timeout: 10\n",
     "services.StableAudioEngine.traffic.timeout is below services.StableAudio.traffic.timeout (900): leave it out"),
    ("services:\n  StableAudio:\n    traffic:\n      timeout: soon\n",
     "services.StableAudio.traffic.timeout must be a number of seconds above 0 (got 'soon')"),
    ("services:\n  StableAudio:\n    traffic:\n      timeout: 0\n",
     "services.StableAudio.traffic.timeout must be a number of seconds above 0 (got 0)"),
    ("services:\n  StableAudioEngine:\n    batching:\n      mode: Whole\n",
     "services.StableAudioEngine.batching.mode='Whole': use one of continuous, whole"),
    ("services:\n  StableAudioEngine:\n    batching: 8\n",
     "services.StableAudioEngine.batching must be a mapping of settings (got 8)")])
def test_a_setting_that_cannot_work_is_named_with_its_file(tmp_path, text, message):
    config = tmp_path / "configuration.yaml"
    config.write_text(text)
    with pytest.raises(ValueError, match=f"^{config}: " + message.replace("(", r"\(").replace(")", r"\)")):
        ServiceSettings.load(config)


@pytest.mark.parametrize("text", ["services:\n", "services:\n  StableAudio:\n",
                                  "services:\n  StableAudioEngine:\n    batching:\n    traffic:\n"])
def test_a_section_with_its_entries_commented_out_is_as_if_absent(tmp_path, text):
    """An AttributeError's traceback, before."""
    config = tmp_path / "configuration.yaml"
    config.write_text(text)
    assert ServiceSettings.load(config) == ServiceSettings()


@pytest.mark.parametrize(("text", "message"), [("", None), ("# all commented out\n", None),
                                              ("- 1\n- 2\n", "must be a mapping of settings (got list)"),
                                              ("services: [\n", "not YAML: ")])
def test_a_file_with_no_settings_is_as_if_absent_and_one_that_is_not_a_mapping_is_named(tmp_path, text, message):
    """BentoML's merge raised an AttributeError on both: a traceback instead of the defaults or one line."""
    config = tmp_path / "configuration.yaml"
    config.write_text(text)
    if message is None:
        assert ServiceSettings.load(config) == ServiceSettings()
    else:
        with pytest.raises(ValueError, match=f"^{config}: {re.escape(message)}") as refused:
            ServiceSettings.load(config)
        assert "\n" not in str(refused.value)


def test_a_value_from_an_override_is_blamed_on_the_override_too(tmp_path, monkeypatch):
    config = tmp_path / "configuration.yaml"
    config.write_text("services:\n  StableAudio:\n    traffic:\n      timeout: 900\n")
    monkeypatch.setenv("BENTOML_CONFIG_OPTIONS", "services.StableAudio.traffic.timeout=soon")
    with pytest.raises(ValueError, match=f"^{config} with BENTOML_CONFIG_OPTIONS: services.StableAudio.traffic.timeout "
                                         "must be a number of seconds above 0"):
        ServiceSettings.load(config)
