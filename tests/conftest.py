"""Shared fixtures: the tiny model (built and saved once per run) and a real `bentoml serve` of it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from stable_audio_bento.config import EngineConfig
from stable_audio_bento.loading import ensure_tiny_model, load_pipeline
from stable_audio_bento.pipeline import BatchedStableAudio

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "artifacts"
SERVER_DECODE_MARGIN = 16  # trimmed decode keeps the end-to-end tests fast; exact-mode equality is in test_pipeline


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("model-cache")
    os.environ["STABLE_AUDIO_CACHE"] = str(cache)
    ensure_tiny_model()
    return cache


@pytest.fixture(scope="session")
def tiny_pipe(model_cache):
    pipe = load_pipeline(EngineConfig(model="tiny"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def exact_engine(tiny_pipe) -> BatchedStableAudio:
    return BatchedStableAudio(tiny_pipe)


@pytest.fixture(scope="session")
def fast_engine(tiny_pipe) -> BatchedStableAudio:
    return BatchedStableAudio(tiny_pipe, decode_margin_frames=SERVER_DECODE_MARGIN)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def server(model_cache) -> str:
    """`bentoml serve` from the repo root with the tiny model; yields its base URL."""
    port = free_port()
    ARTIFACTS.mkdir(exist_ok=True)
    log = open(ARTIFACTS / "server.log", "w")
    env = dict(os.environ, STABLE_AUDIO_MODEL="tiny", STABLE_AUDIO_DECODE_MARGIN=str(SERVER_DECODE_MARGIN),
               BENTOML_CONFIG=str(REPO / "configuration.yaml"))
    process = subprocess.Popen(
        [sys.executable, "-m", "bentoml", "serve", ".", "--port", str(port), "--host", "127.0.0.1"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                pytest.fail(f"bentoml serve exited with {process.returncode}; see {log.name}")
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not healthy after 180 s; see {log.name}")
            time.sleep(1)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        log.close()
