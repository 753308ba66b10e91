"""Every response format decodes back to the audio that went in."""

from __future__ import annotations

import io
import mimetypes

import numpy as np
import pytest
import soundfile

from stable_audio_bento.audio import FORMATS, encode_audio

RATE = 44100


@pytest.fixture(scope="module")
def stereo_tone() -> np.ndarray:
    t = np.arange(round(2.5 * RATE)) / RATE
    return np.stack([0.5 * np.sin(2 * np.pi * 440 * t), 0.3 * np.sin(2 * np.pi * 660 * t)]).astype(np.float32)


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


def test_pcm_is_interleaved_signed_16_bit_little_endian(stereo_tone):
    data = encode_audio(stereo_tone, RATE, "pcm")
    samples = np.frombuffer(data, dtype="<i2").reshape(-1, 2).T / 32767
    assert samples.shape == stereo_tone.shape
    assert np.abs(samples - stereo_tone).max() < 1 / 32767 + 1e-6


def test_out_of_range_samples_are_clipped_not_wrapped():
    loud = np.array([[1.5, -1.5], [2.0, -3.0]], dtype=np.float32)
    samples = np.frombuffer(encode_audio(loud, RATE, "pcm"), dtype="<i2")
    assert list(samples) == [32767, 32767, -32767, -32767]


def test_media_types_follow_the_suffix():
    assert {name: mimetypes.guess_type("x." + spec.extension)[0] for name, spec in FORMATS.items()} == {
        "wav": "audio/wav", "flac": "audio/flac", "mp3": "audio/mpeg", "pcm": "audio/pcm"}
