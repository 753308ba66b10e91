"""Encode float audio of shape (channels, samples) into the response formats of the API."""

from __future__ import annotations

import functools
import io
import mimetypes
import shutil
import subprocess
from dataclasses import dataclass

import numpy as np
import soundfile
import soxr
from pydub import AudioSegment

# Near-transparent for stereo music: Opus at 128k, ffmpeg's native AAC encoder (weaker than libfdk) at 192k.
OPUS_BITRATE = "128k"
AAC_BITRATE = "192k"
# 47 s of stereo take ffmpeg about a second: one that takes this long hangs, holding a thread and the request's
# admission slot.
ENCODE_TIMEOUT_S = 60.0


class EncoderUnavailable(ValueError):
    """The response format needs an ffmpeg (or an ffmpeg encoder) that this machine lacks."""


class EncodingFailed(RuntimeError):
    """ffmpeg failed on this audio, ran out of time, or wrote nothing."""


class EncodingTimedOut(EncodingFailed):
    """ffmpeg was still running at its time limit (and was killed)."""


@dataclass(frozen=True)
class FfmpegCodec:
    """Formats libsndfile cannot write: 16-bit samples piped through ffmpeg. Not through pydub's export, which has
    no time limit and leaves its temporary files behind when ffmpeg fails."""

    muxer: str  # ffmpeg -f
    encoder: str  # ffmpeg -acodec, as `ffmpeg -encoders` lists it
    bitrate: str
    # The only rate the codec takes, resampled to here with soxr: through ffmpeg's resampler a clip under 22
    # samples came out as no audio at all.
    sample_rate: int | None = None


@dataclass(frozen=True)
class AudioFormatSpec:
    extension: str
    media_type: str
    soundfile_format: str | None = None  # None and no ffmpeg: raw samples, no container
    subtype: str = "PCM_16"
    ffmpeg: FfmpegCodec | None = None


FORMATS: dict[str, AudioFormatSpec] = {
    "wav": AudioFormatSpec("wav", "audio/wav", "WAV", "PCM_16"),
    "flac": AudioFormatSpec("flac", "audio/flac", "FLAC", "PCM_16"),
    "mp3": AudioFormatSpec("mp3", "audio/mpeg", "MP3", "MPEG_LAYER_III"),
    # Raw signed 16-bit little-endian samples, channels interleaved (L R L R ...), at the model's rate.
    "pcm": AudioFormatSpec("pcm", "audio/pcm", None, "PCM_16"),
    # Ogg Opus (RFC 7845, whose media type is audio/ogg; audio/opus names the RTP payload). Opus runs at
    # 48 kHz only, so the 44.1 kHz audio is resampled; the pre-skip and end trim keep the length exact.
    "opus": AudioFormatSpec("opus", "audio/ogg", ffmpeg=FfmpegCodec("opus", "libopus", OPUS_BITRATE, 48000)),
    # Raw ADTS AAC-LC, as streamed. ADTS cannot record the encoder delay, so decoders play 1024 samples of
    # priming and the padding of the last frame: up to 46 ms more than was encoded.
    "aac": AudioFormatSpec("aac", "audio/aac", ffmpeg=FfmpegCodec("adts", "aac", AAC_BITRATE)),
}

# BentoML derives a file response's Content-Type from its suffix through `mimetypes`.
for _spec in FORMATS.values():
    mimetypes.add_type(_spec.media_type, "." + _spec.extension)


@functools.cache
def _ffmpeg() -> tuple[str, frozenset[str]] | str:
    """The ffmpeg on PATH and its encoder names, or why it cannot run. Probed once per process."""
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        return "ffmpeg was not found on PATH"
    try:
        listing = subprocess.run([ffmpeg, "-hide_banner", "-encoders"], capture_output=True, text=True,
                                 check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as error:
        return f"{ffmpeg} -encoders failed: {error}"
    # Below the legend's "------" line, rows read " A..... libopus   libopus Opus (codec opus)".
    return ffmpeg, frozenset(row.split()[1] for row in listing.partition("------")[2].splitlines() if row.strip())


def format_unavailable(response_format: str) -> str | None:
    """None when this server can encode `response_format`, else a one-line reason for the client."""
    codec = FORMATS[response_format].ffmpeg
    if codec is None:
        return None  # soundfile's wheel bundles libsndfile with its encoders
    ffmpeg = _ffmpeg()
    if isinstance(ffmpeg, str):
        reason = ffmpeg
    elif codec.encoder not in ffmpeg[1]:
        reason = f"this ffmpeg has no {codec.encoder} encoder"
    else:
        return None
    return f"response_format {response_format!r} is unavailable on this server: {reason}"


def _frames(audio: np.ndarray) -> np.ndarray:
    """(channels, samples) float audio as (samples, channels) float32 clipped to full scale, as soundfile wants.
    A NaN would abort the whole process inside LAME (an assertion): it becomes silence."""
    return np.clip(np.nan_to_num(np.asarray(audio, dtype=np.float32).T), -1.0, 1.0)


def _pcm16(frames: np.ndarray) -> np.ndarray:
    """(samples, channels) little-endian 16-bit samples, rounded to nearest: the inverse of reading them back as
    x / 32768. Quantized here once for every 16-bit format: libsndfile's own conversion rounds differently for WAV
    and for FLAC (every other sample differed by one)."""
    return np.clip(np.rint(frames * 32768.0), -32768, 32767).astype("<i2")


def pcm16_segment(audio: np.ndarray, sample_rate: int) -> AudioSegment:
    """(channels, samples) float audio as a pydub segment of 16-bit samples."""
    samples = _pcm16(_frames(audio))
    return AudioSegment(samples.tobytes(), sample_width=2, frame_rate=sample_rate, channels=samples.shape[1])


def encode_audio(audio: np.ndarray, sample_rate: int, response_format: str,
                 timeout_s: float = ENCODE_TIMEOUT_S) -> bytes:
    """The file of ``response_format`` holding (channels, samples) float audio; ``timeout_s`` bounds ffmpeg."""
    spec = FORMATS[response_format]
    if spec.ffmpeg is not None:
        return _encode_with_ffmpeg(audio, sample_rate, response_format, timeout_s)
    frames = _frames(audio)
    if spec.subtype == "PCM_16":
        frames = _pcm16(frames)  # written as they are (libsndfile converts no integer samples)
    if spec.soundfile_format is None:
        return frames.tobytes()
    buffer = io.BytesIO()
    soundfile.write(buffer, frames, sample_rate, format=spec.soundfile_format, subtype=spec.subtype)
    return buffer.getvalue()


def _encode_with_ffmpeg(audio: np.ndarray, sample_rate: int, response_format: str, timeout_s: float) -> bytes:
    reason = format_unavailable(response_format)
    if reason is not None:
        raise EncoderUnavailable(reason)
    ffmpeg, codec = _ffmpeg()[0], FORMATS[response_format].ffmpeg
    if codec.sample_rate is not None and codec.sample_rate != sample_rate:
        audio = soxr.resample(np.asarray(audio, dtype=np.float32).T, sample_rate, codec.sample_rate,
                              quality="VHQ").T
        sample_rate = codec.sample_rate
    # 16-bit input: its quantization noise lies far below what these lossy codecs discard.
    samples = _pcm16(_frames(audio))
    command = [ffmpeg, "-hide_banner", "-nostats", "-loglevel", "error",
               "-f", "s16le", "-ar", str(sample_rate), "-ac", str(samples.shape[1]), "-i", "pipe:0",
               "-c:a", codec.encoder, "-b:a", codec.bitrate,
               # the same audio makes the same bytes (an Ogg stream's serial number is random otherwise)
               "-fflags", "+bitexact", "-flags:a", "+bitexact", "-f", codec.muxer, "pipe:1"]
    try:  # on a timeout, run kills ffmpeg before raising
        encoded = subprocess.run(command, input=samples.tobytes(), capture_output=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise EncodingTimedOut(f"ffmpeg did not finish within {timeout_s:.0f} s") from None
    except OSError as error:
        raise EncodingFailed(f"ffmpeg could not be run: {error}") from None
    if encoded.returncode != 0:
        said = encoded.stderr.decode(errors="replace").strip().splitlines()
        raise EncodingFailed(f"ffmpeg exited with status {encoded.returncode}"
                             + (f": {said[-1][:200]}" if said else ""))
    if not encoded.stdout:
        raise EncodingFailed("ffmpeg wrote no audio")
    return encoded.stdout
