"""Two engine workers (STABLE_AUDIO_ENGINE_WORKERS=2) behind one front, over HTTP with the tiny model: results do
not depend on which engine runs them or on what runs beside them, jobs report progress and are cancelled on
whichever engine holds them, and the load spreads over both engines."""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from stable_audio_bento.admission import Admission
from stable_audio_bento.engine_pool import EnginePool
from stable_audio_bento.engine_workers import ENGINE_WORKERS_VARIABLE, engine_worker_count
from stable_audio_bento.gateway import Gateway
from stable_audio_bento.local_server import local_server

from conftest import ARTIFACTS, metric_samples, own_bentoml_home

LOG = ARTIFACTS / "engine-workers-server.log"
LONG = {"input": "a long drone", "num_inference_steps": 150}  # seconds on the tiny model, full 47.55 s window
BODIES = [{"input": f"sound {n}", "audio_length": 1.0 + n / 2, "num_inference_steps": 3 + n, "seed": 100 + n,
           **({"negative_prompt": "noise"} if n % 2 else {})} for n in range(6)]
ENGINE_LINE = re.compile(r"\[service:(StableAudioEngine\d*):\d+\] request (\S+) (finished: \w+|stopped after \d+)")


@pytest.fixture(scope="module")
def two_engines(model_cache, tmp_path_factory):
    env = {"STABLE_AUDIO_MODEL": "tiny", ENGINE_WORKERS_VARIABLE: "2", **own_bentoml_home(tmp_path_factory)}
    with local_server(env, LOG, startup_timeout_s=300) as url:
        yield url


def engine_of(request_id: str, timeout_s: float = 30) -> str:
    """The engine service whose log says it finished or stopped this request."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for engine, label, _ in ENGINE_LINE.findall(LOG.read_text(errors="replace")):
            if label == request_id:
                return engine
        time.sleep(0.2)
    raise AssertionError(f"no engine logged request {request_id}")


def generate(url: str, body: dict, request_id: str) -> bytes:
    response = httpx.post(url + "/v1/audio/generate", json=body, headers={"X-Request-Id": request_id}, timeout=300)
    assert response.status_code == 200, response.text
    return response.content


def per_worker(url: str, outcome: str) -> dict[str, float]:
    return {re.search(r'worker="(\d+)"', sample).group(1): value
            for sample, value in metric_samples(url, "stable_audio_engine_generations_total{").items()
            if f'outcome="{outcome}"' in sample}


def test_the_same_request_on_both_engines_at_once_gives_the_same_bytes(two_engines):
    body = {**BODIES[3], "seed": 7}
    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(lambda rid: generate(two_engines, body, rid), ["twin-a", "twin-b"])
    assert first == second
    assert {engine_of("twin-a"), engine_of("twin-b")} == {"StableAudioEngine", "StableAudioEngine1"}


def test_concurrent_results_equal_their_sequential_runs_and_spread_over_both_engines(two_engines):
    sequential = [generate(two_engines, body, f"seq-{n}") for n, body in enumerate(BODIES)]
    before = per_worker(two_engines, "ok")
    with ThreadPoolExecutor(len(BODIES)) as pool:
        concurrent = list(pool.map(lambda n: generate(two_engines, BODIES[n], f"conc-{n}"), range(len(BODIES))))
    after = per_worker(two_engines, "ok")
    assert concurrent == sequential
    assert len(set(sequential)) == len(BODIES)
    split = {worker: after[worker] - before.get(worker, 0.0) for worker in sorted(after)}
    placed = [engine_of(f"conc-{n}") for n in range(len(BODIES))]
    record = {"requests": len(BODIES), "ok_per_worker_metric": split,
              "per_engine_log": {engine: placed.count(engine) for engine in sorted(set(placed))}}
    print(f"\nsplit of {len(BODIES)} concurrent requests over 2 engines: {record}")
    (ARTIFACTS / "engine-workers-split.json").write_text(json.dumps(record, indent=1))
    assert sum(split.values()) == len(BODIES)
    assert set(split) == {"0", "1"} and min(split.values()) >= 2  # least-loaded placement spreads a burst


def job_status(url: str, job_id: str) -> dict:
    response = httpx.get(f"{url}/v1/audio/jobs/{job_id}")
    assert response.status_code == 200, response.text
    return response.json()


def test_running_jobs_report_progress_and_are_cancelled_on_whichever_engine_runs_them(two_engines):
    before = per_worker(two_engines, "cancelled")
    ids = {}
    for name in ("long-a", "long-b"):
        response = httpx.post(two_engines + "/v1/audio/jobs", json=LONG, headers={"X-Request-Id": name})
        assert response.status_code == 202, response.text
        ids[name] = response.json()["id"]
    seen: dict[str, list[int]] = {name: [] for name in ids}
    deadline = time.monotonic() + 120
    while not all(len(set(steps)) >= 2 for steps in seen.values()):  # each has advanced while we watched
        assert time.monotonic() < deadline, seen
        for name, job_id in ids.items():
            status = job_status(two_engines, job_id)
            if status["progress"] is not None:
                assert status["status"] == "running" and status["progress"]["steps_total"] == 150
                seen[name].append(status["progress"]["steps_done"])
        time.sleep(0.1)
    for name, job_id in ids.items():
        assert seen[name] == sorted(seen[name])
        cancelled = httpx.delete(f"{two_engines}/v1/audio/jobs/{job_id}")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert {engine_of(name) for name in ids} == {"StableAudioEngine", "StableAudioEngine1"}
    stopped = {label: int(step.split()[-1]) for _, label, step in ENGINE_LINE.findall(LOG.read_text())
               if label in ids and step.startswith("stopped")}
    assert set(stopped) == set(ids) and all(steps < 150 for steps in stopped.values())
    after = per_worker(two_engines, "cancelled")
    assert {worker: after[worker] - before.get(worker, 0.0) for worker in after} == {"0": 1, "1": 1}


@pytest.mark.parametrize("value", ["0", "-1", "two", " ", "²"])
def test_a_bad_worker_count_is_refused_with_the_variable_named(monkeypatch, value):
    monkeypatch.setenv(ENGINE_WORKERS_VARIABLE, value)
    with pytest.raises(ValueError, match=ENGINE_WORKERS_VARIABLE):
        engine_worker_count()


def test_with_gpus_the_default_is_one_engine_each_and_more_engines_than_gpus_are_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    for variable in ("BENTOML_DISABLE_GPU_ALLOCATION", "CUDA_VISIBLE_DEVICES", ENGINE_WORKERS_VARIABLE):
        monkeypatch.delenv(variable, raising=False)
    assert engine_worker_count() == 4
    monkeypatch.setenv(ENGINE_WORKERS_VARIABLE, "5")  # the fifth engine would quietly run on the CPU
    with pytest.raises(ValueError, match=f"{ENGINE_WORKERS_VARIABLE}=5 but 4 GPUs"):
        engine_worker_count()
    monkeypatch.setenv("BENTOML_DISABLE_GPU_ALLOCATION", "1")  # engines share GPUs in turn: allowed
    assert engine_worker_count() == 5


@pytest.mark.parametrize("unset", [None, ""], ids=["absent", "empty"])  # empty: as templating leaves a variable
def test_the_default_is_one_engine_per_visible_gpu_and_child_processes_inherit_it(monkeypatch, unset):
    if unset is None:
        monkeypatch.delenv(ENGINE_WORKERS_VARIABLE, raising=False)
    else:
        monkeypatch.setenv(ENGINE_WORKERS_VARIABLE, unset)
    expected = max(1, torch.cuda.device_count())
    assert engine_worker_count() == expected
    assert os.environ[ENGINE_WORKERS_VARIABLE] == str(expected)


def test_a_jobs_queue_position_counts_only_those_ahead_of_it_on_its_own_engine():
    """Each engine has its own queue: counted over both, positions were about twice too high ("0 = next" broken)."""
    async def scenario():
        gateway = Gateway(EnginePool([object(), object()], result_wait_s=1.0), Admission(max_pending=16,
                                                                                           max_batch_size=1))
        slots = [gateway.admission.admit(name) for name in "abcdefg"]
        for name in "abcdef":  # "g" is admitted, its submit not sent yet: on no engine
            gateway.engines.place(name)
        engines = {name: gateway.engines.engine_of(name) for name in "abcdef"}
        assert engines == {"a": 0, "b": 1, "c": 0, "d": 1, "e": 0, "f": 1}
        started = {"a", "b"}
        assert {name: gateway.queue_position(name, started) for name in "abcdefg"} == {
            "a": None, "b": None, "c": 0, "d": 0, "e": 1, "f": 1, "g": 4}
        with slots[2]:  # c ends (cancelled): e is next on its engine at once
            pass
        assert gateway.queue_position("e", started) == 0 and gateway.queue_position("c", started) is None

    asyncio.run(scenario())
