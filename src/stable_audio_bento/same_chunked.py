"""SAME-S's attention as Stability's code computes it, for diffusers' ``AutoencoderSAME``.

Stability's SAME autoencoders come in two attention patterns (``TransformerResamplingBlock`` in
``stable_audio_3/models/autoencoders.py``): SAME-L attends through a sliding window, which diffusers implements as a
band mask; SAME-S (the small models' autoencoder) has no sliding window and attends within contiguous chunks of
``chunk_size`` block-input frames (32 audio patches = 2 latent frames = 34 tokens), the first half of each block's
layers on chunks aligned to the clip's start and the second half on chunks shifted by half a chunk ("chunk midpoint
shift": the first and last half chunk are repeated at the ends so that every shifted chunk is full, then cut off
again). Positions restart at 0 in every chunk. The clip is zero-padded to whole chunks (the encoder before its
input mapping, the decoder after its latent projection) and the decoder's output mapping runs over the padded
frames before they are cut. diffusers' converter reads no chunk settings and gives SAME-S the band mask with a
window of one latent frame: each token sees a different set of tokens, at different positions, than in training.

``use_chunked_attention`` switches a loaded ``AutoencoderSAME``'s blocks to this pattern in place. The parameters
and their names do not change; the transformer layers are diffusers' own, called once per chunk without a mask.
It records the settings in the autoencoder's config under Stability's names (``CHUNK_SETTINGS``), so
``save_pretrained`` writes them to ``vae/config.json``, where the loader reads them back.
"""

from __future__ import annotations

import math

import torch
from diffusers.models.autoencoders.autoencoder_same import AutoencoderSAME, SAMETransformerResamplingBlock
from torch import nn
from torch.nn.utils import weight_norm  # as diffusers' blocks: weight_g / weight_v, the checkpoints' names

SAME_S_CHUNK_SIZE = 32  # block-input frames per chunk in SAME-S's encoder and decoder configs
SAME_S_DECODER_MAPPING_KERNEL = 3  # SAME-S's decoder maps tokens to patches with a 3-tap conv (``conv_mapping``)
# Stability's names for these settings (its TransformerResamplingBlock's arguments, in model_config.json); the same
# names in a diffusers vae/config.json, which AutoencoderSAME itself does not read.
CHUNK_SETTINGS = ("chunk_size", "chunk_midpoint_shift")


class ChunkedResamplingBlock(SAMETransformerResamplingBlock):
    """A SAME resampling block with chunked attention (see the module docstring); made from a loaded block by
    ``use_chunked_attention``, never constructed directly."""

    chunk_size: int
    midpoint_shift: bool

    @property
    def frames_per_chunk(self) -> int:
        """Latent-side frames per chunk: the decoder's input frames, the encoder's output frames."""
        return self.chunk_size // self.stride

    @property
    def reach_frames(self) -> int:
        """Latent-side frames on each side that can change a frame's output: its chunk, the shifted chunk over it
        (together at most 1.5 chunks either way) and one token of the output mapping, rounded up to whole chunks so
        that windows starting on a multiple of it stay aligned to the chunks of the whole clip."""
        return 2 * self.frames_per_chunk

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, length = x.shape
        stride, width = self.stride, self.out_channels
        x = self.mapping(pad_to_multiple(x, self.chunk_size)).transpose(1, 2)
        segments = x.shape[1] // stride
        x = torch.cat([x.reshape(batch * segments, stride, width),
                       self.new_tokens.expand(batch * segments, 1, -1)], dim=1)
        x = self.attend(x.reshape(batch, segments * (stride + 1), width))
        latents = x.reshape(batch, segments, stride + 1, width)[:, :, -1].transpose(1, 2)
        # Stability's block also returns the latents of the padding; diffusers' interface has ceil(length / stride).
        return latents[..., : math.ceil(length / stride)]

    def _decode(self, x: torch.Tensor) -> torch.Tensor:
        batch, width, length = x.shape
        stride = self.stride
        x = pad_to_multiple(x, self.frames_per_chunk).transpose(1, 2)
        frames = x.shape[1]
        x = torch.cat([x.reshape(batch * frames, 1, width), self.new_tokens.expand(batch * frames, stride, -1)], dim=1)
        x = self.attend(x.reshape(batch, frames * (stride + 1), width))
        x = x.reshape(batch, frames, stride + 1, width)[:, :, 1:].reshape(batch, frames * stride, width)
        return self.mapping(x.transpose(1, 2))[..., : length * stride]

    def attend(self, tokens: torch.Tensor) -> torch.Tensor:
        """The block's transformer layers over (batch, tokens, width), a whole number of chunks."""
        chunk = self.frames_per_chunk * (self.stride + 1)
        layers = list(self.transformers)
        if not self.midpoint_shift:
            return run_in_chunks(layers, tokens, chunk)
        half, shift = len(layers) // 2, chunk // 2
        tokens = run_in_chunks(layers[:half], tokens, chunk)
        tokens = torch.cat([tokens[:, :shift], tokens, tokens[:, -shift:]], dim=1)
        return run_in_chunks(layers[half:], tokens, chunk)[:, shift:-shift]


def run_in_chunks(layers: list[nn.Module], tokens: torch.Tensor, chunk: int) -> torch.Tensor:
    """Each chunk of ``chunk`` consecutive tokens through the layers on its own: chunks become batch rows, so
    attention stays inside a chunk and the rotary positions count from 0 in each."""
    batch, length, width = tokens.shape
    x = tokens.reshape(batch * (length // chunk), chunk, width)
    for layer in layers:
        x = layer(x)
    return x.reshape(batch, length, width)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """(batch, channels, frames) right-padded with zero frames to a multiple of ``multiple``."""
    return nn.functional.pad(x, (0, -x.shape[-1] % multiple))


def use_chunked_attention(vae: AutoencoderSAME, chunk_size: int = SAME_S_CHUNK_SIZE, midpoint_shift: bool = True,
                          decoder_mapping_kernel: int | None = None) -> AutoencoderSAME:
    """Switches every resampling block of ``vae`` to chunked attention, in place; returns ``vae``.

    decoder_mapping_kernel: give the decoder's output mapping this many taps ('same' padding), new random weights
    to be loaded afterwards (diffusers' blocks only have 1-tap mappings; SAME-S's decoder has 3); None keeps it."""
    blocks = [*vae.encoder.blocks, *vae.decoder.blocks]
    for block in blocks:
        if chunk_size % block.stride:
            raise ValueError(f"chunk_size {chunk_size} must be a multiple of the block stride {block.stride}")
    for block in blocks:
        block.__class__ = ChunkedResamplingBlock
        block.chunk_size, block.midpoint_shift = chunk_size, midpoint_shift
    vae.register_to_config(chunk_size=chunk_size, chunk_midpoint_shift=midpoint_shift)  # CHUNK_SETTINGS
    if decoder_mapping_kernel is not None:
        for block in vae.decoder.blocks:
            if isinstance(block.mapping, nn.Conv1d):
                conv = nn.Conv1d(block.in_channels, block.out_channels, decoder_mapping_kernel, padding="same")
                block.mapping = weight_norm(conv).to(block.mapping.weight.device, block.mapping.weight.dtype)
    return vae


def uses_chunked_attention(vae: AutoencoderSAME) -> bool:
    return any(isinstance(block, ChunkedResamplingBlock) for block in vae.decoder.blocks)
