"""The stable-audio-open family's stages against diffusers' StableAudioPipeline, and against themselves under
different batches (all requests admitted together; admission at other steps is in test_step_loop.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

from stable_audio_bento.config import EngineConfig
from stable_audio_bento.loading import load_pipeline
from stable_audio_bento.generation import AudioRequest
from stable_audio_bento import pipeline as pipeline_module
from stable_audio_bento.pipeline import BatchedStableAudio, GaussianIncrements, SamplingOptions, sde_noise_for
from stable_audio_bento.step_loop import run_to_completion
from conftest import snr_db


REFERENCE_CASES = {
    "guided, no negative prompt": AudioRequest("a dog barking", seed=7, audio_length=10.0, num_inference_steps=8),
    "guided, negative prompt, offset window": AudioRequest(
        "a piano playing a gentle melody", seed=11, audio_length=20.0, audio_start=2.5,
        negative_prompt="low quality, distorted", guidance_scale=3.0, num_inference_steps=6),
    # 1.00002 s is sample 44100.88: the window starts at 44100, where diffusers' int() cut starts it (not round's 44101)
    "start between two samples": AudioRequest("a click", seed=0, audio_length=1.0, audio_start=1.00002,
                                              guidance_scale=1.0, num_inference_steps=2),
    "unguided, full window": AudioRequest("thunder and rain", seed=3, audio_length=1024 * 2048 / 44100,
                                          guidance_scale=1.0, negative_prompt="ignored", num_inference_steps=5),
    # over the 128 tokens T5 reads: cut where diffusers cuts them, both prompts
    "prompts longer than the text encoder reads": AudioRequest(
        ", ".join(f"rain layer {i} on a tin roof" for i in range(40)), seed=5, audio_length=2.0,
        negative_prompt=" ".join(["muffled, distorted, low quality"] * 40), num_inference_steps=3),
}


def diffusers_reference(pipe, request: AudioRequest) -> np.ndarray:
    return pipe(
        request.prompt,
        audio_start_in_s=request.audio_start,
        audio_end_in_s=request.audio_start + request.audio_length,
        num_inference_steps=request.num_inference_steps,
        guidance_scale=request.guidance_scale,
        negative_prompt=request.negative_prompt,
        generator=torch.Generator().manual_seed(request.seed),
    ).audios[0].numpy()


@pytest.mark.parametrize("case", REFERENCE_CASES)
def test_single_request_is_bit_identical_to_diffusers(tiny_pipe, exact_engine, case):
    request = REFERENCE_CASES[case]
    [result] = run_to_completion(exact_engine, [request])
    expected = diffusers_reference(tiny_pipe, request)
    assert result.error is None
    assert result.audio.shape == expected.shape == (2, round(request.audio_length * 44100))
    assert np.array_equal(result.audio, expected)
    assert np.abs(result.audio).max() > 0


MIXED_BATCH = [
    AudioRequest("ocean waves crashing", seed=1, audio_length=8.0, num_inference_steps=7),
    AudioRequest("guitar playing", seed=2, audio_length=15.0, audio_start=1.0, negative_prompt="low quality",
                 num_inference_steps=4),
    AudioRequest("stadium crowd cheering", seed=3, audio_length=5.0, guidance_scale=1.0, num_inference_steps=6),
    AudioRequest("a bell ringing", seed=4, audio_length=3.3, audio_start=40.0, guidance_scale=2.5,
                 num_inference_steps=5),
    AudioRequest("a dog barking", seed=1, audio_length=8.0, guidance_scale=0.5, num_inference_steps=7),
]


def test_batch_does_not_change_any_request(engine):
    batched = run_to_completion(engine, MIXED_BATCH)
    reordered = run_to_completion(engine, MIXED_BATCH[::-1])[::-1]
    for request, in_batch, in_other_order in zip(MIXED_BATCH, batched, reordered):
        [alone] = run_to_completion(engine, [request])
        assert in_batch.error is None and alone.error is None
        assert in_batch.audio.shape == (2, round(request.audio_length * 44100))
        assert np.array_equal(in_batch.audio, alone.audio), request
        assert np.array_equal(in_other_order.audio, alone.audio), request


def test_different_seeds_and_prompts_differ(engine):
    first, second, third = run_to_completion(engine, [
        AudioRequest("rain", seed=1, audio_length=2.0, num_inference_steps=3),
        AudioRequest("rain", seed=2, audio_length=2.0, num_inference_steps=3),
        AudioRequest("wind", seed=1, audio_length=2.0, num_inference_steps=3),
    ])
    assert not np.array_equal(first.audio, second.audio)
    assert not np.array_equal(first.audio, third.audio)


@pytest.mark.parametrize("start, length", [(0.0, 1.2345), (0.777, 2.5), (47.0, 0.5544), (0.0, 1 / 44100)])
def test_output_has_exactly_the_requested_samples(engine, start, length):
    [result] = run_to_completion(engine, [AudioRequest("click", seed=5, audio_length=length, audio_start=start,
                                         num_inference_steps=2)])
    assert result.audio.shape == (2, round(length * 44100))
    assert result.audio.dtype == np.float32


def test_trimmed_decode_matches_full_decode(exact_engine, engine):
    windows = [AudioRequest("a synth pad", seed=9, audio_length=length, audio_start=start, num_inference_steps=4)
               for start, length in [(0.0, 5.0), (20.3, 10.0), (40.0, 7.5)]]
    full_decodes, trimmed_decodes = run_to_completion(exact_engine, windows), run_to_completion(engine, windows)
    for request, full, trimmed in zip(windows, full_decodes, trimmed_decodes):
        assert trimmed.audio.shape == full.audio.shape
        assert snr_db(full.audio, trimmed.audio) >= 100, request


def test_half_precision_path_runs_on_cpu(model_cache, engine):
    """The GPU path (bf16 DiT and T5, fp32 latents and VAE) exercised on CPU: same shapes, audio close to fp32."""
    half = BatchedStableAudio(load_pipeline(EngineConfig(model="tiny", dtype="bfloat16")))
    assert half.transformer.dtype == torch.bfloat16 and half.vae.dtype == torch.float32
    request = AudioRequest("a cat meowing", seed=4, audio_length=3.0, num_inference_steps=6)
    [low], [full] = run_to_completion(half, [request]), run_to_completion(engine, [request])
    assert low.error is None and low.audio.shape == full.audio.shape
    assert np.isfinite(low.audio).all()
    assert snr_db(full.audio, low.audio) > 10


def assert_batch_invariant(engine: BatchedStableAudio, requests: list[AudioRequest]) -> list[np.ndarray]:
    batched = run_to_completion(engine, requests)
    for request, in_batch in zip(requests, batched):
        [alone] = run_to_completion(engine, [request])
        assert in_batch.error is None and in_batch.audio.shape == (2, round(request.audio_length * 44100))
        assert np.array_equal(in_batch.audio, alone.audio), request
    return [result.audio for result in batched]


def test_vectorized_sde_noise_is_reproducible_batch_invariant_and_not_the_tree(tiny_pipe, engine):
    vectorized = BatchedStableAudio(tiny_pipe, SamplingOptions(sde_noise="vectorized"))
    audio = assert_batch_invariant(vectorized, MIXED_BATCH[:3])
    assert np.array_equal(run_to_completion(vectorized, MIXED_BATCH[:1])[0].audio, audio[0])
    assert not np.array_equal(run_to_completion(engine, MIXED_BATCH[:1])[0].audio, audio[0])


def test_denoising_steps_never_wait_for_the_device(tiny_pipe):
    """With the GPU's noise, no step reads a tensor's value on the host (item(), nonzero(): each would make the
    host wait for every kernel queued, on a GPU): the scheduler found each request's first step by value."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class HostReads(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.reads = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.split(".")[0] in ("_local_scalar_dense", "nonzero", "equal", "is_nonzero"):
                self.reads.append(func.__name__)
            return func(*args, **(kwargs or {}))

    vectorized = BatchedStableAudio(tiny_pipe, SamplingOptions(sde_noise="vectorized"))
    edit = AudioRequest("a bell", seed=2, audio_length=1.0, num_inference_steps=3, strength=0.5,
                        init_audio=np.zeros((2, 44100), dtype=np.float32))
    states = [vectorized.prepare_request(request) for request in (*MIXED_BATCH[:2], edit)]
    with HostReads() as watched:
        for _ in range(2):
            for state, prediction in zip(states, vectorized.forward(states)):
                vectorized.advance(state, prediction)
    assert watched.reads == []


def test_auto_sde_noise_is_the_tree_on_cpu_and_vectorized_on_cuda(tiny_pipe, engine):
    assert engine.options.sde_noise == "exact"  # the default, resolved for this CPU engine
    assert BatchedStableAudio(tiny_pipe, SamplingOptions(sde_noise="vectorized")).options.sde_noise == "vectorized"
    assert sde_noise_for(torch.device("cpu")) == "exact"
    assert sde_noise_for(torch.device("cuda", 1)) == "vectorized"


def test_gaussian_increments_are_standard_normal_from_the_request_generator():
    like = torch.zeros(1, 64, 1024)
    draws = GaussianIncrements(torch.Generator().manual_seed(0), like)
    samples = torch.stack([draws(torch.tensor(10.0 - i), torch.tensor(9.0 - i)) for i in range(8)])
    assert samples.shape == (8, 1, 64, 1024)
    assert abs(samples.mean().item()) < 0.01 and abs(samples.std().item() - 1) < 0.01
    again = GaussianIncrements(torch.Generator().manual_seed(0), like)(torch.tensor(10.0), torch.tensor(9.0))
    assert torch.equal(again, samples[0])
    assert torch.equal(again, randn_tensor(like.shape, generator=torch.Generator().manual_seed(0)))  # diffusers' draw


@pytest.mark.parametrize("window", ["full", "short"])
def test_the_row_cap_probe_runs_the_whole_window(tiny_pipe, monkeypatch, window):
    """The cap must hold for the longest request: in the short window a short probe would denoise 64 frames of
    1024 and measure a sixteenth of the memory."""
    engine = BatchedStableAudio(tiny_pipe, SamplingOptions(denoise_window=window))
    probed = []
    monkeypatch.setattr(pipeline_module, "rows_that_fit", lambda device, forward, rows: probed.append(forward()) or 2)
    assert engine.rows_capacity() == 2
    [[prediction]] = probed
    assert prediction.shape[-1] == engine.limits.latent_frames


def test_short_window_denoises_fewer_frames_and_stays_batch_invariant(tiny_pipe):
    short = BatchedStableAudio(tiny_pipe, SamplingOptions(denoise_window="short"))
    assert short.denoised_frames(AudioRequest("x", seed=0, audio_length=5.0)) == 128
    assert short.denoised_frames(AudioRequest("x", seed=0, audio_length=10.0, audio_start=37.0)) == 1024
    assert_batch_invariant(short, MIXED_BATCH)
