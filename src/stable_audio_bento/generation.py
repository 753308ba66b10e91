"""What a generation is, for every model family and both sides of the service: the request, its result, the
hooks that watch it while it runs, and the limits of the served model. Plain data: no torch, no model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Annotated, Literal, Optional

import numpy as np
from pydantic import InstanceOf, WithJsonSchema


# BentoML builds a pydantic model (and its JSON schema) of the engine's inputs from AudioRequest; between the
# services the array travels as it is, pickled.
InitAudio = Annotated[Optional[InstanceOf[np.ndarray]],
                      WithJsonSchema({"type": "array", "description": "float32 (channels, samples), or null"})]


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
    id: str = ""  # unique per generation: what cancellation and progress refer to
    request_id: str = ""  # the client's X-Request-Id, for logs
    deadline: float | None = None  # time.time() after which the request is abandoned
    # Audio-to-audio: float32 (channels, samples) at the model's rate, at most its window, and how far from it
    # the result may go (0 < strength <= 1). Not compared: arrays have no single truth value.
    init_audio: InitAudio = field(default=None, compare=False, repr=False)
    strength: float = 1.0
    # Inpainting (Stable Audio 3): the region to regenerate, in seconds, both set or neither; the rest of the clip
    # is kept from init_audio. Starts from pure noise, so strength does not apply.
    mask_start: float | None = None
    mask_end: float | None = None

    @property
    def rows(self) -> int:
        """DiT rows this request occupies: unconditional + conditional with guidance, else one."""
        return 2 if self.guidance_scale > 1.0 else 1

    @property
    def inpainting(self) -> bool:
        return self.mask_start is not None

    @property
    def label(self) -> str:
        """How logs name this request: the client's request id when there is one."""
        return self.request_id or self.id

    def due_by(self, latest: float | None) -> "AudioRequest":
        """This request with its deadline no later than ``latest`` (time.time(); None: no bound)."""
        if latest is None or (self.deadline is not None and self.deadline <= latest):
            return self
        return replace(self, deadline=latest)


# unknown_generation: the engine holds no such request (it restarted since, or forgot it): the front may send it again.
Failure = Literal["cancelled", "deadline_exceeded", "server_error", "unknown_generation"]


@dataclass
class AudioResult:
    """Float32 audio of shape (channels, samples), or why this request alone did not finish.

    started_at: time.time() when the request was admitted to the step loop (None if it never was).
    batch_size: the most requests that shared one denoising step (one DiT forward) with this one, itself included.
    """

    audio: np.ndarray | None = None
    error: str | None = None
    failure: Failure | None = None
    timings: dict[str, float] = field(default_factory=dict)
    started_at: float | None = None
    batch_size: int = 0

    @classmethod
    def failed(cls, failure: Failure, error: str) -> "AudioResult":
        return cls(error=error, failure=failure)

    @classmethod
    def checked(cls, audio: np.ndarray) -> "AudioResult":
        """Decoded audio as a success, unless it is non-finite or digital silence: never handed out as a file."""
        if not np.isfinite(audio).all():
            return cls.failed("server_error", "the model produced non-finite audio")
        if not audio.any():
            return cls.failed("server_error", "the model produced digital silence")
        return cls(audio=audio)


class GenerationMonitor:
    """Hooks into the step loop. This base class stops nothing and ignores progress."""

    def interruption(self, request: AudioRequest) -> AudioResult | None:
        """Checked while a request waits and between its steps; a result here ends the request."""
        return None

    def on_step(self, request: AudioRequest, steps_done: int, steps_total: int) -> None:
        """Called when a request starts (0 steps done) and after each of its steps."""

    def on_forward(self, requests: int, rows: int, seconds: float) -> None:
        """Called after each batched denoising step: one DiT forward over ``rows`` rows of ``requests`` requests,
        and their own solver steps."""

    def on_work(self, seconds: float) -> None:
        """Called as the loop works, with the seconds since the last call: after each request's preparation (text
        and audio encoding), each batched step, the wait for the device, each decode, and at the end of a turn.
        Together, all the time the loop worked, told as it goes rather than once a long turn has ended."""

    def on_finish(self, request: AudioRequest, result: AudioResult) -> None:
        """Called once per request when it leaves the loop: with its audio, failed, or stopped."""


@dataclass(frozen=True)
class ModelLimits:
    """What the loaded model can produce; requests are validated against this.

    latent_frames: the model's window (stable-audio-open-1.0), or the latent length of its longest request.
    max_duration_s: the longest audio when it is not a whole number of frames (Stable Audio 3: 120 s, 380 s).
    fixed_start: the model generates from 0 s only (Stable Audio 3 has a duration, no start): ``audio_start``
        must be 0, and the output is the duration cut to whole samples (``int``) rather than rounded.
    min_strength_per_step: an edit's least ``strength`` per denoising step after the first (``min_strength``):
        below it, stable-audio-open-1.0's steps get too small for its SDE noise. 0 where any strength works."""

    sample_rate: int
    channels: int
    hop_length: int
    latent_frames: int
    max_duration_s: float | None = None
    fixed_start: bool = False
    min_strength_per_step: float = 0.0

    @property
    def max_samples(self) -> int:
        if self.max_duration_s is not None:
            return int(self.max_duration_s * self.sample_rate)
        return self.latent_frames * self.hop_length

    @property
    def max_seconds(self) -> float:
        return self.max_duration_s if self.max_duration_s is not None else self.max_samples / self.sample_rate

    def min_strength(self, num_inference_steps: int) -> float:
        return self.min_strength_per_step * (num_inference_steps - 1)

    def start_sample(self, seconds: float) -> int:
        """The first sample of a window starting at ``seconds``: ``int``, as StableAudioPipeline cuts its start."""
        return int(seconds * self.sample_rate)

    def samples(self, seconds: float) -> int:
        """Output samples for a length in seconds, as the model's pipeline cuts them."""
        return int(seconds * self.sample_rate) if self.fixed_start else round(seconds * self.sample_rate)

    def seconds(self, samples: int) -> float:
        """The length in seconds that ``samples`` cuts to exactly ``samples``: with ``int``'s cut, samples / rate
        can land a rounding below (15 / 44100 * 44100 = 14.999999999999998), one float up cannot."""
        seconds = samples / self.sample_rate
        return seconds if self.samples(seconds) == samples else math.nextafter(seconds, math.inf)
