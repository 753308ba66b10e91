"""The front's jobs and its waiting for an engine, in-process with stand-in engines: what a job becomes when its
generation fails in an unforeseen way, that finished jobs are forgotten whether or not anyone polls, and that a
generation longer than any one engine call is waited for in bounded calls (and dropped on the engine when the
front gives up on it)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import numpy as np
import pytest

from stable_audio_bento.admission import Admission
from stable_audio_bento.engine_pool import EnginePool
from stable_audio_bento.gateway import Delivery, Gateway, GeneratedAudio
from stable_audio_bento.generation import AudioRequest, ModelLimits
from stable_audio_bento.jobs import EXPIRY_LATENESS_S, PROGRESS_FRESH_S, JobStore, new_job_id
from stable_audio_bento.protocol import APIError, EditRequest, GenerateRequest
from stable_audio_bento.serving import RESPONSE_CHUNK_BYTES, ModelCard, streamed


def job_request() -> AudioRequest:
    return AudioRequest("a bell", seed=1, audio_length=1.0, id=new_job_id())


class GatewayThatGenerates:
    """A gateway whose generations end at once with ``outcome``: audio, or the exception raised."""

    def __init__(self, outcome):
        self.admission = Admission(max_pending=100, max_batch_size=8)
        self.outcome = outcome

    async def generate(self, job: AudioRequest, delivery: Delivery, disconnected=None) -> GeneratedAudio:
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome

    async def progress(self, ids):
        return {}

    def queue_position(self, generation_id: str, started: set[str]) -> int | None:
        """As Gateway's with one engine: the place among the admitted ones not started."""
        waiting = [other for other in self.admission.pending if other not in started]
        return waiting.index(generation_id) if generation_id in waiting else None


def test_a_job_whose_generation_fails_unforeseen_is_failed_not_queued_forever():
    async def scenario():
        gateway = GatewayThatGenerates(OSError("No space left on device"))
        store = JobStore(gateway, ttl_s=60, max_finished=10, max_run_s=900)
        job = store.submit(job_request(), Delivery("opus"))
        await asyncio.wait([job.task])
        return await store.describe(store.get(job.id)), gateway.admission.pending

    described, pending = asyncio.run(scenario())
    assert described["status"] == "failed" and described["finished_at"] is not None
    assert described["error"]["code"] == "generation_failed" and "OSError" in described["error"]["message"]
    assert not pending  # its admission slot was given back


def test_polls_at_once_share_one_engine_call_and_a_later_poll_asks_again():
    class CountingGateway(GatewayThatGenerates):
        calls = 0

        async def generate(self, job, delivery, disconnected=None):
            await asyncio.sleep(60)

        async def progress(self, ids):
            self.calls += 1
            await asyncio.sleep(0.05)
            return {ids[0]: {"steps_done": self.calls, "steps_total": 100}}

    async def scenario():
        gateway = CountingGateway(None)
        store = JobStore(gateway, ttl_s=60, max_finished=10, max_run_s=900)
        job = store.submit(job_request(), Delivery("wav"))
        at_once = await asyncio.gather(*[store.describe(job) for _ in range(20)])
        calls_at_once = gateway.calls
        await asyncio.sleep(PROGRESS_FRESH_S + 0.05)
        later = await store.describe(job)
        job.task.cancel()
        return at_once, calls_at_once, later, gateway.calls

    at_once, calls_at_once, later, calls = asyncio.run(scenario())
    assert calls_at_once == 1 and {polled["progress"]["steps_done"] for polled in at_once} == {1}
    assert all(polled["status"] == "running" for polled in at_once)
    assert calls == 2 and later["progress"]["steps_done"] == 2


def test_a_job_cancelled_before_its_task_first_runs_is_cancelled_and_frees_its_slot():
    async def scenario():
        gateway = GatewayThatGenerates(GeneratedAudio(b"RIFF", "wav", 1, 1, 1.0))
        store = JobStore(gateway, ttl_s=60, max_finished=10, max_run_s=900)
        job = store.submit(job_request(), Delivery())
        described = await store.cancel(job.id)  # before the loop has given the task its first turn
        return described, gateway.admission.pending

    described, pending = asyncio.run(scenario())
    assert described["status"] == "cancelled" and described["finished_at"] is not None
    assert described["result_url"] is None and not pending


def test_each_ended_job_is_told_once_with_its_outcome():
    async def outcome_of(generated, cancel: bool = False) -> list[str]:
        told: list[str] = []
        store = JobStore(GatewayThatGenerates(generated), ttl_s=60, max_finished=10, max_run_s=900,
                         on_finished=told.append)
        job = store.submit(job_request(), Delivery())
        if cancel:
            await store.cancel(job.id)
        await asyncio.wait([job.task])
        await asyncio.sleep(0)  # the task's done callback
        await store.cancel(job.id)  # a cancel after the end changes nothing
        return told

    assert asyncio.run(outcome_of(GeneratedAudio(b"RIFF", "wav", 1, 1, 1.0))) == ["succeeded"]
    assert asyncio.run(outcome_of(GeneratedAudio(b"RIFF", "wav", 1, 1, 1.0), cancel=True)) == ["cancelled"]
    assert asyncio.run(outcome_of(OSError("No space left on device"))) == ["generation_failed"]
    assert asyncio.run(outcome_of(APIError("too slow", status=504, code="timeout"))) == ["timeout"]


def test_finished_jobs_are_forgotten_without_anyone_polling():
    async def scenario():
        store = JobStore(GatewayThatGenerates(GeneratedAudio(b"\0" * 1000, "wav", 1, 1, 1.0)), ttl_s=60,
                         max_finished=2, max_run_s=900)
        for _ in range(20):
            job = store.submit(job_request(), Delivery())
            await asyncio.wait([job.task])
        return len(store._jobs)

    assert asyncio.run(scenario()) == 2


def test_a_finished_job_is_forgotten_when_it_expires_on_an_idle_server():
    async def scenario():
        store = JobStore(GatewayThatGenerates(GeneratedAudio(b"\0" * 1000, "wav", 1, 1, 1.0)), ttl_s=0.3,
                         max_finished=10, max_run_s=900)
        job = store.submit(job_request(), Delivery())
        await asyncio.wait([job.task])
        await asyncio.sleep(0)  # the task's done callback
        kept = len(store._jobs)
        await asyncio.sleep(0.3 + EXPIRY_LATENESS_S + 0.2)  # nobody submits, polls or fetches meanwhile
        return kept, len(store._jobs)

    assert asyncio.run(scenario()) == (1, 0)


def test_finished_jobs_hold_at_most_their_byte_budget_and_the_newest_is_kept_whatever_its_size():
    async def finished_sizes(sizes, budget):
        store = JobStore(GatewayThatGenerates(None), ttl_s=60, max_finished=100, max_run_s=900,
                         max_finished_bytes=budget)
        for size in sizes:
            store.gateway.outcome = GeneratedAudio(b"\0" * size, "wav", 1, 1, 1.0)
            job = store.submit(job_request(), Delivery())
            await asyncio.wait([job.task])
            await asyncio.sleep(0)  # the task's done callback
        return [len(job.output.data) for job in store._jobs.values()]

    assert asyncio.run(finished_sizes([1000] * 5, budget=2500)) == [1000, 1000]
    assert asyncio.run(finished_sizes([1000, 1000, 5000], budget=2500)) == [5000]


@pytest.mark.parametrize("ttl_s, fetch, expected_wait_s", [(60, True, 0.0), (60, False, 0.5), (0.2, False, 0.2)])
def test_a_drain_waits_for_a_succeeded_jobs_audio_until_fetched_given_up_on_or_expired(ttl_s, fetch, expected_wait_s):
    async def scenario():
        store = JobStore(GatewayThatGenerates(GeneratedAudio(b"\0" * 1000, "wav", 1, 1, 1.0)), ttl_s=ttl_s,
                         max_finished=10, max_run_s=900)
        job = store.submit(job_request(), Delivery())
        await asyncio.wait([job.task])
        if fetch:
            store.content(job.id)
        started = time.monotonic()
        await store.all_fetched(given_up_after_s=0.5)
        return time.monotonic() - started

    assert asyncio.run(scenario()) == pytest.approx(expected_wait_s, abs=0.15)


class GatewayThatFinishesWhileAsked(GatewayThatGenerates):
    """The generation ends while a poll is asking the engine for its progress."""

    def __init__(self, outcome):
        super().__init__(outcome)
        self.finish = asyncio.Event()

    async def generate(self, job: AudioRequest, delivery: Delivery, disconnected=None) -> GeneratedAudio:
        await self.finish.wait()
        return await super().generate(job, delivery)

    async def progress(self, ids):
        self.finish.set()
        await asyncio.sleep(0.05)  # the job's task ends meanwhile
        return {request_id: {"steps_done": 3, "steps_total": 8} for request_id in ids}


def test_a_job_that_finishes_while_polled_is_described_as_finished_not_running():
    async def scenario():
        store = JobStore(GatewayThatFinishesWhileAsked(GeneratedAudio(b"", "wav", 1, 1, 1.0)), ttl_s=60,
                         max_finished=10, max_run_s=900)
        job = store.submit(job_request(), Delivery())
        await asyncio.sleep(0)
        return await store.describe(job)

    described = asyncio.run(scenario())
    assert described["status"] == "succeeded" and described["result_url"] is not None
    assert described["progress"]["steps_done"] == described["progress"]["steps_total"]


class GatewayWhoseEngineGoesAway(GatewayThatGenerates):
    """A generation that runs until ``finish`` is set, with its progress readable until ``gone`` is set (then the
    call fails as BentoML's client does once the engine's socket is closed at a drain)."""

    def __init__(self):
        super().__init__(outcome=None)
        self.finish, self.gone = asyncio.Event(), False

    async def generate(self, job: AudioRequest, delivery: Delivery, disconnected=None) -> GeneratedAudio:
        await self.finish.wait()
        return GeneratedAudio(b"RIFF", "wav", 1, 1, 1.0)

    async def progress(self, ids):
        if self.gone:
            raise ConnectionRefusedError("Cannot connect to unix socket engine.sock")
        return {job_id: {"steps_done": 3, "steps_total": 8} for job_id in ids}


def test_a_running_job_polled_while_the_engine_cannot_be_asked_shows_its_last_state():
    """During a drain the engine finishes what it holds but no longer answers progress calls: a poll answers the
    job's last known state (not a 500), and the job still succeeds."""
    async def scenario():
        gateway = GatewayWhoseEngineGoesAway()
        store = JobStore(gateway, ttl_s=60, max_finished=10, max_run_s=900)
        job = store.submit(job_request(), Delivery())
        await asyncio.sleep(0)
        before = await store.describe(job)
        gateway.gone = True
        during = await store.describe(job)
        gateway.finish.set()
        await asyncio.wait([job.task])
        return before, during, await store.describe(job)

    before, during, after = asyncio.run(scenario())
    assert before["status"] == during["status"] == "running"
    assert before["progress"] == during["progress"] == {"steps_done": 3, "steps_total": 8}
    assert after["status"] == "succeeded" and after["result_url"] is not None


def test_a_job_without_a_timeout_or_a_longer_one_gets_the_servers_and_keeps_a_shorter_one():
    async def scenario():
        store = JobStore(GatewayThatGenerates(GeneratedAudio(b"", "wav", 1, 1, 1.0)), ttl_s=60, max_finished=10,
                         max_run_s=900)
        started = time.time()
        unbounded = store.submit(job_request(), Delivery())
        bounded = store.submit(replace(job_request(), deadline=started + 5), Delivery())
        patient = store.submit(replace(job_request(), deadline=started + 86_400), Delivery())
        await asyncio.wait([unbounded.task, bounded.task, patient.task])
        return started, unbounded.request.deadline, bounded.request.deadline, patient.request.deadline

    started, server_bound, own, capped = asyncio.run(scenario())
    assert started + 900 <= server_bound < started + 901 and own == started + 5
    assert started + 900 <= capped < started + 901  # a drain waits for jobs: none may outlast the server's bound


class SlowEngine:
    """A stand-in for an engine's BentoML client whose generation takes ``polls`` result calls to finish, or
    whose result call fails with ``failure``."""

    def __init__(self, polls: int = 0, failure: Exception | None = None):
        self.polls, self.failure = polls, failure
        self.result_calls: list[float] = []
        self.cancelled: list[str] = []
        self.to_async = self

    async def submit(self, requests):
        return [request.id for request in requests]

    async def result(self, generation_id: str, wait_s: float) -> dict:
        self.result_calls.append(wait_s)
        if self.failure is not None:
            raise self.failure
        if len(self.result_calls) <= self.polls:
            return {"pending": True}
        return {"failure": None, "id": generation_id}

    async def cancel(self, ids):
        self.cancelled.extend(ids)


def gateway_of(engine: SlowEngine) -> Gateway:
    return Gateway(EnginePool([engine], result_wait_s=0.5), Admission(max_pending=10, max_batch_size=8))


def test_a_generation_longer_than_one_result_call_is_asked_for_until_it_comes():
    engine = SlowEngine(polls=3)
    request = job_request()
    result = asyncio.run(gateway_of(engine).wait_for_engine(request, None))
    assert result == {"failure": None, "id": request.id}
    assert engine.result_calls == [0.5] * 4 and not engine.cancelled


def test_an_engine_call_that_fails_is_a_503_and_the_engine_is_told_to_drop_the_request():
    engine = SlowEngine(failure=RuntimeError("504 from the engine's traffic timeout"))
    request = job_request()
    with pytest.raises(APIError) as raised:
        asyncio.run(gateway_of(engine).wait_for_engine(request, None))
    assert (raised.value.status, raised.value.code) == (503, "engine_unavailable")
    assert engine.cancelled == [request.id]


def test_a_cancel_that_cannot_reach_the_engine_leaves_the_callers_answer_as_it_is():
    class UnreachableEngine(SlowEngine):
        async def cancel(self, ids):
            raise ConnectionError("the engine is down")

    engine = UnreachableEngine(failure=ConnectionError("the engine is down"))
    with pytest.raises(APIError) as raised:
        asyncio.run(gateway_of(engine).wait_for_engine(job_request(), None))
    assert raised.value.code == "engine_unavailable"


@pytest.mark.parametrize("call", ["submit", "result"])
def test_an_engine_that_accepts_calls_but_never_answers_is_a_prompt_503(call, monkeypatch):
    """A dead engine's socket still accepts connections (its supervisor holds it): a call on one waited for the
    client's own timeout, 1.01 x traffic.timeout, and so did its cancel, a job's progress and the drain after them."""
    from stable_audio_bento import engine_pool

    class DeadEngine(SlowEngine):
        async def never_answers(self, *args):
            await asyncio.Event().wait()

    engine = DeadEngine()
    setattr(engine, call, engine.never_answers)
    engine.cancel = engine.progress = engine.never_answers
    monkeypatch.setattr(engine_pool, "ENGINE_CALL_MARGIN_S", 0.2)
    monkeypatch.setattr(engine_pool, "QUICK_ANSWER_S", 0.2)
    gateway, request, started = gateway_of(engine), job_request(), time.monotonic()
    with pytest.raises(APIError) as raised:
        asyncio.run(gateway.wait_for_engine(request, None))
    assert (raised.value.status, raised.value.code) == (503, "engine_unavailable")
    assert time.monotonic() - started < 0.5 + 0.2 + 0.2 + 1  # the result call's wait, its margin, the cancel's
    with pytest.raises(asyncio.TimeoutError):  # a job's poll then shows its last known state (JobStore._live_state)
        asyncio.run(gateway.progress([request.id]))


def test_a_full_server_refuses_an_upload_before_decoding_it(tmp_path, monkeypatch):
    import stable_audio_bento.gateway as gateway_module

    decoded = []
    monkeypatch.setattr(gateway_module, "load_init_audio", lambda path, limits: decoded.append(path))
    gateway = Gateway(EnginePool([SlowEngine()], result_wait_s=0.5), Admission(max_pending=1, max_batch_size=8))
    gateway._card = ModelCard("tiny", ModelLimits(44100, 2, 2048, 1024), 100, 500, edits=True)
    gateway.admission.admit("the one running")
    request = EditRequest(input="a bell", audio=tmp_path / "upload.wav")
    with pytest.raises(APIError) as raised:
        asyncio.run(gateway.prepare(request, "request-1"))
    assert (raised.value.status, raised.value.code, decoded) == (429, "server_busy", [])


def test_uploads_arriving_together_are_decoded_a_few_at_a_time(tmp_path, monkeypatch):
    """Each decode holds copies of the upload at its own rate (0.5 GB for a 99 KB FLAC of 120 s at 192 kHz): six
    at once took 3.4 GB."""
    import threading

    import stable_audio_bento.gateway as gateway_module

    running, most = [], []
    lock = threading.Lock()

    def decode(path, limits):
        with lock:
            running.append(path)
            most.append(len(running))
        time.sleep(0.1)
        with lock:
            running.remove(path)
        return np.zeros((2, 4410), dtype=np.float32)

    monkeypatch.setattr(gateway_module, "load_init_audio", decode)
    gateway = Gateway(EnginePool([SlowEngine()], result_wait_s=0.5), Admission(max_pending=100, max_batch_size=8))
    gateway._card = ModelCard("tiny", ModelLimits(44100, 2, 2048, 1024), 100, 500, edits=True)

    async def six_at_once():
        requests = [EditRequest(input="a bell", audio_length=0.1, audio=tmp_path / f"{n}.wav") for n in range(6)]
        return await asyncio.gather(*(gateway.prepare(request, f"request-{n}") for n, request in enumerate(requests)))

    prepared = asyncio.run(six_at_once())
    assert len(prepared) == 6 and max(most) == gateway_module.CONCURRENT_DECODES


class RestartedEngine(SlowEngine):
    """An engine that restarted after the request was submitted: it has never heard of it."""

    async def result(self, generation_id: str, wait_s: float) -> dict:
        return {"failure": "unknown_generation", "error": f"no generation {generation_id!r} was submitted here",
                "id": generation_id}


def test_a_request_its_restarted_engine_no_longer_has_is_a_503_to_send_again():
    with pytest.raises(APIError) as raised:
        asyncio.run(gateway_of(RestartedEngine()).generate(job_request(), Delivery()))
    assert (raised.value.status, raised.value.code) == (503, "engine_unavailable")
    assert raised.value.retry_after >= 1 and "send it again" in raised.value.message


class LoadingEngine(SlowEngine):
    """An engine not listening yet (its model still loading) or restarting."""

    async def describe(self) -> dict:
        raise ConnectionRefusedError("[Errno 111] Connection refused")


def test_a_request_before_the_engine_can_describe_its_model_is_a_503_not_a_500():
    gateway = gateway_of(LoadingEngine())
    with pytest.raises(APIError) as raised:
        asyncio.run(gateway.prepare(GenerateRequest(input="a bell", audio_length=1.0), "request-1"))
    assert (raised.value.status, raised.value.code) == (503, "engine_unavailable") and raised.value.retry_after >= 1


def test_audio_is_handed_to_the_server_a_chunk_at_a_time_with_its_whole_length():
    """Handed over whole, a job's audio was copied into the buffer of every connection downloading it, held there
    for as long as its client did not read (5 MB per connection for an 8 MB WAV); in chunks, the server takes the
    next only once the connection has room, and the event loop turns between two (a connection the client reset is
    marked lost only on a later turn: chunks written into it meanwhile each logged a warning)."""
    data = bytes(range(256)) * 1000  # 256 kB
    sent, turns = [], []

    async def send(message):
        sent.append(message)
        if message.get("body"):
            turns.append("chunk")

    async def receive():
        await asyncio.Event().wait()

    async def count_turns():
        while True:
            turns.append("turn")
            await asyncio.sleep(0)

    async def serve():
        counting = asyncio.ensure_future(count_turns())
        await streamed(data, "audio/wav", {"X-Seed": "7"})({"type": "http", "method": "GET", "path": "/"}, receive,
                                                            send)
        counting.cancel()

    asyncio.run(serve())
    assert ("chunk", "chunk") not in set(zip(turns, turns[1:]))
    start, *bodies = sent
    assert dict(start["headers"])[b"content-length"] == b"256000" and dict(start["headers"])[b"x-seed"] == b"7"
    assert b"".join(bytes(body["body"]) for body in bodies) == data
    assert max(len(body["body"]) for body in bodies) == RESPONSE_CHUNK_BYTES and len(bodies) >= 4
