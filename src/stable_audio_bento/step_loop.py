"""The step loop: which requests take the next denoising step.

The engine keeps one loop over its active requests. Each turn it drops the requests that were cancelled or ran
past their deadline (waiting ones are never computed, running ones stop before their next step), admits waiting
requests first come first served while the caps allow, runs one step for every active request (one batched
forward per group of requests that can share one, then each request's own solver step), and decodes and hands
back those whose schedule has ended. In ``continuous`` mode a request joins at the next step boundary; in
``whole`` mode only an empty loop admits, so a batch runs to its end before the next one starts (the
behaviour of plain adaptive batching, kept for comparison).

The loop knows nothing of any model: a ``ModelFamily`` provides the stages. Since every request carries its own
conditioning, noise, generator and solver state, and a forward computes each row independently of the others,
joining or leaving never changes another request's audio.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from .generation import AudioRequest, AudioResult, GenerationMonitor

logger = logging.getLogger(__name__)

BatchingMode = Literal["continuous", "whole"]
BATCHING_MODES: tuple[BatchingMode, ...] = ("continuous", "whole")


@dataclass(kw_only=True)
class RequestState:
    """What the loop and every family read of a request's state; each family adds its conditioning, noise and
    solver state, and says how many steps its schedule has."""

    request: AudioRequest
    latents: Any  # (1, channels, frames)
    step: int = 0  # steps done

    @property
    def guided(self) -> bool:
        return self.request.rows == 2

    @property
    def frames(self) -> int:
        return self.latents.shape[-1]

    @property
    def steps_total(self) -> int:
        raise NotImplementedError

    @property
    def finished(self) -> bool:
        return self.step >= self.steps_total


class ModelFamily(Protocol):
    """The stages of one model family, as the loop drives them."""

    def prepare_request(self, request: AudioRequest) -> RequestState:
        """Everything that makes this request's audio its own: conditioning, noise, generator, solver state."""

    def forward_key(self, state: RequestState) -> Hashable:
        """States with equal keys can share one forward."""

    def forward(self, states: list[RequestState]) -> list[Any]:
        """One batched forward; an output per state. Must not change the states (a failed forward is retried)."""

    def advance(self, state: RequestState, output: Any) -> None:
        """The request's own solver step with its forward output."""

    def decode(self, state: RequestState) -> AudioResult:
        """The audio of a finished request."""

    def release_memory(self) -> None:
        """Gives back the memory a failed forward left cached, before it is retried over fewer requests."""

    def wait_for_device(self) -> None:
        """Returns once the work queued on the device has run."""


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to trim with
        return None


def release_freed_host_memory() -> None:
    """Hands freed heap memory back to the OS (glibc's malloc_trim); the loop does it after each turn in which a
    request left, when its tensors have just been freed. CPU
    steps allocate tensors of ever-changing sizes; without this the allocator keeps the peak of every mix it has
    seen and the process's RSS creeps up. (The CUDA cache is left alone: emptying it would only make the next
    step allocate again.)"""
    if (trim := _malloc_trim()) is not None:
        trim(0)


def drop_tracebacks(error: BaseException) -> None:
    """Takes the tracebacks off ``error`` and off every exception it was raised from or while handling: their
    frames hold what a failed forward allocated, and one kept traceback in the chain (an out-of-memory error
    raised in a fallback path, or re-raised ``from``) keeps all of it alive."""
    pending, seen = [error], set()
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        current.__traceback__ = None
        pending += [current.__cause__, current.__context__]


@dataclass(frozen=True)
class LoopLimits:
    """mode: ``continuous`` admits at every step boundary, ``whole`` only into an empty loop.
    max_requests: requests active at once (the engine's ``max_batch_size``); None for no cap.
    max_rows: DiT rows per step (a guided request takes two); None for no cap. A request alone in the loop is
        admitted whatever its rows, so nothing waits forever."""

    mode: BatchingMode = "continuous"
    max_requests: int | None = None
    max_rows: int | None = None


@dataclass(eq=False)
class _Held:
    """A request in the loop's hands: waiting, then active with its family state."""

    request: AudioRequest
    deliver: Callable[[AudioResult], None]
    state: Any = None
    started_at: float | None = None  # time.time() at admission
    denoise_started: float = 0.0  # perf_counter() at admission
    timings: dict[str, float] = field(default_factory=dict)
    batch_size: int = 0  # the most requests that shared one forward with this one


class StepLoop:
    """``submit`` from any thread; ``step`` (or the thread from ``start``) runs the loop."""

    def __init__(self, family: ModelFamily, monitor: GenerationMonitor = GenerationMonitor(),
                 limits: LoopLimits = LoopLimits()):
        self.family, self.monitor, self.limits = family, monitor, limits
        self._wakeup = threading.Condition()
        self._incoming: list[_Held] = []  # handed over by submit, taken by the loop; under _wakeup
        self._waiting: deque[_Held] = deque()  # the loop's own, like everything below
        self._active: list[_Held] = []
        self._closing = False
        self._thread: threading.Thread | None = None
        self._in_turn = False
        self._worked_until = 0.0  # perf_counter() up to which the monitor has been told of the work
        self.finished = 0  # requests that have left the loop, for any reason

    def submit(self, request: AudioRequest, deliver: Callable[[AudioResult], None]) -> None:
        """Queues a request; ``deliver`` is called once with its result, from the loop's thread."""
        with self._wakeup:
            self._incoming.append(_Held(request, deliver))
            self._wakeup.notify()

    @property
    def busy(self) -> bool:
        return bool(self._waiting or self._active)

    @property
    def active_rows(self) -> int:
        return sum(held.request.rows for held in self._active)

    @property
    def seconds_without_progress(self) -> float:
        """How long the running turn has gone since its last piece of work ended (a request's prepare, a batched
        step, the device wait, a decode; 0 between turns), for a watchdog in another thread: a turn of many pieces
        may be long, one piece that never ends is a hang."""
        return time.perf_counter() - self._worked_until if self._in_turn else 0.0

    def step(self) -> None:
        """One turn of the loop: drop the stopped, admit, one denoising step for all, retire the finished."""
        self._worked_until = time.perf_counter()
        self._in_turn = True
        try:
            with self._wakeup:
                self._waiting.extend(self._incoming)
                self._incoming.clear()
            self._drop_interrupted()
            self._admit()
            for group in self._forward_groups():
                self._step_group(group)
            self._retire_finished()
        finally:
            self._in_turn = False
            self._report_work()

    def _report_work(self) -> None:
        now = time.perf_counter()
        self._tell_monitor(self.monitor.on_work, now - self._worked_until)
        self._worked_until = now

    def run_until_idle(self) -> None:
        self.step()
        while self.busy:
            self.step()

    def start(self) -> None:
        """Runs the loop in a daemon thread, asleep while there is nothing to do."""
        self._thread = threading.Thread(target=self._serve, name="step-loop", daemon=True)
        self._thread.start()

    def close(self, timeout_s: float = 60.0) -> None:
        with self._wakeup:
            self._closing = True
            self._wakeup.notify()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _serve(self) -> None:
        while True:
            with self._wakeup:
                while not (self._incoming or self.busy or self._closing):
                    self._wakeup.wait()
                if self._closing and not (self._incoming or self.busy):
                    return
            finished_before = self.finished
            try:
                self.step()
            except Exception as exc:  # noqa: BLE001 - a bug in a turn must not end the loop and strand everyone
                logger.exception("the step loop failed; failing the %d requests it held", len(self._active))
                for held in [*self._active, *self._waiting]:
                    self._fail(held, exc)
            if self.finished != finished_before:
                release_freed_host_memory()

    # Who runs: interruptions, admission, grouping.
    def _drop_interrupted(self) -> None:
        for held in [*self._waiting, *self._active]:
            try:
                stopped = self.monitor.interruption(held.request)
            except Exception as exc:  # noqa: BLE001 - whether it was stopped is unknown: it ends, alone
                logger.exception("could not tell whether request %s was stopped", held.request.label)
                self._fail(held, exc)
                continue
            if stopped is None:
                continue
            if held.state is None:
                self._waiting.remove(held)  # never computed
            else:
                logger.info("request %s stopped after %d of %d steps (%s)", held.request.label, held.state.step,
                            held.state.steps_total, stopped.failure)
                self._active.remove(held)
            self._finish(held, stopped)

    def _admit(self) -> None:
        if self.limits.mode == "whole" and self._active:
            return
        while self._waiting and self._has_room_for(self._waiting[0].request):
            self._prepare(self._waiting.popleft())

    def _has_room_for(self, request: AudioRequest) -> bool:
        if not self._active:
            return True
        limits = self.limits
        if limits.max_requests is not None and len(self._active) >= limits.max_requests:
            return False
        return limits.max_rows is None or self.active_rows + request.rows <= limits.max_rows

    def _prepare(self, held: _Held) -> None:
        held.started_at, started = time.time(), time.perf_counter()  # the queue ends here: prepare is timed apart
        try:
            held.state = self.family.prepare_request(held.request)
        except Exception as exc:  # noqa: BLE001 - a request that cannot be prepared fails alone
            logger.exception("request %s could not be prepared", held.request.label)
            self._fail(held, exc)
            return
        held.timings["prepare_s"] = time.perf_counter() - started
        held.denoise_started = time.perf_counter()
        self._report_work()
        self._active.append(held)
        self._tell_monitor(self.monitor.on_step, held.request, 0, held.state.steps_total)

    def _forward_groups(self) -> list[list[_Held]]:
        groups: dict[Hashable, list[_Held]] = {}
        for held in list(self._active):
            try:
                key = self.family.forward_key(held.state)
            except Exception as exc:  # noqa: BLE001 - a request the family cannot place fails alone
                logger.exception("request %s could not be grouped for its step", held.request.label)
                self._fail(held, exc)
                continue
            groups.setdefault(key, []).append(held)
        return list(groups.values())

    # How a step runs for one group, and what happens to a request that fails in it.
    def _step_group(self, group: list[_Held]) -> None:
        started = time.perf_counter()
        stepped = self._forward_isolating(group)
        for held, output in stepped:
            try:
                self.family.advance(held.state, output)
            except Exception as exc:  # noqa: BLE001 - this request's solver failed; the others go on
                logger.exception("request %s failed in its solver step", held.request.label)
                self._fail(held, exc)
                continue
            self._tell_monitor(self.monitor.on_step, held.request, held.state.step, held.state.steps_total)
        if stepped:
            self._tell_monitor(self.monitor.on_forward, len(stepped), sum(held.request.rows for held, _ in stepped),
                               time.perf_counter() - started)
        self._report_work()

    def _forward_isolating(self, group: list[_Held]) -> list[tuple[_Held, Any]]:
        """The group's forward; if it raises (out of memory, a bad kernel, a bug one request triggers), the
        forward is retried over halves until the fault is pinned on single requests, which alone fail."""
        try:
            outputs = self.family.forward([held.state for held in group])
        except Exception as exc:  # noqa: BLE001 - whatever broke, the rest of the group must not be lost
            failure, trace = exc, traceback.format_exc()
            # Recovered from below, not in here, and without the tracebacks, whose frames hold the failed forward's
            # tensors: released or retried while they live, an out-of-memory step would fail in every half too.
            drop_tracebacks(exc)
        else:
            for held in group:
                held.batch_size = max(held.batch_size, len(group))
            return list(zip(group, outputs))
        self.family.release_memory()
        if len(group) == 1:
            logger.error("request %s failed on its own:\n%s", group[0].request.label, trace.rstrip())
            self._fail(group[0], failure)
            return []
        logger.warning("a step of %d requests failed (%s: %s); retrying it in halves", len(group),
                       type(failure).__name__, failure)
        half = len(group) // 2
        return self._forward_isolating(group[:half]) + self._forward_isolating(group[half:])

    def _retire_finished(self) -> None:
        finished = [held for held in self._active if held.state.finished]
        if finished:  # on a GPU the steps are still running: their time is denoising, not the first decode's
            self.family.wait_for_device()
            self._report_work()
        for held in finished:
            self._active.remove(held)
            held.timings["denoise_s"] = time.perf_counter() - held.denoise_started
            started = time.perf_counter()
            try:
                result = self.family.decode(held.state)
            except Exception as exc:  # noqa: BLE001 - a decode that fails loses this request only
                logger.exception("request %s failed to decode", held.request.label)
                result = self._failure(exc)
            held.timings["decode_s"] = time.perf_counter() - started
            self._report_work()
            self._finish(held, result)

    @staticmethod
    def _tell_monitor(hook: Callable[..., None], *args: Any) -> None:
        """Metrics, progress and log lines must never cost a request its audio, nor the others theirs."""
        try:
            hook(*args)
        except Exception:  # noqa: BLE001
            logger.exception("the generation monitor failed in %s", hook.__name__)

    def _fail(self, held: _Held, exc: Exception) -> None:
        if held in self._active:
            self._active.remove(held)
        elif held in self._waiting:
            self._waiting.remove(held)
        self._finish(held, self._failure(exc))

    @staticmethod
    def _failure(exc: Exception) -> AudioResult:
        return AudioResult.failed("server_error", f"{type(exc).__name__}: {exc}"[:300])  # after "generation failed: "

    def _finish(self, held: _Held, result: AudioResult) -> None:
        result.timings = {**held.timings, **result.timings}
        result.started_at, result.batch_size = held.started_at, held.batch_size
        self.finished += 1
        self._tell_monitor(self.monitor.on_finish, held.request, result)
        try:
            held.deliver(result)
        except Exception:  # noqa: BLE001 - a broken receiver must not stop the loop
            logger.exception("could not deliver the result of request %s", held.request.label)


def run_to_completion(family: ModelFamily, requests: list[AudioRequest],
                      monitor: GenerationMonitor = GenerationMonitor(),
                      limits: LoopLimits = LoopLimits()) -> list[AudioResult]:
    """All requests submitted at once and stepped to the end in the calling thread; results in request order.
    For tests, benchmarks and warm-up."""
    results: dict[int, AudioResult] = {}
    loop = StepLoop(family, monitor, limits)
    for position, request in enumerate(requests):
        loop.submit(request, lambda result, position=position: results.__setitem__(position, result))
    loop.run_until_idle()
    return [results[position] for position in range(len(requests))]
