"""The engine's view of requests by id: what stops them (cancellation, deadline), how far each has got, and
the results waiting to be collected.

The step loop runs in its own thread while cancel, progress and result calls arrive on the event loop, so the
tracker's state is under a lock and results cross to the event loop with ``call_soon_threadsafe``. Entries
expire, so a long-running server keeps a bounded amount of state. A generation whose front has stopped asking for
its result (the front's worker was killed) is cancelled, not computed for no one (``ResultBoard.drop_orphans``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .generation import AudioRequest, AudioResult, GenerationMonitor

logger = logging.getLogger(__name__)

ENTRY_TTL_S = 3600.0
MAX_ENTRIES = 100_000
UNCLAIMED_RESULT_TTL_S = 120.0  # the front collects a result at once; one left this long was given up on
CLAIMED_RESULT_GRACE_S = 30.0  # a result call retried after a broken connection still finds its result
# ... within this much audio held for such retries (the newest claimed result kept whatever its size): a retry comes
# at once, while a fast GPU collects GBs of audio in 30 s (47 s of stereo float32 is 17 MB).
CLAIMED_RESULTS_MAX_BYTES = 512 << 20
# At a stop, a result not collected this long after it was posted is taken as given up on (the front is polling
# for it at once otherwise).
UNCOLLECTED_AT_STOP_S = 10.0
# ... and none has arrived for this long: the front may have admitted one just before the stop that is still on its
# way (BentoML's batching dispatcher, an upload's transfer), and the engine must not close its socket under it.
ARRIVAL_QUIET_AT_STOP_S = 2.0
SETTLED_POLL_S = 0.25
# The front keeps one result call waiting for each of its generations, each at most result_wait_s, the next sent at
# once; a generation no call has begun to wait for in result_wait_s plus this margin has lost its front (killed, out
# of memory). The margin is for a live front that is slow to ask again (its event loop busy, a connection retried).
FRONT_GONE_MARGIN_S = 30.0
ORPHAN_CHECK_S = 5.0  # how often the engine looks for such generations


class _RecentEntries:
    """A mapping that forgets entries not updated for ``ttl_s``, and its oldest ones past ``max_entries``."""

    def __init__(self, ttl_s: float, max_entries: int):
        self.ttl_s, self.max_entries = ttl_s, max_entries
        self._entries: OrderedDict[str, tuple[float, object]] = OrderedDict()  # key -> (updated, value), oldest first

    def put(self, key: str, value: object) -> None:
        now = time.time()
        self._entries[key] = (now, value)
        self._entries.move_to_end(key)
        while self._entries and (len(self._entries) > self.max_entries
                                 or now - next(iter(self._entries.values()))[0] > self.ttl_s):
            self._entries.popitem(last=False)

    def get(self, key: str) -> object | None:
        entry = self._entries.get(key)
        return None if entry is None else entry[1]


class RequestTracker(GenerationMonitor):
    """The step loop's monitor in the engine: cancellations, deadlines, progress, metrics and the log line of
    each finished request. ``metrics`` is an ``EngineMetrics`` (None in tests)."""

    def __init__(self, ttl_s: float = ENTRY_TTL_S, max_entries: int = MAX_ENTRIES, metrics: Any = None):
        self.metrics = metrics
        self._lock = threading.Lock()
        self._cancelled = _RecentEntries(ttl_s, max_entries)
        self._progress = _RecentEntries(ttl_s, max_entries)  # id -> {"steps_done", "steps_total"}

    def cancel(self, ids: list[str]) -> None:
        """Stops these requests at their next step boundary, or before they start. Ids not seen yet are
        remembered too: a cancel can overtake its request on the way to the engine."""
        with self._lock:
            for request_id in ids:
                self._cancelled.put(request_id, True)

    def progress(self, ids: list[str]) -> dict[str, dict[str, int]]:
        """Steps done and total of the requests among ``ids`` that have started; absent ones are still queued."""
        with self._lock:
            found = {request_id: self._progress.get(request_id) for request_id in ids}
        return {request_id: steps for request_id, steps in found.items() if steps is not None}

    def interruption(self, request: AudioRequest) -> AudioResult | None:
        # The deadline first: the front cancels a request whose timeout it saw pass, and the cancel must not hide why.
        if request.deadline is not None and time.time() > request.deadline:
            return AudioResult.failed("deadline_exceeded", "the request's timeout passed before it finished")
        with self._lock:
            cancelled = self._cancelled.get(request.id) is not None
        if cancelled:
            return AudioResult.failed("cancelled", "cancelled: the client went away or cancelled the job")
        return None

    def on_step(self, request: AudioRequest, steps_done: int, steps_total: int) -> None:
        with self._lock:
            self._progress.put(request.id, {"steps_done": steps_done, "steps_total": steps_total})

    def on_forward(self, requests: int, rows: int, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.observe_step(requests, rows, seconds)

    def on_work(self, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.busy_seconds.inc(seconds)

    def on_finish(self, request: AudioRequest, result: AudioResult) -> None:
        if self.metrics is not None:
            self.metrics.observe_finished(request, result)
        parts = [result.failure or "ok"]  # then what it went through: one dropped while queued, nothing
        if result.batch_size:
            parts.append(f"up to {result.batch_size} requests per step")
        if result.timings:
            parts.append(" ".join(f"{name.removesuffix('_s')}={seconds:.3f}s"
                                  for name, seconds in result.timings.items()))
        logger.info("request %s finished: %s", request.label, ", ".join(parts))


@dataclass
class _Slot:
    """One generation submitted here: its result (a future on the event loop), who still wants it, and whether a
    stop must wait for it."""

    result: asyncio.Future
    label: str
    asked_at: float  # time.monotonic() when the latest result call began (its submit, before the first)
    calls_waiting: int = 0  # result calls waiting for it now
    posted_at: float | None = None  # time.monotonic() when its result came
    collected: bool = False  # a result call has returned it
    orphaned: bool = False  # cancelled by drop_orphans: no one will collect it

    def holds_up_a_stop(self, now: float, given_up_after_s: float) -> bool:
        return not (self.collected or self.orphaned) and (self.posted_at is None
                                                          or now - self.posted_at < given_up_after_s)

    def is_orphan(self, now: float, orphaned_after_s: float) -> bool:
        return (self.posted_at is None and not self.orphaned and not self.calls_waiting
                and now - self.asked_at > orphaned_after_s)


class ResultBoard:
    """Results by generation id, handed from the loop's thread to the async call that waits for each.

    ``expect`` is called on the event loop when a request is submitted; ``deliverer`` gives the loop the callback
    that posts the result; ``wait`` returns it. Results are dropped a while after they are collected (sooner when
    the collected ones hold more than ``claimed_max_bytes`` of audio, oldest first), or after
    ``UNCLAIMED_RESULT_TTL_S`` when nobody collects them (the front gave up on the request).

    ``orphaned_after_s``: a generation still running for which no ``wait`` is in progress and none has begun for
    this long has lost its front; ``drop_orphans`` cancels such generations (None: none is ever dropped)."""

    def __init__(self, unclaimed_ttl_s: float = UNCLAIMED_RESULT_TTL_S, claimed_grace_s: float = CLAIMED_RESULT_GRACE_S,
                 claimed_max_bytes: int = CLAIMED_RESULTS_MAX_BYTES, orphaned_after_s: float | None = None):
        self.unclaimed_ttl_s, self.claimed_grace_s = unclaimed_ttl_s, claimed_grace_s
        self.claimed_max_bytes = claimed_max_bytes
        self.orphaned_after_s = orphaned_after_s
        self._slots: dict[str, _Slot] = {}
        self._claimed: OrderedDict[str, int] = OrderedDict()  # id -> bytes of its audio, first collected first
        self._claimed_bytes = 0
        self._last_arrival = float("-inf")  # time.monotonic() of the last expect

    def expect(self, generation_id: str, label: str | None = None) -> bool:
        """Opens a slot for this id (``label``: how logs name it); False if there is one already (a submit retried
        after a broken connection)."""
        if generation_id in self._slots:
            return False
        self._last_arrival = time.monotonic()
        # The front asks for the result as soon as its submit returns: until then, the submit counts as asking.
        self._slots[generation_id] = _Slot(asyncio.get_running_loop().create_future(), label or generation_id,
                                           asked_at=self._last_arrival)
        return True

    def drop_orphans(self, cancel: Callable[[list[str]], None], every_s: float = ORPHAN_CHECK_S) -> None:
        """From now on, every ``every_s`` on this event loop, the generations orphaned (see the class) are passed to
        ``cancel`` (the tracker's: the step loop drops them at their next step, or before they start) and no longer
        held up a stop, each with one log line. A front that dies leaves its generations running with no one to
        collect them, and the engine's drain (``all_collected``) would wait for them, up to the traffic timeout."""
        if self.orphaned_after_s is None:
            return
        event_loop = asyncio.get_running_loop()

        def check() -> None:
            event_loop.call_later(every_s, check)
            self._cancel_orphans(cancel)

        event_loop.call_later(every_s, check)

    def _cancel_orphans(self, cancel: Callable[[list[str]], None]) -> None:
        now = time.monotonic()
        orphans = [generation_id for generation_id, slot in self._slots.items()
                   if slot.is_orphan(now, self.orphaned_after_s)]
        for generation_id in orphans:
            slot = self._slots[generation_id]
            slot.orphaned = True
            logger.warning("request %s dropped: no one has asked for its result for %.0f s: its front is gone",
                           slot.label, now - slot.asked_at)
        if orphans:
            cancel(orphans)

    async def all_collected(self, given_up_after_s: float = UNCOLLECTED_AT_STOP_S,
                            quiet_s: float = ARRIVAL_QUIET_AT_STOP_S) -> None:
        """Returns once no generation has arrived for ``quiet_s`` (counted from this call at the earliest) and every
        generation submitted here has its result posted and collected, or posted and left uncollected for
        ``given_up_after_s`` (its caller went away), or was dropped as an orphan (``drop_orphans``: its front is
        gone, and nothing asks for it during the stop): what the engine waits for before it stops."""
        called = time.monotonic()
        while (time.monotonic() - max(called, self._last_arrival) < quiet_s
               or any(slot.holds_up_a_stop(time.monotonic(), given_up_after_s) for slot in self._slots.values())):
            await asyncio.sleep(SETTLED_POLL_S)

    def deliverer(self, generation_id: str) -> Callable[[AudioResult], None]:
        event_loop = asyncio.get_running_loop()
        return lambda result: event_loop.call_soon_threadsafe(self._post, generation_id, result)

    def _post(self, generation_id: str, result: AudioResult) -> None:
        if (slot := self._slots.get(generation_id)) is None or slot.result.done():
            return
        slot.result.set_result(result)
        slot.posted_at = time.monotonic()
        asyncio.get_running_loop().call_later(self.unclaimed_ttl_s, self._forget, generation_id)

    def _forget(self, generation_id: str) -> None:
        self._slots.pop(generation_id, None)
        self._claimed_bytes -= self._claimed.pop(generation_id, 0)

    async def wait(self, generation_id: str, timeout_s: float) -> AudioResult | None:
        """The result, or None if it is not there within ``timeout_s`` (the caller asks again)."""
        if (slot := self._slots.get(generation_id)) is None:
            return AudioResult.failed("unknown_generation", f"no generation {generation_id!r} was submitted here")
        slot.asked_at = time.monotonic()
        slot.calls_waiting += 1
        try:
            result = await asyncio.wait_for(asyncio.shield(slot.result), timeout_s)
        except asyncio.TimeoutError:  # not yet the built-in TimeoutError on Python 3.10
            return None
        finally:
            slot.calls_waiting -= 1
        slot.collected = True
        if generation_id not in self._claimed:  # else a retried call: already held, and its timer set
            self._hold_claimed(generation_id, 0 if result.audio is None else result.audio.nbytes)
        return result

    def _hold_claimed(self, generation_id: str, size: int) -> None:
        self._claimed[generation_id] = size
        self._claimed_bytes += size
        while self._claimed_bytes > self.claimed_max_bytes and len(self._claimed) > 1:
            self._forget(next(iter(self._claimed)))
        asyncio.get_running_loop().call_later(self.claimed_grace_s, self._forget, generation_id)

    def __len__(self) -> int:
        return len(self._slots)
