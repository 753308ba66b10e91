"""Every response format decodes back to the audio that went in."""

from __future__ import annotations

import asyncio
import io
import mimetypes
import os
import re
import shutil
import tempfile
import time

import numpy as np
import pytest
import soundfile
from pydub import AudioSegment

from stable_audio_bento import audio
from stable_audio_bento.audio import FORMATS, EncoderUnavailable, EncodingFailed, encode_audio, format_unavailable
from stable_audio_bento.gateway import Delivery, Gateway
from stable_audio_bento.generation import AudioRequest
from stable_audio_bento.protocol import APIError

RATE = 44100
TONES = [(0.5, 440.0), (0.3, 660.0)]  # (amplitude, Hz) of the left and right channel


def tone(seconds: float) -> np.ndarray:
    t = np.arange(round(seconds * RATE)) / RATE
    return np.stack([a * np.sin(2 * np.pi * f * t) for a, f in TONES]).astype(np.float32)


@pytest.fixture(scope="module")
def stereo_tone() -> np.ndarray:
    return tone(2.5)


@pytest.mark.parametrize("name, container", [("wav", "WAV"), ("flac", "FLAC")])
def test_lossless_formats_round_trip(stereo_tone, name, container):
    data = encode_audio(stereo_tone, RATE, name)
    decoded, rate = soundfile.read(io.BytesIO(data), dtype="float32")
    assert soundfile.info(io.BytesIO(data)).format == container
    assert rate == RATE and decoded.shape == (stereo_tone.shape[1], 2)
    assert np.abs(decoded.T - stereo_tone).max() < 1 / 32767 + 1e-6


def test_mp3_is_real_mp3_of_the_right_length(stereo_tone):
    data = encode_audio(stereo_tone, RATE, "mp3")
    assert data[:3] == b"ID3" or data[0] == 0xFF
    decoded, rate = soundfile.read(io.BytesIO(data), dtype="float32")
    assert rate == RATE and decoded.shape[1] == 2
    assert abs(decoded.shape[0] - stereo_tone.shape[1]) < 0.06 * RATE
    assert len(data) < stereo_tone.nbytes / 4  # compressed, not a renamed WAV
    assert_same_tones(decoded.T, rate)  # each channel's tone at its level (MP3's delay shifts only the phase)


def test_pcm_is_interleaved_signed_16_bit_little_endian(stereo_tone):
    data = encode_audio(stereo_tone, RATE, "pcm")
    samples = np.frombuffer(data, dtype="<i2").reshape(-1, 2).T / 32768
    assert samples.shape == stereo_tone.shape
    assert np.abs(samples - stereo_tone).max() < 1 / 32768 + 1e-6
    wav, _ = soundfile.read(io.BytesIO(encode_audio(stereo_tone, RATE, "wav")), dtype="int16")
    assert data == wav.astype("<i2").tobytes()  # the same samples as the wav's


def test_every_16_bit_format_holds_the_same_samples_rounded_to_nearest():
    """libsndfile's own float conversion rounded FLAC's samples otherwise than WAV's: one in two differed by one."""
    noise = np.random.default_rng(0).uniform(-0.9, 0.9, (2, 4410)).astype(np.float32)
    expected = np.rint(noise.T * 32768).astype(np.int16)
    for name in ("wav", "flac"):
        decoded, _ = soundfile.read(io.BytesIO(encode_audio(noise, RATE, name)), dtype="int16")
        assert np.array_equal(decoded, expected), name
    assert np.array_equal(np.frombuffer(encode_audio(noise, RATE, "pcm"), dtype="<i2").reshape(-1, 2), expected)


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_the_same_audio_encodes_to_the_same_bytes(name):
    """A seed means the same file: an Ogg stream's serial number was random at every encode."""
    clip = tone(0.5)
    assert encode_audio(clip, RATE, name) == encode_audio(clip.copy(), RATE, name)


def test_out_of_range_samples_are_clipped_not_wrapped():
    loud = np.array([[1.5, -1.5], [2.0, -3.0]], dtype=np.float32)
    samples = np.frombuffer(encode_audio(loud, RATE, "pcm"), dtype="<i2")
    assert list(samples) == [32767, 32767, -32768, -32768]


def test_media_types_follow_the_suffix():
    assert {name: mimetypes.guess_type("x." + spec.extension)[0] for name, spec in FORMATS.items()} == {
        "wav": "audio/wav", "flac": "audio/flac", "mp3": "audio/mpeg", "pcm": "audio/pcm",
        "opus": "audio/ogg", "aac": "audio/aac"}


def decode_with_ffmpeg(data: bytes) -> tuple[np.ndarray, int]:
    """(channels, samples) floats and their rate, as ffmpeg decodes them through pydub."""
    segment = AudioSegment.from_file(io.BytesIO(data))
    samples = np.array(segment.get_array_of_samples(), dtype=np.float64) / (1 << (8 * segment.sample_width - 1))
    return samples.reshape(-1, segment.channels).T, segment.frame_rate


def fit_tone(x: np.ndarray, rate: int, hz: float) -> tuple[float, float]:
    """Amplitude of the best-fitting `hz` sinusoid, whatever its phase, and its correlation with `x`."""
    t = np.arange(x.size) / rate
    basis = np.stack([np.sin(2 * np.pi * hz * t), np.cos(2 * np.pi * hz * t)], axis=1)
    coefficients = np.linalg.lstsq(basis, x, rcond=None)[0]
    return float(np.hypot(*coefficients)), float(np.corrcoef(x, basis @ coefficients)[0, 1])


def adts_headers(data: bytes) -> list[bytes]:
    """The 7-byte header of every frame, walking the frame lengths: the whole stream must be ADTS."""
    headers, at = [], 0
    while at < len(data):
        header = data[at:at + 7]
        assert header[0] == 0xFF and header[1] & 0xF6 == 0xF0, f"no ADTS sync word (0xFFF, layer 0) at byte {at}"
        headers.append(header)
        at += max(7, (header[3] & 0x03) << 11 | header[4] << 3 | header[5] >> 5)  # frame length, header included
    return headers


def assert_same_tones(decoded: np.ndarray, rate: int):
    edge = 2048  # skip the priming and the encoder's fade at the ends
    for channel, (amplitude, hz) in zip(decoded, TONES):
        fitted, correlation = fit_tone(channel[edge:-edge], rate, hz)
        assert fitted == pytest.approx(amplitude, rel=0.02) and correlation > 0.99, (hz, fitted, correlation)


@pytest.mark.parametrize("samples", [1, 20, 21])
def test_an_opus_clip_of_a_few_samples_holds_them(samples):
    """ffmpeg's resampler turned clips under 22 samples into Ogg files of headers only."""
    decoded, rate = decode_with_ffmpeg(encode_audio(tone(1.0)[:, :samples], RATE, "opus"))
    assert rate == 48000 and abs(decoded.shape[1] - samples * 48000 / RATE) <= 1 and decoded.shape[1] >= 1


@pytest.mark.parametrize("seconds", [1.0, 2.5])
def test_opus_is_ogg_opus_resampled_to_48_khz(seconds):
    clip = tone(seconds)
    data = encode_audio(clip, RATE, "opus")
    # The first Ogg page (27-byte header, 1 lacing byte) holds the Opus identification header.
    assert data[:4] == b"OggS" and data[28:36] == b"OpusHead"
    assert len(data) < clip.nbytes / 4
    decoded, rate = decode_with_ffmpeg(data)
    assert rate == 48000 and decoded.shape[0] == 2
    # The pre-skip and the last page's granule position trim the codec's delay and padding: exact to a sample.
    assert abs(decoded.shape[1] - clip.shape[1] * 48000 / RATE) <= 1
    assert_same_tones(decoded, rate)


@pytest.mark.parametrize("seconds", [1.0, 2.5])
def test_aac_is_adts_aac_lc(seconds):
    clip = tone(seconds)
    data = encode_audio(clip, RATE, "aac")
    headers = adts_headers(data)
    profile_rate_channels = {(h[2] >> 6, h[2] >> 2 & 0xF, (h[2] & 1) << 2 | h[3] >> 6) for h in headers}
    assert profile_rate_channels == {(1, 4, 2)}  # AAC-LC, 44100 Hz, stereo in every frame
    assert len(data) < clip.nbytes / 4
    decoded, rate = decode_with_ffmpeg(data)
    assert rate == RATE and decoded.shape[0] == 2
    # ADTS cannot signal the encoder's 1024 priming samples nor the padding of the last 1024-sample frame, so
    # ffmpeg returns both: 1024 to 2047 extra samples (23 to 46 ms); a decoder that drops the priming, under 1024.
    assert 0 <= decoded.shape[1] - clip.shape[1] < 2048
    assert_same_tones(decoded, rate)


@pytest.fixture
def fresh_probe():
    audio._ffmpeg.cache_clear()
    yield
    audio._ffmpeg.cache_clear()


def test_every_format_is_available_here(fresh_probe):
    assert {name: format_unavailable(name) for name in FORMATS} == dict.fromkeys(FORMATS)


def test_without_ffmpeg_the_ffmpeg_formats_are_refused(fresh_probe, monkeypatch, tmp_path, stereo_tone):
    monkeypatch.setenv("PATH", str(tmp_path))
    reason = "response_format 'opus' is unavailable on this server: ffmpeg was not found on PATH"
    assert format_unavailable("opus") == reason
    with pytest.raises(EncoderUnavailable, match=re.escape(reason)):
        encode_audio(stereo_tone, RATE, "opus")
    assert format_unavailable("wav") is None and encode_audio(stereo_tone, RATE, "wav")[:4] == b"RIFF"


def test_an_ffmpeg_without_the_encoder_is_refused(monkeypatch):
    monkeypatch.setattr(audio, "_ffmpeg", lambda: ("/usr/bin/ffmpeg", frozenset({"aac", "libmp3lame"})))
    reason = "response_format 'opus' is unavailable on this server: this ffmpeg has no libopus encoder"
    assert format_unavailable("opus") == reason
    assert format_unavailable("aac") is None


@pytest.fixture
def broken_ffmpeg(fresh_probe, monkeypatch, tmp_path):
    """An ffmpeg first on PATH that lists the real one's encoders, then encodes as its ``mode`` file says: fail,
    hang, or write nothing. ``TMPDIR`` is watched: nothing may be left there."""
    real = shutil.which("ffmpeg")
    bin_dir, scratch = tmp_path / "bin", tmp_path / "tmp"
    bin_dir.mkdir(), scratch.mkdir()
    (bin_dir / "ffmpeg").write_text(f"""#!/bin/sh
case "$*" in *-encoders*) exec {real} "$@";; esac
cat > /dev/null
case "$(cat {tmp_path}/mode)" in
  fail) echo "Error while encoding: the injected fault" >&2; exit 1;;
  hang) exec sleep 60;;
  empty) exit 0;;
esac
""")
    (bin_dir / "ffmpeg").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr(tempfile, "tempdir", None)  # read TMPDIR again
    yield lambda mode: (tmp_path / "mode").write_text(mode)
    assert list(scratch.iterdir()) == []


@pytest.mark.parametrize("mode, reason", [
    ("fail", "ffmpeg exited with status 1: Error while encoding: the injected fault"),
    ("hang", "ffmpeg did not finish within 1 s"), ("empty", "ffmpeg wrote no audio")])
@pytest.mark.parametrize("name", ["opus", "aac"])
def test_an_ffmpeg_that_fails_hangs_or_writes_nothing_is_an_encoding_failure_in_bounded_time(
        broken_ffmpeg, stereo_tone, name, mode, reason):
    """pydub's export waited on a hung ffmpeg for ever, and left its two temporary files behind when one failed."""
    broken_ffmpeg(mode)
    started = time.monotonic()
    with pytest.raises(EncodingFailed, match=re.escape(reason)):
        encode_audio(stereo_tone, RATE, name, timeout_s=1.0)
    assert time.monotonic() - started < 5


def test_a_nan_is_encoded_as_silence_not_an_abort(stereo_tone):
    """LAME aborts the whole process (an assertion) on a NaN."""
    clip = stereo_tone.copy()
    clip[:, 1000] = np.nan
    for name in FORMATS:
        assert len(encode_audio(clip, RATE, name)) > 1000, name
    assert not np.frombuffer(encode_audio(clip, RATE, "pcm"), dtype="<i2").reshape(-1, 2)[1000].any()


@pytest.mark.parametrize("mode, deadline_in_s, status, code, seconds", [
    ("fail", None, 500, "encoding_failed", 1), ("fail", 60, 500, "encoding_failed", 1),
    ("fail", -1, 500, "encoding_failed", 1),  # ffmpeg's own failure is a 500, whenever it comes
    ("hang", -1, 504, "timeout", 1),  # a second at least: the audio is made
    ("hang", 3, 504, "timeout", 3)])  # cut at the request's deadline, not after ENCODE_TIMEOUT_S
def test_the_gateway_answers_an_encoding_failure_in_the_error_shape(broken_ffmpeg, stereo_tone, caplog, mode,
                                                                    deadline_in_s, status, code, seconds):
    """A 500 naming the format and what ffmpeg said, not BentoML's "unexpected error"; an ffmpeg still running at
    the request's deadline is killed there, and the answer is the 504 of any request that outlasts it. Either is
    logged with ffmpeg's words."""
    broken_ffmpeg(mode)
    request = AudioRequest("rain", 1, 2.5, deadline=None if deadline_in_s is None else time.time() + deadline_in_s)
    started = time.monotonic()
    with pytest.raises(APIError) as raised:
        asyncio.run(Gateway.encode(request, stereo_tone, RATE, Delivery("opus")))
    assert (raised.value.status, raised.value.code) == (status, code)
    if mode == "hang":
        assert seconds - 0.5 < time.monotonic() - started < seconds + 2
    said = ("ffmpeg exited with status 1: Error while encoding: the injected fault" if mode == "fail" else
            "ffmpeg did not finish within")
    assert said in caplog.text
    if status == 500:
        assert str(raised.value) == f"encoding the audio as opus failed: {said}"
