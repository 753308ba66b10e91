"""The front's path for one generation: validate against the served model, admit, wait for the engine (giving
up when the client goes away or the deadline passes, and telling the engine to stop), encode, log.

The synchronous endpoint, the edits endpoint, the OpenAI speech endpoint and the jobs all go through ``Gateway``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field, replace

import aiohttp
import numpy as np

from .admission import Admission
from .audio import ENCODE_TIMEOUT_S, FORMATS, EncodingFailed, EncodingTimedOut, encode_audio
from .engine_pool import EnginePool
from .generation import AudioRequest
from .init_audio import load_init_audio
from .protocol import APIError, EditRequest, GenerateRequest
from .serving import CLIENT_CLOSED_REQUEST, ModelCard, RequestContext
from .silence import trim_trailing_silence
from .traffic_timeout import BACKSTOP_S

logger = logging.getLogger(__name__)

ENGINE_CONNECTION_ATTEMPTS = 3
# Decoding an upload holds a few copies of it at its own rate (a 99 KB FLAC of 120 s of 192 kHz stereo silence:
# about 0.5 GB at the peak), so only this many decode at once, whatever arrives together; the rest wait their turn
# on the event loop, holding no thread.
CONCURRENT_DECODES = 2


@dataclass(frozen=True)
class Delivery:
    """What the client gets made of the decoded audio: its format, and whether the silence after the sound is
    cut first."""

    response_format: str = "wav"
    trim_silence: bool = False

    @classmethod
    def of(cls, request: GenerateRequest) -> "Delivery":
        return cls(request.response_format, request.trim_silence)


@dataclass
class GeneratedAudio:
    data: bytes
    response_format: str
    seed: int
    batch_size: int
    duration: float  # seconds of audio encoded in ``data``: audio_length, or less when trimmed
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage: queue, prepare, denoise, ...

    @property
    def filename(self) -> str:
        return f"audio.{FORMATS[self.response_format].extension}"

    def headers(self) -> dict[str, str]:
        stages = ", ".join(f"{name};dur={1000 * seconds:.1f}" for name, seconds in self.timings.items())
        return {"Server-Timing": stages, "X-Seed": str(self.seed), "X-Batch-Size": str(self.batch_size),
                "X-Audio-Duration": f"{self.duration:.6f}"}


def deliver(audio: np.ndarray, sample_rate: int, delivery: Delivery, encode_timeout_s: float = ENCODE_TIMEOUT_S
            ) -> tuple[bytes, float]:
    """The response body made of decoded (channels, samples) audio, and the seconds it holds."""
    if delivery.trim_silence:
        audio = trim_trailing_silence(audio, sample_rate)
    return encode_audio(audio, sample_rate, delivery.response_format, encode_timeout_s), audio.shape[1] / sample_rate


class Gateway:
    def __init__(self, engines: EnginePool, admission: Admission):
        self.engines = engines
        self.admission = admission
        self.decoding = asyncio.Semaphore(CONCURRENT_DECODES)
        self._card: ModelCard | None = None

    async def model_card(self) -> ModelCard:
        """The served model, as the engines describe it (asked once); a 503 while they cannot be asked (still
        loading, restarting), as when a generation cannot reach them."""
        if self._card is None:
            try:
                described = await self.engines.describe()
            except asyncio.TimeoutError as exc:  # the built-in TimeoutError from Python 3.11 on
                raise self.engine_unavailable("it does not answer (still loading its model, or hung)") from exc
            except Exception as exc:
                logger.exception("the engines could not be asked for their model")
                raise self.engine_unavailable(type(exc).__name__) from exc
            self._card = ModelCard.from_dict(described)
        return self._card

    def engine_unavailable(self, why: str) -> APIError:
        """A 503 to send the request again later: nothing is wrong with it."""
        return APIError(f"the model engine is unavailable: {why}", status=503, code="engine_unavailable",
                        retry_after=self.admission.retry_after_s())

    async def prepare(self, request: GenerateRequest, request_id: str, generation_id: str | None = None
                      ) -> AudioRequest:
        card = await self.model_card()
        job = request.to_audio_request(card.limits, card.model, card.default_steps, card.max_steps,
                                       card.default_guidance_scale,
                                       generation_id=generation_id or uuid.uuid4().hex, request_id=request_id)
        if isinstance(request, EditRequest):
            job = await self.attach_init_audio(job, request, card)
        return job

    async def attach_init_audio(self, job: AudioRequest, request: EditRequest, card: ModelCard) -> AudioRequest:
        if not card.edits:
            raise APIError(f"{card.model} cannot start from audio yet", param="audio", code="unsupported")
        self.admission.check_room()  # a server that is full or draining refuses the upload before decoding it
        # Decoding and resampling take up to a few tenths of a second (0.17 s for 47.55 s at 48 kHz): off the loop.
        async with self.decoding:
            audio = await asyncio.to_thread(load_init_audio, request.audio, card.limits)
        limits = card.limits
        upload_seconds = limits.seconds(audio.shape[1])
        if request.audio_length is None and limits.fixed_start:  # a model with a duration: that of the upload
            job = replace(job, audio_length=upload_seconds)
        fields = request.edit_fields(job, limits, card.inpainting)
        request.check_kept_audio(fields, job.audio_length, upload_seconds, limits.hop_length / limits.sample_rate)
        return replace(job, init_audio=audio, **fields)

    async def serve(self, request: GenerateRequest, client: RequestContext) -> GeneratedAudio:
        """A request whose client waits for the audio: validated, admitted, generated unless the client leaves."""
        # Bounded by the traffic timeout too: past it the engine counts the request as expired, not as cancelled
        # by its client, and the 504 comes from here, a moment before the timeout's own.
        job = (await self.prepare(request, client.request_id)).due_by(client.deadline)
        with self.admission.admit(job.id):
            return await self.generate(job, Delivery.of(request), client.disconnected)

    async def generate(self, job: AudioRequest, delivery: Delivery,
                       disconnected: asyncio.Event | None = None) -> GeneratedAudio:
        """The audio of an admitted request; raises APIError (500, 504, or 499 once the client has gone)."""
        submitted_at = time.time()
        try:
            result = await self.wait_for_engine(job, disconnected)
        finally:
            self.engines.release(job.id)
        failure = result["failure"]
        if failure == "deadline_exceeded":
            raise timeout_error()
        if failure == "cancelled":
            raise APIError("cancelled", status=CLIENT_CLOSED_REQUEST, code="cancelled")
        if failure == "unknown_generation":  # the engine restarted under it: nothing wrong with the request
            logger.error("request %s was lost by its engine: %s", job.request_id, result["error"])
            raise self.engine_unavailable("it restarted and lost this request; send it again")
        if failure is not None:
            logger.error("request %s failed: %s", job.request_id, result["error"])
            raise APIError(f"generation failed: {result['error']}", status=500, code="generation_failed")
        encode_started = time.perf_counter()
        card = await self.model_card()
        data, duration = await self.encode(job, result["audio"], card.limits.sample_rate, delivery)
        timings = {"queue": result["started_at"] - submitted_at,
                   **{name.removesuffix("_s"): seconds for name, seconds in result["timings"].items()},
                   "encode": time.perf_counter() - encode_started}
        self.admission.record_service_time(timings["denoise"] + timings["decode"])
        logger.info("generated %.2f s of %s with up to %d requests per step: %s", duration, delivery.response_format,
                    result["batch_size"], " ".join(f"{name}={seconds:.3f}s" for name, seconds in timings.items()))
        return GeneratedAudio(data, delivery.response_format, job.seed, result["batch_size"], duration, timings)

    @staticmethod
    async def encode(job: AudioRequest, audio: np.ndarray, sample_rate: int, delivery: Delivery
                     ) -> tuple[bytes, float]:
        """``deliver`` off the event loop, within the request's deadline (a second at least: the audio is made, and
        the traffic timeout's backstop comes that much later)."""
        timeout_s = ENCODE_TIMEOUT_S if job.deadline is None else min(ENCODE_TIMEOUT_S, job.deadline - time.time())
        try:
            return await asyncio.to_thread(deliver, audio, sample_rate, delivery, max(timeout_s, BACKSTOP_S))
        except EncodingFailed as error:
            logger.error("request %s could not be encoded as %s: %s", job.request_id, delivery.response_format,
                         error)
            if isinstance(error, EncodingTimedOut) and job.deadline is not None and time.time() >= job.deadline:
                raise timeout_error() from error
            raise APIError(f"encoding the audio as {delivery.response_format} failed: {error}", status=500,
                           code="encoding_failed") from error

    async def wait_for_engine(self, job: AudioRequest, disconnected: asyncio.Event | None) -> dict:
        """The engine's result, unless the client disconnects or the deadline passes first: then the engine is
        told to drop the request (from its queue, or from the running batch at the next step)."""
        call = asyncio.ensure_future(self.call_engine(job))
        client_gone = asyncio.ensure_future(disconnected.wait()) if disconnected is not None else None
        timeout = None if job.deadline is None else max(0.0, job.deadline - time.time())
        try:
            done, _ = await asyncio.wait([w for w in (call, client_gone) if w], timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the handler itself was cancelled (e.g. BentoML's traffic timeout)
            await self.abandon(call, job)
            raise
        finally:
            if client_gone is not None:
                client_gone.cancel()
        if call in done:
            try:
                result = call.result()
            except asyncio.TimeoutError as exc:  # engine_pool's bound on a call: the engine died, or hangs
                logger.error("the engine stopped answering request %s", job.request_id)
                await self.abandon(call, job)
                raise self.engine_unavailable("it stopped answering (it has died, or hangs)") from exc
            except Exception as exc:  # the engine process is down or restarting: the request may be retried
                logger.exception("the engine did not answer request %s", job.request_id)
                await self.abandon(call, job)  # if it is still there, it stops computing for nobody
                raise self.engine_unavailable(type(exc).__name__) from exc
            return result
        await self.abandon(call, job)
        if client_gone in done:
            logger.info("client disconnected; request %s dropped", job.request_id)
            raise APIError("client disconnected", status=CLIENT_CLOSED_REQUEST, code="cancelled")
        raise timeout_error()

    async def call_engine(self, job: AudioRequest) -> dict:
        """Hands the request to the engine's step loop, then waits for its result: separate calls, so that the
        engine's batchable entry never waits for a generation, and result calls that each wait a bounded time, so
        that no generation meets the engine's traffic timeout however long it queues and runs. Each call is retried
        on a fresh connection when a pooled one breaks under it (aiohttp reusing a keep-alive connection the other
        side is closing); the engine ignores a second submit of the same generation id, and keeps a collected
        result a little while for a retry."""
        await self.retrying_connection(self.engines.submit, job, job)
        while (result := await self.retrying_connection(self.engines.result, job.id, job)) is None:
            pass
        return result

    @staticmethod
    async def retrying_connection(call, argument, job: AudioRequest):
        for attempt in range(1, ENGINE_CONNECTION_ATTEMPTS + 1):
            try:
                return await call(argument)
            except aiohttp.ClientConnectionError as error:
                if attempt == ENGINE_CONNECTION_ATTEMPTS:
                    raise
                logger.warning("connection to the engine broke (%s); retrying request %s", error, job.request_id)

    async def abandon(self, call: asyncio.Future, job: AudioRequest) -> None:
        """Stops waiting and tells the engine to drop the request; an engine that cannot be told is logged, not
        raised: the caller's own answer (499, 504, 503) stands."""
        call.cancel()
        try:
            await asyncio.shield(self.cancel([job.id]))
        except Exception as error:  # noqa: BLE001 - the engine is down: nothing runs there to drop
            logger.warning("could not tell the engine to drop request %s", job.request_id,
                           exc_info=not isinstance(error, asyncio.TimeoutError))  # a timeout's traceback says nothing

    def queue_position(self, generation_id: str, started: set[str]) -> int | None:
        """0 for the next to start; None once started or when unknown. Each engine has a queue of its own, in the
        order of submission, which is that of admission (an upload is decoded before its request is admitted):
        those ahead are the ones admitted earlier, not started, on the same engine (on any engine, for one admitted
        but not submitted yet)."""
        waiting = [other for other in self.admission.pending if other not in started]
        if generation_id not in waiting:
            return None
        engine = self.engines.engine_of(generation_id)
        ahead = waiting[:waiting.index(generation_id)]
        return sum(1 for other in ahead if engine is None or self.engines.engine_of(other) == engine)

    async def cancel(self, generation_ids: list[str]) -> None:
        await self.engines.cancel(generation_ids)

    async def progress(self, generation_ids: list[str]) -> dict[str, dict[str, int]]:
        return await self.engines.progress(generation_ids)


def timeout_error() -> APIError:
    return APIError("the request did not finish within its timeout", param="timeout", status=504, code="timeout")
