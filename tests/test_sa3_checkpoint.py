"""Stable Audio 3 checkpoints in Stability's layout: a round trip through the tiny model written in that layout
(the inverse mapping below is written independently of sa3_checkpoint's, from the same documented key names)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import StableAudio3Pipeline
from diffusers.models.autoencoders.autoencoder_same import AutoencoderSAME
from safetensors.torch import save_file

from stable_audio_bento.config import EngineConfig
from stable_audio_bento.generation import AudioRequest
from stable_audio_bento.loading import load_sa3_engine
from stable_audio_bento.model_import import identify_source, main
from stable_audio_bento.pipeline import SamplingOptions
from stable_audio_bento.sa3_checkpoint import CheckpointError, convert_checkpoint, load_stability_checkpoint
from stable_audio_bento.sa3_loading import (TINY_ARCHITECTURE, ensure_tiny_sa3_model, let_autoencoder_hear_its_input,
                                            load_tiny_sa3, place_sa3_pipeline, randomize_zero_initialised)
from stable_audio_bento.same_chunked import use_chunked_attention, uses_chunked_attention
from stable_audio_bento.step_loop import run_to_completion

REPO = Path(__file__).resolve().parents[1]
COMPONENTS = ("transformer", "vae", "duration_embedder", "text_encoder")


def stability_qkv(fused: torch.Tensor) -> torch.Tensor:
    """diffusers' [q | q2 | k | k2 | v] back to Stability's [q | k | v | q2 | k2]."""
    q, q2, k, k2, v = fused.chunk(5)
    return torch.cat([q, k, v, q2, k2])


def stability_dit_key(name: str) -> str:
    if name == "prompt_padding_embedding":
        return "conditioner.conditioners.prompt.padding_embedding"
    block = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", name)
    if block:
        local = block.group(2).replace("ff.proj_in.", "ff.ff.0.proj.").replace("ff.proj_out.", "ff.ff.2.")
        return f"model.model.transformer.layers.{block.group(1)}.{local}"
    inner = {"proj_in.weight": "project_in.weight", "proj_out.weight": "project_out.weight"}
    if name in inner or name.split(".")[0] in ("memory_tokens", "rotary_pos_emb", "global_cond_embedder"):
        return "model.model.transformer." + inner.get(name, name)
    return "model.model." + name


def stability_same_key(name: str, levels: int) -> str:
    if name.startswith("bottleneck."):
        return "pretransform.model." + name.replace("bottleneck.scale", "bottleneck.scaling_factor")
    if name.startswith("encoder.proj."):
        return f"pretransform.model.encoder.layers.{levels + 1}." + name[len("encoder.proj."):]
    if name.startswith("decoder.proj."):
        return "pretransform.model.decoder.layers.1." + name[len("decoder.proj."):]
    side, level, local = re.fullmatch(r"(encoder|decoder)\.blocks\.(\d+)\.(.+)", name).groups()
    for ours, theirs in ((".norm_attn.", ".pre_norm."), (".attn.", ".self_attn."), (".norm_ff.", ".ff_norm."),
                         (".ff.proj_in.", ".ff.ff.0.proj."), (".ff.proj_out.", ".ff.ff.2.")):
        local = local.replace(ours, theirs)
    index = int(level) + (3 if side == "decoder" else 0)
    return f"pretransform.model.{side}.layers.{index}.{local}"


def write_stability_checkpoint(pipe: StableAudio3Pipeline, folder: Path) -> tuple[dict, dict]:
    """The DiT, SAME and duration embedder as Stability's checkpoint holds them, and its model_config.json."""
    state = {}
    for name, tensor in pipe.transformer.state_dict().items():
        state[stability_dit_key(name)] = stability_qkv(tensor) if name.endswith("self_attn.to_qkv.weight") else tensor
    vae = pipe.vae.config
    for name, tensor in pipe.vae.state_dict().items():
        key = stability_same_key(name, len(vae.encoder_strides))
        state[key] = stability_qkv(tensor) if name.endswith("attn.to_qkv.weight") else tensor
    prefix = "conditioner.conditioners.seconds_total.embedder.embedding.1."
    linear = pipe.duration_embedder.linear
    state.update({prefix + "weight": linear.weight, prefix + "bias": linear.bias})
    encoder = dict(channels=vae.encoder_channels, c_mults=list(vae.encoder_c_mults), strides=list(vae.encoder_strides),
                   transformer_depths=list(vae.encoder_transformer_depths), latent_dim=vae.latent_dim,
                   dim_heads=vae.dim_heads, sinusoidal_blocks=list(vae.encoder_sinusoidal_blocks))
    decoder = dict(encoder, sinusoidal_blocks=list(vae.decoder_sinusoidal_blocks))
    if uses_chunked_attention(pipe.vae):  # SAME-S: no sliding window; chunks, and conv_mapping in the decoder
        block = pipe.vae.decoder.blocks[0]
        chunks = dict(chunk_size=block.chunk_size, chunk_midpoint_shift=block.midpoint_shift)
        encoder.update(chunks)
        decoder.update(chunks, conv_mapping=block.mapping.weight_v.shape[-1] == 3)
    else:
        encoder["sliding_window"] = decoder["sliding_window"] = [vae.sliding_window] * 2
    duration = pipe.duration_embedder.config
    config = {"sample_rate": 44100, "model_type": "diffusion_cond", "model": {
        "pretransform": {"type": "autoencoder", "config": {
            "io_channels": vae.audio_channels, "downsampling_ratio": pipe.vae.downsampling_ratio,
            "encoder": {"config": encoder}, "decoder": {"config": decoder}}},
        "conditioning": {"configs": [{"id": "prompt", "type": "t5gemma"}, {"id": "seconds_total", "type": "number",
                                     "config": {"min_val": duration.min_val, "max_val": duration.max_val}}]},
        "diffusion": {"type": "dit", "diffusion_objective": "rf_denoiser" if pipe.scheduler.config.stochastic_sampling
                      else "rectified_flow"}}}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_config.json").write_text(json.dumps(config))
    save_file({key: tensor.contiguous() for key, tensor in state.items()}, folder / "model.safetensors")
    return config, state


@pytest.fixture(scope="module")
def original(model_cache):
    return load_tiny_sa3()


@pytest.fixture(scope="module")
def checkpoint(original, tmp_path_factory):
    folder = tmp_path_factory.mktemp("stability-checkpoint")
    config, state = write_stability_checkpoint(original, folder)
    return folder, config, state


def settings(component) -> dict:
    """A component's configuration without where it was read from."""
    return {key: value for key, value in component.config.items() if not key.startswith("_")}


def generate(pipe: StableAudio3Pipeline, seed: int) -> torch.Tensor:
    return pipe("a dog barking in the rain", duration=1.5, num_inference_steps=3,
                generator=torch.Generator().manual_seed(seed)).audios[0]


def test_the_written_checkpoint_uses_stabilitys_documented_names(checkpoint):
    _, _, state = checkpoint
    for key in ("model.model.transformer.layers.1.self_attn.to_qkv.weight", "model.model.transformer.memory_tokens",
                "model.model.transformer.project_in.weight", "model.model.transformer.layers.0.ff.ff.0.proj.weight",
                "model.model.to_timestep_embed.0.weight", "conditioner.conditioners.prompt.padding_embedding",
                "pretransform.model.encoder.layers.0.transformers.0.pre_norm.gamma",
                "pretransform.model.encoder.layers.2.weight", "pretransform.model.decoder.layers.1.weight",
                "pretransform.model.decoder.layers.3.new_tokens", "pretransform.model.bottleneck.scaling_factor",
                "conditioner.conditioners.seconds_total.embedder.embedding.1.weight"):
        assert key in state, key


def test_import_of_a_stability_checkpoint_round_trips_every_tensor_and_the_audio(checkpoint, original, tmp_path):
    folder, _, _ = checkpoint
    env = dict(os.environ, BENTOML_HOME=str(tmp_path), BENTOML_DO_NOT_TRACK="True")
    done = subprocess.run([sys.executable, "-m", "stable_audio_bento.model_import", str(folder / "model.safetensors"),
                           "--text-encoder", str(ensure_tiny_sa3_model())],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "(stable-audio-3," in done.stdout
    [stored] = [path for path in (tmp_path / "models" / "stable-audio").iterdir() if path.name != "latest"]
    imported = place_sa3_pipeline(StableAudio3Pipeline.from_pretrained(stored), torch.device("cpu"), torch.float32,
                                  torch.float32)
    for name in COMPONENTS:
        ours, theirs = getattr(original, name).state_dict(), getattr(imported, name).state_dict()
        assert ours.keys() == theirs.keys(), name
        for key in ours:
            assert torch.equal(ours[key], theirs[key]), f"{name}.{key}"
    for name in ("scheduler", "vae", "transformer", "duration_embedder"):
        assert settings(getattr(imported, name)) == settings(getattr(original, name)), name
    assert torch.equal(generate(imported, seed=3), generate(original, seed=3))


def test_the_objective_and_duration_range_come_from_model_config(checkpoint, model_cache):
    _, config, state = checkpoint
    base = json.loads(json.dumps(config))
    base["model"]["diffusion"]["diffusion_objective"] = "rectified_flow"
    base["model"]["conditioning"]["configs"][1]["config"]["max_val"] = 60
    pipe = convert_checkpoint(base, state, str(ensure_tiny_sa3_model()))
    assert not pipe.scheduler.config.stochastic_sampling
    assert pipe.duration_embedder.config.max_val == 60


def test_incomplete_or_foreign_checkpoints_are_refused_with_the_reason(checkpoint, tmp_path):
    _, config, state = checkpoint
    text_encoder = str(ensure_tiny_sa3_model())
    dropped = "model.model.transformer.layers.1.self_attn.to_out.weight"
    without_a_tensor = {key: value for key, value in state.items() if key != dropped}
    with pytest.raises(CheckpointError, match=r"StableAudio3DiTModel: the checkpoint lacks 1 .*to_out"):
        convert_checkpoint(config, without_a_tensor, text_encoder)
    no_same = {key: value for key, value in state.items() if not key.startswith("pretransform.")}
    with pytest.raises(CheckpointError, match="not a Stable Audio 3 checkpoint"):
        convert_checkpoint(config, no_same, text_encoder)
    with pytest.raises(CheckpointError, match="model_config.json has no model.pretransform"):
        convert_checkpoint({"model": {}}, state, text_encoder)
    no_objective = json.loads(json.dumps(config))
    del no_objective["model"]["diffusion"]["diffusion_objective"]
    with pytest.raises(CheckpointError, match=r"diffusion_objective is None; .*\['rectified_flow', 'rf_denoiser'\]"):
        convert_checkpoint(no_objective, state, text_encoder)
    with pytest.raises(CheckpointError, match="could not load the T5Gemma text encoder"):
        convert_checkpoint(config, state, str(tmp_path))
    (tmp_path / "model_config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="could not read model_config.json and model.safetensors"):
        load_stability_checkpoint(tmp_path, text_encoder)


# --- the small models: SAME-S with Stability's chunked attention --------------------------------------------------

@pytest.fixture(scope="module")
def chunked_original(original):
    """The tiny model with a SAME-S-like autoencoder: chunks of 32 frames with the midpoint shift over 2 layers (one
    on aligned chunks, one on shifted ones) and a 3-tap decoder mapping, every weight non-trivial."""
    torch.manual_seed(5)
    vae = use_chunked_attention(AutoencoderSAME(**{**TINY_ARCHITECTURE.vae, "encoder_transformer_depths": (2,)}),
                                decoder_mapping_kernel=3)
    randomize_zero_initialised(vae, gain=2.0)
    let_autoencoder_hear_its_input(vae)
    pipe = StableAudio3Pipeline(**{**original.components, "vae": vae.eval().requires_grad_(False)})
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def small_checkpoint(chunked_original, tmp_path_factory):
    """Written in Stability's layout in a folder named like a small model, so the loader's name check applies too."""
    folder = tmp_path_factory.mktemp("checkpoints") / "stable-audio-3-small-music"
    config, state = write_stability_checkpoint(chunked_original, folder)
    return folder, config, state


def test_small_checkpoint_is_written_as_stabilitys_same_s(small_checkpoint):
    _, config, state = small_checkpoint
    autoencoder = config["model"]["pretransform"]["config"]
    for side in ("encoder", "decoder"):
        settings = autoencoder[side]["config"]
        assert "sliding_window" not in settings
        assert (settings["chunk_size"], settings["chunk_midpoint_shift"]) == (32, True)
    assert autoencoder["decoder"]["config"]["conv_mapping"] and not autoencoder["encoder"]["config"].get("conv_mapping")
    assert state["pretransform.model.decoder.layers.3.mapping.weight_v"].shape[-1] == 3
    assert state["pretransform.model.encoder.layers.0.mapping.weight_v"].shape[-1] == 1


def test_imported_small_model_is_served_with_its_chunked_attention_bit_for_bit(small_checkpoint, chunked_original,
                                                                              tmp_path):
    """Import (the command a user runs) → the stored folder's vae/config.json records the chunk settings → the
    engine loads it the way the service loads a stored model, not refused → a request's audio is the original
    chunked pipeline's, bit for bit (17 latent frames: the decoder pads to whole chunks)."""
    folder, _, _ = small_checkpoint
    env = dict(os.environ, BENTOML_HOME=str(tmp_path), BENTOML_DO_NOT_TRACK="True")
    done = subprocess.run([sys.executable, "-m", "stable_audio_bento.model_import", str(folder),
                           "--text-encoder", str(ensure_tiny_sa3_model())],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    [stored] = [path for path in (tmp_path / "models" / "stable-audio").iterdir() if path.name != "latest"]
    vae_config = json.loads((stored / "vae" / "config.json").read_text())
    assert (vae_config["chunk_size"], vae_config["chunk_midpoint_shift"]) == (32, True)

    source = yaml.safe_load((stored / "model.yaml").read_text())["metadata"]["source"]
    assert source == str(folder)
    engine = load_sa3_engine(EngineConfig(model=source, weights=str(stored),
                                          sampling=SamplingOptions(decode_margin_frames=None)))
    assert engine.limits.max_duration_s == 120.0  # known as a small model by its name: the refusal was checked
    blocks = [*engine.vae.encoder.blocks, *engine.vae.decoder.blocks]
    assert all((block.chunk_size, block.midpoint_shift) == (32, True) for block in blocks)
    assert uses_chunked_attention(engine.vae) and engine.vae.decoder.blocks[0].mapping.weight_v.shape[-1] == 3
    original_vae = chunked_original.vae.state_dict()
    assert original_vae.keys() == engine.vae.state_dict().keys()
    assert all(torch.equal(tensor, original_vae[name]) for name, tensor in engine.vae.state_dict().items())

    request = AudioRequest("a kick drum", seed=4, audio_length=1.5, guidance_scale=1.0, num_inference_steps=3)
    assert engine.latent_frames(request.audio_length) == 17
    [result] = run_to_completion(engine, [request])
    expected = generate_request(chunked_original, request)
    assert result.error is None and np.abs(expected).max() > 1e-3
    assert np.array_equal(result.audio, expected)

    # The stored folder imported again (a diffusers-format folder now) keeps the chunked attention.
    again = identify_source(str(stored), str(ensure_tiny_sa3_model())).load()
    assert uses_chunked_attention(again.vae) and again.vae.config.chunk_size == 32


def generate_request(pipe: StableAudio3Pipeline, request: AudioRequest) -> np.ndarray:
    return pipe(request.prompt, duration=request.audio_length, num_inference_steps=request.num_inference_steps,
                guidance_scale=request.guidance_scale,
                generator=torch.Generator().manual_seed(request.seed)).audios[0].numpy()


def without(settings: dict, *names: str) -> dict:
    return {key: value for key, value in settings.items() if key not in names}


def with_sides(config: dict, encoder: dict, decoder: dict) -> dict:
    changed = json.loads(json.dumps(config))
    autoencoder = changed["model"]["pretransform"]["config"]
    autoencoder["encoder"]["config"], autoencoder["decoder"]["config"] = encoder, decoder
    return changed


def test_small_checkpoint_without_chunk_settings_is_refused_with_the_reason(small_checkpoint, tmp_path, capsys):
    folder, config, state = small_checkpoint
    text_encoder = str(ensure_tiny_sa3_model())
    autoencoder = config["model"]["pretransform"]["config"]
    encoder, decoder = autoencoder["encoder"]["config"], autoencoder["decoder"]["config"]
    silent = with_sides(config, without(encoder, "chunk_size", "chunk_midpoint_shift"),
                        without(decoder, "chunk_size", "chunk_midpoint_shift"))
    with pytest.raises(CheckpointError, match="SAME encoder config has neither sliding_window nor chunk_size"):
        convert_checkpoint(silent, state, text_encoder)
    mixed = with_sides(config, encoder, {**without(decoder, "chunk_size"), "sliding_window": [1, 1]})
    with pytest.raises(CheckpointError, match="encoder attends with .*chunk_size=32.* decoder with .*sliding_window=1"):
        convert_checkpoint(mixed, state, text_encoder)
    uneven = with_sides(config, {**encoder, "chunk_size": 24}, {**decoder, "chunk_size": 24})
    with pytest.raises(CheckpointError, match="chunk_size 24 must be a multiple of the block stride 16"):
        convert_checkpoint(uneven, state, text_encoder)

    # The command says why and stores nothing (it fails before the model store is opened).
    copy = tmp_path / "stable-audio-3-small-sfx"
    copy.mkdir()
    (copy / "model_config.json").write_text(json.dumps(silent))
    (copy / "model.safetensors").symlink_to(folder / "model.safetensors")
    assert main([str(copy), "--text-encoder", text_encoder]) == 1
    assert "neither sliding_window nor chunk_size" in capsys.readouterr().err
