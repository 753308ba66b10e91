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
"""

from __future__ import annotations

import asyncio

from .protocol import error_body
from .serving import send_json


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

        handler = asyncio.ensure_future(self.app(scope, receive, send_marking_start))
        started = asyncio.ensure_future(response_started.wait())
        try:
            done, _ = await asyncio.wait([handler, started], timeout=self.timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            handler.cancel()
            raise
        finally:
            started.cancel()
        if done:  # the response has started (it may stream for longer than the timeout) or the handler ended
            return await handler
        handler.cancel()
        body = error_body(f"the server did not answer within its traffic timeout ({self.timeout:g} s)", 504,
                          code="timeout")
        await send_json(send, 504, body)


def install() -> None:
    """Replaces BentoML's TimeoutMiddleware, which its app factory imports by name when building the stack."""
    from bentoml._internal.server.http import traffic

    traffic.TimeoutMiddleware = TrafficTimeoutMiddleware
