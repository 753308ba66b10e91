"""Admission control in the front process: a bound on generations queued or running, and a graceful stop.

Past the bound a request is refused at once with 429 and a Retry-After estimate, instead of waiting in a queue
until it times out. After SIGTERM nothing new is admitted (503) while the generations in flight finish; then the
server shuts down as it would have. BentoML's own ``traffic.max_concurrency`` counts HTTP connections, which
neither covers jobs (they hold no connection) nor leaves health checks out, hence this.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable

from .protocol import APIError
from .serving import RETRY_AFTER_S

logger = logging.getLogger(__name__)

SERVICE_TIME_SMOOTHING = 0.2  # weight of the newest generation in the running mean of service times


class Admission:
    def __init__(self, max_pending: int, max_batch_size: int, on_pending_change: Callable[[int], None] | None = None):
        self.max_pending = max_pending
        self.max_batch_size = max_batch_size
        self.on_pending_change = on_pending_change
        self.pending: dict[str, float] = {}  # generation id -> admitted at (time.time()), oldest first
        self.draining = False
        self.mean_service_s: float | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    def admit(self, generation_id: str) -> "Slot":
        """A slot for one generation, held until the returned object's ``with`` block ends.

        Raises 503 while shutting down and 429 when ``max_pending`` generations are queued or running."""
        self.check_room()
        self.pending[generation_id] = time.time()
        self._idle.clear()
        self._pending_changed()
        return Slot(self, generation_id)

    def check_room(self) -> None:
        """What ``admit`` would refuse now, without taking a slot: for work worth skipping when it would be
        refused anyway (decoding an upload)."""
        if self.draining:
            raise APIError("the server is shutting down and takes no new requests; retry on another instance",
                           status=503, code="shutting_down", retry_after=self.retry_after_s())
        if len(self.pending) >= self.max_pending:
            raise APIError(f"the server is busy: {len(self.pending)} generations are queued or running (limit "
                           f"{self.max_pending}); retry later", status=429, code="server_busy",
                           retry_after=self.retry_after_s())

    def release(self, generation_id: str) -> None:
        self.pending.pop(generation_id, None)
        if not self.pending:
            self._idle.set()
        self._pending_changed()

    def _pending_changed(self) -> None:
        if self.on_pending_change is not None:
            self.on_pending_change(len(self.pending))

    def record_service_time(self, seconds: float) -> None:
        """How long the engine took for one generation (denoise + decode), for the Retry-After estimate."""
        if self.mean_service_s is None:
            self.mean_service_s = seconds
        else:
            self.mean_service_s += SERVICE_TIME_SMOOTHING * (seconds - self.mean_service_s)

    def retry_after_s(self) -> int:
        """Seconds until a slot is likely free: the batches ahead of a new request, each one service time long."""
        if self.mean_service_s is None:
            return RETRY_AFTER_S
        batches_ahead = max(1, math.ceil((len(self.pending) - self.max_pending + 1) / self.max_batch_size))
        return max(1, math.ceil(batches_ahead * self.mean_service_s))

    async def drain(self) -> None:
        """Stop admitting, then return once every admitted generation has finished."""
        self.draining = True
        logger.info("draining: no new requests; %d generations in flight", len(self.pending))
        await self._idle.wait()


class Slot:
    """One admitted generation; leaving the ``with`` block frees it."""

    def __init__(self, admission: Admission, generation_id: str):
        self.admission, self.generation_id = admission, generation_id

    def __enter__(self) -> "Slot":
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def release(self) -> None:
        self.admission.release(self.generation_id)
