"""The audio an edit starts from: an uploaded file decoded (libsndfile, else ffmpeg), resampled to the model's rate
and shaped to the model's channels, as float32 (channels, samples). Every way an upload can be unusable is an
``APIError`` naming the ``audio`` field.

What an upload may cost is bounded before it is decoded: the size limit caps the file, not what it decodes to (a
282 KB FLAC of silence decodes to 30 minutes, 1.2 GB as float32). So the header's rate and channels are checked
first, decoding stops one sample past the model's window, and only the channels the model uses are kept.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import soundfile
import soxr

from .generation import ModelLimits
from .protocol import APIError

MAX_UPLOAD_RATE = 192_000  # Hz: the highest rate in common use (studio masters)
MAX_UPLOAD_CHANNELS = 8  # 7.1 surround
DECODE_BLOCK_FRAMES = 1 << 16
# ffmpeg's demuxers for audio files (mov: MP4 and M4A; matroska: WebM; asf: WMA); none that reads a list of others
FFMPEG_DEMUXERS = "wav,w64,aiff,caf,flac,mp3,ogg,mov,matroska,aac,ac3,eac3,asf,wv,ape,amr,au,tta,dts"
FFMPEG_TIMEOUT_S = 30.0  # a 380 s upload decodes in about a second
# Full scale is 1. Float files may go past it a little (a master's inter-sample peaks); one past this is no audio
# signal the models were trained on, and a finite but huge one (1e24 on the tiny model) made them generate non-finite
# audio: a 500 for the client's input.
MAX_UPLOAD_PEAK = 16.0
FFMPEG_READ_BYTES = 1 << 16  # a pipe's buffer


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
    digits = 2  # more where needed to tell the two apart: a sample over the window is 23 µs at 44.1 kHz
    while seconds is not None and digits < 6 and f"{seconds:.{digits}f}" == f"{limits.max_seconds:.{digits}f}":
        digits += 1
    length = "longer than the window" if seconds is None else f"{seconds:.{digits}f} s long"
    return APIError(f"audio is {length}; this model's window is {limits.max_seconds:.{digits}f} s", param="audio")


def decode(path: Path, limits: ModelLimits) -> tuple[np.ndarray, int]:
    """(channels, frames) float32, at most ``limits.channels`` channels, and the sample rate; libsndfile first (WAV,
    FLAC, Ogg Vorbis/Opus; MP3 only without ffmpeg), then ffmpeg for the rest (MP3, AAC, M4A, WebM, ...)."""
    if path.stat().st_size == 0:
        raise APIError("audio: the uploaded file is empty", param="audio")
    try:
        with soundfile.SoundFile(path) as upload:
            # libsndfile ends an MP3 where its first frame's Xing header says: two MP3s joined with `cat` came out
            # as the first alone. ffmpeg decodes every frame.
            by_ffmpeg = upload.format == "MP3" and all(shutil.which(tool) for tool in ("ffmpeg", "ffprobe"))
            decoded = None if by_ffmpeg else decode_with_libsndfile(upload, limits)
    except (soundfile.LibsndfileError, RuntimeError, TypeError):  # unreadable to libsndfile, on opening or reading
        decoded = None
    frames, rate = decode_with_ffmpeg(path, limits) if decoded is None else decoded
    if frames.shape[0] == 0:
        raise APIError("audio: the uploaded file holds no samples", param="audio")
    low, high = float(frames.min()), float(frames.max())  # no temporary of the upload's size, as abs() would make
    if not (math.isfinite(low) and math.isfinite(high)):  # NaN wins min and max
        raise APIError("audio: the uploaded file holds non-finite samples", param="audio")
    if (peak := max(high, -low)) > MAX_UPLOAD_PEAK:
        raise APIError(f"audio: the uploaded file peaks at {peak:.3g} times full scale; at most {MAX_UPLOAD_PEAK:g} "
                       "is taken (normalise it)", param="audio")
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
    # read() returns the frames it got; SoundFile.blocks() would yield its whole buffer, whatever was read into it:
    # a file shorter than its header says (a cut MP3) or one libsndfile cannot seek in (GSM 6.10) came out with
    # stale memory after its audio, another upload's samples included.
    blocks, read = [], 0
    while read <= limit and len(block := upload.read(min(DECODE_BLOCK_FRAMES, limit + 1 - read), dtype="float32",
                                                     always_2d=True)):
        blocks.append(block[:, :keep] if keep == block.shape[1] else np.ascontiguousarray(block[:, :keep]))
        read += len(block)
    frames = np.concatenate(blocks) if blocks else np.zeros((0, keep), dtype=np.float32)
    if len(frames) > limit:  # a header that understated the length
        raise too_long(limits, None)
    return frames, upload.samplerate


def decode_with_ffmpeg(path: Path, limits: ModelLimits) -> tuple[np.ndarray, int]:
    undecodable = APIError("audio: the uploaded file is not audio that libsndfile or ffmpeg can decode",
                           param="audio")
    probed = run_ffmpeg(["ffprobe", "-v", "error", "-of", "json", "-show_entries", "stream=sample_rate,channels",
                         "-select_streams", "a:0", *ffmpeg_input(path)], undecodable, max_bytes=1 << 16)
    try:
        [stream] = json.loads(probed)["streams"]
        rate, channels = int(stream["sample_rate"]), int(stream["channels"])
    except (KeyError, ValueError, TypeError) as error:  # no audio stream, or one ffprobe could not describe
        raise undecodable from error
    check_header(rate, channels)
    keep = min(channels, limits.channels)
    max_bytes = frames_to_read(rate, limits) * keep * 4  # float32
    # The first channels as they are (a channel map, not a downmix), float32 at the file's own rate. Cut by bytes,
    # not -t: timestamps stop a few samples short (a longer file passed, truncated), or never (a file can zero them).
    decoded = run_ffmpeg(["ffmpeg", "-v", "error", "-nostdin", *ffmpeg_input(path), "-map", "0:a:0",
                          "-af", f"pan={keep}c|" + "|".join(f"c{channel}=c{channel}" for channel in range(keep)),
                          "-ar", str(rate), "-f", "f32le", "-"], undecodable, max_bytes=max_bytes)
    if len(decoded) > max_bytes:
        raise too_long(limits, None)
    return np.frombuffer(decoded, dtype="<f4").reshape(-1, keep), rate


def ffmpeg_input(path: Path) -> list[str]:
    """ffmpeg reads what a file asks it to: a playlist (HLS, concat) opens the files it names, from this server's
    disk, and a live one is reloaded for minutes. So only audio containers' demuxers may read the upload, and only
    the upload itself is opened."""
    return ["-protocol_whitelist", "file", "-format_whitelist", FFMPEG_DEMUXERS, "-i", f"file:{path}"]


def run_ffmpeg(command: list[str], undecodable: APIError, max_bytes: int) -> bytearray:
    """Its output, read until past ``max_bytes`` (then ffmpeg is killed: at most a chunk more is held); a failure,
    or a call still running after ``FFMPEG_TIMEOUT_S`` (killed), is ``undecodable``."""
    try:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.DEVNULL)
    except OSError as error:  # no ffmpeg
        raise undecodable from error
    deadline = threading.Timer(FFMPEG_TIMEOUT_S, process.kill)  # a kill ends the read below: its pipe closes
    output = bytearray()
    try:
        deadline.start()
        while len(output) <= max_bytes and (chunk := process.stdout.read(FFMPEG_READ_BYTES)):
            output += chunk
        if len(output) <= max_bytes:  # its output ended: its exit code says whether all of it came (a kill: no)
            process.wait()
    finally:
        deadline.cancel()
        if deadline.is_alive():  # its kill must not come after the wait below, to another process given the pid
            deadline.join()
        process.kill()
        process.wait()
        process.stdout.close()
    if len(output) <= max_bytes and process.returncode != 0:
        raise undecodable
    return output


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
