"""Audio-to-audio: the upload's decoding and resampling, the edit's noise schedule and initial latents, its place
in the shared step loop, and POST /v1/audio/edits over HTTP."""

from __future__ import annotations

import io
import math
import re
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import bentoml
import httpx
import numpy as np
import pytest
import soundfile
import torch

from stable_audio_bento.audio import encode_audio
from stable_audio_bento.generation import AudioRequest, ModelLimits
from stable_audio_bento.init_audio import MAX_UPLOAD_PEAK, load_init_audio
from stable_audio_bento.pipeline import ENCODE_MARGIN_FRAMES
from stable_audio_bento.protocol import DEFAULT_STRENGTH, APIError
from stable_audio_bento.serving import GuardSettings
from stable_audio_bento.step_loop import run_to_completion

LIMITS = ModelLimits(sample_rate=44100, channels=2, hop_length=2048, latent_frames=1024)
SIGMA_MIN, SIGMA_MAX = 0.3, 500.0  # stable-audio-open-1.0's scheduler (the tiny model copies it)


def tone(rate: int, seconds: float, frequencies: list[float], amplitude: float = 0.5) -> np.ndarray:
    """(samples, channels) sines, one frequency per channel, with a phase offset so channels differ."""
    t = np.arange(round(rate * seconds)) / rate
    return np.stack([amplitude * np.sin(2 * np.pi * f * t + 0.3 * c) for c, f in enumerate(frequencies)], axis=1)


def write(path: Path, audio: np.ndarray, rate: int, subtype: str = "FLOAT") -> Path:
    soundfile.write(path, audio, rate, subtype=subtype)
    return path


def edit(seed: int = 5, strength: float = 0.5, audio: np.ndarray | None = None, **fields) -> AudioRequest:
    if audio is None:
        audio = tone(44100, 0.25, [220.0, 330.0]).T.astype(np.float32)
    fields = {"audio_length": 0.5, "num_inference_steps": 3, **fields}
    return AudioRequest("a cello", seed=seed, init_audio=audio, strength=strength, **fields)


# --- the upload -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rate", [22050, 48000])
@pytest.mark.parametrize("frequencies", [[1000.0], [1000.0, 5000.0]], ids=["mono", "stereo"])
def test_resampling_keeps_frequency_and_level(tmp_path, rate, frequencies):
    seconds = 0.5
    audio = load_init_audio(write(tmp_path / "tone.wav", tone(rate, seconds, frequencies), rate), LIMITS)
    assert audio.dtype == np.float32 and audio.shape == (2, round(44100 * seconds))
    expected = np.resize(tone(44100, seconds, frequencies).T, (2, round(44100 * seconds)))  # mono: copied
    per_channel = np.resize(frequencies, 2)
    inner = slice(441, -441)  # 10 ms from each end, where any resampler sees the signal's truncation
    for got, want, frequency in zip(audio, expected, per_channel):
        error = got[inner] - want[inner]
        snr_db = 10 * math.log10(np.mean(want[inner] ** 2) / np.mean(error**2))
        assert snr_db >= 60, snr_db
        assert np.sqrt(np.mean(got[inner] ** 2)) == pytest.approx(0.5 / math.sqrt(2), rel=1e-3)
        assert np.argmax(np.abs(np.fft.rfft(got))) * 44100 / len(got) == pytest.approx(frequency, abs=2)


def test_more_channels_keep_the_first_two_and_other_formats_decode(tmp_path):
    surround = tone(44100, 0.2, [100.0, 200.0, 300.0, 400.0])
    audio = load_init_audio(write(tmp_path / "quad.flac", surround, 44100, "PCM_24"), LIMITS)
    assert np.allclose(audio, surround[:, :2].T, atol=1e-6)
    ogg = write(tmp_path / "tone.ogg", tone(44100, 0.2, [440.0]), 44100, "VORBIS")
    assert load_init_audio(ogg, LIMITS).shape == (2, 8820)


@pytest.mark.parametrize("content", [b"", b"not audio at all " * 64], ids=["empty", "undecodable"])
def test_unusable_uploads_name_the_audio_field(tmp_path, content):
    path = tmp_path / "upload"
    path.write_bytes(content)
    with pytest.raises(APIError) as raised:
        load_init_audio(path, LIMITS)
    assert (raised.value.param, raised.value.status) == ("audio", 400)


@pytest.mark.parametrize("peak, taken", [(1.5, True), (MAX_UPLOAD_PEAK, True), (17.0, False), (1e30, False)])
def test_a_float_upload_far_past_full_scale_is_a_400_not_a_failed_generation(tmp_path, peak, taken):
    """A finite but huge float file made the model generate non-finite audio: a 500 for the client's input. A little
    past full scale (a master's peaks) is taken as it is."""
    path = write(tmp_path / "loud.wav", tone(44100, 0.1, [440.0], amplitude=peak), 44100, "FLOAT")
    if taken:
        assert np.abs(load_init_audio(path, LIMITS)).max() == pytest.approx(peak, rel=1e-3)
        return
    with pytest.raises(APIError, match="peaks at") as raised:
        load_init_audio(path, LIMITS)
    assert (raised.value.param, raised.value.status) == ("audio", 400)


def test_a_file_shorter_than_its_header_or_not_seekable_decodes_to_its_own_samples_only(tmp_path):
    """libsndfile's block reader handed back its whole buffer whatever it had read: a cut MP3 came out with stale
    memory after its audio (another upload's samples, or values refused as non-finite, at random), and a GSM 6.10
    WAV, which libsndfile cannot seek in, as 'longer than the window'."""
    gsm = write(tmp_path / "gsm.wav", tone(8000, 0.5, [440.0]), 8000, "GSM610")
    assert load_init_audio(gsm, LIMITS).shape[1] == pytest.approx(0.5 * 44100, rel=0.15)  # GSM pads to 160 frames
    whole = write(tmp_path / "whole.mp3", tone(44100, 0.5, [440.0]), 44100, "MPEG_LAYER_III")
    cut = tmp_path / "cut.mp3"
    cut.write_bytes(whole.read_bytes()[:3000])  # its header still counts the whole file's frames
    loud = write(tmp_path / "loud.wav", np.sign(tone(44100, 0.5, [5.0, 5.0])) * 0.9, 44100)
    decoded = []
    for _ in range(3):
        load_init_audio(loud, LIMITS)  # leaves its samples in freed memory
        decoded.append(load_init_audio(cut, LIMITS))
    assert all(np.array_equal(audio, decoded[0]) for audio in decoded)
    assert decoded[0].shape[1] < 0.5 * 44100 and np.abs(decoded[0]).max() < 0.6


def test_two_mp3s_joined_with_cat_decode_to_both(tmp_path):
    """The first file's Xing header counts its own frames only: libsndfile stopped there, the second part lost."""
    parts = [write(tmp_path / f"{name}.mp3", tone(44100, seconds, [frequency] * 2), 44100, "MPEG_LAYER_III")
             for name, seconds, frequency in [("a", 0.5, 440.0), ("b", 1.0, 660.0)]]
    joined = tmp_path / "joined.mp3"
    joined.write_bytes(b"".join(part.read_bytes() for part in parts))
    audio = load_init_audio(joined, LIMITS)
    assert audio.shape[1] == pytest.approx(1.5 * 44100, abs=5000)  # + the second file's header frame, delay, padding
    spectrum = np.abs(np.fft.rfft(audio[0, -22050:]))
    assert np.argmax(spectrum) * 2 == pytest.approx(660, abs=3)  # 0.5 s: 2 Hz a bin


def test_an_upload_that_resamples_to_no_samples_is_a_400(tmp_path):
    """One sample at 192 kHz is less than one at 44.1 kHz: refused by name, not sent on as a clip of 0 s."""
    path = write(tmp_path / "blip.wav", np.full((1, 2), 0.5), 192_000, "PCM_16")
    with pytest.raises(APIError, match="too short") as raised:
        load_init_audio(path, LIMITS)
    assert (raised.value.param, raised.value.status) == ("audio", 400)


def test_a_file_libsndfile_opens_but_cannot_read_is_a_400(tmp_path):
    """Its header is fine, its frames are not (a FLAC whose data is overwritten): libsndfile fails while reading."""
    data = bytearray(write(tmp_path / "good.flac", tone(44100, 1.0, [440.0, 660.0]), 44100, "PCM_16").read_bytes())
    data[200:] = b"\xff" * (len(data) - 200)
    path = tmp_path / "corrupt.flac"
    path.write_bytes(bytes(data))
    with pytest.raises(APIError) as raised:
        load_init_audio(path, LIMITS)
    assert (raised.value.param, raised.value.status) == ("audio", 400)


def test_audio_longer_than_the_window_is_refused(tmp_path):
    too_long = np.zeros((LIMITS.max_samples // 4 + 8, 1))  # at 11025 Hz: a few samples past 47.55 s
    with pytest.raises(APIError, match="window") as raised:
        load_init_audio(write(tmp_path / "long.wav", too_long, 11025, "PCM_16"), LIMITS)
    assert raised.value.param == "audio"


def test_an_upload_one_sample_too_long_is_told_apart_from_the_window(tmp_path):
    one_over = np.zeros((LIMITS.max_samples + 1, 1))
    with pytest.raises(APIError) as raised:
        load_init_audio(write(tmp_path / "long.wav", one_over, LIMITS.sample_rate, "PCM_16"), LIMITS)
    upload_seconds, window_seconds = re.findall(r"([0-9.]+) s\b", raised.value.message)
    assert float(upload_seconds) > float(window_seconds) == pytest.approx(LIMITS.max_seconds, abs=1e-5)


def ffmpeg_silence(path: Path, seconds: float, rate: int = 8000, layout: str = "mono",
                   encoding: tuple[str, ...] = ("-c:a", "aac", "-b:a", "8k")) -> Path:
    """A long file of silence (AAC by default): a few kilobytes that decode to ``seconds`` of audio."""
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", f"anullsrc=r={rate}:cl={layout}", "-t", str(seconds),
                    *encoding, str(path)], check=True)
    return path


@pytest.mark.parametrize("decoder", ["libsndfile", "ffmpeg", "ffmpeg, timestamps that do not advance"])
def test_a_long_upload_is_refused_without_decoding_it_whole(tmp_path, decoder):
    """A small file can decode to hours of audio; the size limit cannot see that, so decoding must stop at the
    window (tracemalloc sees numpy's buffers; 10 minutes of float32 at 8 kHz would be 19 MB, 44.1 kHz stereo 212 MB).
    A Matroska file whose packets all say 0 s never reaches a cut by timestamps: ffmpeg decoded it whole into this
    process (600 s at 192 kHz, a 160 KB upload, held 1.7 GB)."""
    minutes = 10
    if decoder == "libsndfile":
        path = write(tmp_path / "silence.flac", np.zeros((8000 * 60 * minutes, 1)), 8000, "PCM_16")
    elif decoder == "ffmpeg":
        path = ffmpeg_silence(tmp_path / "silence.m4a", 60 * minutes)
    else:
        path = ffmpeg_silence(tmp_path / "zeroed.mkv", 60 * minutes, 8000, "mono",
                              ("-c:a", "flac", "-bsf:a", "setts=ts=0"))
    assert path.stat().st_size < 400_000
    tracemalloc.start()
    try:
        with pytest.raises(APIError, match="window") as raised:
            load_init_audio(path, LIMITS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert raised.value.param == "audio"
    assert peak < 8e6, peak  # at most the window at the file's rate: 47.55 s at 8 kHz is 1.5 MB of float32


def test_ffmpeg_decodes_an_upload_inside_the_window_whole_and_refuses_one_past_it(tmp_path):
    audio = load_init_audio(ffmpeg_silence(tmp_path / "inside.m4a", 47.0), LIMITS)
    # AAC adds its encoder delay and padding, two frames of 1024 samples at most: 0.256 s at 8 kHz
    assert audio.shape[0] == 2 and abs(audio.shape[1] - 47.0 * 44100) <= 0.256 * 44100 and not audio.any()
    with pytest.raises(APIError, match="window"):
        load_init_audio(ffmpeg_silence(tmp_path / "past.m4a", 48.0), LIMITS)


@pytest.mark.parametrize(("name", "rate", "codec"), [("past.mkv", 44100, "flac"), ("past.webm", 48000, "libopus")])
def test_ffmpeg_refuses_an_upload_just_past_the_window_rather_than_truncating_it(tmp_path, name, rate, codec):
    """Cut by timestamps (-t), Matroska's millisecond ones, decoding stopped a few samples short of the window's
    end: a 48 s file came back 47.55 s long instead of refused."""
    path = ffmpeg_silence(tmp_path / name, 48.0, rate, "stereo", ("-c:a", codec))
    with pytest.raises(APIError, match="window") as raised:
        load_init_audio(path, LIMITS)
    assert raised.value.param == "audio"


def test_ffmpeg_keeps_the_first_two_of_three_channels_as_they_are(tmp_path):
    """An AAC upload in an M4A file named .raw (ffmpeg goes by the contents): each kept channel is its own tone,
    not a mix of the three."""
    source = write(tmp_path / "three.wav", tone(44100, 1.0, [440.0, 660.0, 880.0]), 44100)
    path = tmp_path / "upload.raw"
    subprocess.run(["ffmpeg", "-v", "error", "-i", str(source), "-c:a", "aac", "-b:a", "256k", "-f", "mp4", str(path)],
                   check=True)
    audio = load_init_audio(path, LIMITS)
    assert audio.shape[0] == 2 and abs(audio.shape[1] - 44100) <= 2048 + 1024  # AAC's priming and padding
    for channel, frequency in zip(audio, (440.0, 660.0)):
        spectrum = np.abs(np.fft.rfft(channel[4096:-4096]))
        assert np.argmax(spectrum) * 44100 / len(channel[4096:-4096]) == pytest.approx(frequency, abs=3)
        assert np.sqrt(np.mean(channel[4096:-4096] ** 2)) == pytest.approx(0.5 / math.sqrt(2), rel=0.05)


@pytest.mark.parametrize("playlist", [
    "#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:2,\n{target}\n#EXT-X-ENDLIST\n",  # HLS
    "#EXTM3U\n#EXT-X-TARGETDURATION:5\n#EXTINF:2,\n{target}\n",  # live HLS: reloaded for minutes
    "ffconcat version 1.0\nfile '{target}'\n"], ids=["hls", "live-hls", "concat"])
def test_an_upload_that_names_other_files_is_refused_without_reading_them(tmp_path, playlist):
    """Playlists make ffmpeg open the files they name: this server's own files would become the edit's audio."""
    target = tmp_path / "server-side.mp3"
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "sine=duration=2", str(target)], check=True)
    upload = tmp_path / "upload.mp3"
    upload.write_text(playlist.format(target=target))
    started = time.monotonic()
    with pytest.raises(APIError, match="not audio") as raised:
        load_init_audio(upload, LIMITS)
    assert raised.value.param == "audio" and time.monotonic() - started < 10


def test_an_ffmpeg_call_past_its_time_is_killed_and_refused(monkeypatch):
    import stable_audio_bento.init_audio as init_audio

    monkeypatch.setattr(init_audio, "FFMPEG_TIMEOUT_S", 0.3)
    refused = APIError("audio: undecodable", param="audio")
    started = time.monotonic()
    with pytest.raises(APIError) as raised:
        init_audio.run_ffmpeg(["sleep", "30"], refused, max_bytes=1 << 16)
    assert raised.value is refused and time.monotonic() - started < 5


@pytest.mark.parametrize(("rate", "channels", "message"), [(384000, 1, "sample rate"), (44100, 9, "channels")])
def test_uploads_past_the_rate_or_channel_limits_are_refused(tmp_path, rate, channels, message):
    path = write(tmp_path / "odd.wav", np.zeros((64, channels)), rate, "PCM_16")
    with pytest.raises(APIError, match=message) as raised:
        load_init_audio(path, LIMITS)
    assert raised.value.param == "audio"


# --- schedule and initial latents -------------------------------------------------------------------------------

@pytest.mark.parametrize("strength", [0.2, DEFAULT_STRENGTH, 0.9])
def test_sigma_schedule_spans_sigma_min_to_sigma_init(engine, strength):
    steps = 7
    sigma_init = SIGMA_MIN ** (1 - strength) * SIGMA_MAX**strength
    scheduler = engine.edit_scheduler(edit(strength=strength, num_inference_steps=steps))
    expected = torch.linspace(math.log(SIGMA_MIN), math.log(sigma_init), steps).exp().flip(0)
    assert scheduler.config.sigma_max == pytest.approx(sigma_init, rel=1e-12)
    assert torch.allclose(scheduler.sigmas[:-1], expected, rtol=1e-6) and scheduler.sigmas[-1] == 0
    assert len(scheduler.timesteps) == steps


def test_a_one_step_edit_takes_its_step_where_its_latents_are_noised(engine):
    """diffusers' one-point schedule would be sigma_min whatever the strength, with the latents noised to
    sigma_init: the model would be told the wrong noise level. The edit's single step starts at sigma_init."""
    sigma_init = SIGMA_MIN**0.5 * SIGMA_MAX**0.5
    state = engine.prepare_request(edit(strength=0.5, num_inference_steps=1))
    assert state.scheduler.sigmas.tolist() == pytest.approx([sigma_init, 0.0], rel=1e-6)
    assert state.timestep == pytest.approx(math.atan(sigma_init) / math.pi * 2, rel=1e-6)
    [result] = run_to_completion(engine, [edit(strength=0.5, num_inference_steps=1)])
    assert result.failure is None and np.isfinite(result.audio).all(), result.error


def test_full_strength_is_text_to_audio_schedule(engine):
    text = engine.prepare_request(AudioRequest("a cello", seed=5, audio_length=0.5, num_inference_steps=5))
    assert torch.equal(engine.edit_scheduler(edit(strength=1.0, num_inference_steps=5)).sigmas, text.scheduler.sigmas)


def test_brownian_tree_is_bounded_by_the_edit_schedule(engine):
    request = edit(strength=0.4, num_inference_steps=3)
    state = engine.prepare_request(request)
    engine.advance(state, engine.forward([state])[0])
    [tree] = state.scheduler.noise_sampler.tree.trees
    assert (tree._start, tree._end) == pytest.approx((SIGMA_MIN, SIGMA_MIN**0.6 * SIGMA_MAX**0.4), rel=1e-6)


@pytest.mark.parametrize("steps", [2, 100, 500])
def test_the_weakest_edit_keeps_its_smallest_step_within_the_brownian_trees_reach(engine, steps):
    """At the step count's least strength the last step above sigma_min is 1e-5 (the tree resolves 1e-6), and
    the edit runs to finite audio; any weaker is refused before it starts."""
    weakest = engine.limits.min_strength(steps)
    sigmas = engine.edit_scheduler(edit(strength=weakest, num_inference_steps=steps)).sigmas.double()
    assert sigmas[-3] - sigmas[-2] == pytest.approx(1e-5, rel=1e-2) and sigmas[-2] == pytest.approx(SIGMA_MIN)
    [result] = run_to_completion(engine, [edit(strength=weakest, num_inference_steps=steps, audio_length=0.1)])
    assert result.failure is None and np.isfinite(result.audio).all(), result.error
    with pytest.raises(ValueError, match="strength must be at least"):
        engine.prepare_request(edit(strength=weakest * 0.999, num_inference_steps=steps))


def test_initial_latents_are_encoded_audio_plus_scaled_noise(engine):
    request = edit(seed=123, strength=0.3)
    state = engine.prepare_request(request)
    generator = torch.Generator().manual_seed(123)
    shape = (1, engine.transformer.config.in_channels, 1024)
    noise = torch.randn(shape, generator=generator)  # first draw: the initial noise, as text-to-audio's
    posterior_noise = torch.randn(shape, generator=generator)  # second: the VAE posterior's sample
    with torch.no_grad():
        mean, scale = engine.posterior_parameters(request.init_audio, 1024).chunk(2, dim=1)
    encoded = mean + (torch.nn.functional.softplus(scale) + 1e-4) * posterior_noise
    expected = encoded + noise * (SIGMA_MIN**0.7 * SIGMA_MAX**0.3)
    assert torch.equal(state.latents, expected)


def test_windowed_encoding_matches_encoding_the_whole_padded_window(engine):
    frames = 3 * ENCODE_MARGIN_FRAMES + 10  # long enough that the padding is filled in, short enough to encode
    audio = np.random.default_rng(0).uniform(-0.5, 0.5, (2, 5 * 2048 + 77)).astype(np.float32)
    padded = torch.zeros((1, 2, frames * 2048))
    padded[0, :, : audio.shape[1]] = torch.from_numpy(audio)
    with torch.no_grad():
        stitched = engine.posterior_parameters(audio, frames)
        whole = engine.encode_samples(padded)
    assert stitched.shape == whole.shape
    assert torch.allclose(stitched, whole, rtol=1e-5, atol=1e-5)


# --- generation -------------------------------------------------------------------------------------------------

def test_result_depends_on_the_audio_and_the_strength_and_not_on_anything_else(engine):
    other = tone(44100, 0.25, [440.0, 660.0]).T.astype(np.float32)
    base, again, other_audio, weaker = (result.audio for result in run_to_completion(
        engine, [edit(), edit(), edit(audio=other), edit(strength=0.2)]))
    assert np.array_equal(base, again)
    assert not np.array_equal(base, other_audio)
    assert not np.array_equal(base, weaker)


def test_edit_is_batch_invariant_among_text_requests_and_other_edits(engine):
    target = edit(seed=9, strength=0.6, num_inference_steps=4, id="target")
    others = [
        AudioRequest("rain", seed=1, audio_length=1.0, num_inference_steps=5, id="text"),
        AudioRequest("wind", seed=2, audio_length=0.5, guidance_scale=1.0, num_inference_steps=2, id="unguided"),
        edit(seed=3, strength=0.9, num_inference_steps=2, guidance_scale=1.0, id="other edit"),
    ]
    [alone] = run_to_completion(engine, [target])
    batched = run_to_completion(engine, [others[0], target, *others[1:]])
    assert all(result.error is None for result in batched)
    assert alone.audio.shape == (2, 22050)
    assert np.array_equal(batched[1].audio, alone.audio)


# --- over HTTP --------------------------------------------------------------------------------------------------

FIELDS = {"input": "a cello", "audio_length": "0.5", "num_inference_steps": "2", "seed": "4"}


def wav_bytes(seconds: float = 0.25, rate: int = 48000) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, tone(rate, seconds, [440.0]), rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def post_edit(server: str, fields: dict, files: dict | None = None) -> httpx.Response:
    files = {"audio": ("loop.wav", wav_bytes(), "audio/wav")} if files is None else files
    return httpx.post(server + "/v1/audio/edits", data=fields, files=files, timeout=300)


def test_multipart_edit_is_the_engines_edit_of_the_upload(server, engine, tmp_path):
    """The served edit equals the engine's, in-process, of the upload as init_audio.py reads it; another upload
    gives other audio."""
    response = post_edit(server, {**FIELDS, "strength": "0.7", "response_format": "flac"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "audio/flac" and response.headers["x-seed"] == "4"
    audio, rate = soundfile.read(io.BytesIO(response.content))
    assert (rate, audio.shape) == (44100, (22050, 2))
    upload = load_init_audio(write(tmp_path / "loop.wav", tone(48000, 0.25, [440.0]), 48000, "PCM_16"), LIMITS)
    [alone] = run_to_completion(engine, [AudioRequest("a cello", seed=4, audio_length=0.5, num_inference_steps=2,
                                                      init_audio=upload, strength=0.7)])
    assert response.content == encode_audio(alone.audio, 44100, "flac")
    other = io.BytesIO()
    soundfile.write(other, tone(48000, 0.25, [660.0]), 48000, format="WAV", subtype="PCM_16")
    assert post_edit(server, {**FIELDS, "strength": "0.7", "response_format": "flac"},
                     {"audio": ("loop.wav", other.getvalue(), "audio/wav")}).content != response.content


ERROR_CASES = {
    "no file": ({**FIELDS}, {"input": (None, "a cello")}, 400, "audio"),
    "empty file": (FIELDS, {"audio": ("loop.wav", b"", "audio/wav")}, 400, "audio"),
    "undecodable": (FIELDS, {"audio": ("loop.wav", b"RIFF nonsense" * 50, "audio/wav")}, 400, "audio"),
    "longer than the window": (FIELDS, {"audio": ("long.wav", wav_bytes(48.0, 8000), "audio/wav")}, 400, "audio"),
    "text, not a file": (FIELDS, {"audio": (None, "not a file")}, 400, "audio"),
    "a URL, not a file": (FIELDS, {"audio": (None, "http://127.0.0.1:9/loop.wav")}, 400, "audio"),
    "strength 0": ({**FIELDS, "strength": "0"}, None, 400, "strength"),
    "strength above 1": ({**FIELDS, "strength": "1.5"}, None, 400, "strength"),
    "strength not a number": ({**FIELDS, "strength": "strong"}, None, 400, "strength"),
    "strength NaN": ({**FIELDS, "strength": "NaN"}, None, 400, "strength"),
    "strength below the step count's least": ({**FIELDS, "strength": "1e-9"}, None, 400, "strength"),
    "no prompt": ({"audio_length": "0.5"}, None, 400, "input"),
    "audio_length too long": ({**FIELDS, "audio_length": "60"}, None, 400, "audio_length"),
    "bad seed": ({**FIELDS, "seed": "-1"}, None, 400, "seed"),
    "unknown format": ({**FIELDS, "response_format": "ogg"}, None, 400, "response_format"),
    "too many steps": ({**FIELDS, "num_inference_steps": "100000"}, None, 400, "num_inference_steps"),
    "other model": ({**FIELDS, "model": "someone/else"}, None, 404, "model"),
    "mask_start: cannot inpaint": ({**FIELDS, "mask_start": "0.1"}, None, 400, "mask_start"),
    "mask_end: cannot inpaint": ({**FIELDS, "mask_end": "0.3"}, None, 400, "mask_end"),
    "mask_start not a number": ({**FIELDS, "mask_start": "later"}, None, 400, "mask_start"),
}


@pytest.mark.parametrize("case", ERROR_CASES)
def test_bad_edits_are_4xx_naming_the_field(server, case):
    fields, files, status, param = ERROR_CASES[case]
    if case == "no file":  # multipart with text parts only
        response = httpx.post(server + "/v1/audio/edits", files={**files, "audio_length": (None, "0.5")}, timeout=60)
    else:
        response = post_edit(server, fields, files)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"].endswith("_error") and error["message"]


@pytest.mark.parametrize("route", ["/v1/audio/edits", "/v1/audio/edits/jobs"])
def test_a_body_that_is_not_a_form_on_an_edits_route_is_a_415_naming_audio(server, route):
    json_body = httpx.post(server + route, json={"input": "a cello", "audio": "/etc/hostname"}, timeout=60)
    url_encoded = httpx.post(server + route, data={"input": "a cello", "audio": "/etc/hostname"}, timeout=60)
    for response in (json_body, url_encoded):
        error = response.json()["error"]
        assert (response.status_code, error["param"]) == (415, "audio")
        assert "multipart form data" in error["message"] and "curl -F audio=@FILE" in error["message"]


BIG_TEXT_PART = (b'--B\r\nContent-Disposition: form-data; name="audio"\r\n\r\n' + b"RIFF" * (1 << 18) + b"x"
                 + b"\r\n--B--\r\n")  # curl -F "audio=<loop.wav": the file as a text part, over 1 MiB


@pytest.mark.parametrize("content_type, body, message", [
    ("multipart/form-data", b"--B\r\n\r\nx\r\n--B--\r\n", "not a multipart form that can be read"),
    ("multipart/form-data; boundary=B", b"garbage", "not a multipart form that can be read"),
    ("multipart/form-data; boundary=B", BIG_TEXT_PART, "audio must be a file (curl -F audio=@FILE), not text")],
                         ids=["no-boundary", "garbage", "text-part-over-1-MiB"])
@pytest.mark.parametrize("route", ["/v1/audio/edits", "/v1/audio/edits/jobs"])
def test_a_form_that_cannot_be_read_is_a_400_naming_audio(server, route, content_type, body, message):
    response = httpx.post(server + route, content=body, headers={"content-type": content_type}, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "audio" and message in error["message"]


def test_upload_over_the_limit_is_a_413_and_json_routes_keep_theirs(server):
    big = {"audio": ("big.wav", b"\0" * (GuardSettings.max_upload_bytes + 1), "audio/wav")}
    response = post_edit(server, FIELDS, big)
    assert response.status_code == 413
    assert response.json()["error"]["param"] == "audio"
    json_body = b'{"input": "' + b"x" * (1 << 20) + b'"}'
    assert httpx.post(server + "/v1/audio/generate", content=json_body, timeout=60).status_code == 413


def test_bentoml_client_sends_a_path(server, tmp_path):
    loop = tmp_path / "loop.wav"
    loop.write_bytes(wav_bytes())
    with bentoml.SyncHTTPClient(server, timeout=300) as client:
        result = client.edit(audio=loop, input="a cello", audio_length=0.5, num_inference_steps=2, seed=4,
                             strength=0.7)
    audio, rate = soundfile.read(result)
    assert (rate, audio.shape) == (44100, (22050, 2))


def test_openapi_page_shows_the_file_field(server):
    spec = httpx.get(server + "/docs.json").json()
    body = spec["paths"]["/v1/audio/edits"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert {"audio", "strength", "input", "seed"} <= set(body["properties"])


def test_edit_as_a_job_reports_progress_and_returns_the_same_audio(server):
    fields = {**FIELDS, "strength": "0.7"}
    files = {"audio": ("loop.wav", wav_bytes(), "audio/wav")}
    submitted = httpx.post(server + "/v1/audio/edits/jobs", data=fields, files=files, timeout=60)
    assert submitted.status_code == 202, submitted.text
    job_url = f"{server}/v1/audio/jobs/{submitted.json()['id']}"
    deadline = time.monotonic() + 300
    while (status := httpx.get(job_url).json())["status"] in ("queued", "running"):
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert status["status"] == "succeeded" and status["progress"] == {"steps_done": 2, "steps_total": 2}
    assert httpx.get(job_url + "/content").content == post_edit(server, fields).content
    refused = httpx.post(server + "/v1/audio/edits/jobs", data={**fields, "strength": "2"}, files=files)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "strength"


def test_an_edit_job_sent_again_with_its_idempotency_key_is_the_same_job_and_another_upload_is_refused(server):
    fields = {**FIELDS, "strength": "0.7"}
    headers = {"Idempotency-Key": "edit-once"}

    def submit(upload: bytes) -> httpx.Response:
        files = {"audio": ("loop.wav", upload, "audio/wav")}
        return httpx.post(server + "/v1/audio/edits/jobs", data=fields, files=files, headers=headers, timeout=60)

    first, again, other = submit(wav_bytes()), submit(wav_bytes()), submit(wav_bytes(seconds=0.3))
    assert (first.status_code, again.status_code) == (202, 202), again.text
    assert again.json()["id"] == first.json()["id"] and again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert other.status_code == 422 and other.json()["error"]["param"] == "Idempotency-Key"


def test_command_line_client_edits_a_file(server, tmp_path):
    loop = tmp_path / "loop.wav"
    loop.write_bytes(wav_bytes())
    command = [sys.executable, "-m", "stable_audio_bento.client", "a cello", "--url", server, "--init-audio", str(loop),
               "--strength", "0.7", "--audio-length", "0.5", "--num-inference-steps", "2", "--seed", "4",
               "-o", str(tmp_path / "cello.flac")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "2/2 steps" in done.stderr
    assert (tmp_path / "cello.flac").read_bytes() == post_edit(
        server, {**FIELDS, "strength": "0.7", "response_format": "flac"}).content
    refused = subprocess.run(command[:4] + ["--strength", "0.5"], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "--strength needs --init-audio" in refused.stderr
