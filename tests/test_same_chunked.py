"""SAME-S's chunked attention with a midpoint shift (same_chunked.py) against an independent computation written
from Stability's description: every transformer layer evaluated over the whole token sequence with an explicit
same-chunk mask and explicit per-chunk positions, its attention, norms, rotary embedding and feed-forward spelled
out here, not borrowed from diffusers. On a tiny random SAME whose layers and output tokens are all non-trivial."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.autoencoder_same import AutoencoderSAME

from stable_audio_bento.sa3_loading import let_autoencoder_hear_its_input, randomize_zero_initialised
from stable_audio_bento.same_chunked import ChunkedResamplingBlock, use_chunked_attention, uses_chunked_attention
from stable_audio_bento.same_windows import (decode_in_windows, decoder_reach_frames, encode_in_windows,
                                             encoder_reach_frames)
from conftest import snr_db


CHUNK = 32  # SAME-S: 32 audio patches = 2 latent frames = 34 tokens per chunk
TOKENS_PER_CHUNK = 34


def tiny_same(depth: int, seed: int = 0) -> AutoencoderSAME:
    torch.manual_seed(seed)
    vae = AutoencoderSAME(encoder_channels=8, encoder_transformer_depths=(depth,), dim_heads=8, ff_mult=1)
    randomize_zero_initialised(vae, gain=2.0)
    let_autoencoder_hear_its_input(vae)
    return vae.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def band_and_chunked():
    """Diffusers' band attention, and the same weights with chunked attention and SAME-S's 3-tap decoder mapping
    (new random weights for it)."""
    band, chunked = tiny_same(depth=4), tiny_same(depth=4)
    use_chunked_attention(chunked, decoder_mapping_kernel=3)
    return band, chunked


# --- the independent computation -------------------------------------------------------------------------------

def dyt(norm, x):
    return norm.gamma * torch.tanh(norm.alpha * x) + norm.beta


def rotate(x, positions, rotary_dims):
    """Rotary embedding on the first ``rotary_dims`` channels of each head, halves rotated against each other."""
    inverse_frequencies = 1.0 / 10000 ** (torch.arange(0, rotary_dims, 2).float() / rotary_dims)
    angles = positions.float()[:, None] * inverse_frequencies[None]
    angles = torch.cat([angles, angles], dim=-1)[:, None, :]  # (tokens, 1, rotary_dims)
    head, rest = x[..., :rotary_dims], x[..., rotary_dims:]
    first, second = head.chunk(2, dim=-1)
    rotated = head * angles.cos() + torch.cat([-second, first], dim=-1) * angles.sin()
    return torch.cat([rotated, rest], dim=-1)


def layer_over_sequence(layer, x, positions, allowed):
    """One SAME transformer layer, (tokens, width) → (tokens, width): pre-norm differential self-attention (two
    softmax maps over the same values, subtracted) with DyT query/key norms, then a SwiGLU feed-forward."""
    attention, heads = layer.attn, layer.attn.heads
    head_width = attention.dim_heads
    h = dyt(layer.norm_attn, x)
    q1, q2, k1, k2, v = (part.reshape(len(x), heads, head_width) for part in attention.to_qkv(h).chunk(5, dim=-1))
    q1, q2, k1, k2 = (dyt(norm, t) for norm, t in ((attention.q_norm, q1), (attention.q_norm, q2),
                                                   (attention.k_norm, k1), (attention.k_norm, k2)))
    q1, q2, k1, k2 = (rotate(t, positions, head_width // 2) for t in (q1, q2, k1, k2))

    def softmax_attention(q, k):
        scores = torch.einsum("ihd,jhd->hij", q, k) / math.sqrt(head_width)
        weights = scores.masked_fill(~allowed[None], float("-inf")).softmax(dim=-1)
        return torch.einsum("hij,jhd->ihd", weights, v)

    x = x + attention.to_out((softmax_attention(q1, k1) - softmax_attention(q2, k2)).reshape(len(x), -1))
    value, gate = layer.ff.proj_in(dyt(layer.norm_ff, x)).chunk(2, dim=-1)
    return x + layer.ff.proj_out(value * F.silu(gate))


def chunked_layers(layers, tokens):
    """First half of the layers within chunks from the start, second half within chunks shifted by half a chunk,
    the first and last half chunk repeated at the ends (positions count from 0 in each chunk)."""
    def within_chunks(layer_list, x):
        index = torch.arange(len(x))
        same_chunk = (index[:, None] // TOKENS_PER_CHUNK) == (index[None, :] // TOKENS_PER_CHUNK)
        for layer in layer_list:
            x = layer_over_sequence(layer, x, index % TOKENS_PER_CHUNK, same_chunk)
        return x

    half, shift, count = len(layers) // 2, TOKENS_PER_CHUNK // 2, len(tokens)
    tokens = within_chunks(layers[:half], tokens)
    repeated = [*range(shift), *range(count), *range(count - shift, count)]
    return within_chunks(layers[half:], tokens[repeated])[shift:count + shift]


def weight_normed(conv):
    return conv.weight_g * conv.weight_v / conv.weight_v.norm(dim=(1, 2), keepdim=True)


def independent_decode(vae, latents):
    """(256, frames) latents → (2, frames · 4096) audio, one clip."""
    block = vae.decoder.blocks[0]
    frames = latents.shape[-1]
    x = vae.decoder.proj((latents * vae.bottleneck.running_std).T)  # (frames, width)
    x = torch.cat([x, x.new_zeros(frames % 2, x.shape[1])])  # one zero frame if odd: whole chunks
    new_token = block.new_tokens[0, 0]
    tokens = torch.stack([row for frame in x for row in (frame, *[new_token] * block.stride)])
    out = chunked_layers(list(block.transformers), tokens)
    kept = torch.stack([out[i] for i in range(len(out)) if i % (block.stride + 1)])  # drop each frame's input token
    mapping = block.mapping
    kernel = mapping.weight_v.shape[-1]
    patches = F.conv1d(kept.T[None], weight_normed(mapping), mapping.bias, padding=kernel // 2)[0]
    patches = patches[:, : frames * block.stride]  # (2 · 256, frames · 16): channel c, sample p at row c · 256 + p
    return patches.reshape(2, 256, -1).permute(0, 2, 1).reshape(2, -1)


def independent_encode(vae, audio):
    """(2, samples) audio → (256, ceil(samples / 4096)) latents, one clip."""
    block = vae.encoder.blocks[0]
    samples = audio.shape[-1]
    audio = F.pad(audio, (0, -samples % 256))
    patches = audio.reshape(2, -1, 256).permute(0, 2, 1).reshape(512, -1)  # row c · 256 + p
    patches = F.pad(patches, (0, -patches.shape[-1] % CHUNK))  # whole chunks, before the input mapping
    mapped = F.conv1d(patches[None], weight_normed(block.mapping), block.mapping.bias)[0].T  # (patches, width)
    new_token = block.new_tokens[0, 0]
    tokens = torch.stack([row for start in range(0, len(mapped), block.stride)
                          for row in (*mapped[start:start + block.stride], new_token)])
    out = chunked_layers(list(block.transformers), tokens)
    latents = out[block.stride::block.stride + 1][: math.ceil(samples / 4096)]
    encoded = vae.encoder.proj(latents).T
    bottleneck = vae.bottleneck
    return (encoded * bottleneck.scale[0] + bottleneck.bias[0]) / bottleneck.running_std


# --- tests --------------------------------------------------------------------------------------------------------

def test_swap_keeps_parameter_names_and_marks_the_vae(band_and_chunked):
    band, chunked = band_and_chunked
    assert set(band.state_dict()) == set(chunked.state_dict())
    assert uses_chunked_attention(chunked) and not uses_chunked_attention(band)
    assert all(isinstance(block, ChunkedResamplingBlock) for block in [*chunked.encoder.blocks,
                                                                       *chunked.decoder.blocks])
    assert chunked.decoder.blocks[0].mapping.weight_v.shape[-1] == 3
    assert chunked.encoder.blocks[0].mapping.weight_v.shape[-1] == 1


@pytest.mark.parametrize("frames", [2, 7, 12])  # one chunk; odd (padded to whole chunks); several
def test_decode_equals_the_independent_computation(band_and_chunked, frames):
    _, chunked = band_and_chunked
    latents = torch.randn(1, 256, frames, generator=torch.Generator().manual_seed(frames))
    with torch.no_grad():
        audio = chunked.decode(latents).sample[0]
        expected = independent_decode(chunked, latents[0])
    assert audio.shape == expected.shape == (2, frames * 4096)
    assert expected.abs().max() > 1e-2  # the audio is not a constant the two could agree on trivially
    torch.testing.assert_close(audio, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("samples", [2 * 4096, 5 * 4096 + 100])  # one chunk; padded to whole patches and chunks
def test_encode_equals_the_independent_computation(band_and_chunked, samples):
    _, chunked = band_and_chunked
    audio = torch.randn(1, 2, samples, generator=torch.Generator().manual_seed(samples)) * 0.3
    with torch.no_grad():
        latents = chunked.encode(audio).latents[0]
        expected = independent_encode(chunked, audio[0])
    assert latents.shape == expected.shape == (256, math.ceil(samples / 4096))
    torch.testing.assert_close(latents, expected, rtol=1e-4, atol=1e-5)


def test_independent_layer_is_diffusers_layer_under_band_attention(band_and_chunked):
    """The check's own layer agrees with diffusers' when both see a whole sequence with absolute positions: so a
    difference above could only come from the chunking."""
    band, _ = band_and_chunked
    layer = band.decoder.blocks[0].transformers[0]
    tokens = torch.randn(40, layer.attn.to_out.in_features, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = layer_over_sequence(layer, tokens, torch.arange(40), torch.ones(40, 40, dtype=torch.bool))
        theirs = layer(tokens[None])[0]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_band_attention_is_not_the_chunked_attention(band_and_chunked):
    """Identical weights: diffusers' band attention decodes something else than the chunked attention SAME-S was
    trained with (printed for the README)."""
    band, _ = band_and_chunked
    chunked = use_chunked_attention(tiny_same(depth=4))  # the band model's weights, its 1-tap mapping too
    latents = torch.randn(1, 256, 12, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        snr = snr_db(chunked.decode(latents).sample, band.decode(latents).sample)
    print(f"band vs chunked attention, same weights, 12 frames: {snr:.1f} dB SNR")
    assert snr < 40


@pytest.mark.parametrize("frames", [300, 301])
def test_windowed_decode_stays_aligned_to_the_chunks(band_and_chunked, frames):
    _, chunked = band_and_chunked
    margin = decoder_reach_frames(chunked)
    assert margin == 4 and margin % 2 == 0
    latents = torch.randn(1, 256, frames, generator=torch.Generator().manual_seed(frames))
    with torch.no_grad():
        whole = chunked.decode(latents).sample
        windowed = decode_in_windows(chunked, latents, 128, margin)
    assert windowed.shape == whole.shape
    snr = snr_db(whole, windowed)
    print(f"chunked, windows of 128 + {margin} frames, {frames} frames: {snr:.1f} dB SNR")
    assert snr >= 100 or np.array_equal(whole.numpy(), windowed.numpy())


@pytest.mark.parametrize("frames", [300, 301])
def test_windowed_encoding_stays_aligned_to_the_chunks(band_and_chunked, frames):
    _, chunked = band_and_chunked
    margin = encoder_reach_frames(chunked)
    assert margin == 4
    audio = torch.randn(1, 2, frames * 4096 - 1000, generator=torch.Generator().manual_seed(frames))
    with torch.no_grad():
        whole = chunked.encode(audio).latents
        windowed = encode_in_windows(chunked, audio, 128, margin)
    assert windowed.shape == whole.shape == (1, whole.shape[1], frames)
    snr = snr_db(whole, windowed)
    print(f"chunked encoder, windows of 128 + {margin} frames, {frames} frames: {snr:.1f} dB SNR")
    assert snr >= 100


def test_windows_off_the_chunk_grid_are_refused(band_and_chunked):
    """A window of 127 frames would attend within other chunks than the whole clip (8 dB from the whole decode)."""
    band, chunked = band_and_chunked
    latents = torch.randn(1, 256, 20, generator=torch.Generator().manual_seed(0))
    audio = torch.randn(1, 2, 20 * 4096, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for window, margin in ((7, 4), (8, 3)):
            with pytest.raises(ValueError, match="multiples of 2 latent frames"):
                decode_in_windows(chunked, latents, window, margin)
            with pytest.raises(ValueError, match="multiples of 2 latent frames"):
                encode_in_windows(chunked, audio, window, margin)
        assert decode_in_windows(band, latents, 7, 3).shape == band.decode(latents).sample.shape
