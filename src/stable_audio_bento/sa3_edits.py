"""Stable Audio 3 starting from the user's audio, as diffusers' ``StableAudio3AudioToAudioPipeline`` and
``StableAudio3InpaintPipeline`` start it; ``sa3.py`` calls these while preparing a request.

- Audio-to-audio (a variation of the whole clip): the start is (1 - n) · reference + n · noise, and the schedule runs
  its log-SNR time from n down to 0, n being the request's ``strength``.
- Inpainting (regenerate [mask_start, mask_end], keep the rest): the start is pure noise; the DiT is told in every
  block what to keep through ``to_local_embed`` of cat([mask, reference · mask]) (mask 1 = keep). A continuation is
  the same with the region running from the upload's end to a longer ``audio_length``.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers.models.autoencoders.autoencoder_same import AutoencoderSAME

from .same_windows import encode_in_windows


@torch.no_grad()
def encode_reference(vae: AutoencoderSAME, audio: np.ndarray, frames: int, dtype: torch.dtype, window: int | None,
                     margin: int) -> torch.Tensor:
    """(1, latent channels, frames) in ``dtype``: the upload, (channels, samples) at the model's rate, encoded by the
    SAME encoder, then cut or zero-padded in latent space to the request's latent length. ``window`` None encodes
    the whole upload, as the pipelines do; otherwise windows of that many frames with ``margin`` on each side
    (``same_windows.py``), and only as far as the request reaches. Contiguous, as the pipelines' copy of it is: the
    encoder's output is a transposed view, element-wise operations keep that layout, and the DiT's and decoder's
    convolutions round differently on it."""
    samples = torch.from_numpy(audio).unsqueeze(0).to(vae.device, vae.dtype)
    latents = encode_in_windows(vae, samples, window, margin, frames)
    if latents.shape[-1] < frames:
        latents = torch.cat([latents, latents.new_zeros(*latents.shape[:2], frames - latents.shape[-1])], dim=-1)
    return latents.to(dtype).contiguous()


def variation_start(reference: torch.Tensor, noise: torch.Tensor, strength: float) -> torch.Tensor:
    """Audio-to-audio's first latents: the reference mixed with noise at level ``strength``."""
    return (1.0 - strength) * reference + strength * noise


def regenerated_frames(mask_start: float, mask_end: float, sample_rate: int, hop: int, frames: int
                       ) -> tuple[int, int]:
    """The latent frames [first, last) to regenerate for [mask_start, mask_end] seconds, rounded outward: the frame
    holding mask_start through the frame holding mask_end. (diffusers rounds the end down as well, which would keep
    the last partial frame of a continuation as the zero padding past the upload.) The seconds become sample
    positions first, to the nearest sample: a frame's start given in seconds lands a hair either side of it in float
    arithmetic, and dividing the seconds directly took in the frame before or after at 7 % of frame boundaries. A
    region narrower than a sample still regenerates the frame holding it."""
    start, end = round(mask_start * sample_rate), round(mask_end * sample_rate)
    first = min(start // hop, frames - 1)
    return first, min(max(-(-end // hop), first + 1), frames)


def inpainting_conditioning(reference: torch.Tensor, first: int, last: int) -> torch.Tensor:
    """(1, 1 + latent channels, frames), the DiT's local conditioning: the keep-mask and the reference where it
    is kept. Built in fp32 and multiplied, as the pipeline builds it, then cast back."""
    mask = torch.ones((1, 1, reference.shape[-1]), device=reference.device)
    mask[..., first:last] = 0.0
    return torch.cat([mask, reference * mask], dim=1).to(reference.dtype)
