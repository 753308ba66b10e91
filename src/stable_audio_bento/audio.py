"""Encode float audio of shape (channels, samples) into the response formats of the API."""

from __future__ import annotations

import io
import mimetypes
from dataclasses import dataclass

import numpy as np
import soundfile


@dataclass(frozen=True)
class AudioFormatSpec:
    extension: str
    media_type: str
    soundfile_format: str | None  # None: raw samples, no container
    subtype: str


FORMATS: dict[str, AudioFormatSpec] = {
    "wav": AudioFormatSpec("wav", "audio/wav", "WAV", "PCM_16"),
    "flac": AudioFormatSpec("flac", "audio/flac", "FLAC", "PCM_16"),
    "mp3": AudioFormatSpec("mp3", "audio/mpeg", "MP3", "MPEG_LAYER_III"),
    # Raw signed 16-bit little-endian samples, channels interleaved (L R L R ...), at the model's rate.
    "pcm": AudioFormatSpec("pcm", "audio/pcm", None, "PCM_16"),
}

# BentoML derives a file response's Content-Type from its suffix through `mimetypes`.
for _spec in FORMATS.values():
    mimetypes.add_type(_spec.media_type, "." + _spec.extension)


def encode_audio(audio: np.ndarray, sample_rate: int, response_format: str) -> bytes:
    spec = FORMATS[response_format]
    frames = np.clip(np.asarray(audio, dtype=np.float32).T, -1.0, 1.0)  # soundfile wants (samples, channels)
    if spec.soundfile_format is None:
        return np.round(frames * 32767).astype("<i2").tobytes()
    buffer = io.BytesIO()
    soundfile.write(buffer, frames, sample_rate, format=spec.soundfile_format, subtype=spec.subtype)
    return buffer.getvalue()
