"""stable-audio-bento: text-to-audio with stable-audio-open-1.0 on BentoML.

StableAudio (front, HTTP on :8091)  ->  StableAudioEngine (GPU, adaptive batching of heterogeneous requests)
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))  # the Bento ships src/ without installing it

import bentoml  # noqa: E402
from fastapi import FastAPI  # noqa: E402
from fastapi.responses import JSONResponse  # noqa: E402

from stable_audio_bento.audio import FORMATS, encode_audio  # noqa: E402
from stable_audio_bento.config import EngineConfig, ServiceSettings  # noqa: E402
from stable_audio_bento.loading import load_engine  # noqa: E402
from stable_audio_bento.pipeline import AudioRequest  # noqa: E402
from stable_audio_bento.protocol import APIError, GenerateRequest  # noqa: E402
from stable_audio_bento.serving import ModelCard, OpenAIErrorMiddleware, RequestGuardMiddleware  # noqa: E402

logger = logging.getLogger("stable_audio_bento")
logger.setLevel(logging.INFO)
SETTINGS = ServiceSettings.load()


@bentoml.service(resources={"gpu": 1}, workers=1, traffic={"timeout": SETTINGS.request_timeout_s})
class StableAudioEngine:
    """Holds the diffusers pipeline; each adaptive batch is one call of BatchedStableAudio."""

    def __init__(self) -> None:
        self.config = EngineConfig.from_env()
        self.engine = load_engine(self.config)
        self.card = ModelCard(self.config.model, self.engine.limits,
                              self.config.default_inference_steps, self.config.max_inference_steps)

    @bentoml.api
    def describe(self) -> dict:
        return self.card.to_dict()

    @bentoml.api(batchable=True, max_batch_size=SETTINGS.max_batch_size, max_latency_ms=SETTINGS.max_latency_ms)
    def generate(self, requests: list[AudioRequest]) -> list[dict]:
        started_at = time.time()
        results = self.engine(requests)
        logger.info("batch of %d requests (%d DiT rows) took %.2f s", len(requests),
                    sum(r.rows for r in requests), time.time() - started_at)
        return [{"audio": r.audio, "error": r.error, "timings": r.timings, "started_at": started_at,
                 "batch_size": len(requests)} for r in results]


http_routes = FastAPI()


@bentoml.service(http={"port": SETTINGS.port}, traffic={"timeout": SETTINGS.request_timeout_s})
@bentoml.asgi_app(http_routes, path="/")
class StableAudio:
    """The public HTTP API: POST /v1/audio/generate and GET /health."""

    engine = bentoml.depends(StableAudioEngine)

    def __init__(self) -> None:
        self._card: ModelCard | None = None

    async def model_card(self) -> ModelCard:
        if self._card is None:
            self._card = ModelCard.from_dict(await self.engine.to_async.describe())
        return self._card

    @http_routes.get("/health")
    async def health(self):
        try:
            card = await self.model_card()
        except Exception as exc:  # engine still loading or gone: not ready
            return JSONResponse(APIError(f"model engine unavailable: {exc}", status=503).body(), status_code=503)
        return {"status": "ok", "model": card.model, "sample_rate": card.limits.sample_rate,
                "max_audio_length": card.limits.max_seconds}

    @bentoml.api(route="/v1/audio/generate", input_spec=GenerateRequest)
    async def generate(self, ctx: bentoml.Context, **fields) -> Path:
        request = GenerateRequest(**fields)  # already validated by BentoML against input_spec
        submitted_at = time.time()
        try:
            card = await self.model_card()
            job = request.to_audio_request(card.limits, card.model, card.default_steps, card.max_steps)
            [result] = await self.engine.to_async.generate([job])
            if result["error"]:
                raise APIError(f"generation failed: {result['error']}", status=500)
            encode_started = time.perf_counter()
            data = await asyncio.to_thread(encode_audio, result["audio"], card.limits.sample_rate,
                                           request.response_format)
        except APIError as error:
            ctx.response.status_code = error.status
            return JSONResponse(error.body(), status_code=error.status)
        timings = {"queue": result["started_at"] - submitted_at, **result["timings"],
                   "encode": time.perf_counter() - encode_started}
        ctx.response.headers["Server-Timing"] = ", ".join(
            f"{name.removesuffix('_s')};dur={1000 * seconds:.1f}" for name, seconds in timings.items())
        ctx.response.headers["X-Seed"] = str(job.seed)
        ctx.response.headers["X-Batch-Size"] = str(result["batch_size"])
        path = Path(ctx.temp_dir) / f"audio.{FORMATS[request.response_format].extension}"
        path.write_bytes(data)
        return path


StableAudio.add_asgi_middleware(OpenAIErrorMiddleware)
StableAudio.add_asgi_middleware(RequestGuardMiddleware)
