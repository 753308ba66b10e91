"""The HTTP contract: the request bodies of POST /v1/audio/generate and /v1/audio/edits, and the OpenAI-style
error shape."""

from __future__ import annotations

import math
import secrets
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .audio import format_unavailable
from .generation import AudioRequest, ModelLimits
from .silence import CHUNK_MS, MIN_KEPT_S, SILENCE_THRESHOLD_DBFS

AudioFormat = Literal["wav", "mp3", "flac", "pcm", "opus", "aac"]
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes unsigned 64-bit seeds
MAX_GUIDANCE_SCALE = 50.0
MAX_PROMPT_CHARS = 10_000
MAX_TIMEOUT_S = 86_400.0


class GenerateRequest(BaseModel):
    """Body of POST /v1/audio/generate. Strict types: a string where a number belongs is an error, not a guess."""

    model_config = ConfigDict(strict=True, extra="ignore")

    input: str = Field(description="Text prompt.", max_length=MAX_PROMPT_CHARS)
    audio_length: float | None = Field(
        None, description="Seconds of audio to return; default: the model maximum (47.55 s for stable-audio-open-1.0)."
    )
    audio_start: float = Field(0.0, description="Start of the returned window in seconds.")
    negative_prompt: str | None = Field(None, description="What to avoid; used only when guidance_scale > 1.",
                                        max_length=MAX_PROMPT_CHARS)
    guidance_scale: float | None = Field(None, description="Classifier-free guidance scale; <= 1 disables "
                                         "guidance. Default: the model's (7 for stable-audio-open-1.0, 1 for "
                                         "Stable Audio 3).")
    num_inference_steps: int | None = Field(None, description="Denoising steps; default: the model's (100 for "
                                                              "stable-audio-open-1.0, 8 for distilled Stable Audio 3).")
    seed: int | None = Field(None, description=f"0 to {MAX_SEED}; same seed and request give the same audio. "
                                               "Default: random, returned in the X-Seed response header.")
    response_format: AudioFormat = Field(
        "wav", description="wav, mp3, flac, pcm (s16le, interleaved), opus (Ogg Opus, 48 kHz) or aac (ADTS).")
    model: str | None = Field(None, description="Optional; must name the served model.")
    timeout: float | None = Field(None, description="Seconds this request may take, queueing included; past them "
                                                    "it is abandoned with a 504. Default and most: the server's "
                                                    "limit (traffic.timeout).")
    trim_silence: bool = Field(False, description=f"Cut the silence after the sound (from where every later "
                               f"{CHUNK_MS} ms stays under {SILENCE_THRESHOLD_DBFS:g} dBFS; at least {MIN_KEPT_S:g} s "
                               "is kept). The seconds returned are in the X-Audio-Duration header. Default false: "
                               "exactly audio_length.")

    @field_validator("input")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must contain non-whitespace text")
        return value

    @field_validator("audio_length")
    @classmethod
    def _length_positive(cls, value: float | None) -> float | None:
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError("must be a finite number of seconds greater than 0")
        return value

    @field_validator("audio_start")
    @classmethod
    def _start_not_negative(cls, value: float) -> float:
        if not (math.isfinite(value) and value >= 0):
            raise ValueError("must be a finite number of seconds, 0 or more")
        return value

    @field_validator("guidance_scale")
    @classmethod
    def _guidance_in_range(cls, value: float | None) -> float | None:
        if value is not None and not (math.isfinite(value) and 0 <= value <= MAX_GUIDANCE_SCALE):
            raise ValueError(f"must be a finite number between 0 and {MAX_GUIDANCE_SCALE:g}")
        return value

    @field_validator("num_inference_steps")
    @classmethod
    def _steps_positive(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError("must be at least 1")
        return value

    @field_validator("timeout")
    @classmethod
    def _timeout_positive(cls, value: float | None) -> float | None:
        if value is not None and not (math.isfinite(value) and 0 < value <= MAX_TIMEOUT_S):
            raise ValueError(f"must be a number of seconds greater than 0 and at most {MAX_TIMEOUT_S:g}")
        return value

    @field_validator("seed")
    @classmethod
    def _seed_in_range(cls, value: int | None) -> int | None:
        if value is not None and not 0 <= value <= MAX_SEED:
            raise ValueError(f"must be between 0 and {MAX_SEED}")
        return value

    def to_audio_request(self, limits: ModelLimits, served_model: str, default_steps: int, max_steps: int,
                         default_guidance_scale: float = 7.0, *, generation_id: str = "",
                         request_id: str = "") -> AudioRequest:
        """Checks what depends on the loaded model and this server, then fills in the defaults."""
        if self.model is not None and self.model != served_model:
            raise model_not_served(self.model, served_model)
        if (reason := format_unavailable(self.response_format)) is not None:
            raise APIError(reason, param="response_format", code="format_unavailable")
        steps = default_steps if self.num_inference_steps is None else self.num_inference_steps
        if steps > max_steps:
            given = (f"the default of {steps} is above that: give num_inference_steps" if self.num_inference_steps
                     is None else f"got {shown(steps)}")
            raise APIError(f"num_inference_steps must be at most {max_steps} on this server ({given})",
                           param="num_inference_steps")
        if limits.fixed_start and self.audio_start != 0:
            raise APIError(f"this model generates from the start: audio_start must be 0 (got {self.audio_start:g})",
                           param="audio_start")
        if self.audio_start >= limits.max_seconds:
            raise APIError(f"audio_start must be less than {limits.max_seconds:.2f} s for this model "
                           f"(got {self.audio_start:g})", param="audio_start")
        length = limits.max_seconds - self.audio_start if self.audio_length is None else self.audio_length
        if self.audio_length is not None and self.audio_length > limits.max_seconds:
            raise APIError(f"audio_length must be at most {limits.max_seconds:.2f} s for this model "
                           f"(got {self.audio_length:g})", param="audio_length")
        if limits.samples(length) < 1:
            if self.audio_length is None:  # the default length, what is left of the window after the start
                raise APIError(f"audio_start leaves less than one sample of the {limits.max_seconds:.2f} s window "
                               f"(got {self.audio_start:g})", param="audio_start")
            raise APIError("audio_length must cover at least one sample", param="audio_length")
        end_sample = limits.start_sample(self.audio_start) + limits.samples(length)
        if end_sample > limits.max_samples:
            raise APIError(f"audio_start + audio_length must be at most {limits.max_seconds:.2f} s for this model "
                           f"(got {self.audio_start:g} + {length:g})", param="audio_start")
        return AudioRequest(
            prompt=self.input,
            negative_prompt=self.negative_prompt,
            audio_start=self.audio_start,
            audio_length=length,
            guidance_scale=default_guidance_scale if self.guidance_scale is None else self.guidance_scale,
            num_inference_steps=steps,
            seed=secrets.randbelow(MAX_SEED + 1) if self.seed is None else self.seed,
            id=generation_id,
            request_id=request_id,
            deadline=None if self.timeout is None else time.time() + self.timeout,
        )


DEFAULT_STRENGTH = 0.5  # stable-audio-open-1.0: sigma_init = sqrt(0.3 * 500) ≈ 12.2; Stable Audio 3: noise level 0.5


class EditRequest(GenerateRequest):
    """Form fields of POST /v1/audio/edits: those of /v1/audio/generate, the audio to start from, and how far
    from it to go (``strength``) or, Stable Audio 3 only, which region of it to regenerate (``mask_start``,
    ``mask_end``). Each form value is read as JSON when it parses (BentoML's multipart rule), else as text."""

    audio: Path = Field(description="The audio to start from (WAV, FLAC, MP3, Ogg, or anything ffmpeg decodes; "
                                    "any rate and channel count), at most the model's maximum length.")
    strength: float | None = Field(None, description="How far from the audio the result may go, over 0 and at most "
                                   "1. stable-audio-open-1.0: denoising starts at the noise level "
                                   "sigma_min^(1-s) * sigma_max^s; Stable Audio 3: at the noise level s. 1 is "
                                   f"text-to-audio's start, values near 0 keep the audio. Default {DEFAULT_STRENGTH:g}; "
                                   "not with mask_start / mask_end.")
    mask_start: float | None = Field(None, description="Stable Audio 3 inpainting: regenerate the audio from here "
                                     "(seconds; default 0 when mask_end is given) and keep the rest of the upload.")
    mask_end: float | None = Field(None, description="Stable Audio 3 inpainting: ... up to here (seconds; default "
                                   "audio_length). A continuation: mask_start at the upload's end, a longer "
                                   "audio_length.")

    @field_validator("strength")
    @classmethod
    def _strength_in_range(cls, value: float | None) -> float | None:
        if value is not None and not (math.isfinite(value) and 0 < value <= 1):
            raise ValueError("must be a number greater than 0 and at most 1")
        return value

    @field_validator("mask_start", "mask_end")
    @classmethod
    def _mask_not_negative(cls, value: float | None) -> float | None:
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ValueError("must be a finite number of seconds, 0 or more")
        return value

    def edit_fields(self, job: AudioRequest, limits: ModelLimits, inpainting_served: bool) -> dict[str, float]:
        """The AudioRequest's ``strength``, or its ``mask_start`` and ``mask_end`` with their defaults filled in,
        checked against the request (its length and step count) and what the served model does."""
        audio_length, steps = job.audio_length, job.num_inference_steps
        if self.mask_start is None and self.mask_end is None:
            strength = DEFAULT_STRENGTH if self.strength is None else self.strength
            if strength < (least := limits.min_strength(steps)):
                raise APIError(f"strength must be at least {least:.3g} with {steps} inference steps on this model: "
                               f"smaller steps are below the resolution of its SDE noise (got {strength:.3g}); "
                               "raise strength or take fewer steps", param="strength")
            return {"strength": strength}
        named = "mask_start" if self.mask_start is not None else "mask_end"
        if not inpainting_served:
            raise APIError(f"{named}: this model cannot inpaint (stable-audio-open-1.0 was not trained for it); "
                           "Stable Audio 3 models can", param=named, code="unsupported")
        if self.strength is not None:
            raise APIError("strength does not apply with mask_start / mask_end: inpainting starts from pure noise",
                           param="strength")
        start = 0.0 if self.mask_start is None else self.mask_start
        end = audio_length if self.mask_end is None else self.mask_end
        if end > audio_length:
            raise APIError(f"mask_end must be at most audio_length ({audio_length:g} s) (got {end:g})",
                           param="mask_end")
        if start >= end:
            raise APIError(f"mask_start must be less than mask_end ({end:g} s) (got {start:g})", param="mask_start")
        return {"mask_start": start, "mask_end": end}

    @staticmethod
    def check_kept_audio(fields: dict[str, float], audio_length: float, upload_seconds: float,
                         slack_seconds: float) -> None:
        """Inpainting keeps the audio outside [mask_start, mask_end] from the upload, so it must be there (within
        ``slack_seconds``, a latent frame: resampling may leave an upload a sample short)."""
        if "mask_start" not in fields:
            return
        reach = upload_seconds + slack_seconds
        if fields["mask_start"] > reach:
            raise APIError(f"mask_start must be at most the uploaded audio's length ({upload_seconds:.2f} s): the "
                           f"audio before it is kept from the upload (got {fields['mask_start']:g})",
                           param="mask_start")
        if fields["mask_end"] < audio_length and audio_length > reach:
            raise APIError(f"the audio after mask_end is kept from the upload, which ends at {upload_seconds:.2f} s: "
                           f"set mask_end to audio_length ({audio_length:g} s) to continue it, or shorten "
                           "audio_length", param="mask_end")


def shown(value: Any, limit: int = 24) -> str:
    """A value quoted in an error message, cut short: error bodies stay small whatever the client sent."""
    text = str(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


# OpenAI's types: every other 4xx (a bad value, a wrong API key, an unknown model) is an invalid_request_error,
# told apart by its status and code (invalid_api_key, model_not_found); every other 5xx a server_error.
ERROR_TYPES = {429: "rate_limit_error", 503: "service_unavailable", 504: "timeout_error"}


class APIError(Exception):
    """An error that reaches the client as ``{"error": {...}}`` with its HTTP status."""

    def __init__(self, message: str, *, param: str | None = None, status: int = 400, code: str | None = None,
                 retry_after: int | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code
        self.retry_after = retry_after  # seconds, sent as Retry-After with 429 and 503

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.status, self.param, self.code)


def model_not_served(model: str, served_model: str) -> APIError:
    return APIError(f"model {shown(repr(model), 80)} is not served here; this server serves {served_model!r}",
                    param="model", status=404, code="model_not_found")


def error_body(message: str, status: int, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    error_type = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def describe_validation_error(detail: list[dict[str, Any]]) -> tuple[str, str | None]:
    """(message, field) for the first pydantic error, phrased for a person; BentoML reports them as a list."""
    if not detail or not isinstance(detail[0], dict):
        return "invalid request body", None
    first = detail[0]
    fields = [part for part in first.get("loc", ()) if isinstance(part, str) and part not in ("body", "request")]
    kind = first.get("type", "")
    if kind == "json_invalid":
        return "request body is not valid JSON", None
    if kind in ("model_type", "model_attributes_type", "dataclass_type"):
        return "request body must be a JSON object with the fields of /v1/audio/generate", None
    field = fields[0] if fields else None
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    if kind == "missing":
        message = "is required"
        field = field or "input"  # no body at all: what every generation needs first is missing
    return (f"{field}: {message}" if field else message), field
