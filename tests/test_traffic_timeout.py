"""The traffic timeout that replaces BentoML's: same 504 contract, but a finished request is not kept in memory."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import importlib.util
import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

from bentoml._internal.server.base_app import BaseAppFactory
from bentoml._internal.server.http import traffic

from stable_audio_bento.traffic_timeout import TrafficTimeoutMiddleware


def bentoml_timeout_middleware() -> type:
    """BentoML's own class, from a fresh copy of its module (importing service.py replaces it in the original)."""
    spec = importlib.util.spec_from_file_location("bentoml_traffic_unpatched", traffic.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TimeoutMiddleware


SCOPE = {"type": "http", "method": "GET", "path": "/livez", "headers": []}
# What BentoML's stack puts in a request's context (its OpenTelemetry span, its request context): stands in for
# everything a leaked context keeps alive.
request_state: contextvars.ContextVar[object] = contextvars.ContextVar("request_state")


class RequestState:
    pass


async def no_body():
    return {"type": "http.request", "body": b"", "more_body": False}


async def answer_ok(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def serve(middleware) -> list[dict]:
    sent = []

    async def send(message):
        sent.append(message)

    await middleware(SCOPE, no_body, send)
    return sent


async def states_left_after(middleware_class, requests: int) -> int:
    """How many of ``requests`` requests' context states are still alive once they have all been answered, with
    another timer pending meanwhile (a server always has some: uvicorn's keep-alive timeouts)."""
    other_timer = asyncio.get_running_loop().call_later(1.0, lambda: None)
    middleware = middleware_class(answer_ok, timeout=900)
    refs = []

    async def one_request():
        state = RequestState()
        refs.append(weakref.ref(state))
        request_state.set(state)  # in this task's own context, as BentoML sets its context per request
        del state
        await serve(middleware)

    for _ in range(requests):
        await asyncio.create_task(one_request())
        await asyncio.sleep(0)
    other_timer.cancel()
    gc.collect()
    return sum(ref() is not None for ref in refs)


def test_answered_requests_are_not_kept_until_the_timeout():
    assert asyncio.run(states_left_after(TrafficTimeoutMiddleware, 1000)) <= 200  # asyncio purges cancelled timers


def test_bentoml_own_timeout_keeps_every_request_until_it_fires():
    """The cause: if this fails, BentoML has fixed its TimeoutMiddleware and traffic_timeout can go."""
    assert asyncio.run(states_left_after(bentoml_timeout_middleware(), 1000)) == 1000


def test_a_handler_that_does_not_answer_in_time_gets_504_and_is_cancelled():
    cancelled = asyncio.Event()

    async def stuck(scope, receive, send):
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def run():
        sent = await serve(TrafficTimeoutMiddleware(stuck, timeout=0.05))
        await asyncio.wait_for(cancelled.wait(), 1)
        return sent

    start, body = asyncio.run(run())
    assert start["status"] == 504 and (b"x-should-retry", b"false") in start["headers"]
    error = json.loads(body["body"])["error"]
    assert error["code"] == "timeout" and error["type"] == "timeout_error" and "0.05 s" in error["message"]


def test_a_response_that_has_started_may_outlast_the_timeout():
    async def slow_body(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await asyncio.sleep(0.2)
        await send({"type": "http.response.body", "body": b"late but whole"})

    start, body = asyncio.run(serve(TrafficTimeoutMiddleware(slow_body, timeout=0.05)))
    assert start["status"] == 200 and body["body"] == b"late but whole"


def test_a_handler_error_is_raised_at_once_not_after_the_timeout():
    async def broken(scope, receive, send):
        raise RuntimeError("boom")

    async def run():
        try:
            await asyncio.wait_for(serve(TrafficTimeoutMiddleware(broken, timeout=900)), 1)
        except RuntimeError as error:
            return str(error)

    assert asyncio.run(run()) == "boom"


def test_service_installs_it_in_bentoml_middleware_stack():
    importlib.import_module("service")  # importing it installs the middleware

    class App(BaseAppFactory):
        name = "app"

    assert [middleware.cls for middleware in App(timeout=900).middlewares] == [TrafficTimeoutMiddleware]


def test_service_stack_runs_the_timeout_inside_our_middlewares():
    """So that its 504 gets our request id and is counted (BentoML puts it outside them); the engines' stack keeps
    it where BentoML puts it. In a subprocess: building the stack loads the services' configuration into BentoML."""
    script = """
import json, service
from _bentoml_impl.server.app import ServiceAppFactory
stacks = {}
for svc in (service.StableAudio, service.ENGINES[0]):
    svc.inject_config()
    stacks[svc.name] = [m.cls.__name__ for m in ServiceAppFactory(svc).middlewares]
print(json.dumps(stacks))
"""
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", script], cwd=repo, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(repo)})
    assert done.returncode == 0, done.stderr[-2000:]
    stacks = json.loads(done.stdout.strip().splitlines()[-1])
    front = stacks.pop("StableAudio")
    assert front.index("TrafficTimeoutMiddleware") == front.index("RequestGuardMiddleware") + 1
    assert front.index("RequestMetricsMiddleware") < front.index("RequestGuardMiddleware")
    assert front.count("TrafficTimeoutMiddleware") == 1
    (engine,) = stacks.values()
    assert engine.index("AccessLogMiddleware") + 1 == engine.index("TrafficTimeoutMiddleware")
