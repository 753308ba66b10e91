"""Readiness and liveness: the front is ready only while every engine answers, and not alive once one has stopped
answering for the stall timeout; an engine whose step loop hangs in one piece of work is ended by its watchdog; a request
that comes before the engines can describe their model gets a 503 instead of waiting on them."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

import httpx
import numpy as np
import psutil
import pytest

from stable_audio_bento import engine_pool
from stable_audio_bento.admission import Admission
from stable_audio_bento.engine_pool import EnginePool
from stable_audio_bento.gateway import Gateway
from stable_audio_bento.generation import AudioRequest, AudioResult
from stable_audio_bento.health import EngineReadiness, StallWatchdog
from stable_audio_bento.local_server import local_server
from stable_audio_bento.protocol import APIError, GenerateRequest
from stable_audio_bento.step_loop import RequestState, StepLoop

from conftest import ARTIFACTS, own_bentoml_home


class SlowEngine:
    """An engine client that answers only while ``started`` is set, as a real engine answers nothing before its
    __init__ (load and warm-up) has returned, nor once its event loop is blocked."""

    def __init__(self, report: dict[str, float] | None = None):
        self.started, self.report, self.to_async = asyncio.Event(), report or {"load_s": 1.0, "warmup_s": 1.0}, self

    async def startup_report(self) -> dict[str, float]:
        await self.started.wait()
        return self.report

    async def describe(self) -> dict:
        await self.started.wait()
        return {"model": "tiny"}


def test_the_front_is_ready_only_when_every_engine_is():
    async def scenario():
        engines = [SlowEngine({"load_s": 1.0, "warmup_s": 2.0}), SlowEngine({"load_s": 3.0, "warmup_s": 0.5})]
        readiness = EngineReadiness(engines, stall_timeout_s=600, timeout_s=0.05, started_timeout_s=0.2)
        assert await readiness.check() is None
        with pytest.raises(APIError) as refused:
            await readiness.require()
        assert (refused.value.status, refused.value.code) == (503, "not_ready")
        engines[0].started.set()
        assert await readiness.check() is None  # one engine still loading
        engines[1].started.set()
        assert await readiness.check() == {"load_s": 3.0, "warmup_s": 2.0}  # the slowest start
        engines[1].started.clear()  # hung: asked again, with the longer timeout, it does not answer
        started = time.monotonic()
        assert await readiness.check() is None
        assert 0.2 <= time.monotonic() - started < 1
        engines[1].started.set()
        assert await readiness.require() == {"load_s": 3.0, "warmup_s": 2.0}

    asyncio.run(scenario())


def test_an_engine_that_stops_answering_is_not_alive_after_the_stall_timeout():
    async def scenario():
        engines = [SlowEngine(), SlowEngine()]
        readiness = EngineReadiness(engines, stall_timeout_s=0.5, timeout_s=0.05, started_timeout_s=0.05)
        await asyncio.sleep(0.6)
        assert await readiness.alive()  # loading, however long: a model that cannot load ends the server itself
        engines[0].started.set()
        engines[1].started.set()
        assert await readiness.alive()
        engines[1].started.clear()
        assert await readiness.alive()  # silent, but not for long yet: not ready, still alive
        assert await readiness.check() is None
        await asyncio.sleep(0.6)
        assert not await readiness.alive()
        engines[1].started.set()
        assert await readiness.alive()  # it answers again: whoever probes has not restarted it yet, no harm

    asyncio.run(scenario())


@dataclass(kw_only=True)
class CountedState(RequestState):
    steps: int

    @property
    def steps_total(self) -> int:
        return self.steps


class BlockingFamily:
    """A model family whose forwards take ``step_s`` each, and block while ``blocked`` is clear."""

    def __init__(self, step_s: float = 0.0):
        self.step_s, self.blocked = step_s, threading.Event()
        self.blocked.set()

    def prepare_request(self, request: AudioRequest) -> CountedState:
        return CountedState(request=request, latents=np.zeros((1, 2, 4)), steps=request.num_inference_steps)

    def forward_key(self, state):
        return state.request.audio_length  # requests of other lengths are stepped apart, as the real families' are

    def forward(self, states):
        time.sleep(self.step_s)
        self.blocked.wait()
        return [None] * len(states)

    def advance(self, state, output):
        state.step += 1

    def decode(self, state):
        return AudioResult(audio=np.zeros((2, 4), dtype=np.float32))

    def release_memory(self):
        pass

    def wait_for_device(self):
        pass


def run_watched(family: BlockingFamily, steps: int, timeout_s: float) -> tuple[list[str], list[AudioResult], float]:
    """Runs one request through a loop under a watchdog; the stalls it reported, the results, and the seconds."""
    loop, stalls, results = StepLoop(family), [], []
    loop.start()
    StallWatchdog(loop, timeout_s, on_stall=stalls.append).start()
    started = time.monotonic()
    loop.submit(AudioRequest("a hum", seed=1, audio_length=1.0, num_inference_steps=steps), results.append)
    while not results and not stalls and time.monotonic() - started < 10:
        time.sleep(0.01)
    return stalls, results, time.monotonic() - started


def test_the_watchdog_reports_a_step_loop_hung_in_one_forward():
    family = BlockingFamily()
    family.blocked.clear()  # a forward that never returns: a hung kernel, a deadlock
    stalls, results, seconds = run_watched(family, steps=3, timeout_s=0.3)
    assert len(stalls) == 1 and not results
    assert 0.3 <= seconds < 2, seconds
    assert "the step loop has made no progress for" in stalls[0] and "STABLE_AUDIO_STALL_TIMEOUT_S=0.3" in stalls[0]
    family.blocked.set()


def test_the_watchdog_leaves_alone_a_generation_longer_than_the_timeout_whose_steps_end():
    stalls, results, seconds = run_watched(BlockingFamily(step_s=0.05), steps=20, timeout_s=0.3)
    assert not stalls and len(results) == 1 and results[0].failure is None
    assert seconds > 0.6  # twice the timeout, in turns shorter than it


def test_the_watchdog_leaves_alone_a_turn_longer_than_the_timeout_made_of_shorter_pieces():
    """A turn steps each group of requests whose forwards can share a batch, one after another: with the real
    weights on a CPU, a turn of many groups, prepares or decodes lasts minutes while each piece ends."""
    loop, stalls, results = StepLoop(BlockingFamily(step_s=0.1)), [], []
    for length in (1.0, 1.5, 2.0, 2.5, 3.0, 3.5):  # six lengths: six forwards a turn, 0.6 s
        loop.submit(AudioRequest("a hum", seed=1, audio_length=length, num_inference_steps=2), results.append)
    StallWatchdog(loop, 0.3, on_stall=stalls.append).start()
    started = time.monotonic()
    loop.run_until_idle()
    assert time.monotonic() - started > 1.2 and len(results) == 6 and not stalls


def test_a_request_before_the_engines_can_describe_their_model_is_a_prompt_503(monkeypatch):
    """An engine that is loading (or hung) answers nothing; the request must not wait on it for its whole timeout."""
    monkeypatch.setattr(engine_pool, "QUICK_ANSWER_S", 0.2)
    gateway = Gateway(EnginePool([SlowEngine()], result_wait_s=0.5), Admission(max_pending=10, max_batch_size=8))
    started = time.monotonic()
    with pytest.raises(APIError) as refused:
        asyncio.run(gateway.prepare(GenerateRequest(input="a bell"), "request-1"))
    assert time.monotonic() - started < 2
    assert (refused.value.status, refused.value.code) == (503, "engine_unavailable")
    assert "does not answer" in refused.value.message and refused.value.retry_after is not None


def engine_worker(server) -> psutil.Process:
    [engine] = [worker for worker in psutil.Process(server.process.pid).children(recursive=True)
                if "StableAudioEngine" in worker.cmdline()]
    return engine


def test_livez_fails_once_an_engine_has_not_answered_for_the_stall_timeout(model_cache, tmp_path_factory):
    """A frozen engine process (its event loop blocked, as SIGSTOP does): the front is soon not ready, and not alive
    once the stall timeout has passed, so that Kubernetes' liveness probe restarts the pod; it lives again when the
    engine answers again."""
    env = {"STABLE_AUDIO_MODEL": "tiny", "STABLE_AUDIO_STALL_TIMEOUT_S": "3", **own_bentoml_home(tmp_path_factory)}
    with local_server(env, ARTIFACTS / "server-stalled.log", startup_timeout_s=180) as url:
        assert httpx.get(url + "/livez", timeout=10).status_code == 200
        engine = engine_worker(url)
        engine.suspend()
        try:
            stopped = time.monotonic()
            assert httpx.get(url + "/readyz", timeout=10).status_code == 503
            while (alive := httpx.get(url + "/livez", timeout=10).status_code) == 200 \
                    and time.monotonic() - stopped < 30:
                time.sleep(0.5)
            assert alive == 503 and time.monotonic() - stopped >= 3
        finally:
            engine.resume()
        assert httpx.get(url + "/livez", timeout=10).status_code == 200
        assert httpx.get(url + "/readyz", timeout=10).status_code == 200
    assert "engine 0 has not answered for" in (ARTIFACTS / "server-stalled.log").read_text()
