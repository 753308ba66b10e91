"""Prometheus metrics of our own, served with BentoML's on /metrics.

prometheus_client is imported when the metrics are first needed (in the services' ``__init__`` or the first
request), not at module import: BentoML may set PROMETHEUS_MULTIPROC_DIR after importing service.py, and
prometheus_client picks single- or multi-process mode on import; multi-process mode is what makes every
worker's samples appear on /metrics. Each process creates its metrics once (``front_metrics``, ``engine_metrics``).

With several engines (STABLE_AUDIO_ENGINE_WORKERS) the multi-process collector sums each unlabelled engine metric
over all of them, which makes those the aggregate; the ``stable_audio_engine_*`` counters carry a ``worker`` label
(the engine's index) and tell the engines apart.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from .audio import FORMATS
from .generation import AudioRequest, AudioResult
from .serving import CLIENT_CLOSED_REQUEST, JSON_BODY_PATHS, UPLOAD_FORM_SCOPE_KEY, UPLOAD_PATHS, unreadable_json_text

STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0)
RATIO_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 100.0)


@dataclass
class FrontMetrics:
    requests: Any  # Counter: generation requests by endpoint, status and response_format
    pending: Any  # Gauge: generations queued or running
    jobs: Any  # Counter: jobs that ended, by outcome (succeeded, cancelled, or the error's code)

    @classmethod
    @functools.cache
    def get(cls) -> "FrontMetrics":
        import prometheus_client as prometheus

        return cls(
            requests=prometheus.Counter("stable_audio_requests", "Generation requests by endpoint, HTTP status "
                                        "and requested response_format", ["endpoint", "status", "format"]),
            pending=prometheus.Gauge("stable_audio_pending_generations", "Generations admitted and not finished "
                                     "(queued or running)", multiprocess_mode="livesum"),
            jobs=prometheus.Counter("stable_audio_jobs", "Jobs that ended, by outcome: succeeded, cancelled, or "
                                    "the error's code (timeout, generation_failed, engine_unavailable, ...)",
                                    ["outcome"]),
        )

    def count_job(self, outcome: str) -> None:
        self.jobs.labels(outcome).inc()


@dataclass
class EngineMetrics:
    # Per batched DiT forward: one denoising step of every request in it. A turn of the step loop runs one forward
    # per latent length among its requests (Stable Audio 3, STABLE_AUDIO_DENOISE_WINDOW=short).
    batch_size: Any  # Histogram: requests in the forward
    step_rows: Any  # Histogram: DiT rows in the forward
    step_seconds: Any  # Histogram: the forward and the requests' solver steps
    audio_seconds: Any  # Counter: seconds of audio generated
    seconds_per_audio_second: Any  # Histogram: engine time (prepare + denoise + decode) per audio second, per request
    # This engine's own share, labelled with its index:
    generations: Any  # Counter: generations that left its step loop, by outcome (ok, cancelled, ...)
    steps: Any  # Counter: its batched forwards
    busy_seconds: Any  # Counter: seconds its step loop worked (encoding, steps, decoding): its rate is utilisation
    worker: str  # the engine's index

    @classmethod
    @functools.cache
    def get(cls, max_batch_size: int, worker: int = 0) -> "EngineMetrics":
        import prometheus_client as prometheus

        batch_buckets = sorted({1, 2, 4, 8, 16, 32, max_batch_size})
        return cls(
            batch_size=prometheus.Histogram("stable_audio_batch_size",
                                            "Requests per batched DiT forward (a denoising step of each)",
                                            buckets=[b for b in batch_buckets if b <= max_batch_size]),
            step_rows=prometheus.Histogram("stable_audio_step_rows", "DiT rows per batched forward",
                                           buckets=sorted({*batch_buckets, 2 * max_batch_size})),
            step_seconds=prometheus.Histogram("stable_audio_denoise_step_seconds",
                                              "Seconds per batched denoising step (DiT forward and solver "
                                              "steps); on a GPU, the host's time to queue them",
                                              buckets=STEP_BUCKETS),
            audio_seconds=prometheus.Counter("stable_audio_generated_audio_seconds", "Seconds of audio generated"),
            seconds_per_audio_second=prometheus.Histogram(
                "stable_audio_generation_seconds_per_audio_second",
                "Engine seconds (prepare + denoise + decode) per second of audio, per request", buckets=RATIO_BUCKETS),
            generations=prometheus.Counter("stable_audio_engine_generations", "Generations that left an engine's "
                                           "step loop, by engine and outcome", ["worker", "outcome"]),
            steps=prometheus.Counter("stable_audio_engine_steps", "Batched denoising steps run by an engine",
                                     ["worker"]).labels(str(worker)),
            busy_seconds=prometheus.Counter(
                "stable_audio_engine_busy_seconds", "Seconds an engine's step loop spent working: encoding, "
                "denoising, decoding", ["worker"]).labels(str(worker)),
            worker=str(worker),
        )

    def observe_step(self, requests: int, rows: int, seconds: float) -> None:
        self.batch_size.observe(requests)
        self.step_rows.observe(rows)
        self.step_seconds.observe(seconds)
        self.steps.inc()

    def observe_finished(self, request: AudioRequest, result: AudioResult) -> None:
        self.generations.labels(self.worker, result.failure or "ok").inc()
        if result.audio is not None:
            self.audio_seconds.inc(request.audio_length)
            engine_seconds = sum(result.timings[stage] for stage in ("prepare_s", "denoise_s", "decode_s"))
            self.seconds_per_audio_second.observe(engine_seconds / request.audio_length)


class RequestMetricsMiddleware:
    """Counts each generation request with its status and requested format, 4xx from validation included.

    It reads only ``response_format``: from a JSON body as it passes, once the body is whole (then it lets the body
    go), and from an upload's form as the guard read it (an upload is up to 128 MiB and is parsed once). A request
    refused before its body was parsed (a 401, 408, 413 or 429 from the guard, or any answer before the body was
    read whole) is counted with format ``unread``: what it asked for is not known, and it is not a request for an
    invalid format. A 413 is so even when the chunk that crossed the limit was the last. A client that goes away
    before any answer (mid-upload) is counted as nginx logs it, with status 499."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] != "http" or scope["method"] != "POST" or path not in (*JSON_BODY_PATHS, *UPLOAD_PATHS):
            return await self.app(scope, receive, send)
        body = bytearray()
        requested = "unread"
        form: dict[str, Any] = {}
        answered = False

        async def observed_receive():
            nonlocal requested
            message = await receive()
            if message["type"] == "http.request" and requested == "unread":
                body.extend(message.get("body", b""))
                if not message.get("more_body", False):
                    requested = requested_format(body)
                    body.clear()
            return message

        async def observed_send(message):
            nonlocal answered
            if message["type"] == "http.response.start":
                answered, status = True, message["status"]
                if path in UPLOAD_PATHS:
                    label = (requested_in(form["fields"]) if "fields" in form
                             else "invalid" if status == 415 else "unread")  # 415: not a form, so no request
                else:
                    label = "unread" if status in (401, 413) else requested
                FrontMetrics.get().requests.labels(path, str(status), label).inc()
            await send(message)

        if path in UPLOAD_PATHS:
            await self.app({**scope, UPLOAD_FORM_SCOPE_KEY: form}, receive, observed_send)
        else:
            await self.app(scope, observed_receive, observed_send)
        if not answered:
            FrontMetrics.get().requests.labels(path, str(CLIENT_CLOSED_REQUEST), "unread").inc()


class RequestedFormat(BaseModel):
    """A JSON body's ``response_format`` alone: pydantic's parser builds none of the other values, which json.loads
    did on the event loop for every request (a 1 MiB body of numbers: 28 ms of 39, against 5-11 ms now)."""

    model_config = ConfigDict(extra="ignore")
    response_format: Any = "wav"


def requested_format(body: bytes | bytearray) -> str:
    """The JSON body's response_format when it is a known one, ``wav`` when absent, else ``invalid`` (also for a
    body the JSON routes refuse to read)."""
    try:
        return format_label(RequestedFormat.model_validate_json(body).response_format)
    except ValidationError:  # not JSON, or deeper than pydantic's 200 levels, which the FastAPI routes' json.loads read
        pass
    if unreadable_json_text(bytes(body)) is not None:  # what json.loads reads but the routes refuse (UTF-16, a BOM)
        return "invalid"
    try:
        fields = json.loads(body)
    except (ValueError, RecursionError):  # not JSON, nested too deep to parse
        return "invalid"
    return requested_in(fields) if isinstance(fields, dict) else "invalid"


def requested_in(fields: dict[str, Any]) -> str:
    """The same for a request's fields, read."""
    return format_label(fields.get("response_format", "wav"))


def format_label(value: Any) -> str:
    return value if isinstance(value, str) and value in FORMATS else "invalid"
