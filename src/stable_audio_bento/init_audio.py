"""The audio an edit starts from: an uploaded file decoded (libsndfile, else ffmpeg), resampled to the model's rate
and shaped to the model's channels, as float32 (channels, samples). Every way an upload can be unusable is an
``APIError`` naming the ``audio`` field."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile
import soxr

from .generation import ModelLimits
from .protocol import APIError


def load_init_audio(path: Path, limits: ModelLimits) -> np.ndarray:
    """The upload at ``path`` as float32 (limits.channels, samples) at limits.sample_rate, at most the model's
    window long."""
    audio, rate = decode(path)
    audio = match_channels(resample(audio, rate, limits.sample_rate), limits.channels)
    if audio.shape[1] > limits.max_samples:
        raise APIError(f"audio is {audio.shape[1] / limits.sample_rate:.2f} s long; this model's window is "
                       f"{limits.max_seconds:.2f} s", param="audio")
    return audio


def decode(path: Path) -> tuple[np.ndarray, int]:
    """(channels, frames) float32 and the sample rate; libsndfile first (WAV, FLAC, MP3, Ogg Vorbis/Opus), then
    ffmpeg through pydub for the rest (AAC, M4A, WebM, ...)."""
    if path.stat().st_size == 0:
        raise APIError("audio: the uploaded file is empty", param="audio")
    try:
        frames, rate = soundfile.read(path, dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError):
        frames, rate = decode_with_ffmpeg(path)
    if frames.shape[0] == 0:
        raise APIError("audio: the uploaded file holds no samples", param="audio")
    if not np.isfinite(frames).all():
        raise APIError("audio: the uploaded file holds non-finite samples", param="audio")
    return np.ascontiguousarray(frames.T), int(rate)


def decode_with_ffmpeg(path: Path) -> tuple[np.ndarray, int]:
    from pydub import AudioSegment  # imported here: it looks for ffmpeg on import and warns when it is missing
    from pydub.exceptions import CouldntDecodeError

    try:
        segment = AudioSegment.from_file(path)
    except (CouldntDecodeError, OSError, IndexError) as error:  # IndexError: pydub on ffprobe output without streams
        raise APIError("audio: the uploaded file is not audio that libsndfile or ffmpeg can decode",
                       param="audio") from error
    samples = np.array(segment.get_array_of_samples(), dtype=np.float32).reshape(-1, segment.channels)
    return samples / float(1 << (8 * segment.sample_width - 1)), segment.frame_rate


def resample(audio: np.ndarray, rate: int, target_rate: int) -> np.ndarray:
    """soxr's very-high-quality band-limited resampler (passband flat to 0.91 Nyquist, 170 dB+ stopband)."""
    if rate == target_rate:
        return audio
    return np.ascontiguousarray(soxr.resample(audio.T, rate, target_rate, quality="VHQ").T, dtype=np.float32)


def match_channels(audio: np.ndarray, channels: int) -> np.ndarray:
    """Mono is copied to every channel; extra channels are dropped (the first ones are front left and right)."""
    if audio.shape[0] == 1:
        return np.repeat(audio, channels, axis=0)
    return np.ascontiguousarray(audio[:channels])
