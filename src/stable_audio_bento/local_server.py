"""Start `bentoml serve` of this repository on a free loopback port (used by the tests and the benchmarks)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil

from .config import REPO_ROOT


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def is_healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def why_it_stopped(log_path: Path, lines: int = 10) -> str:
    """The log's error lines (its last lines if none), for the exception: a remote run may not bring the log back."""
    log = log_path.read_text(errors="replace").splitlines()
    return "\n".join(([line for line in log if re.search(r"CRITICAL|ERROR|Error\b", line)] or log)[-lines:])


class RunningServer(str):
    """The base URL of a started server, which also carries its `bentoml serve` process."""

    process: subprocess.Popen


@contextlib.contextmanager
def local_server(env: dict[str, str], log_path: Path, startup_timeout_s: float = 600,
                 bento: str = ".") -> Iterator[RunningServer]:
    """Yields the base URL once /health answers 200; stops the whole process group afterwards. ``bento``: what
    `bentoml serve` serves (this repository, or a Bento's folder)."""
    port = free_port()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "bentoml", "serve", bento, "--port", str(port), "--host", "127.0.0.1"],
            cwd=REPO_ROOT, env={**os.environ, "BENTOML_CONFIG": str(REPO_ROOT / "configuration.yaml"), **env},
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        url = RunningServer(f"http://127.0.0.1:{port}")
        url.process = process
        try:
            deadline = time.monotonic() + startup_timeout_s
            while not is_healthy(url):
                if process.poll() is not None:
                    raise RuntimeError(f"bentoml serve exited with {process.returncode}; from {log_path}:\n"
                                       + why_it_stopped(log_path))
                if time.monotonic() > deadline:
                    raise RuntimeError(f"server not healthy after {startup_timeout_s:.0f} s; see {log_path}")
                time.sleep(1)
            yield url
        finally:
            with contextlib.suppress(ProcessLookupError):  # a test may have stopped it already
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                kill_server(process)


def kill_server(process: subprocess.Popen) -> None:
    """SIGKILLs `bentoml serve` and its workers. Circus starts each worker in a session of its own, out of reach of
    a signal to the server's process group, and a killed server's workers would run on, orphaned."""
    with contextlib.suppress(psutil.NoSuchProcess):
        workers = psutil.Process(process.pid).children(recursive=True)  # while they are still its children
        for worker in workers:
            with contextlib.suppress(psutil.NoSuchProcess):
                worker.kill()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
