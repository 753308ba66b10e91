"""`bentoml serve` stops soon after, with one message and no restarts, when its model cannot be loaded; and it
reports ready (/readyz, /health) only once the model is loaded and warmed up."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest

from stable_audio_bento.config import EngineConfig
from stable_audio_bento.loading import ModelLoadError, tiny_model_dir
from stable_audio_bento.local_server import free_port, kill_server, local_server, why_it_stopped
from stable_audio_bento.startup import explain_failure

from conftest import ARTIFACTS, REPO

# From the engine's failure to the exit of `bentoml serve`: BentoML's arbiter checks its workers every 10 s, then the
# front drains. The whole stop also includes three interpreters importing torch and diffusers (the `bentoml serve`
# process and both workers): ~15 s on an idle 2-core machine, 75 s with a load average of 12; that part is bounded
# loosely, to catch a restart loop rather than a slow machine.
STOP_AFTER_FAILURE_S = 20
STOP_IN_ALL_S = 240
MESSAGE = "cannot serve STABLE_AUDIO_MODEL="


def start_server(model: str, log_path: Path, **env: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "bentoml", "serve", ".", "--port", str(port), "--host", "127.0.0.1"], cwd=REPO,
            env={**os.environ, "BENTOML_CONFIG": str(REPO / "configuration.yaml"), "STABLE_AUDIO_MODEL": model,
                 **env},
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return process, f"http://127.0.0.1:{port}"


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        kill_server(process)


def serve_until_exit(model: str, log_path: Path, **env: str) -> tuple[int, datetime, str]:
    """Exit status, time of exit, and the log of a `bentoml serve` expected to stop on its own."""
    process, _ = start_server(model, log_path, **env)
    try:
        status = process.wait(STOP_IN_ALL_S)
    finally:
        stop(process)
    return status, datetime.now(timezone.utc), log_path.read_text(errors="replace")


def assert_stopped_with_one_message(status: int, exited_at: datetime, log: str, why: str) -> None:
    assert status != 0, log
    [message] = [line for line in log.splitlines() if MESSAGE in line]
    assert "[CRITICAL]" in message and why in message and "The server stops" in message
    failed_at = datetime.strptime(message.split(" ", 1)[0], "%Y-%m-%dT%H:%M:%S%z")
    assert (exited_at - failed_at).total_seconds() < STOP_AFTER_FAILURE_S + 1, log  # +1: whole-second log times
    assert log.count("[service:StableAudioEngine:1] Applying user config") == 1, "the engine was restarted"
    assert "Traceback (most recent call last)" not in log, log
    assert log.rstrip().endswith("stable-audio-bento stopped: a worker exited (killed by a signal, or for the "
                                 "reason logged above)"), log
    assert "Application startup failed" not in log


def test_a_missing_model_folder_stops_the_server_with_one_message(tmp_path, model_cache):
    missing = tmp_path / "no-such-model"
    status, exited_at, log = serve_until_exit(str(missing), ARTIFACTS / "startup-missing-folder.log")
    assert_stopped_with_one_message(status, exited_at, log, f"there is no folder {missing}")
    # what local_server's exception quotes, for a run whose log stays on another machine: the cause comes first
    assert MESSAGE in why_it_stopped(ARTIFACTS / "startup-missing-folder.log").splitlines()[0]


def test_an_empty_api_key_file_stops_the_server_instead_of_serving_without_a_key(tmp_path, model_cache):
    """Serving with no key where the operator meant to set one would open the service to anyone."""
    key_file = tmp_path / "api-key"
    key_file.write_text("\n")
    status, _, log = serve_until_exit("tiny", ARTIFACTS / "startup-empty-key.log",
                                      STABLE_AUDIO_API_KEY_FILE=str(key_file))
    assert status != 0, log
    [message] = [line for line in log.splitlines() if "cannot start the front" in line]
    assert "[CRITICAL]" in message and f"STABLE_AUDIO_API_KEY_FILE={str(key_file)!r}: its first line is empty" in message
    assert "Traceback (most recent call last)" not in log.split("cannot start the front")[0], log


@pytest.mark.parametrize(("variable", "value"), [("STABLE_AUDIO_ENGINE_WORKERS", "two"),
                                                  ("STABLE_AUDIO_BATCHING", "sometimes")])
def test_an_unusable_setting_read_at_import_stops_with_one_line(variable, value):
    done = subprocess.run([sys.executable, "-m", "bentoml", "serve", ".", "--port", str(free_port())], cwd=REPO,
                          env={**os.environ, "STABLE_AUDIO_MODEL": "tiny", variable: value}, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith(f"stable-audio-bento cannot start: {variable}={value!r}")
    assert "Traceback" not in done.stderr + done.stdout


def test_a_port_in_use_stops_the_server_with_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "bentoml", "serve", ".", "--port", str(port), "--host",
                               "127.0.0.1"], cwd=REPO, env={**os.environ, "STABLE_AUDIO_MODEL": "tiny"},
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == ("stable-audio-bento cannot start: its port is in use (Address "
                                                    "already in use); stop what listens there, or serve on another "
                                                    "with --port")
    assert "Traceback" not in done.stderr + done.stdout


def test_a_step_loop_of_one_request_serves_one_at_a_time(tmp_path, model_cache):
    """max_batch_size 1, the reference server's way: BentoML refuses 1 on a batchable API, which stopped the server
    with its traceback; the engine now takes arrivals two at a time and its loop runs one."""
    config = tmp_path / "configuration.yaml"
    config.write_text((REPO / "configuration.yaml").read_text().replace("max_batch_size: 8", "max_batch_size: 1"))
    env = {"STABLE_AUDIO_MODEL": "tiny", "BENTOML_CONFIG": str(config)}
    with local_server(env, ARTIFACTS / "server-one-at-a-time.log", startup_timeout_s=180) as url:
        async def both():
            async with httpx.AsyncClient(timeout=300) as client:
                return await asyncio.gather(*[client.post(url + "/v1/audio/generate", json={
                    "input": "a click", "audio_length": 1.0, "num_inference_steps": 4, "seed": seed})
                    for seed in (1, 2)])

        answers = asyncio.run(both())
    assert [answer.status_code for answer in answers] == [200, 200]
    assert [answer.headers["x-batch-size"] for answer in answers] == ["1", "1"]


def test_without_error_lines_the_quote_is_the_logs_end(tmp_path):
    log = tmp_path / "server.log"
    log.write_text("".join(f"line {i}\n" for i in range(30)))
    assert why_it_stopped(log).splitlines() == [f"line {i}" for i in range(20, 30)]
    log.write_text("[INFO] starting\nTraceback (most recent call last):\nModuleNotFoundError: No module named 'pydub'\n"
                   "[INFO] Service instance cleanup finalized\n")
    assert why_it_stopped(log) == "ModuleNotFoundError: No module named 'pydub'"


def test_a_corrupt_checkpoint_stops_the_server_with_one_message(tmp_path, model_cache):
    corrupt = tmp_path / "corrupt-model"
    shutil.copytree(tiny_model_dir(), corrupt)
    weights = corrupt / "transformer" / "diffusion_pytorch_model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)  # a download cut off halfway
    status, exited_at, log = serve_until_exit(str(corrupt), ARTIFACTS / "startup-corrupt-checkpoint.log")
    assert_stopped_with_one_message(status, exited_at, log, f"{str(corrupt)!r} is not a complete diffusers-format")


def test_ready_only_once_the_model_is_loaded_and_warmed_up(model_cache):
    """Whenever /readyz first answers 200, the engine has already logged the end of its warm-up generation (it
    logs it in its __init__, before it serves anything); any answer before that was 503. Whether the front is up
    before the engine is ready depends on timing: the waiting itself is pinned by the test below."""
    log_path = ARTIFACTS / "startup-readiness.log"
    process, url = start_server("tiny", log_path)
    answers = []
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None:
            try:
                answers.append(httpx.get(url + "/readyz", timeout=10).status_code)
            except httpx.TransportError:  # not listening yet, or the front's worker not started yet
                pass
            if answers and answers[-1] == 200:
                break
            time.sleep(0.1)
        warmed_up = re.search(r"ready: tiny loaded in [\d.]+ s, warm-up generation in [\d.]+ s",
                              log_path.read_text(errors="replace"))
        assert answers and answers[-1] == 200, answers
        assert warmed_up, "/readyz said 200 before the engine had warmed up"
        assert set(answers[:-1]) <= {503}, answers  # the front was up, the engine not yet
        health = httpx.get(url + "/health", timeout=10)
        assert health.status_code == 200
        body = health.json()
        assert body["ready"] is True and body["model"] == "tiny"
        assert body["load_s"] > 0 and body["warmup_s"] > 0
    finally:
        stop(process)


def test_out_of_memory_is_named_without_a_traceback():
    config = EngineConfig(model="stabilityai/stable-audio-open-1.0")
    cause = RuntimeError("[enforce fail at alloc_cpu.cpp:119] DefaultCPUAllocator: can't allocate memory: "
                         "you tried to allocate 4294967296 bytes")
    try:
        try:
            raise cause
        except RuntimeError as exc:
            raise ModelLoadError("loading the transformer failed") from exc
    except ModelLoadError as wrapped:
        message = explain_failure(config, wrapped)
    assert message.startswith("cannot serve STABLE_AUDIO_MODEL='stabilityai/stable-audio-open-1.0': not enough memory")
    assert "\n" not in message and "STABLE_AUDIO_DTYPE=float16" in message


@pytest.mark.parametrize("error", [ValueError("bad"), KeyError("x")])
def test_an_unexpected_error_is_named_by_its_type(error):
    message = explain_failure(EngineConfig(model="tiny"), error)
    assert f"{type(error).__name__}: " in message and "the traceback is above" in message


def test_a_stored_model_that_fails_is_named_by_its_tag_not_as_a_missing_folder():
    config = EngineConfig(model="./tinycopy", weights="/root/bentoml/models/stable-audio/abc",
                          model_tag="stable-audio:abc")
    message = explain_failure(config, ModelLoadError("STABLE_AUDIO_DTYPE='half' is not one of auto, float16"))
    assert message.startswith("cannot serve the stored model stable-audio:abc (imported from ./tinycopy): "
                              "STABLE_AUDIO_DTYPE='half'")
    assert "no folder" not in message
