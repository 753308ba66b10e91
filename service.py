"""stable-audio-bento: text-to-audio with stable-audio-open-1.0 on BentoML.

StableAudio (front, HTTP on :8091)  ->  StableAudioEngine (GPU: adaptive batching into a step-level denoising loop)
                                     ->  StableAudioEngine1, ... (one engine per GPU, STABLE_AUDIO_ENGINE_WORKERS)
"""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))  # the Bento ships src/ without installing it

import bentoml  # noqa: E402
from fastapi import FastAPI, Request, Response  # noqa: E402
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.responses import JSONResponse, StreamingResponse  # noqa: E402

from stable_audio_bento import metric_labels, traffic_timeout  # noqa: E402
from stable_audio_bento.admission import Admission  # noqa: E402
from stable_audio_bento.audio import FORMATS  # noqa: E402
from stable_audio_bento.config import ServiceSettings  # noqa: E402
from stable_audio_bento.engine_pool import EnginePool  # noqa: E402
from stable_audio_bento.engine_workers import (  # noqa: E402
    depends_on_engines, engine_clients, engine_services, engine_worker_count,
)
from stable_audio_bento.gateway import Gateway, GeneratedAudio  # noqa: E402
from stable_audio_bento.generation import AudioRequest  # noqa: E402
from stable_audio_bento.graceful_stop import keep_sockets_until_workers_stop, stop_after  # noqa: E402
from stable_audio_bento.health import EngineReadiness, StallWatchdog  # noqa: E402
from stable_audio_bento.idempotency import REPLAYED_HEADERS  # noqa: E402
from stable_audio_bento.jobs import JobStore  # noqa: E402
from stable_audio_bento.metrics import EngineMetrics, FrontMetrics, RequestMetricsMiddleware  # noqa: E402
from stable_audio_bento.model_store import stored_model_reference  # noqa: E402
from stable_audio_bento.playground import playground_page  # noqa: E402
from stable_audio_bento.protocol import (  # noqa: E402
    APIError, EditRequest, GenerateRequest, describe_validation_error, model_not_served,
)
from stable_audio_bento.serving import (  # noqa: E402
    ModelCard, OpenAIErrorMiddleware, RequestGuardMiddleware, current_request, error_headers, install_log_filters,
    streamed,
)
from stable_audio_bento.startup import front_settings, start_engine, supervise_like_a_container  # noqa: E402
from stable_audio_bento.step_loop import LoopLimits, StepLoop  # noqa: E402
from stable_audio_bento.tracking import FRONT_GONE_MARGIN_S, RequestTracker, ResultBoard  # noqa: E402

logger = logging.getLogger("stable_audio_bento")
logger.setLevel(logging.INFO)
try:
    SETTINGS = ServiceSettings.load()
    ENGINE_COUNT = engine_worker_count()
except ValueError as unusable:  # a setting read while BentoML imports this file: one line, not its traceback
    raise SystemExit(f"stable-audio-bento cannot start: {unusable}") from None
traffic_timeout.install()  # BentoML's own keeps every request alive for traffic.timeout
keep_sockets_until_workers_stop()  # BentoML removes the engine's socket as soon as it is told to stop
metric_labels.install()  # BentoML's own labels its request metrics with every path requested


# BentoML 1.4 replaces its client session to a service every 100 calls / 300 s and closes the old one with calls
# still in flight on it, failing them; generations are long and many, so the session is kept for good.
NEVER_RECYCLE_CONNECTION = {"max_requests": 2**62, "max_age": 1e12}


class StableAudioEngine:
    """Holds the model and its step loop. Arrivals come in through BentoML's adaptive batching (``submit``), which
    hands each group to the loop and returns at once; ``result`` waits for one request's audio. The loop runs in
    its own thread, so every API here is async and answers while it denoises. Served once per engine worker
    (``ENGINES``), each on its own device."""

    index = 0  # which engine this is; set by engine_services

    # Declared here so that `bentoml build` packs it into the Bento; None when the model store has none.
    stored_model = stored_model_reference()

    def __init__(self) -> None:
        install_log_filters()
        # Loaded (on this engine's own device) and warmed up, or the server stops.
        self.config, self.engine, self.startup = start_engine(self.stored_model, self.index)
        self.tracker = RequestTracker(metrics=EngineMetrics.get(SETTINGS.max_batch_size, self.index))
        self.results = ResultBoard(orphaned_after_s=SETTINGS.result_wait_s + FRONT_GONE_MARGIN_S)
        self.results.drop_orphans(self.tracker.cancel)  # a killed front's generations are not computed for no one
        self.loop = StepLoop(self.engine, self.tracker, LoopLimits(SETTINGS.batching, SETTINGS.max_batch_size,
                                                                   self.engine.options.max_rows))
        self.loop.start()
        StallWatchdog(self.loop, SETTINGS.stall_timeout_s).start()  # a hung step ends the server, to be restarted
        stop_after(self.results.all_collected)  # SIGTERM: the front collects what is in flight before the socket goes
        self.card = ModelCard(self.config.model, self.engine.limits,
                              self.config.default_inference_steps or self.engine.default_steps,
                              self.config.max_inference_steps, self.engine.default_guidance_scale,
                              edits=self.engine.starts_from_audio, inpainting=self.engine.inpaints,
                              model_tag=self.config.model_tag)
        logger.info("%s batching: at most %d requests and %s DiT rows per step", SETTINGS.batching,
                    SETTINGS.max_batch_size, self.engine.options.max_rows or "any number of")

    @bentoml.api
    async def describe(self) -> dict:
        return self.card.to_dict()

    @bentoml.api
    async def startup_report(self) -> dict:
        return self.startup.to_dict()

    @bentoml.api(batchable=True, max_batch_size=SETTINGS.arrivals_per_call, max_latency_ms=SETTINGS.max_latency_ms)
    async def submit(self, requests: list[AudioRequest]) -> list[str]:
        for request in requests:
            if self.results.expect(request.id, request.label):
                self.loop.submit(request, self.results.deliverer(request.id))
        return [request.id for request in requests]

    @bentoml.api
    async def result(self, generation_id: str, wait_s: float) -> dict:
        """The generation's result, or ``{"pending": true}`` if it has not come within ``wait_s``."""
        result = await self.results.wait(generation_id, wait_s)
        return {"pending": True} if result is None else vars(result)

    @bentoml.api
    async def cancel(self, ids: list[str]) -> None:
        self.tracker.cancel(ids)

    @bentoml.api
    async def progress(self, ids: list[str]) -> dict[str, dict[str, int]]:
        return self.tracker.progress(ids)


ENGINES = engine_services(StableAudioEngine, ENGINE_COUNT, resources={"gpu": 1}, workers=1,
                          traffic={"timeout": SETTINGS.request_timeout_s}, runner_connection=NEVER_RECYCLE_CONNECTION)

http_routes = FastAPI()


@http_routes.exception_handler(APIError)
async def api_error(_: Request, error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error_headers(error))


@http_routes.exception_handler(RequestValidationError)
async def invalid_body(_: Request, error: RequestValidationError) -> JSONResponse:
    message, param = describe_validation_error(error.errors())
    return await api_error(_, APIError(message, param=param))


def error_response(ctx: bentoml.Context, error: APIError) -> JSONResponse:
    """An APIError from a BentoML API method, which cannot raise it: BentoML would answer 500."""
    ctx.response.status_code = error.status
    ctx.response.headers.update(error_headers(error))
    return JSONResponse(error.body(), status_code=error.status)


def audio_response(audio: GeneratedAudio) -> StreamingResponse:
    """As BentoML sends a file returned by an API method (/v1/audio/generate): named for saving."""
    return streamed(audio.data, FORMATS[audio.response_format].media_type,
                    {**audio.headers(), "Content-Disposition": f'attachment; filename="{audio.filename}"'})


# runner_probe: /readyz asks the engines itself (EngineReadiness): BentoML's probe of them failed with a 500 and
# tracebacks when one stopped answering
@bentoml.service(http={"port": SETTINGS.port}, traffic={"timeout": SETTINGS.request_timeout_s},
                 runner_probe={"enabled": False})
@bentoml.asgi_app(http_routes, path="/")
@depends_on_engines(ENGINES)
class StableAudio:
    """The public HTTP API: /v1/audio/generate, /v1/audio/edits, /v1/audio/speech, /v1/audio/jobs, /v1/models and
    /health."""

    @bentoml.on_deployment
    def stop_instead_of_restarting() -> None:
        """Runs in the `bentoml serve` process before it starts any worker (the engine's own hook would run after
        its watcher exists): an engine that cannot load its model ends the server instead of restarting."""
        supervise_like_a_container()

    def __init__(self) -> None:
        install_log_filters()
        capacity = SETTINGS.max_batch_size * len(ENGINES)  # requests all engines run at once
        self.config = front_settings(capacity)  # or the server stops, saying which setting is unusable
        self.admission = Admission(self.config.max_pending, capacity, on_pending_change=FrontMetrics.get().pending.set)
        self.gateway = Gateway(EnginePool(engine_clients(self), SETTINGS.result_wait_s), self.admission)
        self.jobs = JobStore(self.gateway, self.config.job_ttl_s, self.config.max_finished_jobs,
                             SETTINGS.request_timeout_s, self.config.max_finished_bytes, FrontMetrics.get().count_job)
        # SIGTERM: 503 to new work; the generations in flight finish, then the jobs that succeeded are fetched
        stop_after(self.admission.drain, self.jobs.all_fetched)
        self.readiness = EngineReadiness(engine_clients(self), SETTINGS.stall_timeout_s)

    async def __is_alive__(self) -> bool:
        """BentoML's /livez: fails once an engine has stopped answering for STABLE_AUDIO_STALL_TIMEOUT_S."""
        return await self.readiness.alive()

    async def __is_ready__(self) -> bool:
        """BentoML's /readyz: 503 until every engine has loaded and warmed up its model, while one does not answer,
        and once draining."""
        return not self.admission.draining and await self.readiness.check() is not None

    @http_routes.get("/health")
    async def health(self):
        if self.admission.draining:
            raise APIError("shutting down", status=503, code="shutting_down")
        startup = await self.readiness.require()  # 503 until the model is loaded and warmed up
        card = await self.gateway.model_card()
        return {"status": "ok", "ready": True, "model": card.model, "model_tag": card.model_tag,
                "sample_rate": card.limits.sample_rate, "max_audio_length": card.limits.max_seconds, **startup}

    @bentoml.api(route="/v1/audio/generate", input_spec=GenerateRequest)
    async def generate(self, ctx: bentoml.Context, **fields) -> Path:
        return await self.respond(ctx, GenerateRequest(**fields))  # already validated by BentoML against input_spec

    @bentoml.api(route="/v1/audio/edits", input_spec=EditRequest)
    async def edit(self, ctx: bentoml.Context, **fields) -> Path:
        """Audio-to-audio: multipart form data with the file in ``audio``, the fields of /v1/audio/generate, and
        ``strength`` or (Stable Audio 3) ``mask_start`` / ``mask_end``."""
        return await self.respond(ctx, EditRequest(**fields))

    async def respond(self, ctx: bentoml.Context, request: GenerateRequest) -> Path:
        """The audio as the file BentoML sends, with our headers; or the error in our shape."""
        try:
            audio = await self.gateway.serve(request, current_request())
        except APIError as error:
            return error_response(ctx, error)
        ctx.response.headers.update(audio.headers())
        path = Path(ctx.temp_dir) / audio.filename
        await asyncio.to_thread(path.write_bytes, audio.data)  # up to tens of MB: not on the event loop
        return path

    @bentoml.api(route="/v1/audio/edits/jobs", input_spec=EditRequest)
    async def submit_edit_job(self, ctx: bentoml.Context, **fields) -> dict:
        """An edit as a job (the form of /v1/audio/edits); poll, fetch and cancel it under /v1/audio/jobs/{id}."""
        try:
            job, replayed = await self.jobs.create(EditRequest(**fields), current_request())
        except APIError as error:
            return error_response(ctx, error)
        ctx.response.status_code = 202
        ctx.response.headers.update(REPLAYED_HEADERS if replayed else {})
        return await self.jobs.describe(job)

    @http_routes.post("/v1/audio/speech")
    async def speech(self, request: GenerateRequest):
        """OpenAI's speech endpoint, so ``openai.OpenAI(base_url=...).audio.speech.create`` works; ``voice``,
        ``speed`` and ``instructions`` are ignored, our fields come through the SDK's ``extra_body``."""
        return audio_response(await self.gateway.serve(request, current_request()))

    @http_routes.get("/ui", include_in_schema=False)
    async def playground(self):
        """The browser playground (BentoML's own Swagger page keeps "/")."""
        return playground_page()

    @http_routes.get("/v1/models")
    async def models(self):
        return {"object": "list", "data": [(await self.gateway.model_card()).openai_model()]}

    @http_routes.get("/v1/models/{model_id:path}")  # hub ids have a slash: owner/name
    async def model(self, model_id: str):
        """``client.models.retrieve(id)`` of the OpenAI SDK."""
        card = await self.gateway.model_card()
        if model_id != card.model:
            raise model_not_served(model_id, card.model)
        return card.openai_model()

    @http_routes.post("/v1/audio/jobs", status_code=202)
    async def submit_job(self, request: GenerateRequest, response: Response):
        """A job: 202 with its id at once. With an ``Idempotency-Key`` header, the same request sent again with the
        same key gets the job the first one created (a client that lost the answer learns the id)."""
        job, replayed = await self.jobs.create(request, current_request())
        response.headers.update(REPLAYED_HEADERS if replayed else {})
        return await self.jobs.describe(job)

    @http_routes.get("/v1/audio/jobs/{job_id}")
    async def job_status(self, job_id: str):
        return await self.jobs.describe(self.jobs.get(job_id))

    @http_routes.get("/v1/audio/jobs/{job_id}/content")
    async def job_content(self, job_id: str):
        return audio_response(self.jobs.content(job_id))

    @http_routes.delete("/v1/audio/jobs/{job_id}")
    async def cancel_job(self, job_id: str):
        return await self.jobs.cancel(job_id)


StableAudio.add_asgi_middleware(RequestMetricsMiddleware)
StableAudio.add_asgi_middleware(OpenAIErrorMiddleware)
StableAudio.add_asgi_middleware(RequestGuardMiddleware)
