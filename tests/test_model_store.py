"""`stable-audio-import-model` puts the model in BentoML's model store; the service serves it when no
STABLE_AUDIO_MODEL is set; `bentoml build` declares it and the exported Bento carries it (as containerize does)."""

from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import torch
import yaml
import bentoml
from bentoml._internal.configuration.containers import BentoMLContainer
from bentoml._internal.models import ModelStore
from diffusers import DiffusionPipeline, StableAudioPipeline
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from safetensors import SafetensorError

from stable_audio_bento.audio import encode_audio
from stable_audio_bento.config import EngineConfig
from stable_audio_bento.generation import AudioRequest
from stable_audio_bento.loading import ModelLoadError, ensure_tiny_model, load_engine
from stable_audio_bento.local_server import local_server
from stable_audio_bento.model_cache import save_once
from stable_audio_bento.model_import import identify_source, import_model, main
from stable_audio_bento.model_store import (STORED_MODEL_TAG, latest_stored_model, serving_config,
                                            stored_model_reference, stored_models)
from stable_audio_bento.sa3_loading import TINY_SA3, ensure_tiny_sa3_model, load_tiny_sa3
from stable_audio_bento.startup import explain_failure
from stable_audio_bento.step_loop import run_to_completion
from test_sa3_checkpoint import write_stability_checkpoint

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "artifacts"


def bentoml_env(home: Path) -> dict[str, str]:
    return dict(os.environ, BENTOML_HOME=str(home), BENTOML_DO_NOT_TRACK="True")


@pytest.fixture
def store(tmp_path) -> ModelStore:
    """An empty model store, the one imports in this process write into (its folder made, as BentoML makes it)."""
    (tmp_path / "models").mkdir()
    store = ModelStore(tmp_path / "models")
    with BentoMLContainer.model_store.patch(store):
        yield store


@pytest.fixture
def tiny_folder(tmp_path, model_cache) -> Path:
    """A copy of the tiny model's diffusers-format folder, free to change."""
    return Path(shutil.copytree(ensure_tiny_model(), tmp_path / "tiny"))


def change_one_weight(weights: Path) -> None:
    """Flip a bit of a .safetensors file's last byte: in its last tensor's data, so it still loads, differently."""
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(data)


def refuse(*args, **kwargs):
    raise AssertionError("not expected to be called")


def truncate(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


def keep_only_metadata(model: bentoml.Model, *keys: str) -> None:
    """Rewrites a stored model's model.yaml as an earlier import version wrote it: only ``keys`` of its metadata."""
    model_yaml = Path(model.path) / "model.yaml"
    info = yaml.safe_load(model_yaml.read_text())
    info["metadata"] = {key: info["metadata"][key] for key in keys}
    model_yaml.write_text(yaml.safe_dump(info))


def last_error_line(error: str) -> str:
    """The one line an import that failed ends with, after diffusers' progress bars if it got that far."""
    assert "Traceback" not in error
    return error.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def imported(tmp_path_factory, model_cache) -> tuple[Path, str, subprocess.CompletedProcess]:
    """A model store holding `tiny`, imported by the command a user runs; (BENTOML_HOME, version, the run)."""
    home = tmp_path_factory.mktemp("bentoml-home")
    done = subprocess.run([sys.executable, "-m", "stable_audio_bento.model_import", "tiny"], env=bentoml_env(home),
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    version = (home / "models" / "stable-audio" / "latest").read_text().strip()
    return home, version, done


def test_import_stores_the_pipeline_with_source_revision_family_and_size(imported, tiny_pipe):
    home, version, done = imported
    folder = home / "models" / "stable-audio" / version
    info = yaml.safe_load((folder / "model.yaml").read_text())
    assert info["labels"] == {"source": "tiny", "family": "stable-audio-open"}
    metadata = info["metadata"]
    assert (metadata["source"], metadata["family"]) == ("tiny", "stable-audio-open")
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", metadata["revision"])
    weights = [path for path in folder.rglob("*") if path.is_file() and path.name != "model.yaml"]
    assert metadata["size_bytes"] == sum(path.stat().st_size for path in weights) > 1_000_000
    assert f"stored stable-audio:{version} (stable-audio-open, " in done.stdout
    assert metadata["revision"] in done.stdout
    stored = StableAudioPipeline.from_pretrained(folder)
    for name in ("transformer", "vae", "text_encoder", "projection_model"):
        ours, theirs = getattr(tiny_pipe, name).state_dict(), getattr(stored, name).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[key], theirs[key]) for key in ours), name


def test_a_half_precision_import_serves_the_rounded_weights_bit_for_bit(tmp_path, model_cache):
    """--dtype bfloat16: DiT, text encoder and duration embedder in bf16, the autoencoder and the frequency tables
    in fp32; served in fp32 on CPU, its audio is that of the fp32 model with those weights rounded to bf16."""
    home = tmp_path / "home"
    done = subprocess.run([sys.executable, "-m", "stable_audio_bento.model_import", "tiny-sa3", "--dtype", "bfloat16"],
                          env=bentoml_env(home), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    stored = ModelStore(home / "models").get(STORED_MODEL_TAG)
    assert stored.info.metadata["dtype"] == "bfloat16" and "(stable-audio-3, bfloat16, " in done.stdout
    assert stored.info.metadata["size_bytes"] < 0.7 * sum(path.stat().st_size for path in
                                                          ensure_tiny_sa3_model().rglob("*") if path.is_file())
    served = load_engine(EngineConfig(model=stored.path))
    rounded = load_engine(EngineConfig(model=TINY_SA3))
    for name in ("text_encoder", "transformer", "duration_embedder"):
        for parameter in getattr(rounded.pipe, name).parameters():
            parameter.data = parameter.data.bfloat16().float()
        buffers = dict(getattr(served.pipe, name).named_buffers())
        assert all(torch.equal(value, buffers[key]) for key, value in getattr(rounded.pipe, name).named_buffers())
    assert all(torch.equal(a, b) for a, b in zip(served.vae.state_dict().values(), rounded.vae.state_dict().values()))
    request = AudioRequest("a bell", seed=3, audio_length=1.0, num_inference_steps=3, guidance_scale=2.0)
    [ours], [theirs] = run_to_completion(served, [request]), run_to_completion(rounded, [request])
    assert np.array_equal(ours.audio, theirs.audio)


def test_stored_model_is_served_unless_stable_audio_model_names_another(imported, monkeypatch):
    home, version, _ = imported
    stored = ModelStore(home / "models").get(STORED_MODEL_TAG)
    monkeypatch.delenv("STABLE_AUDIO_MODEL", raising=False)
    config = serving_config(stored)
    assert (config.model, config.weights, config.model_tag) == ("tiny", stored.path, f"stable-audio:{version}")
    monkeypatch.setenv("STABLE_AUDIO_MODEL", "tiny-sa3")
    config = serving_config(stored)
    assert (config.model, config.weights, config.model_tag) == ("tiny-sa3", None, None)
    monkeypatch.delenv("STABLE_AUDIO_MODEL")
    assert serving_config(None).model == "stabilityai/stable-audio-open-1.0"  # no stored model: today's default


@pytest.mark.parametrize("source, message", [
    ("/no/such/folder", "is not a file or folder, a hub id"),
    ("stable-audio-bento-tests/no-such-model", "could not read 'stable-audio-bento-tests/no-such-model' from the "
                                               "Hugging Face hub"),
    ("{empty}", "is neither a diffusers-format folder (model_index.json) nor a Stable Audio 3 checkpoint"),
    ("{broken}", "is not a complete diffusers-format pipeline"),
    ("{listed}", "model_index.json is not a JSON object naming the pipeline's components"),
])
def test_bad_sources_fail_with_a_clear_message(source, message, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for folder, index in ("broken", '{"_class_name": "StableAudioPipeline"}'), ("listed", "[1, 2]"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "model_index.json").write_text(index)
    assert main([source.format(empty=tmp_path / "empty", broken=tmp_path / "broken", listed=tmp_path / "listed")]) == 1
    last_line = last_error_line(capsys.readouterr().err)
    assert last_line.startswith("stable-audio-import-model: error: ") and message in last_line


def test_an_import_interrupted_while_writing_leaves_nothing_in_the_store(store, model_cache, monkeypatch, tmp_path):
    """Ctrl-C while the weights are written: nothing entered the store (an entry without model.yaml would break
    every listing of it) and the half-written folder beside it is removed; a folder a killed import left there
    does no harm either. Listing the store and resolving the service's stored model work, the next import is
    served."""
    (tmp_path / ".stable-audio-import-killed").mkdir()  # kill -9 runs no clean-up
    (tmp_path / ".stable-audio-import-killed" / "model_index.json").write_text("{}")
    def interrupted_save(pipe, directory, **options):
        (Path(directory) / "model_index.json").write_text("{}")
        raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr(DiffusionPipeline, "save_pretrained", interrupted_save)
        with pytest.raises(KeyboardInterrupt):
            import_model("tiny")
    assert bentoml.models.list() == []
    assert sorted(path.name for path in tmp_path.iterdir()) == [".stable-audio-import-killed", "models"]
    stored = import_model("tiny").model
    assert [model.tag for model in bentoml.models.list()] == [stored.tag]
    assert store.get(STORED_MODEL_TAG).tag == stored.tag


def test_the_import_writes_the_weights_once_and_renames_them_into_the_store(store, model_cache, monkeypatch):
    """Not copied from a temporary folder (bentoml.models.create's way): gigabytes written once, beside the store,
    and the whole folder renamed into it."""
    written_into = []
    save_pretrained = DiffusionPipeline.save_pretrained

    def recorded_save(pipe, directory, **options):
        written_into.append(Path(directory))
        return save_pretrained(pipe, directory, **options)

    monkeypatch.setattr(DiffusionPipeline, "save_pretrained", recorded_save)
    monkeypatch.setattr(shutil, "copytree", refuse)
    stored = import_model("tiny").model
    [staging] = written_into
    assert staging.parent == Path(store._path).parent and not staging.exists()  # renamed, not copied
    assert Path(store.get(STORED_MODEL_TAG).path) == Path(stored.path)
    assert (Path(stored.path) / "model.yaml").is_file() and (Path(stored.path) / "model_index.json").is_file()


def test_a_folders_revision_leaves_out_git_and_hub_metadata_but_not_its_weights(tiny_folder):
    """A git clone's .git/ and hf download's .cache/huggingface/ are not the model: the same files give the same
    revision wherever they came from; a changed weight gives another."""
    revision = identify_source(str(tiny_folder)).revision
    assert revision == identify_source(str(ensure_tiny_model())).revision  # the same files in another folder
    (tiny_folder / ".git" / "refs" / "heads").mkdir(parents=True)
    (tiny_folder / ".git" / "refs" / "heads" / "main").write_text("0123abcd\n")
    (tiny_folder / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
    hub_metadata = tiny_folder / ".cache" / "huggingface" / "download" / "transformer"
    hub_metadata.mkdir(parents=True)
    (hub_metadata / "diffusion_pytorch_model.safetensors.metadata").write_text("0123abcd\n")
    assert identify_source(str(tiny_folder)).revision == revision
    change_one_weight(tiny_folder / "transformer" / "diffusion_pytorch_model.safetensors")
    assert identify_source(str(tiny_folder)).revision != revision


def test_reimporting_a_stored_source_reuses_its_entry_without_loading_it(tiny_folder, store, monkeypatch, capsys):
    """The same folder at the same revision in the same dtype: no new copy, no load, and it is served again (made
    latest); another dtype or a changed weight is a new entry."""
    first = import_model(str(tiny_folder)).model
    (tiny_folder / ".git").mkdir()
    (tiny_folder / ".git" / "HEAD").write_text("ref: refs/heads/main\n")  # cloned since: still the same model
    with monkeypatch.context() as patched:
        patched.setattr(DiffusionPipeline, "from_pretrained", refuse)
        assert main([str(tiny_folder)]) == 0
    assert capsys.readouterr().out.startswith(f"already stored as {first.tag} (stable-audio-open, float32, ")
    assert [model.tag for model in store.list()] == [first.tag]

    half = import_model(str(tiny_folder), dtype="bfloat16")
    assert not half.already_stored and store.get(STORED_MODEL_TAG).tag == half.model.tag != first.tag
    again = import_model(str(tiny_folder))
    assert again.already_stored and again.model.tag == first.tag == store.get(STORED_MODEL_TAG).tag
    assert len(store.list()) == 2

    change_one_weight(tiny_folder / "transformer" / "diffusion_pytorch_model.safetensors")
    changed = import_model(str(tiny_folder))
    assert not changed.already_stored and changed.model.tag not in (first.tag, half.model.tag)
    assert changed.model.info.metadata["revision"] != first.info.metadata["revision"]
    assert len(store.list()) == 3 and store.get(STORED_MODEL_TAG).tag == changed.model.tag


def test_a_stability_checkpoint_is_reused_only_with_the_same_text_encoder(tmp_path, store, model_cache):
    """Converting folds in T5Gemma from --text-encoder: the same checkpoint with a changed text encoder is another
    model, so the text encoder's revision is recorded and must match too."""
    checkpoint = tmp_path / "checkpoint"
    write_stability_checkpoint(load_tiny_sa3(), checkpoint)
    text_encoder = Path(shutil.copytree(ensure_tiny_sa3_model(), tmp_path / "text-encoder"))
    first = import_model(str(checkpoint), str(text_encoder)).model
    assert first.info.metadata["text_encoder"] == str(text_encoder)
    again = import_model(str(checkpoint), str(text_encoder))
    assert again.already_stored and again.model.tag == first.tag and len(store.list()) == 1

    change_one_weight(text_encoder / "text_encoder" / "model.safetensors")
    other = import_model(str(checkpoint), str(text_encoder))
    assert not other.already_stored and len(store.list()) == 2
    assert other.model.info.metadata["revision"] == first.info.metadata["revision"]  # the checkpoint is the same
    assert other.model.info.metadata["text_encoder_revision"] != first.info.metadata["text_encoder_revision"]


def test_serving_without_a_model_setting_generates_with_the_stored_model(imported, engine):
    home, version, _ = imported
    with local_server({"BENTOML_HOME": str(home), "STABLE_AUDIO_MODEL": ""}, ARTIFACTS / "stored-model-server.log",
                      startup_timeout_s=300) as url:
        health = httpx.get(url + "/health").json()
        body = {"input": "rain on a roof", "audio_length": 1.0, "num_inference_steps": 3, "seed": 42,
                "response_format": "pcm"}
        response = httpx.post(url + "/v1/audio/generate", json=body, timeout=300)
    assert (health["model"], health["model_tag"]) == ("tiny", f"stable-audio:{version}")
    assert response.status_code == 200, response.text
    [expected] = run_to_completion(engine, [AudioRequest("rain on a roof", seed=42, audio_length=1.0,
                                                         num_inference_steps=3)])
    assert response.content == encode_audio(expected.audio, 44100, "pcm")


def test_build_declares_the_stored_model_and_the_exported_bento_serves_it_alone(imported, tmp_path):
    home, version, _ = imported
    built = subprocess.run([sys.executable, "-m", "bentoml", "build", ".", "--output", "tag"], cwd=REPO,
                           env=bentoml_env(home), capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout + built.stderr
    [bento] = [path for path in (home / "bentos" / "stable-audio-bento").iterdir() if path.name != "latest"]
    services = {service["name"]: service for service in yaml.safe_load((bento / "bento.yaml").read_text())["services"]}
    assert [model["tag"] for model in services["StableAudioEngine"]["models"]] == [f"stable-audio:{version}"]
    # A model setting baked into the image would override the baked-in model.
    assert "STABLE_AUDIO_MODEL" not in (bento / "env" / "docker" / "Dockerfile").read_text()

    # `bentoml export` (like `containerize`) copies the declared model into the Bento's models/ folder.
    archive = tmp_path / "stable-audio.bento"
    exported = subprocess.run([sys.executable, "-m", "bentoml", "export", f"stable-audio-bento:{bento.name}",
                               str(archive)], env=bentoml_env(home), capture_output=True, text=True, timeout=600)
    assert exported.returncode == 0, exported.stdout + exported.stderr
    unpacked = tmp_path / "bento"
    with tarfile.open(archive) as tar:
        tar.extractall(unpacked, filter="data")
    assert (unpacked / "models" / "stable-audio" / version / "model_index.json").is_file()

    # Served from that folder with an empty model store and no model setting, as in the container.
    empty_home = tmp_path / "empty-home"
    with local_server({"BENTOML_HOME": str(empty_home), "STABLE_AUDIO_MODEL": ""},
                      ARTIFACTS / "exported-bento-server.log", startup_timeout_s=300, bento=str(unpacked)) as url:
        health = httpx.get(url + "/health").json()
    assert (health["model"], health["model_tag"]) == ("tiny", f"stable-audio:{version}")
    assert not (empty_home / "models").exists() or not any((empty_home / "models").iterdir())


def test_a_folder_is_one_source_by_any_path_and_stored_by_its_absolute_one(store, tiny_folder, monkeypatch):
    first = import_model(str(tiny_folder))
    assert first.model.info.metadata["source"] == str(tiny_folder.resolve()) and not first.already_stored
    monkeypatch.chdir(tiny_folder.parent)
    again = import_model(f"./{tiny_folder.name}")
    assert again.already_stored and again.model.tag == first.model.tag



@pytest.mark.parametrize("model_yaml", [None, "name: stable-audio\nversion: [", "version: x\n"],
                         ids=["missing", "cut short", "without a name"])
def test_a_store_entry_without_a_readable_model_yaml_is_skipped_with_a_warning(store, model_cache, monkeypatch,
                                                                               caplog, model_yaml):
    """BentoML's listing of the store raises at an entry without a readable model.yaml (an older importer killed
    while writing left one; so might BentoML's own import, copying into the store, seen mid-copy), and so does its
    `latest` when that file names it or is missing. Listing, importing and declaring the service's stored model
    (even when STABLE_AUDIO_MODEL names another) skip it, each naming it with how to remove it, and find the
    complete entry."""
    good = import_model("tiny").model
    broken = Path(store._path) / "stable-audio" / bentoml.Tag("stable-audio").make_new_version().version
    (broken / "transformer").mkdir(parents=True)  # newer than the good one: the one BentoML's `latest` would pick
    (broken / "model_index.json").write_text("{}")
    if model_yaml is not None:
        (broken / "model.yaml").write_text(model_yaml)
    with pytest.raises(Exception):
        store.list()
    monkeypatch.setenv("STABLE_AUDIO_MODEL", "tiny")
    latest = broken.parent / "latest"
    latest.write_text(broken.name)
    assert stored_model_reference().stored.path == good.path
    latest.unlink()
    assert stored_model_reference().stored.path == good.path
    assert [model.tag for model in stored_models()] == [good.tag]
    again = import_model("tiny")
    assert again.already_stored and again.model.tag == good.tag == store.get(STORED_MODEL_TAG).tag
    warnings = [record.getMessage() for record in caplog.records if record.name.startswith("stable_audio_bento")]
    assert len(warnings) == 4 and all(f"skipping {broken} " in warning and f"`rm -r {broken}`" in warning
                                      for warning in warnings)


def test_a_downloaded_hub_folder_holding_both_layouts_is_imported_as_its_diffusers_pipeline(tiny_folder, store):
    """`hf download stabilityai/stable-audio-open-1.0 --local-dir DIR` brings its diffusers pipeline and Stability's
    checkpoint (model_config.json + model.safetensors) into one folder: it is the pipeline, as on the hub."""
    (tiny_folder / "model_config.json").write_text('{"model_type": "diffusion_cond"}')
    (tiny_folder / "model.safetensors").write_bytes(b"not Stable Audio 3")
    metadata = import_model(str(tiny_folder)).model.info.metadata
    assert metadata["family"] == "stable-audio-open" and "text_encoder" not in metadata


@pytest.mark.parametrize("recorded", ["file sizes", "total size only"])
def test_a_stored_entry_whose_files_changed_size_is_not_reused(store, model_cache, caplog, recorded):
    """A truncated file in an entry (a full disk, a copy of the store cut short): re-importing its source says so and
    stores it afresh instead of answering "already stored"; an entry stored before each file's size was recorded is
    checked against their total."""
    first = import_model("tiny").model
    if recorded == "total size only":
        keep_only_metadata(first, "source", "revision", "family", "dtype", "size_bytes")
    truncate(Path(first.path) / "text_encoder" / "model.safetensors", 1000)
    again = import_model("tiny")
    assert not again.already_stored and again.model.tag != first.tag == store.get(first.tag).tag
    assert store.get(STORED_MODEL_TAG).tag == again.model.tag
    damage = ("text_encoder/model.safetensors is 1000 bytes, " if recorded == "file sizes" else "its files total ")
    [warning] = [record.getMessage() for record in caplog.records if record.name.startswith("stable_audio_bento")]
    assert warning.startswith(f"not reusing {first.tag}: {damage}")
    assert f"`bentoml models delete {first.tag}`" in warning
    assert import_model("tiny").model.tag == again.model.tag  # the fresh entry is reused in turn


def test_a_stored_model_that_fails_to_load_stops_the_server_saying_to_delete_and_import_it_again(store, model_cache,
                                                                                               monkeypatch):
    stored = import_model("tiny").model
    truncate(Path(stored.path) / "transformer" / "diffusion_pytorch_model.safetensors", 1000)
    monkeypatch.delenv("STABLE_AUDIO_MODEL", raising=False)
    config = serving_config(stored)
    with pytest.raises(ModelLoadError) as failure:
        load_engine(config)
    message = explain_failure(config, failure.value)
    assert "\n" not in message
    assert message.startswith(f"cannot serve the stored model {stored.tag} (imported from tiny): ")
    assert f"Delete the stored model with `bentoml models delete {stored.tag}` and import its source again" in message


def test_a_store_entry_without_a_source_is_skipped_with_a_warning(store, model_cache, monkeypatch, caplog):
    """A `stable-audio` entry another tool stored (or one whose model.yaml lost its metadata) records no source to
    serve: listing, the service's stored model and its settings skip it, naming it with how to remove it."""
    good = import_model("tiny").model
    with bentoml.models.create("stable-audio") as foreign:  # newer, and made latest
        (Path(foreign.path) / "weights.bin").write_bytes(b"0")
    assert store.get(STORED_MODEL_TAG).tag == foreign.tag
    monkeypatch.delenv("STABLE_AUDIO_MODEL", raising=False)
    assert [model.tag for model in stored_models()] == [good.tag]
    assert serving_config(latest_stored_model()).weights == good.path
    assert stored_model_reference().stored.path == good.path
    warnings = [record.getMessage() for record in caplog.records if record.name.startswith("stable_audio_bento")]
    assert len(warnings) == 3 and all(f"skipping {foreign.tag} " in warning
                                      and f"`bentoml models delete {foreign.tag}`" in warning for warning in warnings)


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   SafetensorError("Error while serializing: I/O error: No space left on device (os "
                                                   "error 28)")], ids=["OSError", "SafetensorError"])
def test_an_import_that_cannot_write_exits_with_one_line_naming_the_store(store, model_cache, monkeypatch, capsys,
                                                                          error):
    """A full disk or a read-only store: one line naming the store and the error, not a traceback."""
    def failing_save(pipe, directory, **options):
        raise error

    monkeypatch.setattr(DiffusionPipeline, "save_pretrained", failing_save)
    assert main(["tiny"]) == 1
    line = last_error_line(capsys.readouterr().err)
    assert line.startswith(f"stable-audio-import-model: error: importing into the model store {store._path} failed: ")
    assert "No space left on device" in line and stored_models() == []


def test_a_read_only_bentoml_home_exits_with_one_line(monkeypatch, capsys):
    """BentoML makes its folders when its store is first asked for, and raises when it cannot; asking again to name
    the store in the message raised once more, from inside the handler: two tracebacks instead of the line."""
    def read_only_home():
        raise OSError(errno.EROFS, "Read-only file system", "/read-only/bentos")

    monkeypatch.setattr("stable_audio_bento.model_import.store_folder", read_only_home)
    assert main(["tiny"]) == 1
    assert last_error_line(capsys.readouterr().err) == (
        "stable-audio-import-model: error: importing into BentoML's model store failed: [Errno 30] Read-only file "
        "system: '/read-only/bentos'. Free disk space or make the store writable (BENTOML_HOME chooses another), then "
        "import again")


@pytest.mark.parametrize("argv", [[""], ["tiny", "--text-encoder", ""]], ids=["source", "text-encoder"])
def test_an_empty_source_is_refused_not_read_as_the_current_folder(argv, store, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and "not an empty string" in capsys.readouterr().err and stored_models() == []


def test_the_help_is_plain_text(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    shown = " ".join(capsys.readouterr().out.split())  # argparse wraps it to the terminal's width
    assert "put a model in BentoML's model store as stable-audio," in shown and "``" not in shown


def test_a_tiny_models_build_removes_the_staging_folder_a_killed_build_left(tmp_path, caplog):
    """The model cache's staging folders are removed as the store's are: a killed writer's, on this host, only."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    abandoned = tmp_path / f".tiny-v2-{host}-{int(dead.stdout)}-abcd1234"
    live = tmp_path / f".tiny-v2-{host}-{os.getpid()}-abcd1234"
    elsewhere = tmp_path / f".tiny-v2-another-host-{int(dead.stdout)}-abcd1234"
    another_model = tmp_path / f".tiny-sa3-{host}-{int(dead.stdout)}-abcd1234"
    for folder in abandoned, live, elsewhere, another_model:
        folder.mkdir()
    built = SimpleNamespace(save_pretrained=lambda folder: (Path(folder) / "model_index.json").write_text("{}"))
    assert save_once(tmp_path / "tiny-v2", lambda: built) == tmp_path / "tiny-v2"
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(
        [live.name, elsewhere.name, another_model.name, "tiny-v2"])
    assert f"removed {abandoned}, left by process {int(dead.stdout)}" in caplog.text


def test_reimporting_the_served_model_writes_nothing_to_the_store(store, model_cache, monkeypatch):
    """Already stored and already latest: nothing to write, so a store since made read-only does not fail it."""
    first = import_model("tiny").model

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr("tempfile.mkstemp", read_only)
    again = import_model("tiny")
    assert again.already_stored and again.model.tag == first.tag


KILLED_IMPORT = """
import os, signal
from diffusers import DiffusionPipeline
from stable_audio_bento.model_import import import_model

def killed(pipe, directory, **options):
    open(os.path.join(directory, "model_index.json"), "w").write("{}")
    os.kill(os.getpid(), signal.SIGKILL)

DiffusionPipeline.save_pretrained = killed
import_model("tiny")
"""


def test_an_import_removes_the_staging_folder_of_an_import_killed_while_writing(store, model_cache, tmp_path, caplog):
    """kill -9 runs no clean-up: the next import removes what the killed one was writing, and leaves alone a folder
    being written by a live process, one written on another host (a store volume shared by containers: its PID
    means nothing here) and hidden folders named otherwise."""
    killed = subprocess.run([sys.executable, "-c", KILLED_IMPORT], env=bentoml_env(tmp_path), cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr
    [abandoned] = [path for path in tmp_path.iterdir() if path.name.startswith(".")]
    assert (abandoned / "model_index.json").is_file()
    host = socket.gethostname()
    assert f"-{host}-" in abandoned.name
    live = tmp_path / re.sub(r"-\d+-(\w+)$", rf"-{os.getpid()}-\1", abandoned.name)
    elsewhere = tmp_path / abandoned.name.replace(f"-{host}-", "-another-host-")
    other = tmp_path / ".stable-audio-import-1-abcdefgh"
    for folder in live, elsewhere, other:
        folder.mkdir()
    import_model("tiny")
    assert not abandoned.exists() and live.is_dir() and elsewhere.is_dir() and other.is_dir()
    assert f"removed {abandoned}, left by process " in caplog.text


def test_an_entry_stored_by_the_first_import_version_is_reused_as_float32(store, model_cache, capsys):
    """The first version recorded no dtype, and stored float32 only."""
    first = import_model("tiny").model
    keep_only_metadata(first, "source", "revision", "family", "size_bytes")
    assert main(["tiny"]) == 0
    assert capsys.readouterr().out.startswith(f"already stored as {first.tag} (stable-audio-open, float32, ")
    assert not import_model("tiny", dtype="bfloat16").already_stored


@pytest.mark.parametrize("damage, message", [
    ("remove transformer/", "model_index.json lists transformer, but there is no folder {folder}/transformer. "),
    ("remove scheduler/scheduler_config.json", "model_index.json lists scheduler, but {folder}/scheduler has no "
                                               "config file. "),
    ("empty text_encoder/model.safetensors", "model_index.json lists text_encoder, but "
                                             "{folder}/text_encoder/model.safetensors is empty. "),
    ("truncate text_encoder/model.safetensors", "its text_encoder/ did not load: "),
])
def test_an_incomplete_diffusers_folder_is_refused_naming_the_component(tiny_folder, store, capsys, damage, message):
    action, part = damage.split(" ")
    path = tiny_folder / part
    {"remove": lambda: shutil.rmtree(path) if path.is_dir() else path.unlink(), "empty": lambda: truncate(path, 0),
     "truncate": lambda: truncate(path, path.stat().st_size // 2)}[action]()
    assert main([str(tiny_folder)]) == 1
    line = last_error_line(capsys.readouterr().err)
    assert line.startswith("stable-audio-import-model: error: ") and message.format(folder=tiny_folder) in line
    assert stored_models() == []


HUB_REPO = "stable-audio-bento-tests/tiny-on-the-hub"


def hub_at(commit: str):
    """HfApi.model_info of a hub holding a diffusers-format repo at ``commit``."""
    holding = [SimpleNamespace(rfilename="model_index.json")]
    return lambda api, repo, **options: SimpleNamespace(sha=commit, siblings=holding)


def offline_hub(api, repo, **options):
    raise OfflineModeIsEnabled("Cannot reach https://huggingface.co/api/models: offline mode is enabled. To disable "
                               "it, please unset the `HF_HUB_OFFLINE` environment variable.")


def hub_answering(status: int):
    """HfApi.model_info of a hub failing (5xx) or limiting its rate (429): no answer about the repo."""
    def model_info(api, repo, **options):
        answer = httpx.Response(status, request=httpx.Request("GET", f"https://huggingface.co/api/models/{repo}"))
        raise HfHubHTTPError(f"{status} error", response=answer)
    return model_info


@pytest.mark.parametrize("unreachable_hub, error_name", [(offline_hub, "OfflineModeIsEnabled"),
                                                        (hub_answering(503), "HfHubHTTPError"),
                                                        (hub_answering(429), "HfHubHTTPError")],
                         ids=["offline", "hub-503", "hub-429"])
def test_an_offline_reimport_of_a_hub_id_finds_its_newest_stored_import(store, model_cache, monkeypatch, capsys,
                                                                        unreachable_hub, error_name):
    """With the hub unreachable (HF_HUB_OFFLINE, no network, the hub failing) a hub id's revision cannot be read: its
    newest import in the dtype asked for is reused, loading nothing, and made latest; a hub id (or dtype) never
    imported fails with one line saying the hub cannot be reached and nothing is stored for it."""
    load = DiffusionPipeline.from_pretrained
    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", lambda source, **options: load(ensure_tiny_model()))
    imports = {}
    for commit, dtype in [("1" * 40, "float32"), ("2" * 40, "float32"), ("2" * 40, "bfloat16")]:
        monkeypatch.setattr(HfApi, "model_info", hub_at(commit))
        imports[commit, dtype] = import_model(HUB_REPO, dtype=dtype).model
    newest = imports["2" * 40, "float32"]
    assert newest.info.labels["source"] == HUB_REPO and newest.info.metadata["revision"] == "2" * 40

    monkeypatch.setattr(HfApi, "model_info", unreachable_hub)
    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", refuse)
    assert main([HUB_REPO]) == 0
    assert capsys.readouterr().out.startswith(f"already stored as {newest.tag} (stable-audio-open, float32, ")
    assert store.get(STORED_MODEL_TAG).tag == newest.tag and len(store.list()) == 3

    for source, dtype in [("stable-audio-bento-tests/never-imported", "float32"), (HUB_REPO, "float16")]:
        assert main([source, "--dtype", dtype]) == 1
        [error] = capsys.readouterr().err.strip().splitlines()
        assert error.startswith(f"stable-audio-import-model: error: could not read {source!r} from the Hugging Face "
                                f"hub, which cannot be reached ({error_name}: ")
        assert f"no import of {source!r} in {dtype} is stored" in error
    assert store.get(STORED_MODEL_TAG).tag == newest.tag and len(store.list()) == 3
