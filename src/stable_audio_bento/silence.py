"""``trim_silence``: cutting the quiet a generation leaves after its sound. The model fills the whole requested
length, so a 3 s sound asked for at 47 s comes back with 44 s of near-silence; pydub's silence detection finds
where the sound ends, and the float audio is cut there before it is encoded."""

from __future__ import annotations

import numpy as np
from pydub.silence import detect_leading_silence

from .audio import pcm16_segment

# pydub's own default for detect_leading_silence: below it, a 10 ms stretch is silent (RMS over all channels,
# relative to full scale). Quiet enough to keep a reverb tail until it is inaudible at normal listening levels.
SILENCE_THRESHOLD_DBFS = -50.0
CHUNK_MS = 10  # the stretch pydub measures at a time: the cut lands within this of where the sound ends
MIN_KEPT_S = 0.5  # a clip that is quiet throughout keeps this much (or all of itself, if shorter)


def trim_trailing_silence(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """``audio`` (channels, samples) without its silent end: the same array when nothing is cut, else a view of
    its start, never shorter than MIN_KEPT_S."""
    reversed_segment = pcm16_segment(audio, sample_rate).reverse()  # scanned from the end: only the tail is read
    silent_ms = detect_leading_silence(reversed_segment, silence_threshold=SILENCE_THRESHOLD_DBFS,
                                       chunk_size=CHUNK_MS)
    samples = audio.shape[1]
    kept = max(samples - int(reversed_segment.frame_count(ms=silent_ms)),
               min(samples, round(MIN_KEPT_S * sample_rate)))
    return audio if kept >= samples else audio[:, :kept]
