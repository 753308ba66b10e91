"""The engine's view of requests by id: what stops them (cancellation, deadline) and how far each has got.

The batch runs in BentoML's worker thread while cancel and progress calls arrive on the event loop, so every
access takes the lock. Entries expire, so a long-running server keeps a bounded amount of state.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from .pipeline import AudioRequest, AudioResult, GenerationMonitor

ENTRY_TTL_S = 3600.0
MAX_ENTRIES = 100_000


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
    def __init__(self, ttl_s: float = ENTRY_TTL_S, max_entries: int = MAX_ENTRIES,
                 observe_step_seconds: Callable[[float], None] | None = None):
        self.observe_step_seconds = observe_step_seconds
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
        with self._lock:
            cancelled = self._cancelled.get(request.id) is not None
        if cancelled:
            return AudioResult.failed("cancelled", "cancelled: the client went away or cancelled the job")
        if request.deadline is not None and time.time() > request.deadline:
            return AudioResult.failed("deadline_exceeded", "the request's timeout passed before it finished")
        return None

    def on_step(self, request: AudioRequest, steps_done: int, steps_total: int) -> None:
        with self._lock:
            self._progress.put(request.id, {"steps_done": steps_done, "steps_total": steps_total})

    def on_forward(self, rows: int, seconds: float) -> None:
        if self.observe_step_seconds is not None:
            self.observe_step_seconds(seconds)
