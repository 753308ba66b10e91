"""Stable Audio 3 checkpoints in Stability's layout: a round trip through the tiny model written in that layout
(the inverse mapping below is written independently of sa3_checkpoint's, from the same documented key names)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import StableAudio3Pipeline
from safetensors.torch import save_file

from stable_audio_bento.sa3_checkpoint import CheckpointError, convert_checkpoint, load_stability_checkpoint
from stable_audio_bento.sa3_loading import ensure_tiny_sa3_model, load_tiny_sa3, place_sa3_pipeline

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
                   dim_heads=vae.dim_heads, sliding_window=[vae.sliding_window] * 2,
                   sinusoidal_blocks=list(vae.encoder_sinusoidal_blocks))
    duration = pipe.duration_embedder.config
    config = {"sample_rate": 44100, "model_type": "diffusion_cond", "model": {
        "pretransform": {"type": "autoencoder", "config": {
            "io_channels": vae.audio_channels, "downsampling_ratio": pipe.vae.downsampling_ratio,
            "encoder": {"config": encoder},
            "decoder": {"config": {**encoder, "sinusoidal_blocks": list(vae.decoder_sinusoidal_blocks)}}}},
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
    with pytest.raises(CheckpointError, match="could not load the T5Gemma text encoder"):
        convert_checkpoint(config, state, str(tmp_path))
    (tmp_path / "model_config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="could not read model_config.json and model.safetensors"):
        load_stability_checkpoint(tmp_path, text_encoder)
