"""Stopping a worker only once its work is done.

A BentoML worker stops on SIGTERM by uvicorn's handler, which closes the listening socket at once. BentoML's
supervisor sends SIGTERM to every worker together, so each would close before the work it holds is finished: the
front while generations are in flight, the engine while the front still has to collect their audio (the front asks
for a result in calls of at most ``result_wait_s``; the next call would find no socket). ``stop_after`` puts a wait
in front of uvicorn's handler: the socket keeps answering until each of the ``settled`` steps has returned, in
order, then uvicorn shuts down.
A second SIGTERM delivered to the worker itself stops waiting (BentoML's supervisor signals its workers once only).
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Awaitable, Callable


def stop_after(*settled: Callable[[], Awaitable[None]]) -> None:
    """Called on the worker's event loop (a service's ``__init__``), after the server has set its handlers."""
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set there; such a server stops the default way
    loop = asyncio.get_running_loop()
    server_handler = signal.getsignal(signal.SIGTERM)
    waiting = False

    def stop_once_settled(signum, frame):
        nonlocal waiting
        if not callable(server_handler):
            return
        if waiting:  # a second SIGTERM: stop waiting
            return server_handler(signum, frame)
        waiting = True
        done = asyncio.run_coroutine_threadsafe(in_order(settled), loop)
        done.add_done_callback(lambda _: loop.call_soon_threadsafe(server_handler, signum, frame))

    signal.signal(signal.SIGTERM, stop_once_settled)


async def in_order(steps) -> None:
    for step in steps:
        await step()
