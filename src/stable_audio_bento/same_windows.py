"""A long clip through the SAME autoencoder in windows, within float rounding of the whole clip at once.

diffusers' SAME encoder and decoder attend through a dense band mask over all of a clip's tokens (17 per latent
frame), built through an int64 table of position differences, so their memory grows with the square of the clip:
8.7 GB above the loaded model to decode 120 s, ~90 GB at 380 s (benchmarks/bench_sa3.py); the encoder's mask over a
380 s upload is as large. Yet a latent frame only reaches a few frames either way (``reach_frames``), so a window of
frames, given that many more frames on each side and cropped again, comes out as in the whole clip. Memory then
stays that of one window at any length. A window that spans the clip is exactly the whole-clip computation.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from fractions import Fraction

import torch
from diffusers.models.autoencoders.autoencoder_same import (
    AutoencoderSAME,
    SAMEAttention,
    SAMETransformerResamplingBlock,
)
from torch import nn

from .same_chunked import ChunkedResamplingBlock


def encode_in_windows(vae: AutoencoderSAME, audio: torch.Tensor, window: int | None, margin: int,
                      frames: int | None = None) -> torch.Tensor:
    """(batch, audio channels, samples) → (batch, latent channels, frames): the latents of the first ``frames``
    latent frames (None: all of the clip), ``window`` frames at a time (None, or a clip that fits one window: the
    whole clip at once, as diffusers' pipelines encode it), each window encoded with ``margin`` more frames of
    audio on each side and cropped again. Fewer frames come back when the clip is shorter."""
    hop = vae.downsampling_ratio
    total = math.ceil(audio.shape[-1] / hop)
    if window is None or total <= window:  # one window holds it all: encoded whole, as diffusers does
        return vae.encode(audio).latents[..., :frames]
    sides = encoder_latent_side(vae)
    check_chunk_alignment(sides, window, margin)
    wanted = total if frames is None else min(total, frames)
    windows = []
    for start, end, first, last in window_bounds(wanted, total, window, margin):
        with rotary_positions_from(sides, first):
            latents = vae.encode(audio[..., first * hop: last * hop]).latents
        windows.append(latents[..., start - first: end - first])
    return torch.cat(windows, dim=-1)


def decode_in_windows(vae: AutoencoderSAME, latents: torch.Tensor, window: int | None, margin: int) -> torch.Tensor:
    """(batch, latent channels, frames) → (batch, audio channels, frames · hop), decoded ``window`` frames at a time
    (None: all at once, as diffusers' pipelines decode), each window with ``margin`` more frames on each side
    (fewer at the clip's ends), decoded and cropped again."""
    frames, hop = latents.shape[-1], vae.downsampling_ratio
    sides = decoder_latent_side(vae)
    if window is not None:
        check_chunk_alignment(sides, window, margin)
    windows = []
    for start, end, first, last in window_bounds(frames, frames, window or frames, margin):
        with rotary_positions_from(sides, first):
            audio = vae.decode(latents[..., first:last]).sample
        windows.append(audio[..., (start - first) * hop: (end - first) * hop])
    return torch.cat(windows, dim=-1)


def window_bounds(wanted: int, total: int, window: int, margin: int) -> Iterator[tuple[int, int, int, int]]:
    """(start, end, first, last) for each window: latent frames [start, end) of the first ``wanted`` come out of a
    run over frames [first, last), ``margin`` more on each side where the clip's ``total`` frames have them."""
    for start in range(0, wanted, window):
        end = min(start + window, wanted)
        yield start, end, max(0, start - margin), min(total, end + margin)


def encoder_reach_frames(vae: AutoencoderSAME) -> int:
    """How many latent frames on each side can change a latent frame in the SAME encoder (its patching, input
    mappings and final projection are pointwise in time)."""
    return reach_frames(encoder_latent_side(vae))


def decoder_reach_frames(vae: AutoencoderSAME) -> int:
    """How many latent frames on each side can change a frame's audio in the SAME decoder. SAME-L: 12 frames;
    SAME-S with diffusers' band attention 6, with Stability's chunked attention 4 (whole chunks, so that windows
    stay aligned to the chunks of the whole clip; its 3-tap output mapping is inside that reach)."""
    return reach_frames(decoder_latent_side(vae))


def encoder_latent_side(vae: AutoencoderSAME) -> list[tuple[SAMETransformerResamplingBlock, int]]:
    """Each encoder block with how many of its output frames (the side of its 1 + stride token groups) make one
    latent frame, from the latent end."""
    return latent_side(reversed(vae.encoder.blocks))


def decoder_latent_side(vae: AutoencoderSAME) -> list[tuple[SAMETransformerResamplingBlock, int]]:
    """Each decoder block with how many of its input frames make one latent frame, from the latent end."""
    return latent_side(vae.decoder.blocks)


def latent_side(blocks_from_latent: Iterator[SAMETransformerResamplingBlock] | nn.ModuleList
                ) -> list[tuple[SAMETransformerResamplingBlock, int]]:
    sides, frames_per_latent = [], 1
    for block in blocks_from_latent:
        sides.append((block, frames_per_latent))
        frames_per_latent *= block.stride
    return sides


def reach_frames(sides: list[tuple[SAMETransformerResamplingBlock, int]]) -> int:
    """The blocks' band attentions are the only layers that mix positions: a block's frame on its latent side is
    1 + stride tokens, and each token sees ``sliding_window`` such frames either way, so each transformer layer
    reaches that many frames further. A chunked block reaches ``reach_frames`` (``same_chunked.py``)."""
    reach = 0.0
    for block, frames_per_latent in sides:
        if isinstance(block, ChunkedResamplingBlock):
            reach += block.reach_frames / frames_per_latent
        else:
            reach += len(block.transformers) * block.sliding_window / frames_per_latent
    return math.ceil(reach)


def check_chunk_alignment(sides: list[tuple[SAMETransformerResamplingBlock, int]], window: int, margin: int
                          ) -> None:
    """Chunked attention (SAME-S) is only reproduced in windows that start on a chunk boundary of the whole clip,
    so window and margin must be whole multiples of every chunk in latent frames (SAME-S: 2). Misaligned, a window
    attends within other chunks than the clip: 8 dB from the whole decode in windows of 127 frames."""
    alignment = 1
    for block, frames_per_latent in sides:
        if isinstance(block, ChunkedResamplingBlock):
            alignment = math.lcm(alignment, Fraction(block.frames_per_chunk, frames_per_latent).numerator)
    if window % alignment or margin % alignment:
        raise ValueError(f"window ({window}) and margin ({margin}) must be multiples of {alignment} latent frames "
                         "for this autoencoder's chunked attention")


@contextmanager
def rotary_positions_from(latent_side: list[tuple[SAMETransformerResamplingBlock, int]], first_frame: int
                          ) -> Iterator[None]:
    """Within it, the blocks' rotary embeddings count positions from latent frame ``first_frame`` of the clip rather
    than from the window's start. Attention depends only on position differences, but fp32 angles of far positions
    round differently (~1e-3 rad at 20 000 tokens): on the tiny model at 60 s, decoding windows counted from 0 came
    122 dB from the whole decode, windows counted from their place in the clip 132-137 dB."""
    if first_frame == 0:
        yield
        return
    shifted = []
    for block, frames_per_latent in latent_side:
        if isinstance(block, ChunkedResamplingBlock):  # positions restart in every chunk: nothing to shift
            continue
        offset = first_frame * frames_per_latent * (block.stride + 1)
        for attention in (module for module in block.modules() if isinstance(module, SAMEAttention)):
            shifted.append((attention, attention.rope))
            attention.rope = ShiftedRotaryEmbedding(attention.rope, offset)
    try:
        yield
    finally:
        for attention, rope in shifted:
            attention.rope = rope


class ShiftedRotaryEmbedding(nn.Module):
    """A SAME attention's rotary table for a window ``offset`` tokens into the clip: the attention keeps the last
    ``seq_len`` rows of the table it asks for, so a table ``offset`` rows longer gives the window's tokens the same
    angles, bit for bit, as in the whole clip."""

    def __init__(self, rope: nn.Module, offset: int):
        super().__init__()
        self.rope, self.offset = rope, offset

    def forward(self, seq_len: int, device: torch.device) -> torch.Tensor:
        return self.rope(seq_len + self.offset, device)
