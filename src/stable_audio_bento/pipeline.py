"""The stable-audio-open-1.0 family: the stages of one request, so that many different requests share one DiT
forward per denoising step.

Each request keeps everything that makes its audio its own: its prompt encoding, its seconds conditioning,
its initial noise and SDE noise (from its own seed), its scheduler (step index, solver history, Brownian
tree) and its own number of steps. Only the transformer blocks run on the stacked rows of all requests.
On CPU fp32 a request's audio is bit-identical to ``StableAudioPipeline`` with the same seed, alone or with any
others in any step; see ``tests/test_pipeline.py``. Which requests take each step is the step loop's business
(``step_loop.py``); this module only knows how one step of one set of requests runs.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch
from diffusers import StableAudioPipeline
from diffusers.models.autoencoders.autoencoder_oobleck import OobleckDiagonalGaussianDistribution
from diffusers.models.embeddings import get_1d_rotary_pos_embed
from diffusers.utils.torch_utils import randn_tensor

from .compilation import eager_forward, prepared_forward
from .cuda_memory import host_drawn_noise, release_cached_memory, rows_that_fit, wait_for_queued_work
from .generation import AudioRequest, AudioResult, ModelLimits
from .step_loop import RequestState

# torchsde warns on every Brownian query because diffusers' schedule overshoots the tree's bounds by a few
# ULPs (diffusers issue #13274); the query is still answered. The rare case that recurses is caught per request.
warnings.filterwarnings("ignore", message="Should have ", module="torchsde")

SHORT_WINDOW_TAIL_FRAMES = 16  # latent frames denoised past a short clip's end (the decoder reaches ±10)
SHORT_WINDOW_BUCKET_FRAMES = 64  # window lengths are rounded up to this, so similar clips share a forward
ENCODE_MARGIN_FRAMES = 16  # twice the Oobleck encoder's receptive field (an input sample reaches ±8 latent frames)
# An edit's smallest sigma step: ten times the resolution of diffusers' Brownian tree, which rounds its times to 1e-6
# (tol=1e-6). Smaller steps round to empty intervals (NaN noise, or torchsde recursing), or below that repeat a
# timestep, which the scheduler's step lookup cannot handle.
SMALLEST_EDIT_SIGMA_STEP = 1e-5


@dataclass(frozen=True)
class SamplingOptions:
    """How generation trades exactness for speed. The defaults keep every request's audio reproducible from
    its seed alone, whatever else is in the batch.

    decode_margin_frames: None decodes all 1024 latent frames and crops, bit-exact with diffusers; N decodes
        only the frames under the requested window plus N each side (16 is within float precision of full).
    sde_noise: ``exact`` draws the SDE noise from diffusers' torchsde Brownian tree (bit-exact, ~20 ms per
        request per step on CPU); ``vectorized`` draws the same Gaussian increments from the request's generator;
        ``auto``: ``vectorized`` on CUDA, ``exact`` elsewhere (see ``sde_noise_for``).
    denoise_window: ``full`` denoises the model's whole 47.55 s window as diffusers does; ``short`` denoises only
        the frames up to a clip's end (plus a tail), which changes the audio and is off by default.
    max_rows: cap on DiT rows per forward (a guided request uses two); None for no cap.
    """

    decode_margin_frames: int | None = 16
    sde_noise: Literal["auto", "exact", "vectorized"] = "auto"
    denoise_window: Literal["full", "short"] = "full"
    max_rows: int | None = None


def sde_noise_for(device: torch.device) -> Literal["exact", "vectorized"]:
    """``auto``'s choice. On an H200 the tree's queries, which run on the host, took 17-40 % of a batched step,
    vectorized increments 3-7 % (benchmarks/RESULTS.md); and a GPU's half-precision audio is not bit-identical to
    diffusers' fp32 CPU reference anyway, so there the tree costs time and buys nothing. On CPU it keeps every
    request bit-identical to diffusers."""
    return "vectorized" if device.type == "cuda" else "exact"


class GaussianIncrements:
    """Replaces the scheduler's Brownian-tree sampler in ``vectorized`` mode.

    The tree returns (W(t1) - W(t0)) / sqrt(|t1 - t0|) for consecutive, disjoint intervals: independent standard
    normals. Drawing those from the request's own generator is the same process without the tree's cost; the
    values differ from diffusers', so this is a separate, documented mode."""

    def __init__(self, generator: torch.Generator, like: torch.Tensor):
        self.generator, self.shape, self.device, self.dtype = generator, like.shape, like.device, like.dtype

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        return host_drawn_noise(self.shape, self.generator, self.device, self.dtype)


@dataclass(kw_only=True)
class StableAudioState(RequestState):
    """Per-request tensors and solver state carried through the step loop; latents (1, channels, frames) fp32."""

    generator: torch.Generator
    scheduler: object
    text_conditioning: torch.Tensor  # (rows, text tokens + 2, dim)
    global_conditioning: torch.Tensor  # (rows, 1, inner_dim): global_proj(seconds conditioning)

    @property
    def timestep(self) -> torch.Tensor:
        return self.scheduler.timesteps[self.step]

    @property
    def steps_total(self) -> int:
        return len(self.scheduler.timesteps)


class BatchedStableAudio:
    """One ``StableAudioPipeline``'s components as the stages the step loop drives, for any mix of requests:
    ``prepare_request`` (once, on admission), ``forward`` (one batched DiT forward over the states that share a
    ``forward_key``), ``advance`` (each request's own scheduler step), ``decode`` (once, when it finishes)."""

    starts_from_audio = True  # prepare_request honours AudioRequest.init_audio (edits)
    inpaints = False  # not trained to regenerate a region: AudioRequest.mask_start / mask_end are refused

    def __init__(self, pipe: StableAudioPipeline, options: SamplingOptions = SamplingOptions()):
        self.pipe = pipe
        self.device = pipe.transformer.device
        if options.sde_noise == "auto":
            options = replace(options, sde_noise=sde_noise_for(self.device))
        self.options = options
        self.transformer = pipe.transformer
        self.vae = pipe.vae
        self.dtype = pipe.transformer.dtype
        self.default_steps = 100  # the model card's and diffusers' default
        self.default_guidance_scale = 7.0
        self.limits = ModelLimits(
            sample_rate=int(pipe.vae.config.sampling_rate),
            channels=int(pipe.vae.config.audio_channels),
            hop_length=int(pipe.vae.hop_length),
            latent_frames=int(pipe.transformer.config.sample_size),
            min_strength_per_step=self.strength_per_sigma_step(SMALLEST_EDIT_SIGMA_STEP),
        )
        self._rotary_embeddings: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._silence_parameters: tuple[torch.Tensor, torch.Tensor] | None = None
        self._transformer_forward = self.transformer_forward

    def compile(self, mode: str = "default") -> None:
        self._transformer_forward = prepared_forward(self.transformer_forward, mode, self.device)

    @torch.no_grad()
    def rows_capacity(self) -> int:
        """DiT rows per forward that fit in free CUDA memory, from the memory one full-window forward takes (the
        probe asks for the whole window, so that in the short denoise window too it denoises all its frames)."""
        probe = AudioRequest("probe", seed=0, audio_length=self.limits.max_seconds, num_inference_steps=1)
        state = self.prepare_request(probe)
        with eager_forward(self):  # a graph's replay would show none of the memory
            return rows_that_fit(self.device, lambda: self.forward([state]), state.request.rows)

    def release_memory(self) -> None:
        release_cached_memory(self.device)

    def wait_for_device(self) -> None:
        wait_for_queued_work(self.device)

    # 1. Per-request conditioning, noise and scheduler, computed exactly as StableAudioPipeline does for one prompt.
    @torch.no_grad()
    def prepare_request(self, request: AudioRequest) -> StableAudioState:
        if request.inpainting:
            raise ValueError("stable-audio-open-1.0 cannot inpaint: mask_start / mask_end must be left out")
        pipe = self.pipe
        guided = request.rows == 2
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

        generator = torch.Generator("cpu").manual_seed(request.seed)
        frames = self.denoised_frames(request)
        if request.init_audio is None:
            scheduler = copy.deepcopy(pipe.scheduler)
            scheduler.set_timesteps(request.num_inference_steps, device=self.device)
            latents = self.prepare_latents(generator, scheduler.init_noise_sigma, frames)
        else:
            scheduler = self.edit_scheduler(request)
            latents = self.prepare_edit_latents(generator, request.init_audio, scheduler.config.sigma_max, frames)
        # Its first step is its first timestep: found by value otherwise, with a nonzero() and an item(), two waits
        # for the GPU on every request's first step.
        scheduler.set_begin_index(0)
        if self.options.sde_noise == "vectorized":
            scheduler.noise_sampler = GaussianIncrements(generator, latents)
        return StableAudioState(
            request=request,
            generator=generator,
            scheduler=scheduler,
            text_conditioning=text_conditioning,
            global_conditioning=self.transformer.global_proj(seconds_conditioning),
            latents=latents,
        )

    def denoised_frames(self, request: AudioRequest) -> int:
        if self.options.denoise_window == "full":
            return self.limits.latent_frames
        start, length = self.window_samples(request)
        needed = -(-(start + length) // self.limits.hop_length) + SHORT_WINDOW_TAIL_FRAMES
        bucketed = -(-needed // SHORT_WINDOW_BUCKET_FRAMES) * SHORT_WINDOW_BUCKET_FRAMES
        return min(self.limits.latent_frames, bucketed)

    def prepare_latents(self, generator: torch.Generator, init_noise_sigma: float, frames: int) -> torch.Tensor:
        # Always draw the full window, so a short window starts from the same noise as the full one.
        shape = (1, self.transformer.config.in_channels, self.limits.latent_frames)
        noise = randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)
        return noise[:, :, :frames] * init_noise_sigma

    # 1b. An edit starts part of the way down the schedule, from its audio's latents plus noise of that level.
    def initial_sigma(self, strength: float) -> float:
        """sigma_min^(1 - s) * sigma_max^s: the point at fraction s of the model's exponential (log-linear) sigma
        range, so s = 1 starts where text-to-audio does and s -> 0 leaves the audio as it is."""
        config = self.pipe.scheduler.config
        return config.sigma_min ** (1 - strength) * config.sigma_max**strength

    def strength_per_sigma_step(self, sigma_step: float) -> float:
        """The strength per step after the first that makes an edit's smallest step ``sigma_step``: log sigma
        falls by s * log(sigma_max / sigma_min) / (steps - 1) per step, and the smallest step is the last one
        above sigma_min, sigma_min * (exp(that) - 1)."""
        config = self.pipe.scheduler.config
        return math.log1p(sigma_step / config.sigma_min) / math.log(config.sigma_max / config.sigma_min)

    def edit_scheduler(self, request: AudioRequest) -> object:
        """The pipeline's scheduler with sigma_max = the edit's initial sigma: all its steps spread over
        [sigma_min, sigma_init], and the Brownian tree (built from the config on the first step) bounded by them."""
        least = self.limits.min_strength(request.num_inference_steps)
        if request.strength < least:
            raise ValueError(f"strength must be at least {least:.3g} with {request.num_inference_steps} steps")
        config = self.pipe.scheduler.config
        scheduler = type(self.pipe.scheduler).from_config(config, sigma_max=self.initial_sigma(request.strength))
        scheduler.set_timesteps(request.num_inference_steps, device=self.device)
        if request.num_inference_steps == 1:
            # diffusers' one-point schedule is its bottom, sigma_min, whatever the strength; the edit's latents are
            # noised to the top, where stable-audio-tools' one-step schedule (k-diffusion's) also starts.
            scheduler.sigmas = torch.tensor([scheduler.config.sigma_max, 0.0], device=self.device)
            scheduler.timesteps = scheduler.precondition_noise(scheduler.sigmas[:1])
        return scheduler

    def prepare_edit_latents(self, generator: torch.Generator, audio: np.ndarray, sigma: float, frames: int
                             ) -> torch.Tensor:
        """encode(audio laid at the window's start, zero-padded) + sigma * noise. Draws from the request's
        generator in a fixed order: first the noise (the same values text-to-audio starts from with this seed),
        then the VAE's latent sample."""
        noise = self.prepare_latents(generator, sigma, frames)
        return self.encode_audio(generator, audio)[:, :, :frames] + noise

    @torch.no_grad()
    def encode_audio(self, generator: torch.Generator, audio: np.ndarray) -> torch.Tensor:
        """(1, latent channels, latent frames) fp32: a sample of the VAE's posterior for the audio laid at the
        start of the model window and zero-padded to it."""
        parameters = self.posterior_parameters(audio, self.limits.latent_frames)
        return OobleckDiagonalGaussianDistribution(parameters).sample(generator=generator)

    def posterior_parameters(self, audio: np.ndarray, frames: int) -> torch.Tensor:
        """The encoder's output for ``audio`` zero-padded to ``frames`` latent frames, fp32, without encoding the
        padding: a frame sees only the input within the encoder's receptive field, so frames more than
        ENCODE_MARGIN_FRAMES from the audio see silence, whose encoding is a constant away from the window's end
        and a fixed tail at it (encoding 47.55 s takes minutes on CPU; this costs the audio's length + 32 frames)."""
        hop, margin = self.limits.hop_length, ENCODE_MARGIN_FRAMES
        head_frames = min(frames, -(-audio.shape[1] // hop) + 2 * margin)
        head = torch.zeros((1, self.limits.channels, head_frames * hop), dtype=torch.float32)
        head[0, :, : audio.shape[1]] = torch.from_numpy(audio)
        parameters = self.encode_samples(head)
        if head_frames == frames:
            return parameters
        constant, end = self.silence_parameters()
        filled = constant.expand(-1, -1, frames - head_frames)
        return torch.cat([parameters[:, :, : head_frames - margin], filled, end], dim=2)

    def silence_parameters(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoding of silence: one interior frame and the last ENCODE_MARGIN_FRAMES of a window; computed once."""
        if self._silence_parameters is None:
            margin = ENCODE_MARGIN_FRAMES
            zeros = torch.zeros((1, self.limits.channels, 3 * margin * self.limits.hop_length))
            parameters = self.encode_samples(zeros)
            self._silence_parameters = parameters[:, :, margin : margin + 1], parameters[:, :, 2 * margin :]
        return self._silence_parameters

    def encode_samples(self, audio: torch.Tensor) -> torch.Tensor:
        return self.vae.encoder(audio.to(self.device, self.vae.dtype)).float()

    # 2. One denoising step: a transformer forward over the rows of states of equal window length, then each
    # request's own guidance and scheduler step.
    @staticmethod
    def forward_key(state: StableAudioState) -> int:
        """States with equal keys can share one forward: the window length in latent frames."""
        return state.frames

    @torch.no_grad()
    def forward(self, active: list[StableAudioState]) -> list[torch.Tensor]:
        """Each state's guided noise prediction at its own timestep, from one batched transformer forward."""
        model_inputs, text_rows, global_rows = [], [], []
        for state in active:
            latents = state.latents.expand(state.request.rows, -1, -1)
            model_inputs.append(state.scheduler.scale_model_input(latents, state.timestep))
            text_rows.append(state.text_conditioning)
            global_rows.append(state.global_conditioning + self.embed_timestep(state.timestep).unsqueeze(1))
        latents = torch.cat(model_inputs)
        output = self._transformer_forward(latents, torch.cat(text_rows), torch.cat(global_rows),
                                           self.rotary_embedding(latents.shape[-1]))

        predictions = []
        for state, rows in zip(active, output.split([s.request.rows for s in active])):
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

    def rotary_embedding(self, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        if frames not in self._rotary_embeddings:
            cos, sin = get_1d_rotary_pos_embed(
                self.pipe.rotary_embed_dim, frames + 1, use_real=True, repeat_interleave_real=False
            )
            self._rotary_embeddings[frames] = (cos.to(self.device), sin.to(self.device))
        return self._rotary_embeddings[frames]

    def transformer_forward(
        self, latents: torch.Tensor, text_conditioning: torch.Tensor, global_conditioning: torch.Tensor,
        rotary_embedding: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """StableAudioDiTModel.forward with the global (seconds + timestep) embedding computed per request. The
        rotary embedding comes in ready: built inside, its CPU arithmetic would compile to CPU code."""
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
                rotary_embedding=rotary_embedding,
            )
        hidden = dit.proj_out(hidden).transpose(1, 2)[:, :, 1:]
        return dit.postprocess_conv(hidden) + hidden

    @torch.no_grad()
    def advance(self, state: StableAudioState, noise_pred: torch.Tensor) -> None:
        try:
            state.latents = state.scheduler.step(
                noise_pred, state.timestep, state.latents, generator=state.generator
            ).prev_sample
        except RecursionError as error:  # torchsde's Brownian tree recursing on an out-of-bounds query (#13274)
            raise RuntimeError(f"the SDE noise sampler failed at step {state.step} for this seed and step count"
                               ) from error
        state.step += 1

    # 3. Decode each request's latents and cut its window: [audio_start, audio_start + audio_length].
    def decode(self, state: StableAudioState) -> AudioResult:
        return AudioResult.checked(self.decode_window(state.latents, state.request))

    @torch.no_grad()
    def decode_window(self, latents: torch.Tensor, request: AudioRequest) -> np.ndarray:
        """(channels, samples) float32 audio of the request's window from its (1, channels, frames) latents."""
        start, length = self.window_samples(request)
        first_frame, last_frame = self.decoded_frames(start, length, latents.shape[-1])
        audio = self.vae.decode(latents[:, :, first_frame:last_frame].to(self.vae.dtype)).sample[0]
        offset = start - first_frame * self.limits.hop_length
        return audio[:, offset : offset + length].float().cpu().numpy()

    def decoded_frames(self, start: int, length: int, frames: int) -> tuple[int, int]:
        if self.options.decode_margin_frames is None:
            return 0, frames
        hop, margin = self.limits.hop_length, self.options.decode_margin_frames
        return max(0, start // hop - margin), min(frames, -(-(start + length) // hop) + margin)

    def window_samples(self, request: AudioRequest) -> tuple[int, int]:
        return self.limits.start_sample(request.audio_start), self.limits.samples(request.audio_length)
