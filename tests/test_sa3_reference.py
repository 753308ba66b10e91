"""Stable Audio 3 as Stability's code runs it, where it departs from diffusers: the all-zero inpainting
conditioning in text-to-audio (SA3Options.reference_conditioning), and which small-model folders are served (only
with SAME-S's chunked attention). On the tiny random model, whose ``to_local_embed`` is non-trivial (its
zero-initialised output weights made random, as training would leave them)."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from diffusers import StableAudio3InpaintPipeline
from diffusers.models.autoencoders.autoencoder_same import AutoencoderSAME

from stable_audio_bento.config import EngineConfig
from stable_audio_bento.generation import AudioRequest
from stable_audio_bento.loading import ModelLoadError, load_sa3_engine
from stable_audio_bento.pipeline import SamplingOptions
from stable_audio_bento.sa3 import BatchedStableAudio3, SA3Options
from stable_audio_bento.sa3_loading import (TINY_SA3, TINY_SA3_BASE, chunked_autoencoder_components,
                                            ensure_tiny_sa3_model, load_tiny_sa3)
from stable_audio_bento.same_chunked import use_chunked_attention, uses_chunked_attention
from stable_audio_bento.step_loop import run_to_completion
from conftest import snr_db


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    cache = tmp_path_factory.mktemp("sa3-reference")
    return {variant: load_tiny_sa3(cache / variant, variant) for variant in (TINY_SA3, TINY_SA3_BASE)}


def engine(pipe, reference: bool) -> BatchedStableAudio3:
    return BatchedStableAudio3(pipe, options=SA3Options(window_frames=None, reference_conditioning=reference))


def inpaint_with_nothing_kept(pipe, request: AudioRequest) -> np.ndarray:
    """What Stability's code passes in text-to-audio, through diffusers: the inpainting pipeline with an all-zero
    mask (nothing kept), so the conditioning is zeros and the reference audio (silence here) is never seen."""
    frames = math.ceil(request.audio_length * 44100 / 4096)
    inpaint = StableAudio3InpaintPipeline(**pipe.components)
    inpaint.set_progress_bar_config(disable=True)
    return inpaint(
        request.prompt, duration=request.audio_length, audio=torch.zeros(1, 2, frames * 4096),
        mask=torch.zeros(1, 1, frames), num_inference_steps=request.num_inference_steps,
        generator=torch.Generator().manual_seed(request.seed),
    ).audios[0].numpy()


CASES = {  # the inpainting pipeline has no guidance
    "distilled": (TINY_SA3, AudioRequest("a dog barking", seed=7, audio_length=3.0, guidance_scale=1.0,
                                         num_inference_steps=8)),
    "base, odd duration": (TINY_SA3_BASE, AudioRequest("rain on a roof", seed=5, audio_length=1.2345,
                                                        guidance_scale=1.0, num_inference_steps=5)),
}


@pytest.mark.parametrize("case", CASES)
def test_reference_conditioning_is_inpainting_with_nothing_kept_bit_for_bit(pipes, case):
    variant, request = CASES[case]
    [result] = run_to_completion(engine(pipes[variant], reference=True), [request])
    expected = inpaint_with_nothing_kept(pipes[variant], request)
    assert result.error is None
    assert result.audio.shape == expected.shape == (2, int(request.audio_length * 44100))
    assert np.array_equal(result.audio, expected)


def test_reference_conditioning_changes_the_audio_and_only_by_that_term(pipes):
    """The two modes differ only by the term: with to_local_embed's output zeroed they agree bit for bit."""
    pipe = pipes[TINY_SA3]
    request = CASES["distilled"][1]
    [diffusers_mode] = run_to_completion(engine(pipe, reference=False), [request])
    [reference_mode] = run_to_completion(engine(pipe, reference=True), [request])
    snr = snr_db(diffusers_mode.audio, reference_mode.audio)
    print(f"tiny-sa3, 3 s, 8 steps: reference vs diffusers conditioning {snr:.1f} dB SNR")
    assert snr < 60
    last_layers = [block.to_local_embed[-1] for block in pipe.transformer.transformer_blocks]
    saved = [(layer.weight.clone(), layer.bias.clone()) for layer in last_layers]
    try:
        for layer in last_layers:
            layer.weight.zero_(), layer.bias.zero_()
        [without_term] = run_to_completion(engine(pipe, reference=True), [request])
    finally:
        for layer, (weight, bias) in zip(last_layers, saved):
            layer.weight.copy_(weight), layer.bias.copy_(bias)
    assert np.array_equal(without_term.audio, diffusers_mode.audio)


BATCH = [  # equal latent length; guided (both rows get the zero conditioning, as in Stability's code) and not
    AudioRequest("ocean waves", seed=1, audio_length=2.0, guidance_scale=1.0, num_inference_steps=8),
    AudioRequest("guitar", seed=2, audio_length=1.98, negative_prompt="noise", guidance_scale=3.0,
                 num_inference_steps=5),
    AudioRequest("crowd", seed=3, audio_length=2.0, guidance_scale=1.0, num_inference_steps=3),
]


def test_reference_conditioning_batch_does_not_change_any_request(pipes):
    family = engine(pipes[TINY_SA3], reference=True)
    batched = run_to_completion(family, BATCH)
    assert [result.batch_size for result in batched] == [3, 3, 3]
    for request, in_batch in zip(BATCH, batched):
        [alone] = run_to_completion(family, [request])
        assert np.array_equal(in_batch.audio, alone.audio), request


def test_conditioning_is_chosen_by_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("STABLE_AUDIO_CACHE", str(tmp_path))
    assert EngineConfig.from_env().sa3_conditioning == "diffusers"
    monkeypatch.setenv("STABLE_AUDIO_SA3_CONDITIONING", "reference")
    config = EngineConfig.from_env()
    assert load_sa3_engine(EngineConfig(model=TINY_SA3, sa3_conditioning=config.sa3_conditioning)
                           ).options.reference_conditioning
    assert not load_sa3_engine(EngineConfig(model=TINY_SA3)).options.reference_conditioning
    monkeypatch.setenv("STABLE_AUDIO_SA3_CONDITIONING", "stability")
    with pytest.raises(ValueError, match="STABLE_AUDIO_SA3_CONDITIONING"):
        EngineConfig.from_env()


def test_small_model_is_served_only_with_chunked_attention(tmp_path, monkeypatch):
    """A folder named like a small model holding diffusers' band-attention SAME is refused, and so is one with the
    chunk settings but diffusers' 1-tap decoder mapping; with Stability's chunk settings in vae/config.json (as a
    chunked autoencoder's save_pretrained writes them) and a 3-tap decoder mapping it is served, and a request's
    audio is the pipeline's with that autoencoder (odd latent length: the decoder pads to whole chunks), bit for
    bit."""
    monkeypatch.setenv("STABLE_AUDIO_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "stable-audio-3-small-music"
    shutil.copytree(ensure_tiny_sa3_model(variant=TINY_SA3), folder)
    with pytest.raises(ModelLoadError, match="chunked attention"):
        load_sa3_engine(EngineConfig(model=str(folder)))
    use_chunked_attention(AutoencoderSAME.from_pretrained(folder / "vae")).save_pretrained(folder / "vae")
    with pytest.raises(ModelLoadError, match="3-tap decoder mapping"):
        load_sa3_engine(EngineConfig(model=str(folder)))

    torch.manual_seed(1)
    chunked = use_chunked_attention(AutoencoderSAME.from_pretrained(folder / "vae"), decoder_mapping_kernel=3)
    chunked.save_pretrained(folder / "vae")  # the chunk settings go to vae/config.json with it
    config = json.loads((folder / "vae" / "config.json").read_text())
    assert (config["chunk_size"], config["chunk_midpoint_shift"]) == (32, True)
    engine = load_sa3_engine(EngineConfig(model=str(folder), sampling=SamplingOptions(decode_margin_frames=None)))
    assert uses_chunked_attention(engine.vae) and engine.decode_margin_frames == 4
    assert engine.vae.decoder.blocks[0].mapping.weight_v.shape[-1] == 3
    for name, tensor in chunked.state_dict().items():
        assert torch.equal(engine.vae.state_dict()[name], tensor), name

    request = AudioRequest("a kick drum", seed=4, audio_length=1.5, guidance_scale=1.0, num_inference_steps=4)
    assert engine.latent_frames(request.audio_length) == 17
    [result] = run_to_completion(engine, [request])
    expected = engine.pipe(request.prompt, duration=request.audio_length, num_inference_steps=4,
                           generator=torch.Generator().manual_seed(request.seed)).audios[0].numpy()
    assert result.error is None and np.array_equal(result.audio, expected)


def test_a_chunked_autoencoder_that_does_not_load_says_why(tmp_path, monkeypatch):
    """vae/config.json records the chunk settings but the weights are missing or unreadable: a ValueError naming
    the folder and the cause, not the reader's bare exception."""
    monkeypatch.setenv("STABLE_AUDIO_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "chunked"
    shutil.copytree(ensure_tiny_sa3_model(variant=TINY_SA3), folder)
    use_chunked_attention(AutoencoderSAME.from_pretrained(folder / "vae")).save_pretrained(folder / "vae")
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match=r"chunked.vae: config.json records chunk_size .* SafetensorError"):
        chunked_autoencoder_components(str(folder))
    with pytest.raises(ModelLoadError, match=r"does not load as one: SafetensorError"):  # startup's one line
        load_sa3_engine(EngineConfig(model=str(folder)))
    weights.unlink()
    with pytest.raises(ValueError, match=r"does not load as one: FileNotFoundError"):
        chunked_autoencoder_components(str(folder))


def test_no_duration_headroom(pipes):
    """Latent length as diffusers (and Stability's MLX/TensorRT ports) choose it, not the PyTorch reference's
    duration + 6 s rounded to an even frame count (174 frames for 10 s)."""
    family = engine(pipes[TINY_SA3], reference=True)
    for seconds, frames in ((10.0, 108), (1.2345, 14), (120.0, 1292)):
        state = family.prepare_request(AudioRequest("x", seed=0, audio_length=seconds, guidance_scale=1.0,
                                                     num_inference_steps=1))
        assert state.latents.shape[-1] == frames == math.ceil(seconds * 44100 / 4096)
        assert state.samples == int(seconds * 44100)
