"""Whether the server works, as its probes ask: ready (every engine has loaded its model and answers), and alive
(no engine has hung).

Ready. An engine answers nothing until its ``__init__`` has loaded and warmed up the model (startup), so the
front's ``/readyz`` (``__is_ready__``) and ``/health`` ask every engine each time, briefly while it starts, longer
once it has answered (a busy engine answers slower). BentoML's own probe of the engines (``runner_probe``) is off:
an engine that stopped answering made it fail with a 500 and two tracebacks per probe.

Alive. Two hangs differ. An engine whose step loop is stuck in one piece of work (a hung device or kernel, a
deadlock in a forward) still answers calls, since its event loop runs apart from the loop's thread, but no request advances and
nothing ends them: deadlines and cancellations are checked between steps. ``StallWatchdog`` ends that engine's
worker, which ends the server (a worker that exits ends it, see startup), for whoever runs it to restart it. An
engine that answers nothing any more (its event loop blocked) cannot end itself: the front's ``/livez``
(``EngineReadiness.alive``) fails once an engine that had answered has not for as long, and Kubernetes' liveness
probe restarts the pod. Both wait ``STABLE_AUDIO_STALL_TIMEOUT_S``.
"""

from __future__ import annotations

import asyncio
import faulthandler
import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from .engine_pool import QUICK_ANSWER_S
from .protocol import APIError
from .startup import exit_worker
from .step_loop import StepLoop

logger = logging.getLogger(__name__)

# How long /readyz and /health wait for a starting engine's answer before saying "not ready" (Kubernetes' default
# probe timeout is 1 s); one that has answered before gets QUICK_ANSWER_S (the manifest's probe timeout is 5 s).
PROBE_TIMEOUT_S = 0.5
# The engine worker's exit status when its step loop has hung; `bentoml serve` itself then exits with 1.
EXIT_STALLED = 4


class EngineReadiness:
    """The front's view of the engines: ``check`` for readiness, ``alive`` for liveness."""

    def __init__(self, engines: list[Any], stall_timeout_s: float, timeout_s: float = PROBE_TIMEOUT_S,
                 started_timeout_s: float = QUICK_ANSWER_S):
        self.engines, self.stall_timeout_s = engines, stall_timeout_s
        self.timeout_s, self.started_timeout_s = timeout_s, started_timeout_s
        self.reports: dict[int, dict[str, float]] = {}
        self.answered_at: dict[int, float] = {}  # engine -> time.monotonic() of its last answer

    async def check(self) -> dict[str, float] | None:
        """When every engine answers, the slowest start (load_s, warmup_s) as a dict; else None."""
        answered = await asyncio.gather(*(self._ask(index, engine) for index, engine in enumerate(self.engines)))
        if not all(answered):
            return None
        first = self.reports[0]
        return {key: max(report[key] for report in self.reports.values()) for key in first}

    async def alive(self) -> bool:
        """False once an engine that had answered has not answered for ``stall_timeout_s``; one still loading its
        model is alive (one that fails to load ends the server)."""
        await self.check()
        now = time.monotonic()
        silent = {index: now - at for index, at in self.answered_at.items() if now - at > self.stall_timeout_s}
        for index, seconds in silent.items():
            logger.error("engine %d has not answered for %.0f s (STABLE_AUDIO_STALL_TIMEOUT_S=%g): not alive",
                         index, seconds, self.stall_timeout_s)
        return not silent

    async def _ask(self, index: int, engine: Any) -> bool:
        timeout_s = self.started_timeout_s if index in self.reports else self.timeout_s
        try:
            self.reports[index] = await asyncio.wait_for(engine.to_async.startup_report(), timeout_s)
        except Exception:  # noqa: BLE001 - loading or hung (timeout), or not reachable: not ready either way
            return False
        self.answered_at[index] = time.monotonic()
        return True

    async def require(self) -> dict[str, float]:
        """For /health: the report, or a 503 saying the model is not ready yet."""
        if (report := await self.check()) is None:
            raise APIError("not ready: the model engine is loading or warming up the model, or not answering",
                           status=503, code="not_ready", retry_after=5)
        return report


class StallWatchdog:
    """Watches one engine's step loop from its own thread; when one piece of its work (a prepare, a batched step,
    the device wait, a decode) has run longer than ``timeout_s``, dumps every thread's stack (where it hangs) and
    calls ``on_stall`` with why, which by default ends the worker."""

    def __init__(self, loop: StepLoop, timeout_s: float, on_stall: Callable[[str], None] | None = None):
        self.loop, self.timeout_s = loop, timeout_s
        self.on_stall = on_stall or functools.partial(exit_worker, status=EXIT_STALLED)
        self.period_s = min(5.0, timeout_s / 10)

    def start(self) -> None:
        threading.Thread(target=self._watch, name="stall-watchdog", daemon=True).start()

    def _watch(self) -> None:
        while (seconds := self.loop.seconds_without_progress) <= self.timeout_s:
            time.sleep(self.period_s)
        faulthandler.dump_traceback(all_threads=True)
        self.on_stall(f"the step loop has made no progress for {seconds:.0f} s with {self.loop.active_rows} DiT rows "
                      f"(STABLE_AUDIO_STALL_TIMEOUT_S={self.timeout_s:g}): a hung device, kernel or forward, whose "
                      "thread stacks are above. The engine stops, and the server with it, to be restarted")
