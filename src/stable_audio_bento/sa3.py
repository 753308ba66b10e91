"""The Stable Audio 3 family: the stages of one request, so that many different requests share one DiT forward
per denoising step.

Each request keeps everything that makes its audio its own: its text and duration conditioning (projected once,
on admission), its latent length, its generator (initial noise and, with stochastic sampling, the fresh noise of
every step), its own sigma schedule and step count. Only the DiT's blocks run on the stacked rows of many requests.
What the DiT computes per sample (the AdaLN signal from timestep and duration, the text projection), its residual
input and output convs and its input and output projections run per request, over that request's own rows, as the
pipeline runs them for one prompt: on CPU a Linear over a few more rows rounds differently, and a Conv1d over one
row takes another kernel than over several. The blocks' Linears see the rows of every request in the forward, each
request's rows × tokens of them (its frames and the memory tokens), where the row count no longer changes the
rounding once each request brings ``MIN_SHARED_LINEAR_ROWS``; a request that brings fewer (a clip of about a second,
or a model with few memory tokens) takes its forwards alone. Self-attention over latent frames has no padding mask
in diffusers' Stable Audio 3 DiT, so only requests of equal latent length share a forward; and inpainting requests
(``sa3_edits.py``) share theirs only with each other: their DiT adds the local conditioning in every block, the
pipelines for the others add nothing.

On CPU fp32 a request's audio is bit-identical to ``StableAudio3Pipeline`` (an edit: to
``StableAudio3AudioToAudioPipeline`` or ``StableAudio3InpaintPipeline``) with the same seed, alone or with any others
in any step, when it is decoded (and its upload encoded) whole as the pipeline does; see ``tests/test_sa3.py``. By
default a long clip is decoded, and a long upload encoded, in windows instead (``SA3Options.window_frames``), within
float rounding of the whole clip at a small fraction of its memory. Which requests take each step is the step loop's
business (``step_loop.py``).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import StableAudio3Pipeline
from diffusers.pipelines.stable_audio_3.pipeline_stable_audio_3 import logsnr_sigma_schedule
from diffusers.utils.torch_utils import randn_tensor

from .compilation import eager_forward, prepared_forward
from .cuda_memory import host_drawn_noise, release_cached_memory, rows_that_fit, wait_for_queued_work
from .generation import AudioRequest, AudioResult, ModelLimits
from .sa3_edits import encode_reference, inpainting_conditioning, regenerated_frames, variation_start
from .same_windows import decode_in_windows, decoder_reach_frames, encoder_reach_frames
from .step_loop import RequestState

# The pipeline's defaults: the reference sampler's log-SNR range, warped into the sigma schedule.
LOGSNR_MIN, LOGSNR_MAX = -6.2, 2.0
DISTILLED_STEPS, BASE_STEPS = 8, 100  # the pipeline's default step counts for the two kinds of checkpoint
# On this project's CPUs a Linear over 1-3, 5-7 or 9-11 rows rounds differently from the same rows inside a taller
# matrix (another kernel), over 4, 8 or 12 and more the same; 16 leaves a margin.
MIN_SHARED_LINEAR_ROWS = 16


@dataclass(frozen=True)
class SA3Options:
    """max_rows: cap on DiT rows per forward (a guided request uses two); None for no cap. The engine's step loop
    reads it as it reads ``SamplingOptions.max_rows`` for stable-audio-open.

    window_frames: encode an upload and decode a clip in windows of this many latent frames (each with the
    encoder's or decoder's reach of extra frames on both sides, cropped off again, ``same_windows.py``); None runs
    the whole clip at once, as the pipelines do, bit for bit. The SAME autoencoder attends through a dense band mask
    over 17 tokens per frame, so a whole clip needs memory quadratic in its length: 8.7 GB above the loaded model to
    decode 120 s (benchmarks/bench_sa3.py, any decoder width), ~10 times that at 380 s. Windows of 128 frames
    (~12 s) needed 0.16-0.3 GB at 120 s, and the same at any length.

    reference_conditioning: feed every DiT block the all-zero inpainting conditioning (mask and masked input) that
    Stability's own code passes in text-to-audio, so that ``to_local_embed``'s output for zeros (a learned constant
    per block) is added as in training; the audio then equals ``StableAudio3InpaintPipeline`` with an all-zero mask
    instead of ``StableAudio3Pipeline``, which skips the term (README, "Departures from diffusers")."""

    max_rows: int | None = None
    window_frames: int | None = 128
    reference_conditioning: bool = False


@dataclass(kw_only=True)
class StableAudio3State(RequestState):
    """Per-request tensors and sampler state carried through the step loop; latents (1, latent channels, frames)."""

    generator: torch.Generator
    timesteps: torch.Tensor  # (steps,): what the DiT is told
    sigmas: torch.Tensor  # (steps + 1,) float32, ending at 0: what the sampler mixes with
    context: torch.Tensor  # (rows, text tokens + 1, embed_dim): projected text + duration token, [negative, positive]
    global_embedding: torch.Tensor  # (rows, embed_dim): the projected duration embedding
    samples: int  # output length: int(duration · sample rate), as the pipeline trims
    local_conditioning: torch.Tensor | None = None  # (1, 1 + latent channels, frames): see start()

    @property
    def timestep(self) -> torch.Tensor:
        return self.timesteps[self.step]

    @property
    def steps_total(self) -> int:
        return len(self.timesteps)


class BatchedStableAudio3:
    """One ``StableAudio3Pipeline``'s components as the stages the step loop drives, for any mix of requests:
    ``prepare_request`` (once, on admission), ``forward`` (one batched DiT forward over the states that share a
    ``forward_key``), ``advance`` (each request's own sampler step), ``decode`` (once, when it finishes).

    max_seconds: the longest audio served; default the duration embedder's clamp (384 s for the published models,
    whose trained maxima, 380 s medium and 120 s small, the loader knows: ``sa3_loading.trained_max_seconds``)."""

    starts_from_audio = True  # prepare_request honours AudioRequest.init_audio: audio-to-audio (edits)
    inpaints = True  # ... and AudioRequest.mask_start / mask_end: inpainting and continuation

    def __init__(self, pipe: StableAudio3Pipeline, max_seconds: float | None = None,
                 options: SA3Options = SA3Options()):
        self.pipe = pipe
        self.options = options
        self.transformer = pipe.transformer
        self.vae = pipe.vae
        self.device = pipe.transformer.device
        self.dtype = pipe.transformer.dtype
        self.noise_dtype = pipe.text_encoder.dtype  # the pipeline draws its first noise in the text embeddings' dtype
        self.stochastic = bool(pipe.scheduler.config.stochastic_sampling)
        self.default_steps = DISTILLED_STEPS if self.stochastic else BASE_STEPS
        self.default_guidance_scale = 1.0  # distilled: guidance is baked in; base: the pipeline's default too
        self.max_seconds = float(max_seconds or pipe.duration_embedder.config.max_val)
        sample_rate, hop = int(pipe.vae.config.sampling_rate), int(pipe.vae.downsampling_ratio)
        self.limits = ModelLimits(
            sample_rate=sample_rate,
            channels=int(pipe.vae.config.audio_channels),
            hop_length=hop,
            # The latent length of the longest request; max_duration_s keeps the limit itself, within that frame.
            latent_frames=math.ceil(self.max_seconds * sample_rate / hop),
            max_duration_s=self.max_seconds,
            fixed_start=True,
        )
        self.encode_margin_frames = encoder_reach_frames(pipe.vae)
        self.decode_margin_frames = decoder_reach_frames(pipe.vae)
        self._schedules: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._rotary_table = self.transformer.rotary_pos_emb(self.tokens(self.limits.latent_frames), self.device)
        self._transformer_forward = self.transformer_forward

    def compile(self, mode: str = "default") -> None:
        self._transformer_forward = prepared_forward(self.transformer_forward, mode, self.device)

    @torch.no_grad()
    def rows_capacity(self) -> int:
        """DiT rows per forward that fit in free CUDA memory, from the memory one row of the longest request takes."""
        state = self.prepare_request(AudioRequest("probe", seed=0, audio_length=self.limits.max_seconds,
                                                  guidance_scale=1.0, num_inference_steps=1))
        with eager_forward(self):  # a graph's replay would show none of the memory
            return rows_that_fit(self.device, lambda: self.forward([state]), state.request.rows)

    def release_memory(self) -> None:
        release_cached_memory(self.device)

    def wait_for_device(self) -> None:
        wait_for_queued_work(self.device)

    # 1. Per-request conditioning, noise and schedule, computed exactly as StableAudio3Pipeline does for one prompt.
    @torch.no_grad()
    def prepare_request(self, request: AudioRequest) -> StableAudio3State:
        self.check_request(request)
        duration = self.pipe.encode_duration(request.audio_length, self.device, 1, 1)  # (1, global_cond_dim)
        context, context_mask = self.encode_text(request, duration)
        rows_duration = torch.cat([duration] * request.rows)  # the pipeline concatenates, so do we
        generator = torch.Generator("cpu").manual_seed(request.seed)
        frames = self.latent_frames(request.audio_length)
        noise = randn_tensor((1, self.vae.config.latent_dim, frames), generator=generator, device=self.device,
                             dtype=self.noise_dtype)
        latents, sigma_max, local_conditioning = self.start(request, noise)
        timesteps, sigmas = self.schedule(request.num_inference_steps, sigma_max)
        return StableAudio3State(
            request=request,
            generator=generator,
            timesteps=timesteps,
            sigmas=sigmas,
            context=self.project_context(context, context_mask),
            global_embedding=self.transformer.to_global_embed(rows_duration),
            latents=latents,
            samples=int(request.audio_length * self.limits.sample_rate),
            local_conditioning=local_conditioning,
        )

    def start(self, request: AudioRequest, noise: torch.Tensor) -> tuple[torch.Tensor, float, torch.Tensor | None]:
        """(first latents, the schedule's sigma_max, the DiT's local conditioning): text-to-audio and inpainting
        start from the noise at 1, audio-to-audio from its mix with the upload at ``strength``. Without inpainting
        the conditioning is None (as diffusers' pipelines leave it out) or, with ``reference_conditioning``, zeros
        (Stability's: nothing kept)."""
        if request.inpainting:
            reference = self.encode_reference(request.init_audio, noise.shape[-1])
            first, last = regenerated_frames(request.mask_start, request.mask_end, self.limits.sample_rate,
                                             self.limits.hop_length, noise.shape[-1])
            return noise, 1.0, inpainting_conditioning(reference, first, last).to(self.dtype)
        local = None
        if self.options.reference_conditioning:
            local = noise.new_zeros(1, self.transformer.config.local_add_cond_dim, noise.shape[-1], dtype=self.dtype)
        if request.init_audio is None:
            return noise, 1.0, local
        reference = self.encode_reference(request.init_audio, noise.shape[-1])
        return variation_start(reference, noise, request.strength), request.strength, local

    def encode_reference(self, audio: np.ndarray, frames: int) -> torch.Tensor:
        return encode_reference(self.vae, audio, frames, self.noise_dtype, self.options.window_frames,
                                self.encode_margin_frames)

    def check_request(self, request: AudioRequest) -> None:
        if request.audio_start != 0:
            raise ValueError("Stable Audio 3 generates from the start: audio_start must be 0")
        if not 0 < request.audio_length <= self.limits.max_seconds:
            raise ValueError(f"audio_length must be in (0, {self.limits.max_seconds:.2f}] s for this model")
        if int(request.audio_length * self.limits.sample_rate) < 1:
            raise ValueError("audio_length must cover at least one sample")
        if request.init_audio is not None and not 0 < request.strength <= 1:
            raise ValueError("strength must be in (0, 1]")
        if request.inpainting and not (request.init_audio is not None
                                       and 0 <= request.mask_start < request.mask_end <= request.audio_length):
            raise ValueError("inpainting needs init_audio and 0 <= mask_start < mask_end <= audio_length")

    def latent_frames(self, duration: float) -> int:
        # As the pipeline rounds (without silence padding): the whole duration, up to a frame.
        return math.ceil(duration * self.limits.sample_rate / self.limits.hop_length)

    def encode_text(self, request: AudioRequest, duration: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention context and mask, (rows, text tokens + 1, cond dim): the text encoding followed by the
        duration token; with guidance the negative prompt's rows ("" if none) come first, as in the pipeline."""
        pipe = self.pipe
        context, mask = pipe.prepare_cross_attention(*pipe.encode_prompt(request.prompt, self.device, 1), duration)
        if request.rows == 1:
            return context, mask
        negative = request.negative_prompt if request.negative_prompt is not None else ""
        negative_context, negative_mask = pipe.prepare_cross_attention(
            *pipe.encode_prompt([negative], self.device, 1), duration)
        return torch.cat([negative_context, context]), torch.cat([negative_mask, mask])

    def project_context(self, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The DiT's first stage, the same at every step, so it runs once: padded text positions take the learned
        padding embedding (the DiT then attends to all positions), then the context projection."""
        dit = self.transformer
        padding = dit.prompt_padding_embedding.to(context.dtype).view(1, 1, -1)
        return dit.to_cond_embed(torch.where(mask.bool().unsqueeze(-1), context, padding))

    def schedule(self, steps: int, sigma_max: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(timesteps, sigmas) for a step count and a starting noise level (below 1: audio-to-audio), from a private
        copy of the pipeline's scheduler: the shared one keeps a step index and cannot serve several requests.
        Schedules from full noise are kept, shared between requests, read only; an edit's (its strength is any
        number) is built for it."""
        if sigma_max != 1.0:
            return self.build_schedule(steps, sigma_max)
        if steps not in self._schedules:
            self._schedules[steps] = self.build_schedule(steps, sigma_max)
        return self._schedules[steps]

    def build_schedule(self, steps: int, sigma_max: float) -> tuple[torch.Tensor, torch.Tensor]:
        scheduler = copy.deepcopy(self.pipe.scheduler)
        scheduler.set_timesteps(sigmas=logsnr_sigma_schedule(steps, LOGSNR_MIN, LOGSNR_MAX, sigma_max=sigma_max),
                                device=self.device)
        return scheduler.timesteps, scheduler.sigmas

    # 2. One denoising step: a DiT forward over the rows of states of equal latent length, then each request's own
    # guidance and sampler step.
    def forward_key(self, state: StableAudio3State) -> tuple[int, bool, int | None]:
        """States with equal keys can share one forward: the latent length (no padding mask in self-attention), and
        whether the blocks add local conditioning (inpainting, or every request with reference_conditioning), which
        diffusers' other pipelines leave out; and a state too short to share the blocks' Linears bit for bit gets
        a key of its own."""
        tokens = self.tokens(state.frames)
        if state.local_conditioning is not None:  # every block projects it over the frames alone
            tokens = min(tokens, state.frames)
        alone = id(state) if state.request.rows * tokens < MIN_SHARED_LINEAR_ROWS else None
        return state.frames, state.local_conditioning is not None, alone

    @torch.no_grad()
    def forward(self, states: list[StableAudio3State]) -> list[torch.Tensor]:
        """Each state's (guided) velocity at its own timestep, from one batched pass through the DiT's blocks."""
        hidden = torch.cat([self.preprocess(state) for state in states])
        context = torch.cat([state.context for state in states])
        modulation = torch.cat([self.modulation(state) for state in states])
        local = None
        if states[0].local_conditioning is not None:  # all or none of a forward's states, by forward_key
            # Channels first, then a transposed view, as the DiT's forward hands it to its blocks: the Linears in
            # them take another kernel for a contiguous (rows, frames, channels) tensor, which rounds differently.
            local = torch.cat([state.local_conditioning.expand(state.request.rows, -1, -1) for state in states])
            local = local.transpose(1, 2)
        rope = self.rotary_embedding(self.tokens(states[0].frames))
        hidden = self._transformer_forward(hidden, context, modulation, rope, local)
        rows = hidden.split([state.request.rows for state in states])
        return [self.guide(state, self.postprocess(output)) for state, output in zip(states, rows)]

    def preprocess(self, state: StableAudio3State) -> torch.Tensor:
        """The DiT's residual input conv and input projection, per request over its own rows: on CPU a Conv1d over
        one row runs PyTorch's own kernel and over several oneDNN's (for short clips), and a Linear over a few rows
        another kernel than over more, which round differently. (rows, frames / patch, embed_dim)."""
        latents = torch.cat([state.latents] * state.request.rows).to(self.dtype)  # the pipeline concatenates
        return self.transformer.proj_in(self.patch(self.transformer.preprocess_conv(latents) + latents))

    def postprocess(self, hidden: torch.Tensor) -> torch.Tensor:
        """The DiT's output projection and residual output conv, per request over its own rows (as ``preprocess``):
        (rows, latent channels, frames)."""
        output = self.unpatch(self.transformer.proj_out(hidden))
        return self.transformer.postprocess_conv(output) + output

    def modulation(self, state: StableAudio3State) -> torch.Tensor:
        """The AdaLN signal (rows, 6 · embed_dim) from the duration and this step's timestep: per request, over its
        own rows, as the pipeline computes it for one prompt."""
        dit = self.transformer
        timestep = state.timestep.expand(state.request.rows)
        timestep_embedding = dit.to_timestep_embed(dit.timestep_features(timestep.float()[:, None]).to(self.dtype))
        return dit.global_cond_embedder(state.global_embedding + timestep_embedding)

    def tokens(self, frames: int) -> int:
        """The DiT's sequence length for a latent length: its patches after its memory tokens."""
        return frames // self.transformer.config.patch_size + self.transformer.config.num_memory_tokens

    def rotary_embedding(self, length: int) -> torch.Tensor:
        """The rotary table of ``length`` tokens: the first rows of the longest request's, computed once. A row is
        its position times the frequencies, element by element, so it is the same bit for bit in a table of any
        length; a table kept per length would hold ~1.1 GB for the medium model once clips of every length had run."""
        return self._rotary_table[:length]

    def transformer_forward(self, hidden: torch.Tensor, context: torch.Tensor, modulation: torch.Tensor,
                            rope: torch.Tensor, local: torch.Tensor | None = None) -> torch.Tensor:
        """StableAudio3DiTModel.forward's blocks, with the context, the AdaLN modulation and the rotary embedding
        (of the memory tokens and frames) already computed: (rows, frames / patch, embed_dim) in and out; ``local``:
        inpainting's (rows, frames, 1 + latent channels), which every block projects and adds to the frames."""
        dit, memory_tokens = self.transformer, self.transformer.config.num_memory_tokens
        if memory_tokens:  # the learned memory tokens go in front of the frames, and come off before proj_out
            hidden = torch.cat([dit.memory_tokens.unsqueeze(0).expand(hidden.shape[0], -1, -1), hidden], dim=1)
        for block in dit.transformer_blocks:
            hidden = block(hidden, context=context, global_modulation=modulation, rope=rope, local_seq=local,
                           num_memory_tokens=memory_tokens)
        return hidden[:, memory_tokens:]

    def patch(self, latents: torch.Tensor) -> torch.Tensor:
        """(batch, channels, frames) → (batch, frames / patch, channels · patch)."""
        hidden, patch = latents.transpose(1, 2), self.transformer.config.patch_size
        return hidden if patch == 1 else hidden.reshape(hidden.shape[0], hidden.shape[1] // patch, -1)

    def unpatch(self, hidden: torch.Tensor) -> torch.Tensor:
        """The inverse of ``patch``."""
        patch = self.transformer.config.patch_size
        if patch > 1:
            hidden = hidden.reshape(hidden.shape[0], hidden.shape[1] * patch, -1)
        return hidden.transpose(1, 2)

    @staticmethod
    def guide(state: StableAudio3State, velocity: torch.Tensor) -> torch.Tensor:
        if not state.guided:
            return velocity
        unconditional, conditional = velocity.chunk(2)
        return unconditional + state.request.guidance_scale * (conditional - unconditional)

    @torch.no_grad()
    def advance(self, state: StableAudio3State, velocity: torch.Tensor) -> None:
        """FlowMatchEulerDiscreteScheduler.step for this request alone, with its own step index and generator.
        Stochastic ("ping-pong", the distilled models): estimate the clean latents, then re-noise them to the next
        sigma with fresh noise, drawn on every step (the last one too) exactly as the scheduler draws it for one
        request, so the generator stays in step with a solo run. Otherwise the base models' Euler step."""
        sigma, sigma_next = state.sigmas[state.step], state.sigmas[state.step + 1]
        sample = state.latents.to(torch.float32)
        if self.stochastic:
            denoised = sample - sigma * velocity
            noise = host_drawn_noise(sample.shape, state.generator, sample.device, sample.dtype)
            latents = (1.0 - sigma_next) * denoised + sigma_next * noise
        else:
            latents = sample + (sigma_next - sigma) * velocity
        state.latents = latents.to(velocity.dtype)
        state.step += 1

    # 3. Decode each request's latents alone (the SAME decoder's attention would mix in a neighbour's padding), in
    # windows, and trim to its duration.
    @torch.no_grad()
    def decode(self, state: StableAudio3State) -> AudioResult:
        audio = decode_in_windows(self.vae, state.latents.to(self.vae.dtype), self.options.window_frames,
                                  self.decode_margin_frames)
        return AudioResult.checked(audio[0, :, : state.samples].clamp(-1.0, 1.0).float().cpu().numpy())

