"""``stable-audio-import-model SOURCE``: put a model in BentoML's model store as ``stable-audio``, so the service
serves it and ``bentoml build`` packs it into the Bento.

SOURCE is a hub id (with ``HF_TOKEN`` for gated repos), a local diffusers-format folder, ``tiny``, ``tiny-sa3``,
``tiny-sa3-base``, or a Stable Audio 3 checkpoint in Stability's layout (a folder with ``model_config.json`` and
``model.safetensors``, or either file), which is converted to diffusers' layout on the way in. ``--dtype float16``
(or ``bfloat16``) stores the weights the service casts to ``STABLE_AUDIO_DTYPE`` in that dtype, half the size.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import sys
from pathlib import Path

import bentoml
import torch
from diffusers import DiffusionPipeline
from huggingface_hub import HfApi, hf_hub_download

from . import sa3_checkpoint, sa3_loading
from .loading import HUB_ID, TINY, ensure_tiny_model
from .model_store import FAMILIES, STORED_MODEL_NAME

STORED_DTYPES = ("float32", "float16", "bfloat16")


class ImportFailed(RuntimeError):
    """The source could not be read; the message says why and what to do instead."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stable-audio-import-model", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="hub id, diffusers folder, tiny / tiny-sa3 / tiny-sa3-base, or a Stable Audio 3 "
                                       "checkpoint in Stability's layout (model_config.json + model.safetensors)")
    parser.add_argument("--text-encoder", default=sa3_checkpoint.TEXT_ENCODER_HUB_ID, metavar="ID_OR_PATH",
                        help="for Stability-format checkpoints: where T5Gemma and its tokenizer come from (default "
                             "%(default)s; or a local folder, or a diffusers-format SA3 folder)")
    parser.add_argument("--dtype", choices=STORED_DTYPES, default="float32",
                        help="store the DiT's, text encoder's and conditioning's weights in this dtype (default "
                             "%(default)s); the autoencoder stays float32. Store what you serve: float16 for GPUs")
    args = parser.parse_args(argv)
    try:
        model = import_model(args.source, args.text_encoder, args.dtype)
    except (ImportFailed, sa3_checkpoint.CheckpointError) as exc:
        print(f"stable-audio-import-model: error: {exc}", file=sys.stderr)
        return 1
    metadata = model.info.metadata
    print(f"stored {model.tag} ({metadata['family']}, {metadata['dtype']}, {metadata['size_bytes'] / 2**20:.1f} MiB) "
          f"from {metadata['source']} at {metadata['revision']}")
    return 0


def import_model(source: str, text_encoder: str = sa3_checkpoint.TEXT_ENCODER_HUB_ID, dtype: str = "float32"
                 ) -> bentoml.Model:
    pipe, revision = read_source(source, text_encoder)
    family = FAMILIES[type(pipe).__name__]
    store_weights_in(pipe, getattr(torch, dtype))
    tag = bentoml.Tag(STORED_MODEL_NAME).make_new_version()
    try:
        with bentoml.models.create(tag, labels={"source": source, "family": family}) as model:
            pipe.save_pretrained(model.path)
            model.info.metadata.update(source=source, revision=revision, family=family, dtype=dtype,
                                       size_bytes=sum(path.stat().st_size for path in _files(Path(model.path))))
    except BaseException:
        # BentoML removes a half-copied store entry after an error, but not after Ctrl-C, and an entry without its
        # model.yaml breaks every listing of the store, the service's start included (even with another model set).
        with contextlib.suppress(bentoml.exceptions.NotFound):
            bentoml.models.delete(tag)
        raise
    return model


def store_weights_in(pipe: DiffusionPipeline, dtype: torch.dtype) -> None:
    """Every component's parameters but the autoencoder's in ``dtype``: those the service runs in
    ``STABLE_AUDIO_DTYPE``. Buffers stay as they are: Stable Audio 3's DiT and duration embedder save their rotary
    and Fourier frequencies with the weights, and rounded to half precision they would move every position."""
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module) and name != "vae":
            for parameter in component.parameters():
                parameter.data = parameter.data.to(dtype)


def read_source(source: str, text_encoder: str) -> tuple[DiffusionPipeline, str]:
    """The pipeline and its revision: the hub commit, or the SHA-256 of the source's files."""
    if source == TINY:
        return _diffusers_folder(ensure_tiny_model())
    if source in (sa3_loading.TINY_SA3, sa3_loading.TINY_SA3_BASE):
        return _diffusers_folder(sa3_loading.ensure_tiny_sa3_model(variant=source))
    path = Path(source)
    if path.exists():
        if sa3_checkpoint.is_stability_checkpoint(path):
            files = sa3_checkpoint.checkpoint_files(path)
            return sa3_checkpoint.load_stability_checkpoint(path, text_encoder), _digest(files, files[0].parent)
        if (path / "model_index.json").is_file():
            return _diffusers_folder(path)
        raise ImportFailed(f"{source} is neither a diffusers-format folder (model_index.json) nor a Stable Audio 3 "
                           f"checkpoint in Stability's layout ({sa3_checkpoint.CONFIG_FILE} + "
                           f"{sa3_checkpoint.WEIGHTS_FILE})")
    if not HUB_ID.fullmatch(source):
        raise ImportFailed(f"{source!r} is not a file or folder, a hub id (owner/name), tiny, tiny-sa3 or "
                           "tiny-sa3-base")
    return _from_hub(source, text_encoder)


def _diffusers_folder(folder: Path) -> tuple[DiffusionPipeline, str]:
    return _pipeline(str(folder)), _digest(_files(folder), folder)


def _pipeline(source: str, **hub: str | None) -> DiffusionPipeline:
    try:
        # A folder whose autoencoder is SAME-S with its chunked attention keeps it (diffusers alone would drop it).
        pipe = DiffusionPipeline.from_pretrained(source, **hub, **sa3_loading.chunked_autoencoder_components(source))
    except Exception as exc:  # diffusers raises OSError, ValueError or HTTP errors depending on what is missing
        raise ImportFailed(f"{source!r} is not a complete diffusers-format pipeline: {exc}") from exc
    if type(pipe).__name__ not in FAMILIES:
        raise ImportFailed(f"{source!r} holds a {type(pipe).__name__}; this service serves {', '.join(FAMILIES)}")
    return pipe


def _from_hub(repo: str, text_encoder: str) -> tuple[DiffusionPipeline, str]:
    token = os.environ.get("HF_TOKEN")
    try:
        info = HfApi(token=token).model_info(repo)
    except Exception as exc:  # offline, unknown repo, gated without a token: huggingface_hub's own errors
        raise ImportFailed(
            f"could not read {repo!r} from the Hugging Face hub ({type(exc).__name__}: {exc}). Gated models need "
            "their license accepted and HF_TOKEN set; without hub access, download the repo elsewhere "
            f"(`huggingface-cli download {repo} --local-dir DIR`) and import DIR") from exc
    files = {sibling.rfilename for sibling in info.siblings or []}
    if "model_index.json" in files:
        return _pipeline(repo, revision=info.sha, token=token), info.sha
    if {sa3_checkpoint.CONFIG_FILE, sa3_checkpoint.WEIGHTS_FILE} <= files:
        try:
            weights = hf_hub_download(repo, sa3_checkpoint.WEIGHTS_FILE, revision=info.sha, token=token)
            hf_hub_download(repo, sa3_checkpoint.CONFIG_FILE, revision=info.sha, token=token)  # beside the weights
        except Exception as exc:  # gated without access, or the connection dropped
            raise ImportFailed(f"could not download {repo!r}'s checkpoint ({type(exc).__name__}: {exc}); gated "
                               "models need their license accepted and HF_TOKEN set") from exc
        return sa3_checkpoint.load_stability_checkpoint(Path(weights), text_encoder), info.sha
    raise ImportFailed(f"{repo!r} has neither model_index.json (diffusers) nor {sa3_checkpoint.CONFIG_FILE} + "
                       f"{sa3_checkpoint.WEIGHTS_FILE} (Stability's layout)")


def _files(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if path.is_file())


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
