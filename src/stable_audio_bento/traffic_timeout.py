"""BentoML's ``traffic.timeout``, without keeping every request in memory for the length of the timeout.

BentoML 1.4's ``TimeoutMiddleware`` arms one ``loop.call_later(timeout, ...)`` timer per request and never cancels
it. A timer holds a copy of the request's context: its OpenTelemetry span, BentoML's request context, the ASGI
scope. So every request, a health check or an invalid body included, stays alive until its timer fires, i.e. for
``traffic.timeout`` (900 s): about 4.5 KB per request, so ~900 cheap requests/s add about 3.5 GB before the first
timer fires (found with tracemalloc inside the front worker; benchmarks/RESULTS.md "Front memory").

``TrafficTimeoutMiddleware`` keeps BentoML's contract (no response started within the timeout: the handler is
cancelled and the client gets 504) but waits with ``asyncio.wait``, whose timer is cancelled when the request
ends, and answers in the OpenAI error shape. ``install`` puts it in the place BentoML reads its class from when
it builds a service's middleware stack (each worker, after importing service.py).

``install`` also moves it inside the service's own middlewares (``add_asgi_middleware``: request metrics, error
shape, request guard). BentoML puts the timeout outside them, so its 504 was sent past them: no ``X-Request-Id``,
no request id on its access log line (the guard sets the id in the handler's task, which the timeout runs apart),
not counted in ``stable_audio_requests_total``. Inside them, the 504 goes through their ``send`` like any
answer, in the task where the guard set the request id. The timeout then starts once the guard has read the
body (at most the body limit); until then a stalled upload is the server's connection handling's business.

A generation ends at the timeout by itself: the request's context carries the moment (``deadline``), which the
gateway makes the generation's deadline, so the engine counts it as expired (not as cancelled by its client, as
a cancelled handler would be) and the 504 is the gateway's. The timer here fires ``BACKSTOP_S`` later, for
whatever else outlasts it.
"""

from __future__ import annotations

import asyncio
import functools
import time

from .protocol import APIError
from .serving import current_request, error_headers, send_json

BACKSTOP_S = 1.0


class TrafficTimeoutMiddleware:
    def __init__(self, app, timeout: float) -> None:
        self.app = app
        self.timeout = timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        response_started = asyncio.Event()

        async def send_marking_start(message):
            response_started.set()
            await send(message)

        current_request().deadline = time.time() + self.timeout
        handler = asyncio.ensure_future(self.app(scope, receive, send_marking_start))
        started = asyncio.ensure_future(response_started.wait())
        try:
            done, _ = await asyncio.wait([handler, started], timeout=self.timeout + BACKSTOP_S,
                                         return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            handler.cancel()
            raise
        finally:
            started.cancel()
        if done:  # the response has started (it may stream for longer than the timeout) or the handler ended
            return await handler
        handler.cancel()
        error = APIError(f"the server did not answer within its traffic timeout ({self.timeout:g} s)", status=504,
                         code="timeout")
        headers = [(name.lower().encode(), value.encode()) for name, value in error_headers(error).items()]
        await send_json(send, 504, error.body(), headers)


def install() -> None:
    """Replaces BentoML's TimeoutMiddleware, which its app factory imports by name when building the stack, and
    has the service app factory put it inside the service's own middlewares. Idempotent."""
    from _bentoml_impl.server.app import ServiceAppFactory
    from bentoml._internal.server.http import traffic

    traffic.TimeoutMiddleware = TrafficTimeoutMiddleware
    if not getattr(ServiceAppFactory.middlewares.fget, "timeout_inside", False):
        ServiceAppFactory.middlewares = property(timeout_inside(ServiceAppFactory.middlewares.fget))


def timeout_inside(build_stack):
    """``ServiceAppFactory.middlewares`` with the traffic timeout moved from BentoML's place (outside the service's
    own middlewares) to just inside the last of them."""
    @functools.wraps(build_stack)
    def middlewares(factory) -> list:
        stack = build_stack(factory)
        timeouts = [m for m in stack if m.cls is TrafficTimeoutMiddleware]
        own_classes = [cls for cls, _ in factory.service.middlewares]
        own = [i for i, m in enumerate(stack) if m.cls in own_classes]
        if len(timeouts) != 1 or not own:
            return stack
        stack.insert(own[-1] + 1, timeouts[0])
        stack.remove(timeouts[0])  # the first of the two: BentoML's place, before the service's own
        return stack

    middlewares.timeout_inside = True
    return middlewares
