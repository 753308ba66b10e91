"""One loader for the tiny model, local folders, the hub and dummy full-size weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderOobleck, CosineDPMSolverMultistepScheduler, StableAudioDiTModel

from stable_audio_bento.config import EngineConfig
from stable_audio_bento.loading import (ModelLoadError, load_engine, load_pipeline, resolve_placement,
                                        tiny_model_dir)
from stable_audio_bento.model_cache import cache_root, save_once
from stable_audio_bento.pipeline import BatchedStableAudio, SamplingOptions
from stable_audio_bento.sa3 import BatchedStableAudio3
from stable_audio_bento.sa3_loading import ensure_tiny_sa3_model


def test_tiny_model_is_a_saved_diffusers_folder_with_the_real_geometry(tiny_pipe):
    folder = tiny_model_dir()
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableAudioPipeline"
    assert index["transformer"] == ["diffusers", "StableAudioDiTModel"]
    assert isinstance(tiny_pipe.transformer, StableAudioDiTModel)
    assert isinstance(tiny_pipe.vae, AutoencoderOobleck)
    assert isinstance(tiny_pipe.scheduler, CosineDPMSolverMultistepScheduler)
    limits = BatchedStableAudio(tiny_pipe).limits
    assert (limits.sample_rate, limits.channels, limits.hop_length, limits.latent_frames) == (44100, 2, 2048, 1024)
    assert limits.max_seconds == pytest.approx(47.5545, abs=1e-4)
    assert sum(p.numel() for p in tiny_pipe.transformer.parameters()) < 1_000_000


def test_a_local_folder_loads_through_the_same_code(tiny_pipe):
    from_folder = load_pipeline(EngineConfig(model=str(tiny_model_dir())))
    for name in ("transformer", "vae", "text_encoder", "projection_model"):
        ours, theirs = getattr(tiny_pipe, name).state_dict(), getattr(from_folder, name).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[key], theirs[key]) for key in ours)


def test_missing_folder_says_how_to_point_at_weights(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="STABLE_AUDIO_MODEL"):
        load_pipeline(EngineConfig(model=str(tmp_path)))


def test_an_incomplete_folder_is_not_told_to_download_itself(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(ModelLoadError) as refused:
        load_pipeline(EngineConfig(model=str(tmp_path)))
    assert f"hf download {tmp_path}" not in str(refused.value)
    assert "hf download stabilityai/stable-audio-open-1.0 --local-dir DIR" in str(refused.value)


@pytest.mark.parametrize(("setting", "value", "named"), [
    ("device", "tpu", "STABLE_AUDIO_DEVICE='tpu'"), ("dtype", "float8", "STABLE_AUDIO_DTYPE"),
    ("compile", "cuda-graphs", "STABLE_AUDIO_COMPILE=cuda-graphs needs a CUDA device")])
def test_unusable_settings_are_told_before_any_weights_are_read(monkeypatch, setting, value, named):
    """A hub model would be downloaded first (gigabytes) and only then refused."""
    import stable_audio_bento.loading as loading

    def read_weights(*args, **kwargs):
        raise AssertionError("the weights were read")

    monkeypatch.setattr(loading, "load_pipeline", read_weights)
    monkeypatch.setattr(loading, "load_sa3_engine", read_weights)
    config = {"device": "cpu", **{setting: value}}
    for model in ("stabilityai/stable-audio-open-1.0", "tiny-sa3"):
        with pytest.raises(ModelLoadError, match=named):
            load_engine(EngineConfig(model=model, **config))


@pytest.mark.parametrize("model", ["tiny", "tiny-sa3"])
def test_an_unwritable_cache_for_the_tiny_model_is_named(tmp_path, monkeypatch, model):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("STABLE_AUDIO_CACHE", str(blocker / "cache"))
    with pytest.raises(ModelLoadError, match=r"cannot build the tiny model under .*a-file/cache: NotADirectoryError.*"
                                             r"Set STABLE_AUDIO_CACHE to a writable folder"):
        load_engine(EngineConfig(model=model))


def test_hub_id_without_network_fails_with_a_hint(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="local diffusers-format folder"):
        load_pipeline(EngineConfig(model="stabilityai/stable-audio-open-1.0"))


@pytest.mark.parametrize("model", ["/models/missing", "./stable-audio-3-medium"])
def test_a_folder_that_is_not_there_is_named_as_such_not_as_a_failed_download(model, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match=f"^there is no folder {model!r}, and it is not a hub id") as refused:
        load_engine(EngineConfig(model=model))
    assert "Hugging Face" not in str(refused.value)


def test_unknown_load_format_and_dtype_are_refused():
    with pytest.raises(ModelLoadError, match="STABLE_AUDIO_LOAD_FORMAT"):
        load_pipeline(EngineConfig(model="tiny", load_format="safetensors-please"))
    with pytest.raises(ModelLoadError, match="STABLE_AUDIO_DTYPE"):
        resolve_placement(EngineConfig(dtype="float8"))


@pytest.mark.parametrize("device", ["gpu", "tpu", "cuda:99"])
def test_a_device_the_engine_cannot_use_is_refused_naming_the_setting(device):
    with pytest.raises(ModelLoadError, match=f"STABLE_AUDIO_DEVICE={device!r}"):
        resolve_placement(EngineConfig(device=device))


def test_placement_defaults_to_cpu_fp32_without_cuda():
    placement = resolve_placement(EngineConfig())
    assert placement.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        assert placement.dtype == placement.vae_dtype == torch.float32


def test_environment_selects_model_and_format(monkeypatch):
    monkeypatch.setenv("STABLE_AUDIO_MODEL", "/models/stable-audio")
    monkeypatch.setenv("STABLE_AUDIO_LOAD_FORMAT", "dummy")
    monkeypatch.setenv("STABLE_AUDIO_DECODE_MARGIN", "full")
    monkeypatch.setenv("STABLE_AUDIO_SDE_NOISE", "vectorized")
    monkeypatch.setenv("STABLE_AUDIO_MAX_ROWS", "6")
    config = EngineConfig.from_env()
    assert (config.model, config.load_format) == ("/models/stable-audio", "dummy")
    assert config.sampling == SamplingOptions(decode_margin_frames=None, sde_noise="vectorized", max_rows=6)
    assert not config.auto_max_rows
    monkeypatch.setenv("STABLE_AUDIO_DENOISE_WINDOW", "tiny")
    with pytest.raises(ValueError, match="STABLE_AUDIO_DENOISE_WINDOW"):
        EngineConfig.from_env()


def test_dummy_format_builds_the_full_size_architecture():
    pipe = load_pipeline(EngineConfig(load_format="dummy"))
    counts = {name: sum(p.numel() for p in getattr(pipe, name).parameters())
              for name in ("transformer", "vae", "text_encoder")}
    assert 1.05e9 < counts["transformer"] < 1.07e9
    assert 1.55e8 < counts["vae"] < 1.57e8
    assert 1.0e8 < counts["text_encoder"] < 1.2e8
    assert pipe.transformer.config.num_layers == 24 and pipe.transformer.config.sample_size == 1024


def test_stored_weights_are_read_from_their_folder_while_the_name_gives_the_limits(model_cache):
    folder = str(ensure_tiny_sa3_model())
    engine = load_engine(EngineConfig(model="stabilityai/stable-audio-3-medium", weights=folder))
    assert isinstance(engine, BatchedStableAudio3)
    assert engine.max_seconds == 380.0  # the published model's trained maximum, known by its name
    assert engine.transformer.config.embed_dim == 64  # the tiny weights, not a download


@pytest.mark.parametrize(("variable", "value"), [
    ("STABLE_AUDIO_MAX_STEPS", "abc"), ("STABLE_AUDIO_MAX_STEPS", "0"), ("STABLE_AUDIO_DEFAULT_STEPS", "0"),
    ("STABLE_AUDIO_DECODE_MARGIN", "-3"), ("STABLE_AUDIO_DECODE_MARGIN", "FULL"), ("STABLE_AUDIO_MAX_ROWS", "0"),
    ("STABLE_AUDIO_MAX_ROWS", "x"),
])
def test_an_unusable_engine_setting_is_refused_naming_it(monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValueError, match=f"^{variable}={value!r}: give a whole number") as refused:
        EngineConfig.from_env()
    word = {"STABLE_AUDIO_DECODE_MARGIN": "full", "STABLE_AUDIO_MAX_ROWS": "auto"}.get(variable)
    assert str(refused.value).endswith(f", or {word}") == (word is not None)  # FULL: the word it wants is said


def test_a_default_step_count_above_the_maximum_is_refused(monkeypatch):
    monkeypatch.setenv("STABLE_AUDIO_DEFAULT_STEPS", "900")
    with pytest.raises(ValueError, match="STABLE_AUDIO_DEFAULT_STEPS=900 is above STABLE_AUDIO_MAX_STEPS=500"):
        EngineConfig.from_env()


def test_a_setting_left_empty_means_its_default(monkeypatch):
    for variable in ("STABLE_AUDIO_MODEL", "STABLE_AUDIO_MAX_STEPS", "STABLE_AUDIO_DECODE_MARGIN",
                     "STABLE_AUDIO_SDE_NOISE", "STABLE_AUDIO_MAX_ROWS", "STABLE_AUDIO_COMPILE", "STABLE_AUDIO_DTYPE"):
        monkeypatch.setenv(variable, "")
    assert EngineConfig.from_env() == EngineConfig()
    monkeypatch.setenv("STABLE_AUDIO_CACHE", "")  # not the current folder
    assert cache_root() == Path.home() / ".cache" / "stable-audio-bento"


class SavedPipeline:
    """Stands in for a pipeline: ``save_pretrained`` writes a model_index.json, after ``meanwhile`` runs."""

    def __init__(self, meanwhile=lambda: None):
        self.meanwhile = meanwhile

    def save_pretrained(self, folder):
        self.meanwhile()
        (Path(folder) / "model_index.json").write_text('{"by": "this process"}')


def test_the_cache_saves_a_model_once_and_leaves_no_half_written_folder(tmp_path):
    target = tmp_path / "tiny-v1"

    def other_process_finishes_first():
        target.mkdir()
        (target / "model_index.json").write_text('{"by": "another process"}')

    assert save_once(target, lambda: SavedPipeline(other_process_finishes_first)) == target
    assert (target / "model_index.json").read_text() == '{"by": "another process"}'  # its identical copy stays
    assert save_once(target, lambda: pytest.fail("built again")) == target
    with pytest.raises(RuntimeError, match="build failed"):
        save_once(tmp_path / "other", lambda: (_ for _ in ()).throw(RuntimeError("build failed")))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["tiny-v1"]  # no staging folder left behind
    save_once(tmp_path / "third", SavedPipeline)
    assert oct((tmp_path / "third").stat().st_mode & 0o777) == "0o755"
