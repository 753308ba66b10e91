"""``stable-audio-import-model SOURCE``: put a model in BentoML's model store as ``stable-audio``, so the service
serves it and ``bentoml build`` packs it into the Bento.

SOURCE is a hub id (with ``HF_TOKEN`` for gated repos), a local diffusers-format folder, ``tiny``, ``tiny-sa3``,
``tiny-sa3-base``, or a Stable Audio 3 checkpoint in Stability's layout (a folder with ``model_config.json`` and
``model.safetensors``, or either file), which is converted to diffusers' layout on the way in. ``--dtype float16``
(or ``bfloat16``) stores the weights the service casts to ``STABLE_AUDIO_DTYPE`` in that dtype, half the size.
A source already stored at the same revision in the same dtype is not stored again, unless that entry's files no
longer have the sizes recorded at import; offline, a hub id already stored is its newest import.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import sys
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import bentoml
import torch
from bentoml._internal.models.model import Model, ModelContext, ModelInfo, ModelOptions
from diffusers import DiffusionPipeline
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError
from safetensors import SafetensorError

from . import sa3_checkpoint, sa3_loading
from .env_values import env_text
from .loading import HUB_ID, TINY, ensure_tiny_model
from .model_cache import remove_abandoned_staging, written_whole
from .model_store import FAMILIES, STORED_MODEL_NAME, latest_file, store_folder, stored_models

logger = logging.getLogger(__name__)

STORED_DTYPES = ("float32", "float16", "bfloat16")
VERSION = "[a-z2-7]{16}"  # a BentoML version: 10 bytes of a UUID in lowercase base32


class ImportFailed(RuntimeError):
    """The source could not be read; the message says why and what to do instead."""


class HubUnreachable(ImportFailed):
    """The hub gave no answer about a repo (HF_HUB_OFFLINE, no connection), so its revision is unknown."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stable-audio-import-model",
                                     description=__doc__.split("\n\n")[0].replace("``", ""))  # RST is not for --help
    parser.add_argument("source", type=nonempty,
                        help="hub id, diffusers folder, tiny / tiny-sa3 / tiny-sa3-base, or a Stable Audio 3 "
                             "checkpoint in Stability's layout (model_config.json + model.safetensors)")
    parser.add_argument("--text-encoder", type=nonempty, default=sa3_checkpoint.TEXT_ENCODER_HUB_ID,
                        metavar="ID_OR_PATH",
                        help="for Stability-format checkpoints: where T5Gemma and its tokenizer come from (default "
                             "%(default)s; or a local folder, or a diffusers-format SA3 folder)")
    parser.add_argument("--dtype", choices=STORED_DTYPES, default="float32",
                        help="store the DiT's, text encoder's and conditioning's weights in this dtype (default "
                             "%(default)s); the autoencoder stays float32. Store what you serve: float16 for GPUs")
    args = parser.parse_args(argv)
    store = "BentoML's model store"  # until BentoML has made its folders: that fails in a read-only BENTOML_HOME
    try:
        store = f"the model store {store_folder()}"
        model, already_stored = import_model(args.source, args.text_encoder, args.dtype)
    except (ImportFailed, sa3_checkpoint.CheckpointError) as exc:
        print(f"stable-audio-import-model: error: {exc}", file=sys.stderr)
        return 1
    except (OSError, SafetensorError) as exc:  # safetensors reports its own writes' failures as SafetensorError
        print(f"stable-audio-import-model: error: importing into {store} failed: {exc}. Free disk space or make the "
              "store writable (BENTOML_HOME chooses another), then import again", file=sys.stderr)
        return 1
    metadata = _recorded(model)
    what = "already stored as" if already_stored else "stored"
    print(f"{what} {model.tag} ({metadata['family']}, {metadata['dtype']}, {metadata['size_bytes'] / 2**20:.1f} MiB) "
          f"from {metadata['source']} at {metadata['revision']}")
    return 0


def nonempty(source: str) -> str:
    """An empty source or text encoder (an unset variable, quoted) would be the current folder."""
    if not source:
        raise argparse.ArgumentTypeError("give a hub id, a folder or a file, not an empty string")
    return source


class Imported(NamedTuple):
    model: bentoml.Model
    already_stored: bool  # an earlier import of the same source was reused (see import_model)


def import_model(source: str, text_encoder: str = sa3_checkpoint.TEXT_ENCODER_HUB_ID, dtype: str = "float32"
                 ) -> Imported:
    """The stored model of ``source`` in ``dtype``, made the store's latest (the one served). An earlier import with
    the same identity (see ``identify_source``) is reused: the source is then not even loaded. With the hub
    unreachable, a hub id's newest import stands in for it (see ``_stored_offline``)."""
    remove_abandoned_staging(store_folder().parent, VERSION)
    source = _absolute_if_local(source)
    try:
        identified = identify_source(source, text_encoder)
    except HubUnreachable as unreachable:
        return _reused(_stored_offline(source, text_encoder, dtype, unreachable))
    identity = {"source": source, "revision": identified.revision, "dtype": dtype, **identified.converted_with}
    earlier = _stored_import(identity)
    if earlier is not None:
        return _reused(earlier)
    pipe = identified.load()
    family = FAMILIES[type(pipe).__name__]
    store_weights_in(pipe, getattr(torch, dtype))
    known = {key: value for key, value in identity.items() if value is not None}  # BentoML's metadata takes no None
    return Imported(_store(pipe, labels={"source": source, "family": family}, metadata={**known, "family": family}),
                    already_stored=False)


def _absolute_if_local(source: str) -> str:
    """A file or folder by its absolute path: ``./sao`` and ``/models/sao`` are one source, and the stored source is
    the id the service shows, which a relative path, read from wherever the server runs, would not name."""
    if source in (TINY, sa3_loading.TINY_SA3, sa3_loading.TINY_SA3_BASE) or not Path(source).exists():
        return source
    return str(Path(source).resolve())


def _reused(earlier: bentoml.Model) -> Imported:
    _make_latest(earlier)
    return Imported(earlier, already_stored=True)


def _stored_import(identity: dict[str, str | None]) -> bentoml.Model | None:
    """The newest stored model whose metadata records ``identity``. The source's name is part of it, as the service
    reads the stored model's ``source`` (the published name tells a small Stable Audio 3 model); an identity with a
    part that could not be read (None) matches nothing."""
    if None in identity.values():
        return None
    return _newest_stored(lambda metadata: all(metadata.get(key) == value for key, value in identity.items()))


def _stored_offline(repo: str, text_encoder: str, dtype: str, unreachable: HubUnreachable) -> bentoml.Model:
    """The newest stored import of hub repo ``repo`` in ``dtype`` (and, if it was converted from Stability's layout,
    with ``text_encoder``): with the hub unreachable no revision can be read, the text encoder's neither, so none
    is compared; a reachable hub would give its newest commit, as no revision is asked for."""
    newest = _newest_stored(lambda metadata: (metadata.get("source"), metadata.get("dtype")) == (repo, dtype)
                            and metadata.get("text_encoder", text_encoder) == text_encoder)
    if newest is None:
        raise ImportFailed(f"{unreachable}, and no import of {repo!r} in {dtype} is stored. Without hub access, "
                           f"download the repo elsewhere (`hf download {repo} --local-dir DIR`) and import DIR"
                           ) from unreachable
    return newest


def _newest_stored(matches: Callable[[dict], bool]) -> bentoml.Model | None:
    """The newest stored model whose metadata ``matches`` and whose files are as they were stored."""
    matching = [model for model in stored_models() if matches(_recorded(model))]
    return max((model for model in matching if _intact(model)), key=lambda model: model.creation_time, default=None)


def _recorded(model: bentoml.Model) -> dict:
    """``model``'s metadata as this version records it: the first version recorded no dtype, and stored float32."""
    return {"dtype": "float32", **model.info.metadata}


def _intact(model: bentoml.Model) -> bool:
    """Whether ``model``'s files have the sizes recorded when it was stored: one cut short (a full disk, a copy of the
    store interrupted) would be reused, and then fail to load, at every import."""
    damage = _damage(model)
    if damage is not None:
        logger.warning("not reusing %s: %s; it cannot be served, remove it with `bentoml models delete %s`",
                       model.tag, damage, model.tag)
    return damage is None


def _damage(model: bentoml.Model) -> str | None:
    """How ``model``'s files differ from the sizes recorded when it was stored, or None."""
    found = _file_sizes(Path(model.path))
    expected = model.info.metadata.get("file_sizes")
    if expected is None:  # stored before each file's size was recorded: only their total was
        total, expected_total = sum(found.values()), model.info.metadata["size_bytes"]
        return None if total == expected_total else f"its files total {total} bytes, {expected_total} when stored"
    for name in sorted(found.keys() | expected.keys()):
        if found.get(name) != expected.get(name):
            return f"{name} is {_described(found.get(name))}, {_described(expected.get(name))} when stored"
    return None


def _described(size: int | None) -> str:
    return "absent" if size is None else f"{size} bytes"


def _file_sizes(folder: Path) -> dict[str, int]:
    """The size of each of a stored model's files by its path in ``folder``, BentoML's model.yaml left out."""
    return {path.relative_to(folder).as_posix(): path.stat().st_size for path in _files(folder)
            if path != folder / "model.yaml"}


def _make_latest(model: bentoml.Model) -> None:
    """Point ``stable-audio:latest`` at ``model``, as a fresh import of it would: re-importing a source means serving
    it."""
    latest = latest_file()
    if latest.is_file() and latest.read_text().strip() == model.tag.version:
        return  # served already: rewriting it would fail, for nothing, on a read-only store
    descriptor, partial = tempfile.mkstemp(dir=latest.parents[2])  # beside the store: its listing reads every file
    with os.fdopen(descriptor, "w") as file:
        file.write(model.tag.version)
    os.chmod(partial, 0o644)
    os.replace(partial, latest)  # whole: a reader never finds it empty


def _store(pipe: DiffusionPipeline, labels: dict[str, str], metadata: dict[str, str]) -> bentoml.Model:
    """A new version of ``stable-audio`` holding ``pipe``. ``bentoml.models.create`` would have it written into a
    temporary folder and then copied into the store (a second full write of gigabytes); this writes it once, beside
    the store, with what ``create`` writes (the same model.yaml, the same ``latest``), then renames the whole entry
    into place: an entry without its model.yaml breaks BentoML's listing of the store (this project's skips it),
    and one would stay behind a killed import, or be seen by a concurrent one."""
    tag = bentoml.Tag(STORED_MODEL_NAME).make_new_version()
    store = store_folder()
    (store / STORED_MODEL_NAME).mkdir(parents=True, exist_ok=True)
    with written_whole(store / STORED_MODEL_NAME / tag.version, beside=store.parent) as staging:
        pipe.save_pretrained(staging)
        file_sizes = _file_sizes(staging)  # checked before the entry is reused (see _intact)
        info = ModelInfo(tag=tag, module="", labels=labels, options=ModelOptions(), signatures={},
                         metadata={**metadata, "size_bytes": sum(file_sizes.values()), "file_sizes": file_sizes},
                         api_version="v1",
                         context=ModelContext(framework_name="", framework_versions={}))
        Model(tag, str(staging), info, internal=True).flush()  # model.yaml
    model = bentoml.models.get(tag)
    _make_latest(model)
    return model


def store_weights_in(pipe: DiffusionPipeline, dtype: torch.dtype) -> None:
    """Every component's parameters but the autoencoder's in ``dtype``: those the service runs in
    ``STABLE_AUDIO_DTYPE``. Buffers stay as they are: Stable Audio 3's DiT and duration embedder save their rotary
    and Fourier frequencies with the weights, and rounded to half precision they would move every position."""
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module) and name != "vae":
            for parameter in component.parameters():
                parameter.data = parameter.data.to(dtype)


@dataclass(frozen=True)
class IdentifiedSource:
    """A source identified before it is loaded, so that an earlier import of it is found without loading it."""
    revision: str  # the hub commit, or the SHA-256 of the model's files
    load: Callable[[], DiffusionPipeline]
    # Stability's layout: the T5Gemma folded in on conversion comes from elsewhere, so it is part of the identity.
    converted_with: dict[str, str | None] = field(default_factory=dict)


def identify_source(source: str, text_encoder: str = sa3_checkpoint.TEXT_ENCODER_HUB_ID) -> IdentifiedSource:
    if source == TINY:
        return _diffusers_folder(ensure_tiny_model())
    if source in (sa3_loading.TINY_SA3, sa3_loading.TINY_SA3_BASE):
        return _diffusers_folder(sa3_loading.ensure_tiny_sa3_model(variant=source))
    path = Path(source)
    if path.exists():
        # A diffusers folder first, as on the hub: stable-audio-open-1.0's repo, downloaded, holds both layouts.
        if (path / "model_index.json").is_file():
            return _diffusers_folder(path)
        if sa3_checkpoint.is_stability_checkpoint(path):
            files = sa3_checkpoint.checkpoint_files(path)
            return _stability_checkpoint(lambda: path, _digest(files, files[0].parent), text_encoder)
        raise ImportFailed(f"{source} is neither a diffusers-format folder (model_index.json) nor a Stable Audio 3 "
                           f"checkpoint in Stability's layout ({sa3_checkpoint.CONFIG_FILE} + "
                           f"{sa3_checkpoint.WEIGHTS_FILE})")
    if not HUB_ID.fullmatch(source):
        raise ImportFailed(f"{source!r} is not a file or folder, a hub id (owner/name), tiny, tiny-sa3 or "
                           "tiny-sa3-base")
    return _from_hub(source, text_encoder)


def _diffusers_folder(folder: Path) -> IdentifiedSource:
    return IdentifiedSource(_digest(_files(folder), folder), lambda: _pipeline(str(_complete(folder))))


def _complete(folder: Path) -> Path:
    """``folder``, once each component its model_index.json lists is there (see ``_missing_from``): diffusers,
    finding one missing, names a file but no folder (``no file named config.json found in directory /top``), and
    reads an empty file as an invalid header without naming it."""
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except ValueError as exc:
        raise ImportFailed(f"{folder / 'model_index.json'} is not JSON ({exc}). Download or copy the model again"
                           ) from exc
    if not isinstance(index, dict):
        raise ImportFailed(f"{folder / 'model_index.json'} is not a JSON object naming the pipeline's components. "
                           "Download or copy the model again")
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or None in spec:
            continue  # the pipeline's own attributes, and optional components saved as [null, null]
        missing = _missing_from(folder / name)
        if missing is not None:
            raise ImportFailed(f"{folder} is not a complete diffusers-format pipeline: model_index.json lists {name}, "
                               f"but {missing}. Download or copy the model again")
    return folder


def _missing_from(component: Path) -> str | None:
    """What a component's folder lacks: the folder itself, a config file, or weights in a file that is not empty."""
    if not component.is_dir():
        return f"there is no folder {component}"
    if not any(component.glob("*config.json")):  # config.json, scheduler_config.json, tokenizer_config.json
        return f"{component} has no config file"
    empty = [path for suffix in ("*.safetensors", "*.bin") for path in component.glob(suffix)
             if path.stat().st_size == 0]
    return f"{empty[0]} is empty" if empty else None


def _stability_checkpoint(checkpoint: Callable[[], Path], revision: str, text_encoder: str) -> IdentifiedSource:
    """``checkpoint`` gives the path to convert (downloading it first, for a hub repo)."""
    return IdentifiedSource(
        revision, lambda: sa3_checkpoint.load_stability_checkpoint(checkpoint(), text_encoder),
        converted_with={"text_encoder": text_encoder, "text_encoder_revision": _text_encoder_revision(text_encoder)})


def _text_encoder_revision(text_encoder: str) -> str | None:
    """The SHA-256 of a local folder's files (all of them, for a diffusers-format SA3 folder: more than T5Gemma,
    never less), or the hub's current commit, which transformers loads. None when the hub cannot say (offline, with
    T5Gemma in transformers' cache): the import then goes ahead and matches no earlier one."""
    folder = Path(text_encoder)
    if folder.is_dir():
        return _digest(_files(folder), folder)
    with contextlib.suppress(Exception):  # huggingface_hub's own errors; loading it will say what is wrong
        return HfApi(token=env_text(os.environ, "HF_TOKEN")).model_info(text_encoder).sha
    return None


def _pipeline(source: str, **hub: str | None) -> DiffusionPipeline:
    try:
        # A folder whose autoencoder is SAME-S with its chunked attention keeps it (diffusers alone would drop it).
        pipe = DiffusionPipeline.from_pretrained(source, **hub, **sa3_loading.chunked_autoencoder_components(source))
    except Exception as exc:  # diffusers raises OSError, ValueError or HTTP errors depending on what is missing
        component = _component_loading(exc)
        where = "" if component is None else f"its {component}/ did not load: "
        raise ImportFailed(f"{source!r} is not a complete diffusers-format pipeline: {where}{exc}") from exc
    if type(pipe).__name__ not in FAMILIES:
        raise ImportFailed(f"{source!r} holds a {type(pipe).__name__}; this service serves {', '.join(FAMILIES)}")
    return pipe


def _component_loading(exc: BaseException) -> str | None:
    """The component diffusers was loading when it raised ``exc``, read from the traceback: diffusers loads each in
    ``load_sub_model(name=...)``, and neither its messages nor the libraries' below it (safetensors: ``Error while
    deserializing header: incomplete metadata``) name the component. None when no such frame is there."""
    names = [frame.f_locals.get("name") for frame, _ in traceback.walk_tb(exc.__traceback__)
             if frame.f_code.co_name == "load_sub_model"]
    return names[-1] if names else None


def _from_hub(repo: str, text_encoder: str) -> IdentifiedSource:
    token = env_text(os.environ, "HF_TOKEN")
    try:
        info = HfApi(token=token).model_info(repo)
    except Exception as exc:
        status = exc.response.status_code if isinstance(exc, HfHubHTTPError) else None
        if status is not None and status < 500 and status != 429:  # about the repo: unknown, gated, ...
            raise ImportFailed(f"could not read {repo!r} from the Hugging Face hub ({type(exc).__name__}: {exc}). "
                               "Gated models need their license accepted and HF_TOKEN set") from exc
        # No answer about the repo: HF_HUB_OFFLINE (OfflineModeIsEnabled), a connection error or timeout, or the
        # hub failing (5xx) or limiting its rate (429)
        raise HubUnreachable(f"could not read {repo!r} from the Hugging Face hub, which cannot be reached "
                             f"({type(exc).__name__}: {exc})") from exc
    files = {sibling.rfilename for sibling in info.siblings or []}
    if "model_index.json" in files:
        return IdentifiedSource(info.sha, lambda: _pipeline(repo, revision=info.sha, token=token))
    if {sa3_checkpoint.CONFIG_FILE, sa3_checkpoint.WEIGHTS_FILE} <= files:
        return _stability_checkpoint(lambda: _download_checkpoint(repo, info.sha, token), info.sha, text_encoder)
    raise ImportFailed(f"{repo!r} has neither model_index.json (diffusers) nor {sa3_checkpoint.CONFIG_FILE} + "
                       f"{sa3_checkpoint.WEIGHTS_FILE} (Stability's layout)")


def _download_checkpoint(repo: str, revision: str, token: str | None) -> Path:
    try:
        weights = hf_hub_download(repo, sa3_checkpoint.WEIGHTS_FILE, revision=revision, token=token)
        hf_hub_download(repo, sa3_checkpoint.CONFIG_FILE, revision=revision, token=token)  # beside the weights
    except Exception as exc:  # gated without access, or the connection dropped
        raise ImportFailed(f"could not download {repo!r}'s checkpoint ({type(exc).__name__}: {exc}); gated "
                           "models need their license accepted and HF_TOKEN set") from exc
    return Path(weights)


def _files(folder: Path) -> list[Path]:
    """The model's files under ``folder``: hidden ones (a path part starting with ".") left out. They are never the
    model's (diffusers neither reads nor writes any), only where it came from: a git clone's ``.git/``, the
    ``.cache/huggingface/`` that ``hf download --local-dir`` leaves. Counted, they would give the same
    model downloaded two ways two revisions, and a folder a new one after a ``git fetch``."""
    return sorted(path for path in folder.rglob("*")
                  if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts))


def _digest(files: list[Path] | tuple[Path, ...], root: Path) -> str:
    """SHA-256 over the files' paths (relative to root) and contents, in the order given."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        with open(path, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    return f"sha256:{digest.hexdigest()}"


if __name__ == "__main__":
    sys.exit(main())
