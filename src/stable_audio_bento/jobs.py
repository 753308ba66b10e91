"""Asynchronous generation jobs: submit and get an id at once, poll status and progress, fetch, cancel.

BentoML's ``@bentoml.task`` gives submit/status/get, but no progress, no queue position, no expiry, and no cancel
when served locally; a job here is the same admitted generation as a synchronous request, run as an asyncio task
in the front process, with progress read from the engine. Finished jobs are kept ``ttl_s`` seconds (at most
``max_finished`` of them holding at most ``max_finished_bytes`` of audio, oldest dropped first), then forgotten:
their ids answer 404 like unknown ones.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from .admission import Slot
from .gateway import Delivery, Gateway, GeneratedAudio
from .generation import AudioRequest
from .idempotency import IdempotencyKeys, parse_key, request_fingerprint
from .protocol import APIError, GenerateRequest, shown
from .serving import RequestContext

logger = logging.getLogger(__name__)

# At a stop, how long a job that has succeeded waits to be fetched: its client polls every fraction of a second
# (client.py, the playground), so longer means it went away.
UNFETCHED_AT_STOP_S = 30.0
# How long one answer of the engines about progress serves the polls that follow (a client polls every fraction of
# a second): each call names every pending generation, so P clients polling on their own made O(P²) work.
PROGRESS_FRESH_S = 0.2

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


def new_job_id() -> str:
    return f"job_{uuid.uuid4().hex}"


@dataclass
class Job:
    request: AudioRequest
    delivery: Delivery
    slot: Slot
    created_at: float = field(default_factory=time.time)
    status: JobStatus = "queued"
    finished_at: float | None = None
    output: GeneratedAudio | None = None
    error: APIError | None = None
    task: asyncio.Task | None = None
    fetched: bool = False  # its audio has been sent at least once
    # (status, progress, queue_position) as last read from the engine, while the job is queued or running
    live: tuple[JobStatus, dict[str, int] | None, int | None] = ("queued", None, None)

    @property
    def id(self) -> str:
        return self.request.id

    @property
    def finished(self) -> bool:
        return self.finished_at is not None


EXPIRY_LATENESS_S = 0.5


class JobStore:
    """max_run_s: the longest a job may run, its ``timeout`` or not, as a direct request is cut by the traffic
    timeout: a drain, which waits for every job in flight, ends within the same bound. on_finished: told each
    job's outcome once it has ended (``succeeded``, ``cancelled``, or its error's code), for the metrics."""

    def __init__(self, gateway: Gateway, ttl_s: float, max_finished: int, max_run_s: float,
                 max_finished_bytes: int | None = None, on_finished: Callable[[str], None] = lambda outcome: None):
        self.gateway, self.ttl_s, self.max_finished, self.max_run_s = gateway, ttl_s, max_finished, max_run_s
        self.max_finished_bytes = max_finished_bytes  # None: no bound
        self.on_finished = on_finished
        self._jobs: dict[str, Job] = {}  # in submission order
        self.keys = IdempotencyKeys()
        self._progress: asyncio.Future | None = None  # the engines' last answer, or the call under way
        self._progress_asked_at = 0.0

    async def create(self, request: GenerateRequest, client: RequestContext) -> tuple[Job, bool]:
        """A new job for the request (an edit's upload decoded, admitted); or, when the client's Idempotency-Key
        created one for the same request, that job, and True: the answer is a replay."""
        if client.idempotency_key is None:
            return await self._prepare_and_submit(request, client), False
        key = parse_key(client.idempotency_key)  # before an upload is read for its fingerprint
        fingerprint = await asyncio.to_thread(request_fingerprint, request)
        self._expire()  # a key whose job has expired is free again
        if (job_id := self.keys.claim(key, fingerprint)) is not None:
            return self._jobs[job_id], True
        try:
            job = await self._prepare_and_submit(request, client)
        except BaseException:
            self.keys.release(key)
            raise
        self.keys.bind(key, job.id)
        return job, False

    async def _prepare_and_submit(self, request: GenerateRequest, client: RequestContext) -> Job:
        return self.submit(await self.gateway.prepare(request, client.request_id, new_job_id()), Delivery.of(request))

    def submit(self, request: AudioRequest, delivery: Delivery) -> Job:
        """Admits the job (429/503 like a synchronous request) and starts it."""
        self._expire()
        request = request.due_by(time.time() + self.max_run_s)
        job = Job(request, delivery, self.gateway.admission.admit(request.id))
        job.task = asyncio.create_task(self._run(job), name=f"job {job.id}")
        job.task.add_done_callback(lambda _: self._settle(job))
        self._jobs[job.id] = job
        return job

    async def _run(self, job: Job) -> None:
        try:
            job.output = await self.gateway.generate(job.request, job.delivery)
            job.status = "succeeded"
        except APIError as error:
            job.error = error
            job.status = "cancelled" if error.code == "cancelled" else "failed"
        except asyncio.CancelledError:
            job.status = "cancelled"
        except Exception as exc:  # noqa: BLE001 - a fault here (an encoder, a full disk) fails this job, visibly
            logger.exception("job %s failed", job.id)
            job.error = APIError(f"generation failed: {type(exc).__name__}", status=500, code="generation_failed")
            job.status = "failed"

    def _settle(self, job: Job) -> None:
        """When the job's task is done, however it ended: also when cancelled before it ever ran, when ``_run``'s
        own code never started."""
        if job.status == "queued":
            job.status = "cancelled"
        if job.error is not None and job.error.status == 503:  # nothing wrong with the request: it may be resent
            self.keys.free(job.id)
        job.slot.release()
        job.finished_at = time.time()
        self.on_finished(job.status if job.status != "failed" else job.error.code or "failed")
        job.request = replace(job.request, init_audio=None)  # finished jobs need not hold the upload
        self._expire()  # the store stays bounded whether or not anyone polls
        # and the audio goes when the job expires, on an idle server too (a moment past, so that it has expired)
        asyncio.get_running_loop().call_later(self.ttl_s + EXPIRY_LATENESS_S, self._expire)

    def get(self, job_id: str) -> Job:
        self._expire()
        if (job := self._jobs.get(job_id)) is None:
            raise APIError(f"no job {shown(repr(job_id), 80)} on this instance: unknown, its result expired, or "
                           "another instance accepted it (jobs live where they were submitted: poll through "
                           "load-balancer affinity)",
                           param="job_id", status=404, code="job_not_found")
        return job

    def content(self, job_id: str) -> GeneratedAudio:
        job = self.get(job_id)
        if job.output is None:
            state = job.status if job.finished else "not finished"  # queued or running: the engine knows which
            raise APIError(f"job {job_id!r} is {state}; its audio exists only once it has succeeded",
                           param="job_id", status=409, code="job_not_finished" if not job.finished else job.status)
        job.fetched = True
        return job.output

    async def all_fetched(self, given_up_after_s: float = UNFETCHED_AT_STOP_S) -> None:
        """Returns once every job that succeeded has had its audio fetched, or has waited ``given_up_after_s``
        since it finished (or expired before): what a draining front waits for, after the jobs in flight."""
        wait_s = min(given_up_after_s, self.ttl_s)
        while any(job.output is not None and not job.fetched and time.time() - job.finished_at < wait_s
                  for job in self._jobs.values()):
            await asyncio.sleep(0.1)

    async def cancel(self, job_id: str) -> dict[str, Any]:
        """Stops a queued or running job (the engine drops it at its next step); finished jobs stay as they are."""
        job = self.get(job_id)
        if not job.finished:
            job.task.cancel()
            await asyncio.wait([job.task])
        return await self.describe(job)

    async def describe(self, job: Job) -> dict[str, Any]:
        live = None if job.finished else await self._live_state(job)
        if job.finished:  # checked after asking the engine too: the job may have finished meanwhile
            steps = job.request.num_inference_steps
            status, queue_position = job.status, None
            progress = {"steps_done": steps, "steps_total": steps} if job.output is not None else None
        else:
            status, progress, queue_position = live
        return {
            "id": job.id,
            "object": "audio.generation.job",
            "status": status,
            "created_at": job.created_at,
            "finished_at": job.finished_at,
            "expires_at": None if job.finished_at is None else job.finished_at + self.ttl_s,
            "progress": progress,
            "queue_position": queue_position,
            "seed": job.request.seed,
            "audio_length": job.request.audio_length,
            "audio_duration": None if job.output is None else job.output.duration,
            "response_format": job.delivery.response_format,
            "trim_silence": job.delivery.trim_silence,
            "error": None if job.error is None else job.error.body()["error"],
            "result_url": f"/v1/audio/jobs/{job.id}/content" if job.output is not None else None,
        }

    async def _live_state(self, job: Job) -> tuple[JobStatus, dict[str, int] | None, int | None]:
        """Running with its progress, or queued with its place in line, as the engine tells it now. An engine that
        cannot be asked (it is shutting down, its socket closed, while it finishes what it holds; or restarting)
        leaves the last state read: the job is in flight all the same, and a poll is no place for a 500."""
        try:
            started = await self._engine_progress()
        except Exception as error:  # noqa: BLE001 - whatever the engine call raised, the job's state is known
            logger.info("job %s: the engine's progress is unavailable (%s: %s); its last known state is shown",
                        job.id, type(error).__name__, error)
            return job.live
        progress = started.get(job.id)
        job.live = ("running" if progress is not None else "queued", progress,
                    self.gateway.queue_position(job.id, set(started)))
        return job.live

    async def _engine_progress(self) -> dict[str, dict[str, int]]:
        """The progress of every started generation, from one engine call shared by the polls that arrive while it
        is under way or within PROGRESS_FRESH_S of it."""
        now = time.monotonic()
        if self._progress is None or (self._progress.done() and now - self._progress_asked_at > PROGRESS_FRESH_S):
            self._progress = asyncio.ensure_future(self.gateway.progress(list(self.gateway.admission.pending)))
            self._progress.add_done_callback(lambda call: call.cancelled() or call.exception())  # seen, if all left
            self._progress_asked_at = now
        return await asyncio.shield(self._progress)  # a poll whose client leaves does not cancel the others' call

    def _expire(self) -> None:
        now = time.time()
        finished = [job for job in self._jobs.values() if job.finished]
        finished.sort(key=lambda job: job.finished_at)
        excess = len(finished) - self.max_finished
        held = sum(len(job.output.data) for job in finished if job.output is not None)
        for position, job in enumerate(finished):
            # the newest stays whatever its size: its client has not had a chance to fetch it
            over_budget = self.max_finished_bytes is not None and held > self.max_finished_bytes
            if position < excess or now - job.finished_at > self.ttl_s or (over_budget and job is not finished[-1]):
                del self._jobs[job.id]
                held -= len(job.output.data) if job.output is not None else 0
        self.keys.keep_only(self._jobs)
