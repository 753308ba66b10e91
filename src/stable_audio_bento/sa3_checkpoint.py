"""Stable Audio 3 checkpoints in Stability's own layout (``model_config.json`` + ``model.safetensors``, as the
hub repos hold them) read into diffusers' ``StableAudio3Pipeline``.

The key mapping follows diffusers' ``scripts/convert_stable_audio_3_to_diffusers.py`` (facts, not its code):

- DiT: ``model.model.*``; its inner transformer's ``project_in`` / ``project_out`` / ``memory_tokens`` /
  ``rotary_pos_emb`` / ``global_cond_embedder`` sit one level up in diffusers, ``transformer.layers.N`` is
  ``transformer_blocks.N``, and the SwiGLU ``ff.ff.0.proj`` / ``ff.ff.2`` are ``ff.proj_in`` / ``ff.proj_out``.
  The prompt's padding embedding lives on the conditioner there and on the DiT here.
- SAME autoencoder: ``pretransform.model.*``; encoder ``layers`` = [level 0 .. level D-1, transpose, linear],
  decoder ``layers`` = [transpose, linear, transpose, level 0 ..]; inside a level's transformer ``pre_norm`` is
  ``norm_attn``, ``self_attn`` is ``attn``, ``ff_norm`` is ``norm_ff``; the bottleneck's ``scaling_factor`` is
  ``scale``.
- Duration: ``conditioner.conditioners.seconds_total.embedder.embedding.1`` is the embedder's ``linear`` (index 0,
  the Fourier features, has no weights).
- Differential self-attention (DiT and SAME) fuses its projections as [q | k | v | q2 | k2]; diffusers as
  [q | q2 | k | k2 | v]. Cross-attention's ``to_q`` / ``to_kv`` already agree.

What the weights do not say comes from ``model_config.json``: the SAME's strides, level widths and attention, the
duration's range, and ``diffusion_objective`` (``rf_denoiser``: the distilled models' stochastic sampling;
``rectified_flow``: the base models' deterministic Euler; anything else is refused). The SAME's attention (see
``same_attention``): SAME-L's encoder and decoder configs give a ``sliding_window`` (diffusers' band attention);
SAME-S's give none, and ``chunk_size`` and ``chunk_midpoint_shift`` instead, which ``same_chunked`` reproduces and
records in the autoencoder's config (so in ``vae/config.json``).
SAME-S's decoder also has ``conv_mapping`` (a 3-tap output mapping, ``mapping.weight_v`` of shape (out, in, 3)
under the decoder block's key); like every other shape, its taps are read from the weight. The T5Gemma text
encoder and its tokenizer are not in these checkpoints: they are read from ``google/t5gemma-b-b-ul2`` (the hub) or
a local folder.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, NamedTuple

import torch
from diffusers import StableAudio3Pipeline
from diffusers.models.autoencoders.autoencoder_same import AutoencoderSAME
from diffusers.models.transformers.transformer_stable_audio3 import StableAudio3DiTModel
from diffusers.pipelines.stable_audio_3.modeling_stable_audio_3 import StableAudio3DurationEmbedder
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer, T5GemmaEncoderModel

from .env_values import env_text
from .sa3_loading import sa3_scheduler
from .same_chunked import use_chunked_attention

logger = logging.getLogger(__name__)

CONFIG_FILE = "model_config.json"
WEIGHTS_FILE = "model.safetensors"
TEXT_ENCODER_HUB_ID = "google/t5gemma-b-b-ul2"

DIT_PREFIX = "model.model."
SAME_PREFIX = "pretransform.model."
DURATION_PREFIX = "conditioner.conditioners.seconds_total.embedder.embedding.1."
PADDING_EMBEDDING = "conditioner.conditioners.prompt.padding_embedding"

# Inner-transformer tensors of the DiT that diffusers keeps at the model's top level.
_DIT_INNER_TOP = {"project_in.weight": "proj_in.weight", "project_out.weight": "proj_out.weight",
                  "memory_tokens": "memory_tokens", "rotary_pos_emb.inv_freq": "rotary_pos_emb.inv_freq"}
_SWIGLU = (("ff.ff.0.proj.", "ff.proj_in."), ("ff.ff.2.", "ff.proj_out."))
_SAME_BLOCK = (("pre_norm.", "norm_attn."), ("self_attn.", "attn."), ("ff_norm.", "norm_ff."), *_SWIGLU)


class CheckpointError(ValueError):
    """The checkpoint is not a complete Stable Audio 3 checkpoint in Stability's layout; the message says why."""


def is_stability_checkpoint(path: Path) -> bool:
    """A folder holding ``model_config.json`` and ``model.safetensors``, or the path of either file of that pair."""
    folder = path if path.is_dir() else path.parent
    return (folder / CONFIG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()


def checkpoint_files(path: Path) -> tuple[Path, Path]:
    folder = path if path.is_dir() else path.parent
    return folder / CONFIG_FILE, folder / WEIGHTS_FILE


def load_stability_checkpoint(path: Path, text_encoder: str = TEXT_ENCODER_HUB_ID) -> StableAudio3Pipeline:
    """The pipeline of a Stability-format checkpoint (fp32, on CPU), with the text encoder and tokenizer from
    ``text_encoder``: a hub id, a folder holding both, or a diffusers-format SA3 folder (its ``text_encoder/`` and
    ``tokenizer/``)."""
    config_path, weights_path = checkpoint_files(path)
    try:
        model_config, state = json.loads(config_path.read_text()), load_file(weights_path)
    except (OSError, ValueError, SafetensorError) as exc:
        raise CheckpointError(f"could not read {config_path.name} and {weights_path.name} in {config_path.parent}: "
                              f"{exc}") from exc
    return convert_checkpoint(model_config, state, text_encoder)


def convert_checkpoint(model_config: dict[str, Any], state: dict[str, torch.Tensor],
                       text_encoder: str = TEXT_ENCODER_HUB_ID) -> StableAudio3Pipeline:
    if not {f"{SAME_PREFIX}encoder.layers.0.new_tokens", f"{DIT_PREFIX}transformer.memory_tokens"} <= state.keys():
        raise CheckpointError("not a Stable Audio 3 checkpoint: it has no SAME autoencoder or no DiT memory tokens "
                              "(for stable-audio-open-1.0 import its hub id, which has the diffusers layout)")
    model = model_config.get("model", {})
    transformer = StableAudio3DiTModel(**dit_config(state))
    vae = same_autoencoder(state, model_config)
    stochastic = stochastic_sampling(model)
    duration = StableAudio3DurationEmbedder(**duration_config(state, model))
    used: set[str] = set()
    for module, convert in ((transformer, dit_state), (vae, same_state), (duration, duration_state)):
        expected = module.state_dict()
        converted = {name: key for name, key in convert(state, module.config).items() if name in expected}
        used.update(converted.values())
        fill(module, {name: reorder(name, module, state[key]) for name, key in converted.items()})
    ignored = sorted(set(state) - used)
    if ignored:
        logger.warning("%d checkpoint tensors are not part of the diffusers pipeline (e.g. %s)", len(ignored),
                       ignored[0])
    tokenizer, encoder = load_text_encoder(text_encoder)
    return StableAudio3Pipeline(vae=vae.eval(), text_encoder=encoder.eval(), tokenizer=tokenizer,
                                duration_embedder=duration.eval(), transformer=transformer.eval(),
                                scheduler=sa3_scheduler(stochastic))


SAMPLING_OF_OBJECTIVE = {"rf_denoiser": True, "rectified_flow": False}  # distilled: stochastic; base: Euler


def stochastic_sampling(model: dict[str, Any]) -> bool:
    """Whether the checkpoint samples stochastically, from its objective; any other objective (Stability's code
    defaults to ``v``, which no Stable Audio 3 model uses) would leave the sampler a guess."""
    objective = model.get("diffusion", {}).get("diffusion_objective")
    if objective not in SAMPLING_OF_OBJECTIVE:
        raise CheckpointError(f"model_config.json's model.diffusion.diffusion_objective is {objective!r}; a Stable "
                              f"Audio 3 checkpoint has one of {sorted(SAMPLING_OF_OBJECTIVE)}")
    return SAMPLING_OF_OBJECTIVE[objective]


# Each *_state function maps the diffusers module's tensor names to the checkpoint's keys.
def dit_state(state: dict[str, torch.Tensor], config: Any) -> dict[str, str]:
    names = {PADDING_EMBEDDING: "prompt_padding_embedding"}
    for key in state:
        if not key.startswith(DIT_PREFIX):
            continue
        local = key[len(DIT_PREFIX):]
        if local.startswith("transformer.layers."):
            index, rest = local[len("transformer.layers."):].split(".", 1)
            local = f"transformer_blocks.{index}.{_rename(rest, _SWIGLU)}"
        elif local.startswith("transformer."):
            inner = local[len("transformer."):]
            local = _DIT_INNER_TOP.get(inner, inner)  # global_cond_embedder.* keeps its name
        names[key] = local
    return {name: key for key, name in names.items() if key in state}


def same_state(state: dict[str, torch.Tensor], config: Any) -> dict[str, str]:
    levels = len(config.encoder_strides)
    places = {f"encoder.layers.{levels + 1}.": "encoder.proj.", "decoder.layers.1.": "decoder.proj.",
              **{f"encoder.layers.{level}.": f"encoder.blocks.{level}." for level in range(levels)},
              **{f"decoder.layers.{3 + level}.": f"decoder.blocks.{level}." for level in range(levels)}}
    names = {}
    for key in state:
        if not key.startswith(SAME_PREFIX):
            continue
        local = key[len(SAME_PREFIX):]
        if local.startswith("bottleneck."):
            names[key] = local.replace("bottleneck.scaling_factor", "bottleneck.scale")
            continue
        match = re.match(r"(?:en|de)coder\.layers\.\d+\.", local)
        if match and match.group(0) in places:
            rest = local[match.end():]
            block = re.match(r"transformers\.\d+\.", rest)
            if block:
                rest = block.group(0) + _rename(rest[block.end():], _SAME_BLOCK)
            names[key] = places[match.group(0)] + rest
    return {name: key for key, name in names.items()}


def duration_state(state: dict[str, torch.Tensor], config: Any) -> dict[str, str]:
    return {f"linear.{part}": DURATION_PREFIX + part for part in ("weight", "bias") if DURATION_PREFIX + part in state}


def _rename(local: str, renames: tuple[tuple[str, str], ...]) -> str:
    for old, new in renames:
        if local.startswith(old):
            return new + local[len(old):]
    return local


def reorder(name: str, module: torch.nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """Differential self-attention's fused projection, from [q | k | v | q2 | k2] to [q | q2 | k | k2 | v]."""
    if not (name.endswith("attn.to_qkv.weight") and module.config.use_differential_attention):
        return tensor
    q, k, v, q2, k2 = tensor.chunk(5, dim=0)
    return torch.cat([q, q2, k, k2, v])


def fill(module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Loads every parameter; buffers the checkpoint lacks keep the values their module computes (frequencies)."""
    expected = module.state_dict()
    missing = sorted({name for name, _ in module.named_parameters()} - set(tensors))
    if missing:
        raise CheckpointError(f"{type(module).__name__}: the checkpoint lacks {len(missing)} of its tensors, "
                              f"e.g. {missing[:3]}")
    wrong = [name for name, tensor in tensors.items() if tensor.shape != expected[name].shape]
    if wrong:
        raise CheckpointError(f"{type(module).__name__}: {wrong[0]} has shape {tuple(tensors[wrong[0]].shape)}, "
                              f"the configuration gives {tuple(expected[wrong[0]].shape)}")
    module.load_state_dict(tensors, strict=False)


# What the configurations are: the shapes where they tell, model_config.json where they cannot.
def dit_config(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    def shape(name: str) -> torch.Size:
        return _require(state, DIT_PREFIX + name).shape

    embed_dim, timestep_features_dim = shape("to_timestep_embed.0.weight")
    depth = len({key.split(".")[4] for key in state if key.startswith(f"{DIT_PREFIX}transformer.layers.")})
    head_dim = shape("transformer.layers.0.self_attn.q_norm.gamma")[0]
    return dict(
        io_channels=shape("preprocess_conv.weight")[0], embed_dim=embed_dim, depth=depth,
        num_heads=embed_dim // head_dim, cond_token_dim=shape("to_cond_embed.0.weight")[1],
        global_cond_dim=shape("to_global_embed.0.weight")[1],
        local_add_cond_dim=shape("transformer.layers.0.to_local_embed.0.weight")[1],
        timestep_features_dim=timestep_features_dim,
        ff_mult=shape("transformer.layers.0.ff.ff.0.proj.weight")[0] / (2 * embed_dim),
        num_memory_tokens=shape("transformer.memory_tokens")[0],
        use_differential_attention=shape("transformer.layers.0.self_attn.to_qkv.weight")[0] == 5 * embed_dim,
    )


class SameAttention(NamedTuple):
    """How a SAME's resampling blocks attend, in the terms of Stability's ``TransformerResamplingBlock``: through a
    sliding window of ``sliding_window`` latent frames each side (SAME-L), or, with none, within chunks of
    ``chunk_size`` block-input frames, the second half of the layers on chunks shifted by half if
    ``chunk_midpoint_shift`` (SAME-S)."""

    sliding_window: int | None
    chunk_size: int | None
    chunk_midpoint_shift: bool


def same_attention(autoencoder: dict[str, Any]) -> SameAttention:
    """The attention of the encoder and of the decoder, which must agree (one setting serves both here)."""
    encoder, decoder = (_block_attention(_field(autoencoder, side, "config"), side) for side in ("encoder", "decoder"))
    if encoder != decoder:
        raise CheckpointError(f"{CONFIG_FILE}: the SAME's encoder attends with {encoder} and its decoder with "
                              f"{decoder}; this service runs both with one setting")
    return encoder


def _block_attention(config: dict[str, Any], side: str) -> SameAttention:
    window = config.get("sliding_window")
    if window is not None:
        return SameAttention(window[0], None, False)  # per side; the models' windows are symmetric
    if "chunk_size" not in config:
        # Stability's block would chunk by its default of 128 frames, while its latent-length alignment
        # (model.py) assumes 32 when the config is silent: the attention the model was trained with is unknown.
        raise CheckpointError(
            f"{CONFIG_FILE}: the SAME {side} config has neither sliding_window nor chunk_size, so how its "
            "attention was trained cannot be told (Stability's code itself assumes 128 in one place and 32 in "
            "another); SAME-S (the small models) records chunk_size 32 and chunk_midpoint_shift true: add the "
            "model's values to model.pretransform.config.encoder.config and .decoder.config")
    return SameAttention(None, int(config["chunk_size"]), bool(config.get("chunk_midpoint_shift", False)))


def same_autoencoder(state: dict[str, torch.Tensor], model_config: dict[str, Any]) -> AutoencoderSAME:
    """The SAME with the configuration's attention; SAME-S's chunked attention with as many decoder mapping taps as
    its weight has. Its weights are loaded afterwards."""
    attention = same_attention(_field(model_config, "model", "pretransform", "config"))
    if attention.chunk_size is None:
        return AutoencoderSAME(**same_config(state, model_config), sliding_window=attention.sliding_window)
    vae = AutoencoderSAME(**same_config(state, model_config))
    taps = _require(state, f"{SAME_PREFIX}decoder.layers.3.mapping.weight_v").shape[-1]
    try:
        return use_chunked_attention(vae, attention.chunk_size, attention.chunk_midpoint_shift,
                                     decoder_mapping_kernel=taps)
    except ValueError as exc:  # a chunk that is not a whole number of the blocks' strides
        raise CheckpointError(f"{CONFIG_FILE}: {exc}") from None


def same_config(state: dict[str, torch.Tensor], model_config: dict[str, Any]) -> dict[str, Any]:
    """AutoencoderSAME's arguments but its attention (``same_attention``)."""
    autoencoder = _field(model_config, "model", "pretransform", "config")
    encoder = _field(autoencoder, "encoder", "config")
    decoder = _field(autoencoder, "decoder", "config")
    strides = list(_field(encoder, "strides"))
    width = _require(state, f"{SAME_PREFIX}encoder.layers.0.new_tokens").shape[-1]
    layer = f"{SAME_PREFIX}encoder.layers.0.transformers.0."
    return dict(
        audio_channels=autoencoder.get("io_channels", 2),
        patch_size=_field(autoencoder, "downsampling_ratio") // math.prod(strides),
        encoder_channels=_field(encoder, "channels"), encoder_c_mults=list(_field(encoder, "c_mults")),
        encoder_strides=strides, encoder_transformer_depths=list(_field(encoder, "transformer_depths")),
        latent_dim=_require(state, f"{SAME_PREFIX}encoder.layers.{len(strides) + 1}.weight").shape[0],
        use_differential_attention=_require(state, layer + "self_attn.to_qkv.weight").shape[0] == 5 * width,
        dim_heads=_require(state, layer + "self_attn.q_norm.gamma").shape[0],
        ff_mult=_require(state, layer + "ff.ff.0.proj.weight").shape[0] // (2 * width),
        encoder_sinusoidal_blocks=list(encoder.get("sinusoidal_blocks", [0] * len(strides))),
        decoder_sinusoidal_blocks=list(decoder.get("sinusoidal_blocks", [0] * len(strides))),
        sampling_rate=model_config.get("sample_rate", 44100),
    )


def duration_config(state: dict[str, torch.Tensor], model: dict[str, Any]) -> dict[str, Any]:
    output_dim, fourier_dim = _require(state, DURATION_PREFIX + "weight").shape
    configs = model.get("conditioning", {}).get("configs", [])
    seconds = next((item.get("config", {}) for item in configs if item.get("id") == "seconds_total"), {})
    return dict(output_dim=output_dim, fourier_dim=fourier_dim, min_val=float(seconds.get("min_val", 0.0)),
                max_val=float(seconds.get("max_val", 384.0)))


def _require(state: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state:
        raise CheckpointError(f"the checkpoint has no tensor {key!r}")
    return state[key]


def _field(config: dict[str, Any], *path: str) -> Any:
    for depth, name in enumerate(path):
        if not isinstance(config, dict) or name not in config:
            raise CheckpointError(f"{CONFIG_FILE} has no {'.'.join(path[:depth + 1])}")
        config = config[name]
    return config


def load_text_encoder(source: str) -> tuple[Any, T5GemmaEncoderModel]:
    """T5Gemma's encoder and tokenizer from a hub id (with HF_TOKEN: Gemma's terms are gated), a folder holding
    both, or a diffusers-format SA3 folder."""
    folder = Path(source)
    parts = ("tokenizer", "text_encoder") if (folder / "text_encoder").is_dir() else ("", "")
    token = None if folder.is_dir() else env_text(os.environ, "HF_TOKEN")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, subfolder=parts[0], token=token)
        config = AutoConfig.from_pretrained(source, subfolder=parts[1], token=token)
        config.is_encoder_decoder = False  # the encoder-only model refuses the encoder-decoder's config
        encoder = T5GemmaEncoderModel.from_pretrained(source, subfolder=parts[1], config=config, token=token)
    except Exception as exc:  # transformers raises OSError, ValueError or HTTP errors depending on what is missing
        raise CheckpointError(
            f"could not load the T5Gemma text encoder from {source!r}: {exc}. Pass --text-encoder with a local "
            f"folder (e.g. `hf download {TEXT_ENCODER_HUB_ID} --local-dir DIR`), or set HF_TOKEN after "
            "accepting Gemma's terms on the hub") from exc
    return tokenizer, encoder.float()
