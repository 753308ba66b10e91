"""A tiny random Stable Audio 3 pipeline, built offline and saved like any diffusers folder, for tests and CPU
serving; the published models' full-size architectures with random weights (``STABLE_AUDIO_LOAD_FORMAT=dummy``);
and what is known about the published Stable Audio 3 models that their folders do not say.

The tiny model keeps the real time geometry (44.1 kHz stereo, 4096 samples per latent frame, 256 latent
channels), so any request valid for a real SA3 model has the same latent length and output length here.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableAudio3Pipeline
from diffusers.models.autoencoders.autoencoder_same import AutoencoderSAME
from diffusers.models.transformers.transformer_stable_audio3 import StableAudio3DiTModel
from diffusers.pipelines.stable_audio_3.modeling_stable_audio_3 import StableAudio3DurationEmbedder
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import GemmaTokenizer, T5GemmaConfig, T5GemmaEncoderModel

from .model_cache import cache_root, save_once
from .same_chunked import (CHUNK_SETTINGS, SAME_S_DECODER_MAPPING_KERNEL, use_chunked_attention,
                           uses_chunked_attention)

TINY_SA3 = "tiny-sa3"  # the distilled kind: stochastic "ping-pong" sampling, 8 steps, no guidance
TINY_SA3_BASE = "tiny-sa3-base"  # the same weights with the base models' deterministic Euler sampling
TINY_SA3_FORMAT_VERSION = 2  # 2: the encoder follows its upload (let_autoencoder_hear_its_input)

# The longest audio each published model was trained for; the diffusers folders do not record it (the duration
# embedder only says where it clamps: 384 s).
KNOWN_MAX_SECONDS = {
    "stabilityai/stable-audio-3-medium": 380.0,
    "stabilityai/stable-audio-3-medium-base": 380.0,
    "stabilityai/stable-audio-3-small-music": 120.0,
    "stabilityai/stable-audio-3-small-music-base": 120.0,
    "stabilityai/stable-audio-3-small-sfx": 120.0,
    "stabilityai/stable-audio-3-small-sfx-base": 120.0,
}
TINY_MAX_SECONDS = 120.0  # the tiny model is for CPUs, like the small models

_TEXT_WIDTH = 32  # T5Gemma hidden size = the DiT's cond_token_dim = the duration embedding's width
_TINY_TEXT_ENCODER = dict(
    vocab_size=384, hidden_size=_TEXT_WIDTH, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
    num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, layer_types=["full_attention"],
    max_position_embeddings=512,
)
_TINY_VAE = dict(encoder_channels=8, encoder_transformer_depths=(1,), dim_heads=8, ff_mult=1)  # hop 256 × 16
_TINY_DIT = dict(embed_dim=64, depth=2, num_heads=4, cond_token_dim=_TEXT_WIDTH, global_cond_dim=_TEXT_WIDTH,
                 timestep_features_dim=16, num_memory_tokens=4)
_TINY_DURATION = dict(output_dim=_TEXT_WIDTH, fourier_dim=16, max_val=TINY_MAX_SECONDS)


def build_offline_gemma_tokenizer() -> GemmaTokenizer:
    """A character-level Gemma tokenizer (BPE without merges, byte fallback for anything else), built without any
    download. Special tokens sit at Gemma's ids (pad 0, eos 1, bos 2), which the T5Gemma config expects."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    byte_tokens = [f"<0x{value:02X}>" for value in range(256)]  # byte fallback needs all 256
    characters = ["▁", *string.ascii_letters, *string.digits, *string.punctuation]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(specials + byte_tokens + characters))}
    return GemmaTokenizer(vocab=vocab, merges=[], model_max_length=256)


@dataclass(frozen=True)
class SA3Architecture:
    """Constructor arguments of every component of a Stable Audio 3 model."""

    text_encoder: dict[str, Any]  # one T5Gemma module's config (the encoder's)
    vae: dict[str, Any]
    transformer: dict[str, Any]
    duration: dict[str, Any]


TINY_ARCHITECTURE = SA3Architecture(_TINY_TEXT_ENCODER, _TINY_VAE, _TINY_DIT, _TINY_DURATION)

# The published sizes. T5Gemma-b (google/t5gemma-b-b-ul2), as Stability's MLX port of it records it: 12 layers of
# width 768, 12 heads of 64, GeGLU 2048, Gemma's 256 000-token vocabulary (197 M of the encoder's 282 M parameters
# are its embedding). Its query scaling is the head width; the rest (attention softcap 50, a 4096-token sliding window
# on alternate layers, longer than any prompt) are transformers' T5Gemma defaults, not checked against the hub's
# config, which is gated.
_T5GEMMA_B = dict(
    vocab_size=256000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
    num_key_value_heads=12, head_dim=64, query_pre_attn_scalar=64,
)
# SAME-S (108 M) and SAME-L (852 M), as diffusers' AutoencoderSAME documents them: SAME-S is its default; SAME-L is
# twice as wide and deep, with sinusoidal gating in the decoder's last 8 layers.
_SAME_S: dict[str, Any] = {}
_SAME_L = dict(encoder_channels=256, encoder_transformer_depths=(12,), decoder_sinusoidal_blocks=(8,))
# The medium DiT (1.39 B, 1.45 B with the per-block inpainting projections) is diffusers' default
# StableAudio3DiTModel: width 1536, 24 blocks of 24 heads, differential attention. The small one (433 M / 459 M):
# width 1024, 20 blocks of 16 heads, plain attention, as Stability's MLX port and LoRA maps of sa3-sm-music give it.
_MEDIUM_DIT: dict[str, Any] = {}
_SMALL_DIT = dict(embed_dim=1024, depth=20, num_heads=16, use_differential_attention=False)
_DURATION = dict(output_dim=768, fourier_dim=256)  # the duration embedder's default: clamps at 384 s

MEDIUM_ARCHITECTURE = SA3Architecture(_T5GEMMA_B, _SAME_L, _MEDIUM_DIT, _DURATION)
SMALL_ARCHITECTURE = SA3Architecture(_T5GEMMA_B, _SAME_S, _SMALL_DIT, _DURATION)


def published_architecture(model: str) -> SA3Architecture:
    """The full-size architecture of a published model, by its hub id or a folder named after it."""
    name = Path(model).name
    if max_seconds_for(model) is None:
        raise ValueError(f"{model!r} is not a published Stable Audio 3 model: no full-size architecture known "
                         f"(use one of {', '.join(KNOWN_MAX_SECONDS)})")
    return MEDIUM_ARCHITECTURE if "-medium" in name else SMALL_ARCHITECTURE


def build_dummy_sa3_pipeline(model: str, seed: int = 0) -> StableAudio3Pipeline:
    """A published model's full-size architecture with random weights, for benchmarks without a download: the
    distilled models sample stochastically, the ``-base`` ones with deterministic Euler."""
    architecture = published_architecture(model)
    pipe = build_sa3_pipeline(architecture, not Path(model).name.endswith("-base"), seed)
    if architecture is SMALL_ARCHITECTURE:  # SAME-S as Stability runs it (README, "Departures from diffusers")
        use_chunked_attention(pipe.vae, decoder_mapping_kernel=SAME_S_DECODER_MAPPING_KERNEL)
    return pipe


def build_tiny_sa3_pipeline(stochastic_sampling: bool = True, seed: int = 0) -> StableAudio3Pipeline:
    """Every component with the real classes and random weights (deterministic for a given seed), the weights that
    start at zero made random too, and an autoencoder that follows its input (see below)."""
    pipe = build_sa3_pipeline(TINY_ARCHITECTURE, stochastic_sampling, seed)
    randomize_zero_initialised(pipe.transformer, gain=0.5)
    randomize_zero_initialised(pipe.vae, gain=2.0)
    let_autoencoder_hear_its_input(pipe.vae)
    return pipe


def build_sa3_pipeline(architecture: SA3Architecture, stochastic_sampling: bool, seed: int) -> StableAudio3Pipeline:
    """Every component with the real classes and freshly initialised weights (deterministic for a given seed)."""
    torch.manual_seed(seed)
    tokenizer = build_offline_gemma_tokenizer()
    text = architecture.text_encoder
    if len(tokenizer) > text["vocab_size"]:
        raise ValueError(f"the offline tokenizer's {len(tokenizer)} tokens do not fit {text['vocab_size']} embeddings")
    text_encoder = T5GemmaEncoderModel(T5GemmaConfig(
        encoder=text, decoder=text, vocab_size=text["vocab_size"],
        is_encoder_decoder=False,  # the encoder-only model refuses a config that says otherwise
    ))
    return StableAudio3Pipeline(
        vae=AutoencoderSAME(**architecture.vae),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        duration_embedder=StableAudio3DurationEmbedder(**architecture.duration),
        transformer=StableAudio3DiTModel(**architecture.transformer),
        scheduler=sa3_scheduler(stochastic_sampling),
    )


def sa3_scheduler(stochastic_sampling: bool) -> FlowMatchEulerDiscreteScheduler:
    # As diffusers' converter configures the real models: timesteps equal sigmas in [0, 1], no shift.
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1, shift=1.0, stochastic_sampling=stochastic_sampling)


@torch.no_grad()
def randomize_zero_initialised(module: torch.nn.Module, gain: float) -> None:
    """Gives random values to the weights that start at zero (the DiT's residual convs and padding embedding, the
    SAME's attention and feed-forward outputs): a trained model has them non-zero, and with zeros the tests
    would not exercise those paths at all."""
    for name, parameter in module.named_parameters():
        if parameter.count_nonzero() or (parameter.dim() < 2 and not name.endswith("padding_embedding")):
            continue
        fan_in = parameter[0].numel() if parameter.dim() >= 2 else 1
        parameter.normal_(std=gain * fan_in**-0.5)


@torch.no_grad()
def let_autoencoder_hear_its_input(vae: AutoencoderSAME) -> None:
    """A freshly initialised SAME autoencoder hardly depends on its input: its output tokens start at 1e-5, so both
    halves of their differential attention are uniform and cancel, and the decoder's audio is its channel mapping's
    bias (two independent latents decode ~100 dB apart), the encoder's latents nearly one constant (two different
    uploads encode 82 dB apart). Larger output tokens (and no decoder bias) make the tiny model's audio follow its
    latents (~12 dB apart, nothing clipped) and its latents follow the upload (~12 dB apart), so the exactness
    tests see any difference in them. The decoder's first, so that its draws stay those of format version 1."""
    for name, parameter in vae.decoder.named_parameters():
        if name.endswith("new_tokens"):
            parameter.normal_(std=0.3)
        elif "mapping" in name and name.endswith("bias"):
            parameter.zero_()
    for block in vae.encoder.blocks:
        block.new_tokens.normal_(std=0.3)


def tiny_sa3_model_dir(variant: str = TINY_SA3) -> Path:
    """Next to the tiny stable-audio-open model: ``$STABLE_AUDIO_CACHE/<variant>-v<format>``."""
    return cache_root() / f"{variant}-v{TINY_SA3_FORMAT_VERSION}"


def ensure_tiny_sa3_model(directory: Path | None = None, variant: str = TINY_SA3) -> Path:
    """Build and save the tiny model once; later loads read it back like any diffusers folder. Both variants have
    the same weights; only the scheduler's ``stochastic_sampling`` differs."""
    if variant not in (TINY_SA3, TINY_SA3_BASE):
        raise ValueError(f"unknown tiny Stable Audio 3 variant {variant!r}")
    return save_once(directory or tiny_sa3_model_dir(variant),
                     lambda: build_tiny_sa3_pipeline(stochastic_sampling=variant == TINY_SA3))


def load_tiny_sa3(directory: Path | None = None, variant: str = TINY_SA3) -> StableAudio3Pipeline:
    """The tiny model read back through ``from_pretrained``, on CPU in fp32."""
    pipe = StableAudio3Pipeline.from_pretrained(ensure_tiny_sa3_model(directory, variant))
    return place_sa3_pipeline(pipe, torch.device("cpu"), torch.float32, torch.float32)


# For the engine's loader: which models are Stable Audio 3, where to read them from, how to place them.
def is_sa3_model(model: str) -> bool:
    """Whether STABLE_AUDIO_MODEL names a Stable Audio 3 model: a tiny variant, a folder whose model_index.json
    names StableAudio3Pipeline, or a hub id of the family."""
    if model in (TINY_SA3, TINY_SA3_BASE):
        return True
    index = Path(model) / "model_index.json"
    if index.is_file():
        return json.loads(index.read_text()).get("_class_name") == StableAudio3Pipeline.__name__
    return "stable-audio-3" in model.lower()


def sa3_source(model: str) -> str:
    """What to hand ``StableAudio3Pipeline.from_pretrained``: the tiny variants' folders (built on first use), else
    the folder or hub id as given."""
    return str(ensure_tiny_sa3_model(variant=model)) if model in (TINY_SA3, TINY_SA3_BASE) else model


def chunked_autoencoder_components(source: str) -> dict[str, AutoencoderSAME]:
    """``{"vae": ...}`` for ``from_pretrained`` when ``source`` is a folder whose vae/config.json records
    ``chunk_size`` (and ``chunk_midpoint_shift``), as a chunked autoencoder's ``save_pretrained`` writes it (the
    importer's output, for one): the autoencoder built from the rest of its config, switched to chunked attention
    with the decoder mapping's taps read from its weights, then loaded strictly. Else ``{}``: diffusers' own
    AutoencoderSAME, which has no such settings."""
    folder = Path(source) / "vae"
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    if "chunk_size" not in config:
        return {}
    weights_file = folder / "diffusion_pytorch_model.safetensors"
    try:  # diffusers' loader, which would say what is wrong, never sees this folder's autoencoder
        weights = load_file(weights_file)
        vae = AutoencoderSAME.from_config({key: value for key, value in config.items() if key not in CHUNK_SETTINGS})
        use_chunked_attention(vae, int(config["chunk_size"]), bool(config.get("chunk_midpoint_shift", False)),
                              decoder_mapping_kernel=weights["decoder.blocks.0.mapping.weight_v"].shape[-1])
        vae.load_state_dict(weights, strict=True)
    except (OSError, SafetensorError, KeyError, RuntimeError, ValueError) as exc:
        raise ValueError(f"{folder}: config.json records chunk_size (a chunked SAME autoencoder), but "
                         f"{weights_file.name} does not load as one: {type(exc).__name__}: {exc}") from exc
    return {"vae": vae}


def check_autoencoder_is_faithful(model: str, vae: AutoencoderSAME) -> None:
    """A small model (by its published name, or a SAME-S-shaped autoencoder: width 128 × 6, 6 layers) is served
    only with the chunked attention and the 3-tap decoder mapping SAME-S was trained with; diffusers' band attention
    decodes something else, and a 1-tap mapping cannot hold SAME-S's weights."""
    same_s_shaped = autoencoder_size(vae) == "S"
    published_small = max_seconds_for(model) is not None and "-small-" in Path(model).name
    if (same_s_shaped or published_small) and not (uses_chunked_attention(vae) and has_same_s_decoder_mapping(vae)):
        raise ValueError(
            f"{model!r}: its autoencoder is SAME-S, which Stability's code runs with chunked attention (chunks of "
            "32 frames, the second half of the layers on chunks shifted by half) and a 3-tap decoder mapping; "
            "diffusers' AutoencoderSAME gives it band attention, so the audio would not be the model's. Import "
            "Stability's checkpoint with stable-audio-import-model (it keeps both), or record chunk_size (32) and "
            "chunk_midpoint_shift (true) in vae/config.json and keep the decoder mapping's 3-tap weights (README, "
            "'Departures from diffusers')")


def has_same_s_decoder_mapping(vae: AutoencoderSAME) -> bool:
    """Whether the decoder maps its tokens to audio patches with SAME-S's 3 taps (diffusers' blocks have 1)."""
    mappings = [block.mapping for block in vae.decoder.blocks if isinstance(block.mapping, torch.nn.Conv1d)]
    return all(mapping.kernel_size[0] == SAME_S_DECODER_MAPPING_KERNEL for mapping in mappings)


def place_sa3_pipeline(pipe: StableAudio3Pipeline, device: torch.device, dtype: torch.dtype,
                       vae_dtype: torch.dtype) -> StableAudio3Pipeline:
    """The duration embedder goes with the DiT's dtype: its output feeds the DiT's projections directly."""
    for module, wanted in ((pipe.text_encoder, dtype), (pipe.duration_embedder, dtype), (pipe.transformer, dtype),
                           (pipe.vae, vae_dtype)):
        place_keeping_frequencies(module, device, wanted)
    for module in (pipe.text_encoder, pipe.duration_embedder, pipe.transformer, pipe.vae):
        module.eval().requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


FREQUENCY_BUFFERS = ("inv_freq", "freqs")  # the rotary embeddings' and the duration embedder's Fourier frequencies


def place_keeping_frequencies(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """``module.to(device, dtype)``, but its Fourier and rotary frequency buffers keep their fp32 values. ``to``
    would round them to a half dtype, and casting back to fp32 afterwards cannot undo that: with fp16 (CUDA's
    default) the rotary angles of a 380 s clip's last frames come out 0.66 rad off and the duration's Fourier
    features up to 19 rad off (bf16: the tiny model's duration embedding 3 dB from fp32). A half-precision
    ``inv_freq`` would also count positions in that dtype (``arange(length, dtype=inv_freq.dtype)``: 257 becomes
    256 in bf16). Every use of these buffers computes in fp32 and casts back, whereas another buffer (the SAME's
    running std) would turn its layer's output into fp32, so only these stay."""
    frequencies = [(owner, name, buffer.float()) for owner in module.modules() for name in FREQUENCY_BUFFERS
                   if (buffer := owner._buffers.get(name)) is not None]
    if (module.device, module.dtype) != (device, dtype):  # diffusers warns on every cast, even to fp32
        module.to(device, dtype)
    for owner, name, buffer in frequencies:
        setattr(owner, name, buffer.to(device))


def max_seconds_for(model: str) -> float | None:
    """The trained maximum of a published model by its hub id (or a folder named after it); None if unknown."""
    return KNOWN_MAX_SECONDS.get(model) or KNOWN_MAX_SECONDS.get(f"stabilityai/{Path(model).name}")


def autoencoder_size(vae: AutoencoderSAME) -> str | None:
    """``S`` or ``L`` when the autoencoder has SAME-S's or SAME-L's shape (width and encoder depth), else None."""
    shape = (vae.config.encoder_channels, tuple(vae.config.encoder_transformer_depths))
    return {(128, (6,)): "S", (_SAME_L["encoder_channels"], _SAME_L["encoder_transformer_depths"]): "L"}.get(shape)


def trained_max_seconds(model: str, vae: AutoencoderSAME) -> float | None:
    """The trained maximum by the model's name, else by its autoencoder: every published model with SAME-S (the
    small ones) was trained to 120 s, with SAME-L (medium) to 380 s; so a checkpoint imported from a folder of any
    name is served to its own length, not to the duration embedder's 384 s clamp. None for other shapes."""
    by_size = {"S": KNOWN_MAX_SECONDS["stabilityai/stable-audio-3-small-music"],
               "L": KNOWN_MAX_SECONDS["stabilityai/stable-audio-3-medium"]}
    return max_seconds_for(model) or by_size.get(autoencoder_size(vae))
