"""The audio an edit starts from: an uploaded file decoded (libsndfile, else ffmpeg), resampled to the model's rate
and shaped to the model's channels, as float32 (channels, samples). Every way an upload can be unusable is an
``APIError`` naming the ``audio`` field.

What an upload may cost is bounded before it is decoded: the size limit caps the file, not what it decodes to (a
282 KB FLAC of silence decodes to 30 minutes, 1.2 GB as float32). So the header's rate and channels are checked
first, decoding stops one sample past the model's window, and only the channels the model uses are kept.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import soundfile
import soxr

from .generation import ModelLimits
from .protocol import APIError

MAX_UPLOAD_RATE = 192_000  # Hz: the highest rate in common use (studio masters)
MAX_UPLOAD_CHANNELS = 8  # 7.1 surround
DECODE_BLOCK_FRAMES = 1 << 16


def load_init_audio(path: Path, limits: ModelLimits) -> np.ndarray:
    """The upload at ``path`` as float32 (limits.channels, samples) at limits.sample_rate, at most the model's
    window long."""
    audio, rate = decode(path, limits)
    audio = match_channels(resample(audio, rate, limits.sample_rate), limits.channels)
    if audio.shape[1] == 0:  # a sample or two at a higher rate resample to none
        raise APIError(f"audio: the upload is too short to hold one sample at {limits.sample_rate} Hz", param="audio")
    if audio.shape[1] > limits.max_samples:
        raise too_long(limits, audio.shape[1] / limits.sample_rate)
    return audio


def too_long(limits: ModelLimits, seconds: float | None) -> APIError:
    """``seconds``: the upload's length, None when decoding stopped past the window without learning it."""
    length = "longer than the window" if seconds is None else f"{seconds:.2f} s long"
    return APIError(f"audio is {length}; this model's window is {limits.max_seconds:.2f} s", param="audio")


def decode(path: Path, limits: ModelLimits) -> tuple[np.ndarray, int]:
    """(channels, frames) float32, at most ``limits.channels`` channels, and the sample rate; libsndfile first (WAV,
    FLAC, MP3, Ogg Vorbis/Opus), then ffmpeg through pydub for the rest (AAC, M4A, WebM, ...)."""
    if path.stat().st_size == 0:
        raise APIError("audio: the uploaded file is empty", param="audio")
    try:
        with soundfile.SoundFile(path) as upload:
            frames, rate = decode_with_libsndfile(upload, limits)
    except (soundfile.LibsndfileError, RuntimeError, TypeError):  # unreadable to libsndfile, on opening or reading
        frames, rate = decode_with_ffmpeg(path, limits)
    if frames.shape[0] == 0:
        raise APIError("audio: the uploaded file holds no samples", param="audio")
    if not np.isfinite(frames).all():
        raise APIError("audio: the uploaded file holds non-finite samples", param="audio")
    return np.ascontiguousarray(frames.T), rate


def check_header(rate: int, channels: int) -> None:
    if not 0 < rate <= MAX_UPLOAD_RATE:
        raise APIError(f"audio: a sample rate of {rate} Hz is not taken; at most {MAX_UPLOAD_RATE} Hz", param="audio")
    if not 0 < channels <= MAX_UPLOAD_CHANNELS:
        raise APIError(f"audio: {channels} channels are not taken; at most {MAX_UPLOAD_CHANNELS}", param="audio")


def frames_to_read(rate: int, limits: ModelLimits) -> int:
    """Frames at ``rate`` past which the upload, resampled, would be longer than the model's window: reading one
    more than this is enough to refuse it."""
    return math.ceil((limits.max_samples + 1) * rate / limits.sample_rate) + 1


def decode_with_libsndfile(upload: soundfile.SoundFile, limits: ModelLimits) -> tuple[np.ndarray, int]:
    check_header(upload.samplerate, upload.channels)
    limit = frames_to_read(upload.samplerate, limits)
    if upload.frames > limit:  # the header knows the length: refused without decoding
        raise too_long(limits, upload.frames / upload.samplerate)
    keep = min(upload.channels, limits.channels)
    blocks = [block[:, :keep] for block in upload.blocks(DECODE_BLOCK_FRAMES, frames=limit + 1, dtype="float32",
                                                         always_2d=True)]
    frames = np.concatenate(blocks) if blocks else np.zeros((0, keep), dtype=np.float32)
    if len(frames) > limit:  # a header that understated the length
        raise too_long(limits, None)
    return frames, upload.samplerate


def decode_with_ffmpeg(path: Path, limits: ModelLimits) -> tuple[np.ndarray, int]:
    from pydub import AudioSegment  # imported here: it looks for ffmpeg on import and warns when it is missing
    from pydub.exceptions import CouldntDecodeError
    from pydub.utils import mediainfo_json

    undecodable = APIError("audio: the uploaded file is not audio that libsndfile or ffmpeg can decode",
                           param="audio")
    try:
        streams = [stream for stream in mediainfo_json(str(path))["streams"] if stream.get("codec_type") == "audio"]
        rate, channels = int(streams[0]["sample_rate"]), int(streams[0]["channels"])
    except (KeyError, IndexError, ValueError, OSError) as error:
        raise undecodable from error
    check_header(rate, channels)
    limit = frames_to_read(rate, limits)
    try:
        # ffmpeg stops one frame's worth past the limit (-t): a longer file is never decoded whole.
        segment = AudioSegment.from_file(path, duration=(limit + 1) / rate)
    except (CouldntDecodeError, OSError, IndexError) as error:  # IndexError: pydub on ffprobe output without streams
        raise undecodable from error
    width = segment.sample_width
    # pydub holds signed samples of 1, 2 or 4 bytes (it turns 8-bit WAV's unsigned ones and 24-bit ones into these)
    integers = np.frombuffer(segment.raw_data, dtype={1: np.int8, 2: np.int16, 4: np.int32}[width])
    kept = integers.reshape(-1, segment.channels)[:, : limits.channels].astype(np.float32)
    if len(kept) > limit:
        raise too_long(limits, None)
    return kept / float(1 << (8 * width - 1)), segment.frame_rate


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
