"""How the server starts: the engine loads its model and warms it up before it answers anything, or the whole
server stops with one message saying what failed and what to do.

Why the server stops instead of retrying. `bentoml serve` is a circus arbiter with one watcher per service;
BentoML 1.4 creates every watcher with ``respawn=not running_inside_container()`` (bentoml/serving.py) and has no
setting for a retry limit. Outside a container a worker whose model cannot load is therefore restarted forever;
inside BentoML's image (its Dockerfile sets ``BENTOML_CONTAINERIZED``) it is not, and circus stops the arbiter as
soon as a watcher has no process left (circus/arbiter.py ``manage_watchers``: "No active process found for
watcher", which graceful_stop turns into one line), which drains the other services and exits `bentoml serve`
with status 1. A retry cannot fix a missing
folder, a corrupt file or too little memory, so ``supervise_like_a_container`` gives a bare `bentoml serve` that
same policy (BentoML 1.4.40 reads the variable there only); a worker that dies later also ends the server, and
whoever runs it (Kubernetes, a restart policy) decides about restarting. The engine worker reports its failure
once and exits without raising: an exception out of a service's ``__init__`` is printed by BentoML, Starlette and
uvicorn, three tracebacks per attempt.

A worker's uvicorn serves only after the service's ``__init__`` has returned, so warming up inside the engine's
``__init__`` keeps the engine unanswered until the first generation has run; the probes (health) rely on that.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import bentoml
import torch

from .config import EngineConfig, FrontConfig
from .engine_workers import own_device
from .generation import AudioRequest
from .loading import ModelLoadError, fit_rows_to_free_memory, load_engine
from .model_store import serving_config
from .serving import GuardSettings
from .step_loop import run_to_completion

logger = logging.getLogger(__name__)

# A second of guided audio in two steps: every stage a request goes through (prompt encoding, a batched DiT
# forward with guidance, the scheduler step, the trimmed decode), so compilation, lazy initialisation, kernel
# selection and allocator growth happen before the first request instead of in it.
WARM_UP = AudioRequest("warm-up", seed=0, audio_length=1.0, guidance_scale=7.0, num_inference_steps=2,
                       id="warm-up")
# The engine worker's exit status when its model cannot be served; `bentoml serve` itself then exits with 1.
EXIT_MODEL_UNAVAILABLE = 3


@dataclass(frozen=True)
class StartupReport:
    """Seconds the engine took to load its model and to run the warm-up generation."""

    load_s: float
    warmup_s: float

    def to_dict(self) -> dict[str, float]:
        return {name: round(seconds, 3) for name, seconds in asdict(self).items()}


def supervise_like_a_container() -> None:
    """In the `bentoml serve` process, before it creates its workers: a worker that exits ends the server (status
    1) instead of being restarted, as in BentoML's own image. See the module's docstring."""
    os.environ.setdefault("BENTOML_CONTAINERIZED", "true")


def start_engine(stored: bentoml.Model | None, index: int) -> tuple[EngineConfig, Any, StartupReport]:
    """Engine ``index``'s settings and its model (``stored``, the model store's, unless the environment names
    another) on its own device, loaded and warmed up; if any of that fails, this worker logs why and exits (it
    never returns)."""
    started = time.perf_counter()
    config: EngineConfig | None = None
    try:
        config = own_device(serving_config(stored), index)
        engine = load_engine(config)
        loaded = time.perf_counter()
        warm_up(engine)
        fit_rows_to_free_memory(engine, config)
    except Exception as exc:  # noqa: BLE001 - whatever stops the model from loading stops the server
        exit_worker(explain_failure(config, exc), traceback_of=None if _is_explained(config, exc) else exc)
    report = StartupReport(loaded - started, time.perf_counter() - loaded)
    logger.info("ready: %s loaded in %.1f s, warm-up generation in %.1f s", config.model, report.load_s,
                report.warmup_s)
    if config.default_inference_steps is None and engine.default_steps > config.max_inference_steps:
        # allowed (a server may make its clients choose a few steps), but every request without steps gets a 400
        logger.warning("the model's default of %d steps is above STABLE_AUDIO_MAX_STEPS=%d: a request must give "
                       "num_inference_steps (set STABLE_AUDIO_DEFAULT_STEPS to give it a default)",
                       engine.default_steps, config.max_inference_steps)
    return config, engine, report


def warm_up(engine: Any) -> None:
    """Runs the warm-up generation; its failure is the model's, raised as a ModelLoadError."""
    [result] = run_to_completion(engine, [WARM_UP])
    if result.failure is None:
        return
    hint = ""
    if engine.dtype == torch.float16:
        # Models trained in bf16 can exceed fp16's range (65504): Gemma-based text encoders such as Stable Audio 3's
        # T5Gemma are known to, and transformers' T5Gemma, unlike its T5, does not clamp. bf16 has fp32's range.
        hint = (" (the DiT and text encoder run in float16, whose range a model trained in bfloat16 can overflow; "
                "if the audio is non-finite, serve with STABLE_AUDIO_DTYPE=bfloat16 or float32)")
    raise ModelLoadError(f"the model loaded but its warm-up generation failed: {result.error}{hint}")


def front_settings(capacity: int) -> FrontConfig:
    """The front's settings, the request guard's (API key, body limits) included, checked before it serves; an
    unusable one logs one line and exits, as an engine does (the guard itself reads its settings only when the
    first request comes)."""
    try:
        GuardSettings.from_env()
        return FrontConfig.from_env(capacity)
    except ValueError as exc:
        exit_worker(f"cannot start the front: {_one_line(exc)}. The server stops; fix the setting and start it again.")


def explain_failure(config: EngineConfig | None, exc: BaseException) -> str:
    """One line: what could not be served, why, and what to do about it."""
    if config is None:  # the environment itself is invalid
        return f"cannot start the engine: {_one_line(exc)}. The server stops; fix the setting and start it again."
    what = (f"cannot serve the stored model {config.model_tag} (imported from {config.model})" if config.weights
            else f"cannot serve STABLE_AUDIO_MODEL={config.model!r}")
    if config.load_format != "auto":
        what += f" (STABLE_AUDIO_LOAD_FORMAT={config.load_format})"
    if _no_such_folder(config):
        why = (f"there is no folder {config.model}. Mount or download the model there (a diffusers-format folder, "
               "e.g. `hf download stabilityai/stable-audio-open-1.0 --local-dir DIR`), or set "
               "STABLE_AUDIO_MODEL to a hub id or to tiny")
    elif _is_out_of_memory(exc):
        why = (f"not enough memory to load it ({_one_line(exc)}). Free memory or use a larger machine; on a GPU, "
               "STABLE_AUDIO_DTYPE=float16 halves the DiT and T5")
    elif isinstance(exc, ModelLoadError):
        why = _one_line(exc)  # loading.py's messages already say what to do
    else:
        why = f"{type(exc).__name__}: {_one_line(exc)} (unexpected: the traceback is above)"
    return f"{what}: {why}. The server stops; fix the setting and start it again."


def exit_worker(message: str, traceback_of: BaseException | None = None,
                status: int = EXIT_MODEL_UNAVAILABLE) -> None:
    """Logs the failure once (after the traceback of an unexpected one) and ends this worker process at once:
    raising would make BentoML, Starlette and uvicorn print it three times, and there is nothing to clean up."""
    if traceback_of is not None:
        logger.error("".join(traceback.format_exception(traceback_of)).rstrip())
    logger.critical(message)
    for handler in {*logging.getLogger().handlers, *logger.handlers}:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _is_explained(config: EngineConfig | None, exc: BaseException) -> bool:
    """Whether the one-line message says all there is to know, so no traceback is logged."""
    return (isinstance(exc, (ModelLoadError, ValueError)) if config is None else
            isinstance(exc, ModelLoadError) or _is_out_of_memory(exc) or _no_such_folder(config))


def _no_such_folder(config: EngineConfig) -> bool:
    # A stored model keeps the path it was imported from as its name; its weights are in the model store.
    return (config.load_format == "auto" and config.weights is None and _looks_like_a_path(config.model)
            and not Path(config.model).expanduser().exists())


def _looks_like_a_path(model: str) -> bool:
    return model.startswith(("/", "./", "../", "~"))


def _is_out_of_memory(exc: BaseException) -> bool:
    # torch.OutOfMemoryError on a GPU; on the CPU allocator a RuntimeError ("DefaultCPUAllocator: can't allocate
    # memory"); plain MemoryError from Python.
    while exc is not None:
        if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" \
                or "can't allocate memory" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _one_line(exc: BaseException, limit: int = 2000) -> str:
    text = " ".join(str(exc).split()).rstrip(".")
    return text if len(text) <= limit else text[:limit] + "…"
