"""Stable Audio 3 edits in-process, on the tiny random model: audio-to-audio against diffusers'
StableAudio3AudioToAudioPipeline, inpainting and continuation against StableAudio3InpaintPipeline, bit for bit, alone
and in mixed batches that requests join at different steps; and the edit's dependence on its inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableAudio3AudioToAudioPipeline, StableAudio3InpaintPipeline

from stable_audio_bento.generation import AudioRequest, AudioResult
from stable_audio_bento.sa3 import BatchedStableAudio3, SA3Options
from stable_audio_bento.sa3_edits import regenerated_frames
from stable_audio_bento.sa3_loading import TINY_SA3, TINY_SA3_BASE, load_tiny_sa3
from stable_audio_bento.same_windows import encode_in_windows, encoder_reach_frames
from stable_audio_bento.step_loop import StepLoop, run_to_completion
from conftest import snr_db

RATE, HOP = 44100, 4096


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    cache = tmp_path_factory.mktemp("sa3-edits-cache")
    return {variant: load_tiny_sa3(cache / variant, variant) for variant in (TINY_SA3, TINY_SA3_BASE)}


@pytest.fixture(scope="module")
def families(pipes):  # decoded whole, as the pipelines decode: bit-identical
    return {variant: BatchedStableAudio3(pipe, options=SA3Options(window_frames=None))
            for variant, pipe in pipes.items()}


def upload(seconds: float, seed: int = 0) -> np.ndarray:
    """Stereo (2, samples) at 44.1 kHz, as init_audio.py hands an upload over: a chord plus a little noise."""
    t = np.arange(int(seconds * RATE)) / RATE
    rng = np.random.default_rng(seed)
    chord = [0.3 * np.sin(2 * np.pi * f * t + c) for c, f in enumerate((220.0 + 40 * seed, 330.0))]
    return (np.stack(chord) + 0.05 * rng.standard_normal((2, t.size))).astype(np.float32)


def variation(seed: int, strength: float, seconds: float = 2.5, audio: np.ndarray | None = None, steps: int = 4,
              **fields) -> AudioRequest:
    audio = upload(2.0) if audio is None else audio
    fields = {"guidance_scale": 1.0, **fields}
    return AudioRequest("a cello", seed=seed, audio_length=seconds, num_inference_steps=steps, init_audio=audio,
                        strength=strength, **fields)


def inpainting(seed: int, mask_start: float, mask_end: float, seconds: float = 2.5, audio: np.ndarray | None = None,
               steps: int = 4, **fields) -> AudioRequest:
    audio = upload(2.5) if audio is None else audio
    fields = {"guidance_scale": 1.0, **fields}
    return AudioRequest("a violin", seed=seed, audio_length=seconds, num_inference_steps=steps, init_audio=audio,
                        mask_start=mask_start, mask_end=mask_end, **fields)


def diffusers_variation(pipe, request: AudioRequest) -> np.ndarray:
    pipeline = StableAudio3AudioToAudioPipeline(**pipe.components)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline(request.prompt, duration=request.audio_length, audio=torch.from_numpy(request.init_audio)[None],
                    init_noise_level=request.strength, num_inference_steps=request.num_inference_steps,
                    generator=torch.Generator().manual_seed(request.seed)).audios[0].numpy()


def diffusers_inpainting(pipe, request: AudioRequest) -> np.ndarray:
    """The pipeline with mask_start_seconds / mask_end_seconds chosen so its frames are ours: it rounds the end down,
    we round it up (see regenerated_frames), so it is told the middle of the frame after our last one."""
    first, last = regenerated_frames(request.mask_start, request.mask_end, RATE, HOP, 10**6)
    assert first == int(request.mask_start * RATE / HOP)
    pipeline = StableAudio3InpaintPipeline(**pipe.components)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline(request.prompt, duration=request.audio_length, audio=torch.from_numpy(request.init_audio)[None],
                    mask_start_seconds=request.mask_start, mask_end_seconds=(last + 0.5) * HOP / RATE,
                    num_inference_steps=request.num_inference_steps,
                    generator=torch.Generator().manual_seed(request.seed)).audios[0].numpy()


REFERENCE_CASES = {  # (variant, request, the diffusers pipeline's audio for it)
    "variation, distilled": (TINY_SA3, variation(5, 0.6), diffusers_variation),
    "variation, weak, upload longer than the result": (TINY_SA3, variation(6, 0.2, seconds=1.3), diffusers_variation),
    "variation, strength 1, base": (TINY_SA3_BASE, variation(7, 1.0, steps=5), diffusers_variation),
    "variation, default steps, upload shorter": (TINY_SA3, variation(8, 0.5, seconds=3.1, steps=8),
                                                 diffusers_variation),
    "inpainting, middle": (TINY_SA3, inpainting(9, 0.5, 1.2), diffusers_inpainting),
    "inpainting, the start, base": (TINY_SA3_BASE, inpainting(10, 0.0, 0.7, steps=5), diffusers_inpainting),
    "continuation": (TINY_SA3, inpainting(11, 2.0, 3.5, seconds=3.5, audio=upload(2.0)), diffusers_inpainting),
}


@pytest.mark.parametrize("case", REFERENCE_CASES)
def test_edit_is_bit_identical_to_its_diffusers_pipeline(pipes, families, case):
    variant, request, reference = REFERENCE_CASES[case]
    [result] = run_to_completion(families[variant], [request])
    expected = reference(pipes[variant], request)
    assert result.error is None, result.error
    assert result.audio.shape == expected.shape == (2, int(request.audio_length * RATE))
    assert np.array_equal(result.audio, expected)
    assert np.abs(result.audio).max() > 0


def test_the_served_windows_change_no_edit_whose_upload_fits_one_window(pipes, families):
    """The engine's default windows of 128 latent frames (11.9 s) against the whole-clip encode and decode above:
    an upload that fits one window is encoded whole, also when the request is shorter than it (the weak
    variation), so the served edit is the pipeline's, bit for bit."""
    served = {variant: BatchedStableAudio3(pipe) for variant, pipe in pipes.items()}
    assert served[TINY_SA3].options.window_frames == 128
    for case, (variant, request, _) in REFERENCE_CASES.items():
        [windowed], [whole] = run_to_completion(served[variant], [request]), run_to_completion(families[variant],
                                                                                               [request])
        assert np.array_equal(windowed.audio, whole.audio), case


def test_mask_seconds_round_outward_to_latent_frames():
    assert regenerated_frames(0.5, 1.2, RATE, HOP, 33) == (5, 13)  # 5.38 and 12.92 frames
    assert regenerated_frames(2.0, 3.5, RATE, HOP, 38) == (21, 38)  # a continuation reaches the last frame
    assert regenerated_frames(0.0, 120.0, RATE, HOP, 1292) == (0, 1292)


def test_a_mask_on_frame_boundaries_regenerates_exactly_those_frames():
    """k * HOP / RATE seconds is frame k's start, up to float rounding either way: the frames between two boundaries
    are regenerated, not one more at either end; a region narrower than a sample still regenerates its frame."""
    for first in range(1290):
        assert regenerated_frames(first * HOP / RATE, (first + 2) * HOP / RATE, RATE, HOP, 1292) == (first, first + 2)
    assert regenerated_frames(1.0, 1.0 + 0.1 / RATE, RATE, HOP, 33) == (10, 11)
    assert regenerated_frames(3.0, 3.0 + 0.1 / RATE, RATE, HOP, 33) == (32, 33)  # the last frame, at the very end


JOINING = {  # equal latent length (2.5 s: 27 frames) except "short"; every kind of request
    "text": AudioRequest("rain", seed=1, audio_length=2.5, guidance_scale=1.0, num_inference_steps=6),
    "guided text": AudioRequest("wind", seed=2, audio_length=2.45, guidance_scale=3.0, negative_prompt="hiss",
                                num_inference_steps=5),
    "variation": variation(3, 0.7, steps=5),
    "other variation": variation(4, 0.3, audio=upload(2.5, seed=1), steps=3),
    "inpainting": inpainting(5, 0.5, 1.5, steps=5),
    "continuation": inpainting(6, 1.0, 2.5, audio=upload(1.0, seed=2), steps=4),
    "guided inpainting": inpainting(7, 1.2, 2.0, steps=3, guidance_scale=2.5),
    "short": inpainting(8, 0.2, 0.4, seconds=1.0, steps=2),
}


@pytest.mark.parametrize("join_at", [1, 2])
def test_edits_and_text_requests_joining_a_loop_get_their_solo_audio(families, join_at):
    family = families[TINY_SA3]
    results: dict[str, AudioResult] = {}
    loop = StepLoop(family)

    def submit(*names: str) -> None:
        for name in names:
            loop.submit(JOINING[name], lambda result, name=name: results.__setitem__(name, result))

    submit("text", "inpainting")
    for _ in range(join_at):
        loop.step()
    submit("variation", "continuation", "short")
    loop.step()
    submit("guided text", "other variation", "guided inpainting")
    loop.run_until_idle()

    # Text and variations share forwards; so do the inpaintings; the two kinds never share one.
    assert results["text"].batch_size == 4 and results["variation"].batch_size == 4
    assert results["inpainting"].batch_size == 3 and results["guided inpainting"].batch_size == 3
    for name, request in JOINING.items():
        [alone] = run_to_completion(family, [request])
        assert results[name].error is None, (name, results[name].error)
        assert np.array_equal(results[name].audio, alone.audio), name


def test_a_continuation_keeps_the_upload_and_fills_the_rest(pipes, families):
    """The inpainted audio follows the conditioning: two uploads give the same noise and schedule but different
    audio, in the kept part and (less) in the regenerated one; an inpainting differs from the plain variation."""
    family = families[TINY_SA3]
    first, second, as_variation = run_to_completion(family, [
        inpainting(3, 1.0, 2.5, audio=upload(1.0, seed=0)),
        inpainting(3, 1.0, 2.5, audio=upload(1.0, seed=3)),
        variation(3, 1.0),
    ])
    kept, regenerated = slice(0, 40000), slice(50000, None)
    assert not np.array_equal(first.audio[:, kept], second.audio[:, kept])
    assert not np.array_equal(first.audio[:, regenerated], second.audio[:, regenerated])
    assert not np.array_equal(first.audio, as_variation.audio)


def test_variation_depends_on_the_audio_and_the_strength_and_not_on_anything_else(families):
    family = families[TINY_SA3]
    base, again, other_audio, weaker, masked_elsewhere = (result.audio for result in run_to_completion(family, [
        variation(5, 0.5), variation(5, 0.5), variation(5, 0.5, audio=upload(2.0, seed=4)), variation(5, 0.3),
        inpainting(5, 0.5, 1.0), ]))
    assert np.array_equal(base, again)
    assert not np.array_equal(base, other_audio)
    assert not np.array_equal(base, weaker)
    [text] = run_to_completion(family, [AudioRequest("a cello", seed=5, audio_length=2.5, guidance_scale=1.0,
                                                     num_inference_steps=4)])
    assert not np.array_equal(base, text) and not np.array_equal(masked_elsewhere, text)


def test_the_variation_schedule_is_the_pipelines_log_snr_ramp_from_the_strength(families):
    family = families[TINY_SA3]
    timesteps, sigmas = family.schedule(4, 0.5)
    t = np.linspace(0.5, 0.0, 5)[:-1]
    expected = 1 / (1 + np.exp(2.0 - 8.2 * t))  # sigmoid(-logsnr), logsnr = 2 - 8.2 t
    expected[0] = 0.5
    assert np.allclose(sigmas[:-1].numpy(), expected, atol=1e-6) and sigmas[-1] == 0
    assert torch.equal(timesteps, sigmas[:-1])  # num_train_timesteps = 1: timesteps are the sigmas
    assert torch.equal(family.schedule(4, 1.0)[1], family.schedule(4)[1])


def test_a_variation_whose_ramp_passes_its_strength_again_is_served_where_diffusers_fails(pipes, families):
    """Strength 0.5 over 41 steps: the log-SNR ramp is at 0.5 again at step 21. diffusers' scheduler looks its first
    step up by value and takes the second match, and its pipeline runs off the schedule's end (the README says so);
    the service counts its own steps: 41 of them, each with its own sigma."""
    family = families[TINY_SA3]
    _, sigmas = family.schedule(41, 0.5)
    assert (sigmas == 0.5).nonzero().flatten().tolist() == [0, 21]
    request = variation(1, 0.5, seconds=0.5, steps=41)
    [result] = run_to_completion(family, [request])
    assert result.error is None and result.audio.shape == (2, int(0.5 * RATE)) and np.abs(result.audio).max() > 0
    with pytest.raises(IndexError):
        diffusers_variation(pipes[TINY_SA3], request)


def test_impossible_edits_fail_alone(families):
    family = families[TINY_SA3]
    no_audio, backwards, fine = run_to_completion(family, [
        AudioRequest("x", seed=0, audio_length=1.0, guidance_scale=1.0, num_inference_steps=1, mask_start=0.2,
                     mask_end=0.5),
        inpainting(0, 0.6, 0.5, seconds=1.0, steps=1),
        inpainting(0, 0.5, 0.6, seconds=1.0, steps=1),
    ])
    assert no_audio.failure == backwards.failure == "server_error" and "mask_start" in backwards.error
    assert fine.error is None and fine.audio.shape == (2, 44100)


def recording_encoder_inputs(monkeypatch, vae) -> list[int]:
    """The sample counts that ``vae.encode`` is called with from now on."""
    lengths, encode = [], vae.encode
    monkeypatch.setattr(vae, "encode", lambda audio: lengths.append(audio.shape[-1]) or encode(audio))
    return lengths


def test_windowed_encoding_is_within_float_rounding_of_the_whole_upload(pipes, monkeypatch):
    """A minute of upload (646 latent frames) in windows of two sizes, the last one short, each with the encoder's
    reach on both sides; only as far as the request reaches. Without the margin it is far off."""
    vae = pipes[TINY_SA3].vae
    audio = torch.from_numpy(upload(60.0))[None]
    reach = encoder_reach_frames(vae)
    assert reach == 1  # the tiny encoder: one layer, a band of one frame
    with torch.no_grad():
        whole = vae.encode(audio).latents
        assert whole.shape[-1] == 646
        for window in (16, 100):
            windowed = encode_in_windows(vae, audio, window, reach)
            assert windowed.shape == whole.shape
            assert snr_db(whole, windowed) > 100, window  # 145 dB measured
        assert snr_db(whole, encode_in_windows(vae, audio, 100, 0)) < 60  # 38 dB measured
        lengths = recording_encoder_inputs(monkeypatch, vae)
        first = encode_in_windows(vae, audio, 100, reach, frames=150)
    assert first.shape[-1] == 150 and snr_db(whole[..., :150], first) > 100
    assert lengths == [101 * HOP, 52 * HOP]  # [0, 101) and [99, 151): nothing past frame 150 + reach


def test_a_long_upload_is_encoded_in_windows_and_comes_out_as_encoded_whole(pipes, families, monkeypatch):
    """The engine's default: a 30 s upload (323 frames) in windows of 128, and its variation within float
    rounding of the pipeline's way (whole encode, whole decode)."""
    request = variation(2, 0.5, seconds=30.0, audio=upload(30.0), steps=2)
    [whole] = run_to_completion(families[TINY_SA3], [request])
    family = BatchedStableAudio3(pipes[TINY_SA3])
    lengths = recording_encoder_inputs(monkeypatch, family.vae)
    [windowed] = run_to_completion(family, [request])
    assert lengths == [129 * HOP, 130 * HOP, 30 * 44100 - 255 * HOP]
    assert windowed.audio.shape == whole.audio.shape == (2, 30 * 44100)
    print(f"30 s variation, windowed vs whole encode and decode: {snr_db(whole.audio, windowed.audio):.1f} dB")
    assert snr_db(whole.audio, windowed.audio) > 90
