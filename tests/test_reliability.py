"""Over HTTP against a server with a small admission bound and room for one guided request per step (so that
requests queue): request ids, disconnects, deadlines, bursts, expiry of job results, and a graceful SIGTERM."""

from __future__ import annotations

import asyncio
import io
import json
import re
import signal
import socket
import time
from urllib.parse import urlparse

import httpx
import pytest
import soundfile

from stable_audio_bento.local_server import local_server

from conftest import ARTIFACTS, metric_samples, own_bentoml_home

MAX_PENDING = 3
LONG = {"input": "a long drone", "num_inference_steps": 150}  # seconds on the tiny model, full 47.55 s window
SHORT = {"input": "a click", "audio_length": 1.0, "num_inference_steps": 2}


@pytest.fixture(scope="module")
def limited_server(model_cache, tmp_path_factory):
    env = {"STABLE_AUDIO_MODEL": "tiny", "STABLE_AUDIO_MAX_PENDING": str(MAX_PENDING), "STABLE_AUDIO_JOB_TTL_S": "2",
           "STABLE_AUDIO_MAX_ROWS": "2", **own_bentoml_home(tmp_path_factory)}
    with local_server(env, ARTIFACTS / "limited-server.log", startup_timeout_s=180) as url:
        yield url


def server_log() -> str:
    return (ARTIFACTS / "limited-server.log").read_text(errors="replace")


def wait_for_log(pattern: str, timeout_s: float = 120) -> re.Match:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if match := re.search(pattern, server_log()):
            return match
        time.sleep(0.2)
    raise AssertionError(f"no log line matching {pattern!r}")


def send_then_disconnect(url: str, body: dict, request_id: str, after_s: float) -> None:
    """A client that posts a generation and hangs up before the answer."""
    address = urlparse(url)
    data = json.dumps(body).encode()
    with socket.create_connection((address.hostname, address.port)) as connection:
        connection.sendall(b"POST /v1/audio/generate HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                           b"X-Request-Id: %s\r\nContent-Length: %d\r\n\r\n%s" % (request_id.encode(), len(data), data))
        time.sleep(after_s)


def test_request_ids_are_echoed_generated_and_logged(limited_server):
    given = httpx.post(limited_server + "/v1/audio/generate", json=SHORT, headers={"X-Request-Id": "ticket-4711"},
                       timeout=120)
    assert given.status_code == 200 and given.headers["x-request-id"] == "ticket-4711"
    made_up = httpx.post(limited_server + "/v1/audio/generate", json={"input": ""},
                         headers={"X-Request-Id": "not a valid id; " + "x" * 200}, timeout=120)
    assert made_up.status_code == 400 and re.fullmatch(r"[0-9a-f]{32}", made_up.headers["x-request-id"])
    wait_for_log(r"generated 1\.00 s of wav .*\[request_id=ticket-4711\]")  # the front's line per request
    wait_for_log(r"path=/v1/audio/generate.*status=200.*\[request_id=ticket-4711\]")  # BentoML's access line
    wait_for_log(r"request ticket-4711 finished: ok")  # the engine's batch line


def test_a_client_that_disconnects_while_queued_is_never_computed(limited_server):
    async def scenario():
        async with httpx.AsyncClient(timeout=300) as client:
            running = asyncio.ensure_future(client.post(limited_server + "/v1/audio/generate", json=LONG,
                                                        headers={"X-Request-Id": "occupies-engine"}))
            await asyncio.sleep(1.0)
            await asyncio.to_thread(send_then_disconnect, limited_server, SHORT, "hangs-up-queued", 0.5)
            return await running

    assert asyncio.run(scenario()).status_code == 200
    wait_for_log(r"request hangs-up-queued finished: cancelled")
    assert "stopped after" not in "".join(line for line in server_log().splitlines() if "hangs-up-queued" in line)
    assert not re.search(r"generated .*\[request_id=hangs-up-queued\]", server_log())


def test_a_job_waiting_for_room_knows_its_place(limited_server):
    # STABLE_AUDIO_MAX_ROWS=2: a running guided request (2 rows) leaves no room, so the next one waits its turn.
    jobs = limited_server + "/v1/audio/jobs"
    running = httpx.post(jobs, json=LONG).json()
    deadline = time.monotonic() + 120
    while httpx.get(f"{jobs}/{running['id']}").json()["status"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    waiting = httpx.post(jobs, json=LONG).json()
    for _ in range(3):  # and it stays so, step after step
        status = httpx.get(f"{jobs}/{waiting['id']}").json()
        assert (status["status"], status["queue_position"], status["progress"]) == ("queued", 0, None)
        time.sleep(0.2)
    for job in (waiting, running):
        assert httpx.delete(f"{jobs}/{job['id']}").json()["status"] == "cancelled"


def test_a_client_that_disconnects_mid_generation_stops_it_at_the_next_step(limited_server):
    send_then_disconnect(limited_server, {**LONG, "num_inference_steps": 500}, "hangs-up-running", 2.0)
    stopped = wait_for_log(r"request hangs-up-running stopped after (\d+) of 500 steps \(cancelled\)")
    assert 0 < int(stopped.group(1)) < 500


def test_a_request_past_its_timeout_gets_504_and_its_batch_goes_on(limited_server):
    """Unguided, so that both fit the two rows a step takes here: they share steps until the hasty one's deadline
    stops it mid-way; the patient one finishes with its solo audio."""
    patient_body = {**SHORT, "num_inference_steps": 40, "guidance_scale": 1.0, "seed": 8}

    async def scenario():
        async with httpx.AsyncClient(timeout=300) as client:
            return await asyncio.gather(
                client.post(limited_server + "/v1/audio/generate", json=patient_body,
                            headers={"X-Request-Id": "patient-504"}),
                client.post(limited_server + "/v1/audio/generate", json={**LONG, "guidance_scale": 1.0, "timeout": 1.0},
                            headers={"X-Request-Id": "hasty-504"}))

    patient, hasty = asyncio.run(scenario())
    assert hasty.status_code == 504
    assert hasty.json()["error"]["param"] == "timeout" and hasty.json()["error"]["type"] == "timeout_error"
    stopped = wait_for_log(r"request hasty-504 stopped after (\d+) of 150 steps \(deadline_exceeded\)")
    assert 0 < int(stopped.group(1)) < 150
    assert patient.status_code == 200 and patient.headers["x-batch-size"] == "2"
    assert soundfile.info(io.BytesIO(patient.content)).frames == 44100
    alone = httpx.post(limited_server + "/v1/audio/generate", json=patient_body, timeout=120)
    assert alone.headers["x-batch-size"] == "1" and alone.content == patient.content


def test_a_burst_past_the_bound_is_served_or_refused_at_once(limited_server):
    async def timed_post(client, body):
        started = time.monotonic()
        response = await client.post(limited_server + "/v1/audio/generate", json=body)
        return response, time.monotonic() - started

    async def burst():
        async with httpx.AsyncClient(timeout=300) as client:
            return await asyncio.gather(*(timed_post(client, {**SHORT, "num_inference_steps": 20, "seed": i})
                                          for i in range(4 * MAX_PENDING)))

    outcomes = asyncio.run(burst())
    served = [response for response, _ in outcomes if response.status_code == 200]
    refused = [(response, seconds) for response, seconds in outcomes if response.status_code == 429]
    assert len(served) + len(refused) == len(outcomes), [r.status_code for r, _ in outcomes]
    assert MAX_PENDING <= len(served) and refused
    for response in served:
        assert soundfile.info(io.BytesIO(response.content)).frames == 44100
    for response, seconds in refused:
        assert seconds < 2.0 and int(response.headers["retry-after"]) >= 1
        assert response.json()["error"]["code"] == "server_busy"


def test_jobs_and_speech_count_against_the_same_bound_and_free_it_when_cancelled(limited_server):
    jobs = limited_server + "/v1/audio/jobs"
    held = [httpx.post(jobs, json=LONG).json() for _ in range(MAX_PENDING)]
    try:
        for path, body in [("/v1/audio/generate", SHORT), ("/v1/audio/jobs", SHORT),
                           ("/v1/audio/speech", {**SHORT, "model": "tiny", "voice": "alloy"})]:
            refused = httpx.post(limited_server + path, json=body)
            assert refused.status_code == 429, (path, refused.text)
            assert refused.json()["error"]["code"] == "server_busy" and int(refused.headers["retry-after"]) >= 1
    finally:
        for job in held:
            assert httpx.delete(f"{jobs}/{job['id']}").json()["status"] == "cancelled"
    deadline = time.monotonic() + 30
    while (served := httpx.post(limited_server + "/v1/audio/generate", json=SHORT, timeout=120)).status_code == 429:
        assert time.monotonic() < deadline, "cancelled jobs still hold their admission slots"
        time.sleep(0.2)
    assert served.status_code == 200 and soundfile.info(io.BytesIO(served.content)).frames == 44100
    assert metric_samples(limited_server, "stable_audio_pending_generations") == {
        "stable_audio_pending_generations": 0.0}


def test_job_results_expire(limited_server):
    job = httpx.post(limited_server + "/v1/audio/jobs", json=SHORT).json()
    deadline = time.monotonic() + 60
    while (status := httpx.get(f"{limited_server}/v1/audio/jobs/{job['id']}").json())["status"] != "succeeded":
        assert time.monotonic() < deadline, status
        time.sleep(0.1)
    assert status["expires_at"] == pytest.approx(status["finished_at"] + 2)
    time.sleep(2.5)
    for path in (f"/v1/audio/jobs/{job['id']}", f"/v1/audio/jobs/{job['id']}/content"):
        gone = httpx.get(limited_server + path)
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "job_not_found"


def test_sigterm_stops_admission_and_finishes_in_flight_requests(model_cache):
    """The signal reaches every worker at once: the front keeps answering (503 to new work, /readyz not ready)
    and the engine keeps serving the front (progress, results, cancels: also over new connections, as BentoML
    removed its socket at once) until what is in flight is done; a job that succeeds during the drain can still be
    fetched."""
    log = ARTIFACTS / "sigterm-server.log"
    with local_server({"STABLE_AUDIO_MODEL": "tiny"}, log, startup_timeout_s=180) as url:
        async def scenario():
            async with httpx.AsyncClient(timeout=300) as client:
                in_flight = asyncio.ensure_future(client.post(url + "/v1/audio/generate", json=LONG))
                job = (await client.post(url + "/v1/audio/jobs", json=LONG)).json()
                dropped = (await client.post(url + "/v1/audio/jobs", json=LONG,
                                             headers={"X-Request-Id": "dropped-in-the-drain"})).json()
                while (await client.get(f"{url}/v1/audio/jobs/{job['id']}")).json()["progress"] is None:
                    await asyncio.sleep(0.1)
                url.process.send_signal(signal.SIGTERM)  # to `bentoml serve` alone, as `docker stop` does
                await asyncio.sleep(0.5)
                refused = await client.post(url + "/v1/audio/generate", json=SHORT)
                health, ready = await client.get(url + "/health"), await client.get(url + "/readyz")
                cancelled = (await client.delete(f"{url}/v1/audio/jobs/{dropped['id']}")).json()
                steps_done = []  # the engine, signalled too, still answers the front's progress calls
                for _ in range(3):  # polls at once: more calls to the engine than the front had connections open
                    polls = await asyncio.gather(*[client.get(f"{url}/v1/audio/jobs/{job['id']}") for _ in range(8)])
                    steps_done.append(max(polled["progress"]["steps_done"] if polled["status"] == "running" else 150
                                          for polled in (poll.json() for poll in polls)))
                    await asyncio.sleep(0.3)
                finished = await in_flight
                while (await client.get(f"{url}/v1/audio/jobs/{job['id']}")).json()["status"] != "succeeded":
                    await asyncio.sleep(0.25)  # the command-line client's pace
                await asyncio.sleep(1.0)  # a slower client: the drain is over, the job's audio is still there
                fetched = await client.get(f"{url}/v1/audio/jobs/{job['id']}/content")
                return finished, refused, health, ready, steps_done, fetched, cancelled

        finished, refused, health, ready, steps_done, fetched, cancelled = asyncio.run(scenario())
        assert refused.status_code == 503 and refused.headers["retry-after"]
        assert refused.json()["error"]["code"] == "shutting_down"
        assert health.status_code == 503 and ready.status_code == 503
        assert steps_done == sorted(steps_done) and steps_done[0] < steps_done[-1], steps_done
        assert finished.status_code == 200
        assert soundfile.info(io.BytesIO(finished.content)).frames == 1024 * 2048
        assert fetched.status_code == 200 and soundfile.info(io.BytesIO(fetched.content)).frames == 1024 * 2048
        assert url.process.wait(60) == 0
    text = log.read_text(errors="replace")
    assert "Exception in ASGI application" not in text and "UnixClientConnectorError" not in text
    assert cancelled["status"] == "cancelled" and "request dropped-in-the-drain finished: cancelled" in text
