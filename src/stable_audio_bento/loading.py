"""Load a StableAudioPipeline from the hub, a local folder, a tiny self-made model, or random full-size weights."""

from __future__ import annotations

import logging
import os
import re
import string
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from diffusers import (AutoencoderOobleck, CosineDPMSolverMultistepScheduler, StableAudio3Pipeline, StableAudioDiTModel,
                       StableAudioPipeline)
from diffusers.pipelines.stable_audio.modeling_stable_audio import StableAudioProjectionModel
from transformers import T5Config, T5EncoderModel, T5Tokenizer

from . import sa3_loading
from .compilation import CUDA_GRAPHS
from .config import EngineConfig
from .cuda_graphs import require_cuda
from .env_values import env_text
from .model_cache import cache_root, save_once
from .pipeline import BatchedStableAudio
from .sa3 import BatchedStableAudio3, SA3Options

logger = logging.getLogger(__name__)

TINY = "tiny"
HUB_ID = re.compile(r"\w(?:[\w.-]*\w)?/\w(?:[\w.-]*\w)?")  # owner/name, each starting and ending alphanumeric
TINY_FORMAT_VERSION = 2  # 2: 8 latent channels, not 64 (its VAE encoder took 30 s for a 5 s upload on a CPU)


class ModelLoadError(RuntimeError):
    """The configured model could not be loaded; the message says what to do instead."""


@dataclass(frozen=True)
class Architecture:
    """Constructor arguments of every component; the time geometry (hop 2048, 1024 frames, 44.1 kHz stereo)
    is the same in both sizes, so any request valid for the real model is valid for the tiny one."""

    text_encoder: dict[str, Any]
    projection: dict[str, Any]
    transformer: dict[str, Any]
    vae: dict[str, Any]


_VAE_GEOMETRY = dict(downsampling_ratios=[2, 4, 4, 8, 8], audio_channels=2, sampling_rate=44100, decoder_input_channels=64)

# stable-audio-open-1.0 as published (T5-base, 1.06 B-parameter DiT, 156 M-parameter Oobleck VAE).
FULL_SIZE = Architecture(
    text_encoder=dict(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12, relative_attention_num_buckets=32),
    projection=dict(text_encoder_dim=768, conditioning_dim=768, min_value=0, max_value=512),
    transformer=dict(
        sample_size=1024, in_channels=64, out_channels=64, num_layers=24, attention_head_dim=64,
        num_attention_heads=24, num_key_value_attention_heads=12, cross_attention_dim=768, time_proj_dim=256,
        global_states_input_dim=1536, cross_attention_input_dim=768,
    ),
    vae=dict(_VAE_GEOMETRY, encoder_hidden_size=128, channel_multiples=[1, 2, 4, 8, 16], decoder_channels=128),
)

TINY_SIZE = Architecture(
    text_encoder=dict(vocab_size=256, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8),
    projection=dict(text_encoder_dim=32, conditioning_dim=32, min_value=0, max_value=512),
    transformer=dict(
        sample_size=1024, in_channels=8, out_channels=8, num_layers=2, attention_head_dim=16,
        num_attention_heads=4, num_key_value_attention_heads=2, cross_attention_dim=64, time_proj_dim=32,
        global_states_input_dim=64, cross_attention_input_dim=32,
    ),
    vae=dict(_VAE_GEOMETRY, encoder_hidden_size=16, channel_multiples=[1, 1, 1, 1, 1], decoder_channels=8,
             decoder_input_channels=8),  # the encoder's width is twice the latent channels'
)


def build_offline_tokenizer() -> T5Tokenizer:
    """A unigram T5 tokenizer over single characters and a few common words, built without any download."""
    pieces = ["▁" + word for word in "the a of and sound playing in with on music piano dog rain".split()]
    pieces += ["▁" + ch for ch in string.ascii_lowercase] + list(string.ascii_letters + string.digits + string.punctuation)
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(piece, -3.0 - 0.01 * i) for i, piece in enumerate(dict.fromkeys(pieces))]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=128)


def build_random_pipeline(architecture: Architecture, seed: int = 0) -> StableAudioPipeline:
    """Every component with the real classes and random weights (deterministic for a given seed)."""
    torch.manual_seed(seed)
    tokenizer = build_offline_tokenizer()
    text_encoder = T5EncoderModel(T5Config(feed_forward_proj="relu", **architecture.text_encoder))
    return StableAudioPipeline(
        vae=AutoencoderOobleck(**architecture.vae),
        text_encoder=text_encoder.eval(),
        projection_model=StableAudioProjectionModel(**architecture.projection),
        tokenizer=tokenizer,
        transformer=StableAudioDiTModel(**architecture.transformer),
        scheduler=CosineDPMSolverMultistepScheduler(),
    )


def tiny_model_dir() -> Path:
    return cache_root() / f"tiny-v{TINY_FORMAT_VERSION}"


def built_in_cache(build: Callable[[], Path | str]) -> str:
    """The folder ``build`` returns, having built a tiny model there on first use."""
    try:
        return str(build())
    except OSError as error:  # an unwritable or missing cache folder (a read-only home in a container, say)
        raise ModelLoadError(f"cannot build the tiny model under {cache_root()}: {type(error).__name__}: {error}. "
                             "Set STABLE_AUDIO_CACHE to a writable folder") from None


def ensure_tiny_model(directory: Path | None = None) -> Path:
    """Build and save the tiny model once; later loads read it back like any diffusers folder."""
    return save_once(directory or tiny_model_dir(), lambda: build_random_pipeline(TINY_SIZE))


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype  # DiT, T5 and projection model
    vae_dtype: torch.dtype


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_placement(config: EngineConfig) -> Placement:
    device = torch.device("cuda" if config.device == "auto" and torch.cuda.is_available() else
                          "cpu" if config.device == "auto" else _parse_device(config.device))
    if config.dtype == "auto":
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    else:
        dtype = _parse_dtype(config.dtype, "STABLE_AUDIO_DTYPE")
    return Placement(device, dtype, _parse_dtype(config.vae_dtype, "STABLE_AUDIO_VAE_DTYPE"))


def _parse_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ModelLoadError(f"STABLE_AUDIO_DEVICE={name!r}: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ModelLoadError(f"STABLE_AUDIO_DEVICE={name!r}, but this process sees {torch.cuda.device_count()} CUDA "
                             "GPUs (CUDA_VISIBLE_DEVICES, the driver); use auto or cpu")
    return device


def _parse_dtype(name: str, variable: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ModelLoadError(f"{variable}={name!r} is not one of {sorted(_DTYPES)}") from None


def load_engine(config: EngineConfig) -> BatchedStableAudio | BatchedStableAudio3:
    """The served model as its family's stages, compiled if configured (``startup.py`` warms it up); the family is
    read from the model's name or its folder's model_index.json."""
    # Settings that cannot work are told before the weights are read (or gigabytes downloaded).
    placement = resolve_placement(config)
    if config.compile == CUDA_GRAPHS:
        try:
            require_cuda(placement.device)
        except ValueError as error:
            raise ModelLoadError(f"{error}. Unset STABLE_AUDIO_COMPILE, or choose a torch.compile mode") from None
    if sa3_loading.is_sa3_model(config.weights or config.model):
        engine = load_sa3_engine(config)
    else:
        engine = BatchedStableAudio(load_pipeline(config), config.sampling)
    forward = {None: "eager", CUDA_GRAPHS: CUDA_GRAPHS}.get(config.compile, f"torch.compile'd ({config.compile})")
    logger.info("engine: %s%s on %s, DiT dtype %s, VAE dtype %s, %d CPU threads, %s, DiT forward: %s", config.model,
                f" (stored model {config.model_tag})" if config.model_tag else "", engine.device,
                engine.dtype, engine.vae.dtype, torch.get_num_threads(), engine.options, forward)
    if config.compile:
        engine.compile(config.compile)
    return engine


def fit_rows_to_free_memory(engine: BatchedStableAudio | BatchedStableAudio3, config: EngineConfig) -> None:
    """With ``STABLE_AUDIO_MAX_ROWS=auto`` on a GPU, caps the DiT rows per forward at what fits in its free memory;
    measured after a warm-up, so that the allocator's growth is already counted, over the eager forward."""
    if config.auto_max_rows and engine.device.type == "cuda":
        engine.options = replace(engine.options, max_rows=engine.rows_capacity())
        logger.info("at most %d DiT rows per forward fit in free GPU memory", engine.options.max_rows)


def load_sa3_engine(config: EngineConfig) -> BatchedStableAudio3:
    """A Stable Audio 3 model (``tiny-sa3``, ``tiny-sa3-base``, a diffusers-format folder or a hub id), or with
    ``dummy`` a published model's full-size architecture with random weights. ``STABLE_AUDIO_DECODE_MARGIN=full``
    decodes the whole clip at once, as the pipeline does (bit-identical); otherwise in windows (see SA3Options)."""
    if config.load_format == "dummy":
        try:
            pipe = sa3_loading.build_dummy_sa3_pipeline(config.model)
        except ValueError as exc:
            raise ModelLoadError(f"STABLE_AUDIO_LOAD_FORMAT=dummy: {exc}") from None
        logger.info("built full-size %s architecture with random weights (dummy load format)", config.model)
    elif config.load_format == "auto":
        source = config.weights or built_in_cache(lambda: sa3_loading.sa3_source(config.model))
        try:
            components = sa3_loading.chunked_autoencoder_components(source)
        except ValueError as exc:
            raise ModelLoadError(str(exc)) from None
        pipe = _from_pretrained(source, StableAudio3Pipeline, stored_as=config.model_tag, **components)
        try:
            sa3_loading.check_autoencoder_is_faithful(config.model, pipe.vae)
        except ValueError as exc:
            raise ModelLoadError(str(exc)) from None
    else:
        raise ModelLoadError(f"STABLE_AUDIO_LOAD_FORMAT={config.load_format!r}: use 'auto' or 'dummy'")
    placement = resolve_placement(config)
    pipe = sa3_loading.place_sa3_pipeline(pipe, placement.device, placement.dtype, placement.vae_dtype)
    options = SA3Options(config.sampling.max_rows, reference_conditioning=config.sa3_conditioning == "reference")
    if config.sampling.decode_margin_frames is None:
        options = replace(options, window_frames=None)
    return BatchedStableAudio3(pipe, sa3_loading.trained_max_seconds(config.model, pipe.vae), options)


def load_pipeline(config: EngineConfig) -> StableAudioPipeline:
    """The one entry point: pick the source from the configuration, then place components on the device."""
    if config.load_format == "dummy":
        logger.info("building full-size stable-audio-open architecture with random weights (dummy load format)")
        pipe = build_random_pipeline(FULL_SIZE)
    elif config.load_format != "auto":
        raise ModelLoadError(f"STABLE_AUDIO_LOAD_FORMAT={config.load_format!r}: use 'auto' or 'dummy'")
    elif config.weights:
        pipe = _from_pretrained(config.weights, stored_as=config.model_tag)
    elif config.model == TINY:
        pipe = _from_pretrained(built_in_cache(ensure_tiny_model))
    else:
        pipe = _from_pretrained(config.model)
    return place_pipeline(pipe, resolve_placement(config))


def _from_pretrained(source: str, pipeline_class: type = StableAudioPipeline, stored_as: str | None = None,
                     **components: Any) -> Any:
    """stored_as: the tag of the stored model whose folder ``source`` is. components: already loaded ones, which
    from_pretrained then does not read from ``source``."""
    is_folder = Path(source).is_dir()
    if not is_folder and not HUB_ID.fullmatch(source):  # a mistyped or unmounted path, not a download to retry
        raise ModelLoadError(f"there is no folder {source!r}, and it is not a hub id (owner/name). Point "
                             "STABLE_AUDIO_MODEL at a local diffusers-format folder, or use STABLE_AUDIO_MODEL=tiny "
                             "(or tiny-sa3) for a small random model.")
    try:
        token = None if is_folder else env_text(os.environ, "HF_TOKEN")  # empty: unset, as the hub library reads it
        return pipeline_class.from_pretrained(source, token=token, **components)
    except Exception as exc:  # diffusers raises OSError, ValueError or HTTP errors depending on what is missing
        hint = (
            f"{source!r} is not a complete diffusers-format {pipeline_class.__name__} folder"
            if is_folder
            else f"could not fetch {source!r} from the Hugging Face hub (gated: accept the license and set HF_TOKEN)"
        )
        reason, cause = str(exc), exc.__cause__
        if cause is not None:  # diffusers refers to a stack trace, which this one-line message replaces
            reason = reason.replace("Please check out the root cause in the stacktrace above.",
                                    f"The cause: {type(cause).__name__}: {cause}")
        example = "stabilityai/stable-audio-open-1.0" if is_folder else source  # a folder is no hub id to download
        remedy = (
            # Its files changed since the import (a disk error, a full disk while copying the store): the import
            # checks them before reusing an entry, so importing again writes a new one.
            f"Delete the stored model with `bentoml models delete {stored_as}` and import its source again with "
            "stable-audio-import-model" if stored_as else
            f"Point STABLE_AUDIO_MODEL at a local diffusers-format folder (e.g. one made with `hf download {example} "
            "--local-dir DIR`), or use STABLE_AUDIO_MODEL=tiny (or tiny-sa3) for a small random model."
        )
        raise ModelLoadError(f"{hint}: {reason}. {remedy}") from exc


def place_pipeline(pipe: StableAudioPipeline, placement: Placement) -> StableAudioPipeline:
    for name in ("text_encoder", "projection_model", "transformer"):
        getattr(pipe, name).to(placement.device, placement.dtype)
    pipe.vae.to(placement.device, placement.vae_dtype)
    for module in (pipe.text_encoder, pipe.projection_model, pipe.transformer, pipe.vae):
        module.eval().requires_grad_(False)
    return pipe
