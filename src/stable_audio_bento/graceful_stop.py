"""Stopping a worker only once its work is done.

A BentoML worker stops on SIGTERM by uvicorn's handler, which closes the listening socket at once. BentoML's
supervisor sends SIGTERM to every worker together, so each would close before the work it holds is finished: the
front while generations are in flight, the engine while the front still has to collect their audio (the front asks
for a result in calls of at most ``result_wait_s``; the next call would find no socket). ``stop_after`` puts a wait
in front of uvicorn's handler: the socket keeps answering until each of the ``settled`` steps has returned, in
order, then uvicorn shuts down.
A second SIGTERM delivered to the worker itself stops waiting (BentoML's supervisor signals its workers once only).

The engine's socket is a Unix socket in a folder that BentoML's supervisor removes when told to stop, before it
stops the workers (``keep_sockets_until_workers_stop`` moves that to after): the connections the front held kept
working, but a new one (a cancel, a progress call, a result once those were busy) failed, so a job cancelled during
a drain was generated all the same and polls showed running jobs as queued.
"""

from __future__ import annotations

import asyncio
import errno
import signal
import threading
from collections.abc import Awaitable, Callable


# What circus's arbiter raises from its start once a worker has exited and is not restarted.
WORKER_EXITED = "No active process found for watcher."


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


def keep_sockets_until_workers_stop() -> None:
    """In the supervisor's process (where BentoML imports service.py too): its stop runs circus's alone, which
    stops the workers (each drains first, see ``stop_after``), and what BentoML's stop ran first (removing the
    sockets' folder) runs once its start returns, when they have all stopped. A port in use stops the start with one
    line (after BentoML's own "Could not bind"), not a traceback of 55, and so does a worker that exited (a model that
    cannot load, a hung engine: it logged why, see startup), which circus raises as "No active process found for
    watcher". Idempotent."""
    from bentoml._internal.utils import circus
    from circus.arbiter import Arbiter as CircusArbiter

    if getattr(circus.Arbiter.start, "closes_after_stop", False):
        return
    bentoml_start = circus.Arbiter.start

    def start(arbiter, cb=None) -> None:
        try:
            bentoml_start(arbiter, cb)  # returns once the loop has stopped: the workers have
        except OSError as error:
            if error.errno != errno.EADDRINUSE:
                raise
            raise SystemExit(f"stable-audio-bento cannot start: its port is in use ({error.strerror}); stop what "
                             "listens there, or serve on another with --port") from None
        except RuntimeError as error:
            if str(error) != WORKER_EXITED:
                raise
            # Circus keeps no exit status by then; a worker killed (kill -9, the OOM killer) has logged nothing.
            raise SystemExit("stable-audio-bento stopped: a worker exited (killed by a signal, or for the reason "
                             "logged above)") from None
        finally:
            arbiter.exit_stack.close()

    start.closes_after_stop = True
    circus.Arbiter.start = start
    circus.Arbiter.stop = CircusArbiter.stop
