"""Batched Stable Audio generation: many different requests share one DiT forward per denoising step.

Each request keeps everything that makes its audio its own: its prompt encoding, its seconds conditioning,
its initial noise and SDE noise (from its own seed), its scheduler (step index, solver history, Brownian
tree) and its own number of steps. Only the transformer blocks run on the stacked rows of all requests.
On CPU fp32 a request's audio is bit-identical to ``StableAudioPipeline`` with the same seed, alone or in
any batch; see ``tests/test_pipeline.py``.
"""

from __future__ import annotations

import copy
import logging
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from diffusers import StableAudioPipeline
from diffusers.models.embeddings import get_1d_rotary_pos_embed
from diffusers.utils.torch_utils import randn_tensor

logger = logging.getLogger(__name__)

# torchsde warns on every Brownian query because diffusers' schedule overshoots the tree's bounds by a few
# ULPs (diffusers issue #13274); the query is still answered. The rare case that recurses is caught per request.
warnings.filterwarnings("ignore", message="Should have ", module="torchsde")


@dataclass(frozen=True)
class AudioRequest:
    """One generation, already validated against the model's limits."""

    prompt: str
    seed: int
    audio_length: float
    audio_start: float = 0.0
    negative_prompt: str | None = None
    guidance_scale: float = 7.0
    num_inference_steps: int = 100


@dataclass
class AudioResult:
    """Float32 audio of shape (channels, samples), or the reason this request alone failed."""

    audio: np.ndarray | None = None
    error: str | None = None
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelLimits:
    """What the loaded model can produce; requests are validated against this."""

    sample_rate: int
    channels: int
    hop_length: int
    latent_frames: int

    @property
    def max_samples(self) -> int:
        return self.latent_frames * self.hop_length

    @property
    def max_seconds(self) -> float:
        return self.max_samples / self.sample_rate


@dataclass
class _RequestState:
    """Per-request tensors and solver state carried through the denoising loop."""

    request: AudioRequest
    generator: torch.Generator
    scheduler: object
    text_conditioning: torch.Tensor  # (rows, text tokens + 2, dim): rows = 2 with guidance, else 1
    global_conditioning: torch.Tensor  # (rows, 1, inner_dim): global_proj(seconds conditioning)
    latents: torch.Tensor  # (1, channels, frames), float32
    step: int = 0
    error: str | None = None
    started_at: float = 0.0

    @property
    def guided(self) -> bool:
        return self.text_conditioning.shape[0] == 2

    @property
    def timestep(self) -> torch.Tensor:
        return self.scheduler.timesteps[self.step]

    @property
    def active(self) -> bool:
        return self.error is None and self.step < len(self.scheduler.timesteps)


class BatchedStableAudio:
    """Runs a list of heterogeneous requests through one ``StableAudioPipeline``'s components."""

    def __init__(self, pipe: StableAudioPipeline, decode_margin_frames: int | None = None):
        """decode_margin_frames: None decodes all latent frames then crops, exactly as the pipeline does;
        an integer decodes only the frames under the requested window plus that many on each side
        (the decoder sees ±10 frames, so 16 matches the full decode to float precision)."""
        self.pipe = pipe
        self.decode_margin_frames = decode_margin_frames
        self.transformer = pipe.transformer
        self.vae = pipe.vae
        self.device = pipe.transformer.device
        self.dtype = pipe.transformer.dtype
        self.limits = ModelLimits(
            sample_rate=int(pipe.vae.config.sampling_rate),
            channels=int(pipe.vae.config.audio_channels),
            hop_length=int(pipe.vae.hop_length),
            latent_frames=int(pipe.transformer.config.sample_size),
        )
        self.rotary_embedding = tuple(
            part.to(self.device)
            for part in get_1d_rotary_pos_embed(
                pipe.rotary_embed_dim, self.limits.latent_frames + 1, use_real=True, repeat_interleave_real=False
            )
        )

    @torch.no_grad()
    def __call__(self, requests: list[AudioRequest]) -> list[AudioResult]:
        states = [self.prepare_request(request) for request in requests]
        self.denoise(states)
        return [self.decode(state) for state in states]

    # 1. Per-request conditioning, noise and scheduler, computed exactly as StableAudioPipeline does for one prompt.
    def prepare_request(self, request: AudioRequest) -> _RequestState:
        pipe = self.pipe
        started_at = time.perf_counter()
        guided = request.guidance_scale > 1.0
        negative_prompt = request.negative_prompt if guided else None
        prompt_embeds = pipe.encode_prompt(request.prompt, self.device, guided, negative_prompt)
        seconds_start, seconds_end = pipe.encode_duration(
            request.audio_start,
            request.audio_start + request.audio_length,
            self.device,
            guided and negative_prompt is not None,
            1,
        )
        text_conditioning = torch.cat([prompt_embeds, seconds_start, seconds_end], dim=1)
        seconds_conditioning = torch.cat([seconds_start, seconds_end], dim=2)
        if guided and negative_prompt is None:  # unconditional row: all-zero text and seconds embeddings
            text_conditioning = torch.cat([torch.zeros_like(text_conditioning), text_conditioning])
            seconds_conditioning = torch.cat([seconds_conditioning, seconds_conditioning])

        scheduler = copy.deepcopy(pipe.scheduler)
        scheduler.set_timesteps(request.num_inference_steps, device=self.device)
        generator = torch.Generator("cpu").manual_seed(request.seed)
        latents = self.prepare_latents(generator, scheduler.init_noise_sigma)
        return _RequestState(
            request=request,
            generator=generator,
            scheduler=scheduler,
            text_conditioning=text_conditioning,
            global_conditioning=self.transformer.global_proj(seconds_conditioning),
            latents=latents,
            started_at=started_at,
        )

    def prepare_latents(self, generator: torch.Generator, init_noise_sigma: float) -> torch.Tensor:
        shape = (1, self.transformer.config.in_channels, self.limits.latent_frames)
        noise = randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)
        return noise * init_noise_sigma

    # 2. Denoising: one transformer forward per step over the rows of every request still running.
    def denoise(self, states: list[_RequestState]) -> None:
        while active := [state for state in states if state.active]:
            noise_predictions = self.predict_noise(active)
            for state, noise_pred in zip(active, noise_predictions):
                self.scheduler_step(state, noise_pred)

    def predict_noise(self, active: list[_RequestState]) -> list[torch.Tensor]:
        model_inputs, text_rows, global_rows = [], [], []
        for state in active:
            rows = state.text_conditioning.shape[0]
            latents = state.latents.expand(rows, -1, -1)
            model_inputs.append(state.scheduler.scale_model_input(latents, state.timestep))
            text_rows.append(state.text_conditioning)
            global_rows.append(state.global_conditioning + self.embed_timestep(state.timestep).unsqueeze(1))
        output = self.transformer_forward(torch.cat(model_inputs), torch.cat(text_rows), torch.cat(global_rows))

        predictions = []
        for state, rows in zip(active, output.split([s.text_conditioning.shape[0] for s in active])):
            rows = rows.float()
            if state.guided:
                uncond, cond = rows.chunk(2)
                predictions.append(uncond + state.request.guidance_scale * (cond - uncond))
            else:
                predictions.append(rows)
        return predictions

    def embed_timestep(self, timestep: torch.Tensor) -> torch.Tensor:
        # Per request, on one row, as the pipeline does: a Linear over a taller batch rounds differently on CPU.
        dit = self.transformer
        return dit.timestep_proj(dit.time_proj(timestep.unsqueeze(0).to(self.dtype)))

    def transformer_forward(
        self, latents: torch.Tensor, text_conditioning: torch.Tensor, global_conditioning: torch.Tensor
    ) -> torch.Tensor:
        """StableAudioDiTModel.forward with the global (seconds + timestep) embedding computed per request."""
        dit = self.transformer
        hidden = latents.to(self.dtype)
        cross_attention = dit.cross_attention_proj(text_conditioning)
        hidden = (dit.preprocess_conv(hidden) + hidden).transpose(1, 2)
        hidden = torch.cat([global_conditioning, dit.proj_in(hidden)], dim=-2)
        for block in dit.transformer_blocks:
            hidden = block(
                hidden_states=hidden,
                attention_mask=None,
                encoder_hidden_states=cross_attention,
                encoder_attention_mask=None,
                rotary_embedding=self.rotary_embedding,
            )
        hidden = dit.proj_out(hidden).transpose(1, 2)[:, :, 1:]
        return dit.postprocess_conv(hidden) + hidden

    def scheduler_step(self, state: _RequestState, noise_pred: torch.Tensor) -> None:
        try:
            state.latents = state.scheduler.step(
                noise_pred, state.timestep, state.latents, generator=state.generator
            ).prev_sample
        except RecursionError:  # torchsde's Brownian tree recursing on an out-of-bounds query (diffusers #13274)
            state.error = f"the SDE noise sampler failed at step {state.step} for this seed and step count"
            logger.exception("scheduler step failed for seed %d", state.request.seed)
            return
        state.step += 1

    # 3. Decode each request's latents and cut its window: [audio_start, audio_start + audio_length].
    def decode(self, state: _RequestState) -> AudioResult:
        denoised_at = time.perf_counter()
        if state.error:
            return AudioResult(error=state.error)
        start, length = self.window_samples(state.request)
        first_frame, last_frame = self.decoded_frames(start, length)
        latents = state.latents[:, :, first_frame:last_frame].to(self.vae.dtype)
        audio = self.vae.decode(latents).sample[0]
        offset = start - first_frame * self.limits.hop_length
        audio = audio[:, offset : offset + length].float().cpu().numpy()
        if not np.isfinite(audio).all():
            return AudioResult(error="the model produced non-finite audio")
        return AudioResult(
            audio=audio,
            timings={"denoise_s": denoised_at - state.started_at, "decode_s": time.perf_counter() - denoised_at},
        )

    def decoded_frames(self, start: int, length: int) -> tuple[int, int]:
        if self.decode_margin_frames is None:
            return 0, self.limits.latent_frames
        hop, margin = self.limits.hop_length, self.decode_margin_frames
        first = max(0, start // hop - margin)
        last = min(self.limits.latent_frames, -(-(start + length) // hop) + margin)
        return first, last

    def window_samples(self, request: AudioRequest) -> tuple[int, int]:
        rate = self.limits.sample_rate
        return round(request.audio_start * rate), round(request.audio_length * rate)
