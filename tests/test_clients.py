"""Users beyond curl: async jobs with progress, the OpenAI SDK, the progress bar of the CLI, and metrics."""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.error
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import soundfile

from stable_audio_bento import client
from stable_audio_bento.client import Server

from conftest import metric_samples, server_timing_ms

BODY = {"input": "a kettle whistling", "audio_length": 2.0, "num_inference_steps": 12, "seed": 99,
        "response_format": "flac"}


def poll(server: str, job_id: str, until=("succeeded", "failed", "cancelled"), timeout_s: float = 120) -> list[dict]:
    """Every status seen until the job reaches one of ``until``."""
    seen, deadline = [], time.monotonic() + timeout_s
    while not seen or seen[-1]["status"] not in until:
        assert time.monotonic() < deadline, seen[-1:]
        seen.append(httpx.get(f"{server}/v1/audio/jobs/{job_id}").json())
        time.sleep(0.05)
    return seen


def test_a_job_reports_progress_and_returns_the_same_audio_as_a_direct_request(server):
    submitted = httpx.post(server + "/v1/audio/jobs", json=BODY)
    assert submitted.status_code == 202
    job = submitted.json()
    assert job["status"] in ("queued", "running") and job["id"].startswith("job_") and job["seed"] == 99
    statuses = poll(server, job["id"])
    final = statuses[-1]
    assert final["status"] == "succeeded" and final["error"] is None
    done = [s["progress"]["steps_done"] for s in statuses if s["progress"]]
    assert done == sorted(done) and done[-1] == 12
    assert final["expires_at"] > final["finished_at"] >= final["created_at"]

    content = httpx.get(server + final["result_url"])
    assert content.status_code == 200 and content.headers["content-type"] == "audio/flac"
    assert content.headers["x-seed"] == "99"
    direct = httpx.post(server + "/v1/audio/generate", json=BODY, timeout=120)
    assert content.content == direct.content
    # saved under the same name as a direct request's, by a browser opening result_url or `curl -OJ`
    assert content.headers["content-disposition"] == direct.headers["content-disposition"] == (
        'attachment; filename="audio.flac"')
    samples, rate = soundfile.read(io.BytesIO(content.content))
    assert (rate, samples.shape) == (44100, (88200, 2))


def test_cancelled_jobs_have_no_audio(server):
    # Continuous batching admits the second job at the next step, so it is queued or running by now; the queued
    # case is pinned where the loop is full (test_reliability.py).
    long = {"input": "a long drone", "num_inference_steps": 400}
    running = httpx.post(server + "/v1/audio/jobs", json=long).json()
    poll(server, running["id"], until=("running",))
    waiting = httpx.post(server + "/v1/audio/jobs", json=long).json()

    for job in (waiting, running):
        cancelled = httpx.delete(f"{server}/v1/audio/jobs/{job['id']}")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        missing = httpx.get(f"{server}/v1/audio/jobs/{job['id']}/content")
        assert missing.status_code == 409 and missing.json()["error"]["param"] == "job_id"
    assert httpx.get(f"{server}/v1/audio/jobs/{running['id']}").json()["status"] == "cancelled"


@pytest.mark.parametrize("method, path", [("GET", "/v1/audio/jobs/job_nope"), ("GET", "/v1/audio/jobs/x/content"),
                                          ("DELETE", "/v1/audio/jobs/job_nope")])
def test_unknown_jobs_are_404_in_the_error_shape(server, method, path):
    response = httpx.request(method, server + path)
    assert response.status_code == 404
    error = response.json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "job_not_found", "job_id")


@pytest.mark.parametrize("body, param", [({"input": "x", "audio_length": 99.0}, "audio_length"),
                                         ({"input": "x", "seed": "7"}, "seed"), (b"{oops", None)])
def test_bad_job_submissions_are_400_naming_the_field(server, body, param):
    sent = {"json": body} if isinstance(body, dict) else {"content": body, "headers": {"content-type": "application/json"}}
    response = httpx.post(server + "/v1/audio/jobs", **sent)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param and response.json()["error"]["message"]


def test_a_job_sent_again_with_its_idempotency_key_is_the_same_job(server):
    """A client that lost the answer to its POST sends it again with the same key and learns the job's id."""
    key = {"Idempotency-Key": "kettle-once"}
    first = httpx.post(server + "/v1/audio/jobs", json=BODY, headers=key)
    again = httpx.post(server + "/v1/audio/jobs", json={**BODY, "audio_start": 0.0}, headers=key)  # a default written out
    assert (first.status_code, again.status_code) == (202, 202)
    assert again.json()["id"] == first.json()["id"] and again.headers["idempotent-replayed"] == "true"
    other = httpx.post(server + "/v1/audio/jobs", json={**BODY, "seed": 1}, headers=key)
    assert other.status_code == 422
    assert (other.json()["error"]["param"], other.json()["error"]["code"]) == ("Idempotency-Key", "idempotency_key_reused")
    unusable = httpx.post(server + "/v1/audio/jobs", json=BODY, headers={"Idempotency-Key": "x" * 300})
    assert unusable.status_code == 400 and unusable.json()["error"]["param"] == "Idempotency-Key"
    assert poll(server, first.json()["id"])[-1]["status"] == "succeeded"


def test_the_openai_sdk_lists_the_model_and_creates_speech(server):
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)
    [listed] = client.models.list()
    assert listed.id == "tiny" and client.models.retrieve("tiny") == listed
    extra = listed.model_extra
    assert extra["max_audio_length"] == pytest.approx(2**21 / 44100) and extra["sample_rate"] == 44100
    with pytest.raises(openai.NotFoundError, match="'stabilityai/stable-audio-open-1.0' is not served here"):
        client.models.retrieve("stabilityai/stable-audio-open-1.0")  # an owner/name id: a slash in the path
    speech = client.audio.speech.create(model="tiny", input="a kettle whistling", voice="alloy",
                                        response_format="flac", extra_body={k: BODY[k] for k in
                                                                           ("audio_length", "num_inference_steps", "seed")})
    direct = httpx.post(server + "/v1/audio/generate", json=BODY, timeout=120)
    assert speech.read() == direct.content
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.audio.speech.create(model="tts-1", input="x", voice="alloy")
    with pytest.raises(openai.BadRequestError, match="audio_length"):
        client.audio.speech.create(model="tiny", input="x", voice="alloy", extra_body={"audio_length": 100})


def test_the_openai_sdk_does_not_resend_a_request_that_ran_out_of_time(server):
    """The SDK retries a 5xx twice by default; a 504 says X-Should-Retry: false, so the engine runs it once."""
    key = 'stable_audio_requests_total{endpoint="/v1/audio/speech",format="wav",status="504"}'
    before = metric_samples(server).get(key, 0.0)
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=2)
    with pytest.raises(openai.InternalServerError, match="timeout"):
        client.audio.speech.create(model="tiny", input="a long drone", voice="alloy", response_format="wav",
                                   extra_body={"num_inference_steps": 500, "timeout": 0.5})
    assert metric_samples(server).get(key, 0.0) == before + 1


@pytest.mark.parametrize("response_format", ["opus", "aac"])
def test_ffmpeg_formats_over_http(server, response_format):
    body = {"input": "a bell", "audio_length": 1.5, "num_inference_steps": 2, "seed": 1,
            "response_format": response_format}
    response = httpx.post(server + "/v1/audio/generate", json=body, timeout=120)
    assert response.status_code == 200
    if response_format == "opus":
        assert response.headers["content-type"] == "audio/ogg" and b"OpusHead" in response.content[:64]
        samples, rate = soundfile.read(io.BytesIO(response.content))
        assert rate == 48000 and abs(samples.shape[0] - 72000) <= 1 and np.abs(samples).max() > 0
    else:
        assert response.headers["content-type"] == "audio/aac" and response.content[:2] in (b"\xff\xf1", b"\xff\xf9")


def test_command_line_client_shows_progress(server, tmp_path):
    output = tmp_path / "bell.opus"
    done = subprocess.run([sys.executable, "-m", "stable_audio_bento.client", "a bell", "--url", server,
                           "--audio-length", "1", "--num-inference-steps", "20", "-o", str(output)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    bars = re.findall(r"\[([#.]{30})\] (\d+)/(\d+) steps", done.stderr)
    assert bars and bars[-1] == ("#" * 30, "20", "20") and "succeeded" in done.stderr
    assert soundfile.info(output).frames == 48000


AUDIO = b"RIFF audio"  # what the stand-in's downloads hold
STEADY_AUDIO, STEADY_GAP_S = AUDIO * 20, 0.1  # a "steady" download: 2 s, a chunk every 0.1 s


class StandInServer(BaseHTTPRequestHandler):
    """The jobs API as the command-line client sees it: the first ``refusals`` submissions answered ``refusal``
    (status, Retry-After; or "drop"; or a list of them, one per submission), then a job that has already succeeded. Every request's method and path are
    kept, and each submission's Idempotency-Key.

    ``polls`` and ``downloads`` script the answers to the job's status and content, one per request (the last one
    repeats): a job status ("running", "succeeded"), an HTTP status (int; 429 and 503 come with Retry-After: 0), or
    "drop" (the connection is closed without an answer), "redirect" (elsewhere) or "moved" (the same route at
    another address). With ``polls`` set, the submitted job is running. With ``held`` (an Event) set, the answer to
    a submission waits for it. Each submission's Authorization header is kept in ``authorizations``, as sent."""

    refusals, refusal, seen, keys, held, authorizations = 0, (429, "0"), [], [], None, []
    polls, downloads, cancel = [], [], "cancelled"  # cancel: the DELETE's answer, a job status or "drop"
    JOB = {"id": "job_1", "status": "succeeded", "progress": {"steps_done": 2, "steps_total": 2}, "seed": 7,
           "queue_position": None, "audio_duration": 1.0, "response_format": "wav", "error": None,
           "result_url": "/v1/audio/jobs/job_1/content"}

    def log_message(self, *args):
        pass

    def answer(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def scripted(self, script: list, success: bytes) -> None:
        """Answers the next step of ``script`` (see the class)."""
        tries = sum(seen == ("GET", self.path) for seen in self.seen)  # this one included
        step = script[min(tries, len(script)) - 1]
        if step == "drop":
            self.close_connection = True  # nothing written: the client sees the connection closed
        elif isinstance(step, int):
            error = {"error": {"message": f"stand-in {step}", "type": "x", "param": "job_id", "code": None}}
            self.answer(step, json.dumps(error).encode(), {"Retry-After": "0"} if step in (429, 503) else {})
        elif step == "not json":
            self.answer(200, b"<html>a proxy's page</html>", {"Content-Type": "text/html"})
        elif step == "not a job":
            self.answer(200, json.dumps({"status": "running"}).encode(), {"Content-Type": "application/json"})
        elif step == "redirect":
            self.answer(302, b"", {"Location": "/elsewhere"})
        elif step == "moved":
            self.answer(301, b"", {"Location": f"https://audio.example:8443{self.path}"})
        elif step == "steady":  # STEADY_AUDIO, a chunk every STEADY_GAP_S
            self.send_response(200)
            self.send_header("Content-Type", "audio/wav")
            self.send_header("Content-Length", str(len(STEADY_AUDIO)))
            self.end_headers()
            for chunk in range(0, len(STEADY_AUDIO), len(AUDIO)):
                time.sleep(STEADY_GAP_S)
                self.wfile.write(STEADY_AUDIO[chunk:chunk + len(AUDIO)])
                self.wfile.flush()
        elif step == "succeeded" and success == AUDIO:
            self.answer(200, AUDIO, {"Content-Type": "audio/wav"})
        else:
            self.answer(200, success if step == "succeeded" else json.dumps({**self.JOB, "status": step}).encode(), {})

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.authorizations.append(self.headers.get("Authorization", "").encode("latin-1"))  # the bytes sent
        self.seen.append(("POST", self.path))
        self.keys.append(self.headers["Idempotency-Key"])
        if self.held is not None:
            self.held.wait(20)
        if len(self.seen) <= self.refusals:
            status, retry_after = self.refusal[len(self.seen) - 1] if isinstance(self.refusal, list) else self.refusal
            if status == "drop":
                self.close_connection = True  # the job may have been created: its answer is lost
                return
            error = {"error": {"message": "the server is busy", "type": "x", "param": None, "code": None}}
            return self.answer(status, json.dumps(error).encode(), {"Retry-After": retry_after})
        self.answer(202, json.dumps({**self.JOB, "status": "running"} if self.polls else self.JOB).encode(), {})

    def do_GET(self):
        self.seen.append(("GET", self.path))
        content = self.path.endswith("/content")
        if content and self.downloads:
            return self.scripted(self.downloads, AUDIO)
        if not content and self.polls:
            return self.scripted(self.polls, json.dumps(self.JOB).encode())
        if content:
            return self.answer(200, AUDIO, {"Content-Type": "audio/wav"})
        self.answer(200, json.dumps(self.JOB).encode(), {})

    def do_DELETE(self):
        self.seen.append(("DELETE", self.path))
        if self.cancel == "drop":
            self.close_connection = True
        else:
            self.answer(200, json.dumps({**self.JOB, "status": self.cancel}).encode(), {})


@pytest.fixture
def stand_in(monkeypatch):
    """(the stand-in server's URL, its handler class); ``refusals``, ``refusal``, ``polls``, ``downloads``,
    ``cancel`` and ``held`` set per test."""
    for name, value in {"seen": [], "keys": [], "refusals": 0, "refusal": (429, "0"), "polls": [], "downloads": [],
                        "cancel": "cancelled", "held": None, "authorizations": []}.items():
        monkeypatch.setattr(StandInServer, name, value)
    server = ThreadingHTTPServer(("127.0.0.1", 0), StandInServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", StandInServer
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("status", [429, 503])
def test_the_command_line_client_submits_again_after_a_busy_servers_retry_after(stand_in, tmp_path, capsys, status):
    url, handler = stand_in
    handler.refusals, handler.refusal = 2, (status, "0")
    output = tmp_path / "out.wav"
    assert client.main(["a bell", "--url", url, "--quiet", "-o", str(output)]) == 0
    assert [path for method, path in handler.seen if method == "POST"] == ["/v1/audio/jobs"] * 3
    assert output.read_bytes() == AUDIO
    assert capsys.readouterr().err.count(f"submitting the job failed (HTTP {status} ") == 1  # once for the run
    assert len(set(handler.keys)) == 1 and handler.keys[0]  # the same Idempotency-Key each time


@pytest.mark.parametrize("failure", ["drop", 409, 502, 504])
def test_a_submission_whose_answer_is_lost_is_sent_again_with_the_same_idempotency_key(stand_in, tmp_path, capsys,
                                                                                     failure):
    """A job the first try created is what the server answers the second with (test_idempotency.py), so sending
    it again is safe; without the key, a lost answer left a job generating that nobody would fetch."""
    url, handler = stand_in
    handler.refusals, handler.refusal = 1, (failure, "0")
    assert client.main(["a bell", "--url", url, "--quiet", "-o", str(tmp_path / "out.wav")]) == 0
    assert [path for method, path in handler.seen if method == "POST"] == ["/v1/audio/jobs"] * 2
    assert handler.keys[0] == handler.keys[1] and (tmp_path / "out.wav").read_bytes() == AUDIO
    assert "submitting the job failed" in capsys.readouterr().err


@pytest.mark.parametrize("refusal, timeout", [((400, "0"), "60"), ((429, "30"), "5")])
def test_a_bad_request_or_a_retry_past_the_timeout_is_not_sent_again(stand_in, tmp_path, capsys, refusal, timeout):
    url, handler = stand_in
    handler.refusals, handler.refusal = 1, refusal
    started = time.monotonic()
    assert client.main(["a bell", "--url", url, "--timeout", timeout, "-o", str(tmp_path / "out.wav")]) == 1
    assert time.monotonic() - started < 5 and handler.seen == [("POST", "/v1/audio/jobs")]
    err = capsys.readouterr().err
    assert f"error {refusal[0]}: the server is busy\n" in err and not (tmp_path / "out.wav").exists()  # the message
    assert ("asks to retry after 30 s, past --timeout" in err) == (refusal[0] == 429)


@pytest.mark.parametrize(("errno", "retried"), [(socket.EAI_NONAME, False), (socket.EAI_AGAIN, True)],
                         ids=["no-such-host", "lookup-failed-for-now"])
def test_a_host_that_does_not_exist_fails_at_once_and_a_failed_lookup_is_tried_again(tmp_path, capsys, monkeypatch,
                                                                                      errno, retried):
    def lookup(host, *args, **kwargs):
        raise socket.gaierror(errno, "looked up in a test")

    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    started = time.monotonic()
    url = "http://stable-audio.example:8091"
    assert client.main(["a bell", "--url", url, "--timeout", "3", "--quiet", "-o", str(tmp_path / "out.wav")]) == 1
    assert (time.monotonic() - started >= 2) == retried
    assert ("retrying until --timeout" in capsys.readouterr().err) == retried


@pytest.mark.parametrize("url", ["htp://127.0.0.1:{port}", "http://127.0.0.1:{port}x", "https://127.0.0.1:{port}"],
                         ids=["unknown-scheme", "bad-port", "tls-to-http"])
def test_a_submission_no_retry_can_get_past_fails_at_once(stand_in, tmp_path, capsys, url):
    served, _ = stand_in
    started = time.monotonic()
    url = url.format(port=served.rsplit(":", 1)[1])
    assert client.main(["a bell", "--url", url, "--timeout", "30", "--quiet", "-o", str(tmp_path / "out.wav")]) == 1
    assert time.monotonic() - started < 3 and "retrying" not in capsys.readouterr().err


JOB_PATH = "/v1/audio/jobs/job_1"


def test_a_job_a_lost_answer_made_is_found_and_cancelled_when_the_client_gives_up(stand_in, tmp_path, capsys):
    """The first answer is lost, the second try is a 504 whose Retry-After runs past --timeout: the job the first
    may have made is asked for with the same key, and cancelled."""
    url, handler = stand_in
    handler.refusals, handler.refusal = 2, [("drop", "0"), (504, "5")]
    assert client.main(["a bell", "--url", url, "--timeout", "2", "--quiet", "-o", str(tmp_path / "out.wav")]) == 1
    assert handler.seen == [("POST", "/v1/audio/jobs")] * 3 + [("DELETE", JOB_PATH)], handler.seen
    assert len(set(handler.keys)) == 1 and "error 504" in capsys.readouterr().err


@pytest.mark.parametrize("error, made_nothing", [
    (urllib.error.URLError(ConnectionRefusedError(111, "Connection refused")), True),  # raised while connecting
    (ValueError("unknown url type: 'localhost/v1/audio/jobs'"), True),
    (urllib.error.HTTPError("u", 301, "Moved", {}, None), True),
    (urllib.error.HTTPError("u", 429, "Too Many Requests", {}, None), True),
    (urllib.error.HTTPError("u", 502, "Bad Gateway", {}, None), False),
    (urllib.error.HTTPError("u", 409, "Conflict", {}, None), False),
    (http.client.RemoteDisconnected("closed"), False),  # raised while the answer was awaited
    (TimeoutError("timed out"), False),
    (json.JSONDecodeError("not JSON", "<html>", 0), False),
    (KeyboardInterrupt(), False),  # held until the answer, which it replaced
])
def test_which_failed_submissions_surely_made_no_job(error, made_nothing):
    """Those that may have made one are asked for again on the way out, to cancel the job (and warn if they
    cannot be): a connection refused or a redirect did neither."""
    assert client.made_nothing(error) is made_nothing


def test_finding_and_cancelling_the_job_a_lost_answer_made_share_one_bound(monkeypatch):
    monkeypatch.setattr(client, "CANCEL_TIMEOUT_S", 2.0)
    calls = []

    class SlowServer:
        def call(self, method, path, body=None, form=None, timeout=None, headers=None):
            calls.append((method, timeout))
            time.sleep(1.5 if method == "POST" else timeout)
            if method == "DELETE":
                raise TimeoutError("timed out")
            return json.dumps(StandInServer.JOB).encode(), {}

    started = time.monotonic()
    client.cancel_unseen(SlowServer(), client.Submission({"input": "a bell"}, None), client.ProgressBar(False))
    assert [method for method, _ in calls] == ["POST", "DELETE"]
    assert calls[1][1] <= client.MIN_CALL_TIMEOUT_S + 0.05 and time.monotonic() - started < 2.0 + 0.7


def test_a_stop_ignored_by_the_parent_stays_ignored_while_the_job_is_submitted():
    """sh starts a background job with SIGINT ignored: a Ctrl-C meant for the script must not cancel the job."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with client.stops_deferred(client.ProgressBar(False)):
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN  # not ignored: held as before
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_ctrl_c_between_submission_tries_cancels_the_job_a_lost_answer_made(stand_in, tmp_path):
    url, handler = stand_in
    handler.refusals, handler.refusal = 1, ("drop", "0")
    process = subprocess.Popen([sys.executable, "-m", "stable_audio_bento.client", "a bell", "--url", url, "--quiet",
                                "-o", str(tmp_path / "out.wav")], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while not handler.seen:  # the first answer is being lost; the next try comes a second later
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    err = process.communicate(timeout=30)[1]
    assert process.returncode == 130 and err.splitlines()[-1] == "cancelled", err
    assert handler.seen == [("POST", "/v1/audio/jobs")] * 2 + [("DELETE", JOB_PATH)], handler.seen
    assert handler.keys[0] == handler.keys[1]


def run_client(url: str, tmp_path, *flags: str) -> int:
    return client.main(["a bell", "--url", url, "--quiet", "-o", str(tmp_path / "out.wav"), *flags])


@pytest.mark.parametrize("failure", ["drop", 429, 502, 503, 504])
def test_the_command_line_client_polls_on_through_a_dropped_connection_or_a_proxys_error(stand_in, tmp_path, capsys,
                                                                                        failure):
    url, handler = stand_in
    handler.polls = ["running", failure, failure, failure, "running", "succeeded"]
    assert run_client(url, tmp_path) == 0
    assert (tmp_path / "out.wav").read_bytes() == AUDIO
    assert [method for method, path in handler.seen if path == JOB_PATH] == ["GET"] * 6  # and no cancel
    err = capsys.readouterr().err
    assert err.count("polling the job failed") == 1, err  # once, not at every try
    cause = f"HTTP {failure} " if isinstance(failure, int) else "Remote end closed connection without response"
    assert f"polling the job failed ({cause}" in err and "retrying until --timeout" in err


def test_the_command_line_client_downloads_again_after_a_failed_download(stand_in, tmp_path, capsys):
    url, handler = stand_in
    handler.downloads = ["drop", 502, "succeeded"]
    assert run_client(url, tmp_path) == 0
    assert (tmp_path / "out.wav").read_bytes() == AUDIO
    assert [path for _, path in handler.seen].count(JOB_PATH + "/content") == 3
    assert capsys.readouterr().err.count("downloading the audio failed") == 1


def test_a_steady_download_longer_than_a_calls_timeout_is_not_cut_before_the_clients(stand_in, tmp_path,
                                                                                   monkeypatch):
    """Each read gets a chunk well within the call's (socket) timeout of 1 s; the whole download takes 2 s, within
    --timeout: it is not cut (and tried again from the start) at the call's timeout."""
    url, handler = stand_in
    handler.downloads = ["steady"]
    monkeypatch.setattr(client, "Server", lambda url, api_key: Server(url, api_key, timeout=1.0))
    assert run_client(url, tmp_path, "--timeout", "6") == 0
    assert (tmp_path / "out.wav").read_bytes() == STEADY_AUDIO
    assert [path for _, path in handler.seen].count(JOB_PATH + "/content") == 1


def test_the_client_generates_from_a_thread_other_than_the_main_one(stand_in):
    """Only the main thread may set signal handlers: elsewhere a stop is not deferred during the submission."""
    url, handler = stand_in
    result = []
    thread = threading.Thread(target=lambda: result.append(
        client.generate(client.Server(url, None), {"input": "a bell"}, 10, client.ProgressBar(False))))
    thread.start()
    thread.join(20)
    assert result and result[0][0] == AUDIO
    assert ("POST", "/v1/audio/jobs") in handler.seen


@pytest.mark.parametrize("cancel", ["cancelled", "drop"])
@pytest.mark.parametrize("polls, flags, message", [
    (["running", 500], [], "error 500: "),  # an error that trying again would not fix
    (["running"], ["--timeout", "1"], "the job took longer than 1 s"),
    (["running", "drop"], ["--timeout", "2"], "Remote end closed connection without response"),  # past --timeout
], ids=["error", "timeout", "outage"])
def test_the_command_line_client_cancels_the_job_it_gives_up_on(stand_in, tmp_path, capsys, polls, flags, message,
                                                                cancel):
    """Even when the cancel fails too (``drop``), the error that made the client give up is the one shown."""
    url, handler = stand_in
    handler.polls, handler.cancel = polls, cancel
    started = time.monotonic()
    assert run_client(url, tmp_path, *flags) == 1
    assert time.monotonic() - started < 10
    assert handler.seen[-1] == ("DELETE", JOB_PATH) and not (tmp_path / "out.wav").exists()
    err = capsys.readouterr().err
    assert message in err
    assert ("could not cancel job job_1 on the server" in err) == (cancel == "drop"), err


def test_an_unexpected_answer_cancels_the_job_too_and_is_reported(stand_in, tmp_path, capsys):
    url, handler = stand_in
    handler.polls = ["running", "not json"]  # e.g. a proxy's page
    assert run_client(url, tmp_path) == 1
    assert handler.seen[-1] == ("DELETE", JOB_PATH)
    assert "failed (" in capsys.readouterr().err  # one line, no traceback


def test_on_a_terminal_the_messages_get_lines_of_their_own_below_the_bar(stand_in, tmp_path, capsys, monkeypatch):
    url, handler = stand_in
    handler.polls, handler.cancel = ["running", 500], "drop"
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # the bar is drawn in place, its line left open
    assert client.main(["a bell", "--url", url, "--timeout", "10", "-o", str(tmp_path / "out.wav")]) == 1
    err = capsys.readouterr().err
    assert re.search(r"running *\ncould not cancel job job_1 .*\nerror 500: ", err), err


def test_an_answer_that_is_json_but_not_a_job_cancels_the_job_and_is_reported(stand_in, tmp_path, capsys):
    url, handler = stand_in
    handler.polls = ["running", "not a job"]  # the progress bar reads what is missing
    assert client.main(["a bell", "--url", url, "--timeout", "10", "-o", str(tmp_path / "out.wav")]) == 1
    assert handler.seen[-1] == ("DELETE", JOB_PATH)
    assert "the server's answer is not a job (KeyError" in capsys.readouterr().err


@pytest.mark.parametrize("redirect, advice", [
    ("redirect", "it is not this route at another address: check --url"),
    ("moved", "give https://audio.example:8443 as --url"),  # the address, not the job's route after it
])
def test_a_redirect_is_reported_not_followed_with_the_key(stand_in, tmp_path, capsys, redirect, advice):
    url, handler = stand_in
    handler.polls = ["running", redirect]
    assert run_client(url, tmp_path, "--api-key", "secret") == 1
    assert ("GET", "/elsewhere") not in handler.seen and handler.seen[-1] == ("DELETE", JOB_PATH)
    err = capsys.readouterr().err
    assert "which is not followed (it would get the API key)" in err and err.rstrip().endswith(advice), err
    if redirect == "redirect":
        assert f"the server redirects to {url}/elsewhere," in err


def test_a_failed_job_is_reported_by_its_message_and_code(stand_in, tmp_path, capsys, monkeypatch):
    url, handler = stand_in
    failure = {"message": "the engine ran out of memory", "type": "server_error", "param": None, "code": "oom"}
    monkeypatch.setattr(handler, "JOB", {**handler.JOB, "error": failure})
    handler.polls = ["running", "failed"]
    assert run_client(url, tmp_path) == 1
    assert capsys.readouterr().err.rstrip().endswith("job failed: the engine ran out of memory (oom)")


def test_a_stop_during_the_download_cancels_nothing_and_names_where_the_audio_is(stand_in, tmp_path):
    """The job has succeeded: its audio waits on the server until the job expires, and no cancel is sent."""
    url, handler = stand_in
    handler.downloads = ["steady"]  # 2 s long
    process = subprocess.Popen([sys.executable, "-m", "stable_audio_bento.client", "a bell", "--url", url, "--quiet",
                                "-o", str(tmp_path / "out.wav")], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while ("GET", JOB_PATH + "/content") not in handler.seen:
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    err = process.communicate(timeout=20)[1]
    assert process.returncode == 130, err
    assert err.splitlines()[-1] == ("interrupted while downloading the audio of job job_1, which succeeded; it "
                                    f"stays on the server until the job expires: {url}{JOB_PATH}/content"), err
    assert "DELETE" not in [method for method, _ in handler.seen] and not (tmp_path / "out.wav").exists()


def test_a_download_that_is_not_audio_is_not_written(stand_in, tmp_path, capsys):
    url, handler = stand_in
    handler.downloads = ["not json"]  # a proxy's login page, with a 200
    assert run_client(url, tmp_path) == 1
    assert not (tmp_path / "out.wav").exists()
    assert "the download of job job_1 is not audio (Content-Type: text/html)" in capsys.readouterr().err


def test_an_output_that_cannot_be_written_leaves_no_partial_file_and_names_the_result(stand_in, tmp_path, capsys,
                                                                                      monkeypatch):
    url, _ = stand_in

    def full_disk(self, target):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "replace", full_disk)
    assert run_client(url, tmp_path) == 1
    assert list(tmp_path.iterdir()) == []
    err = capsys.readouterr().err
    assert "could not write" in err and "No space left on device" in err
    assert f"{url}/v1/audio/jobs/job_1/content" in err


def test_an_output_through_a_link_replaces_the_links_target_and_keeps_the_link(stand_in, tmp_path):
    """-o a link to a file: the file is replaced whole and the link kept. /dev/stdout redirected to a file is such a
    link (to /proc/self/fd/1, to the file): replacing the link there, as root, replaced /dev/stdout."""
    url, _ = stand_in
    take, link = tmp_path / "takes" / "take.wav", tmp_path / "latest.wav"
    take.parent.mkdir()
    take.write_bytes(b"an older take")
    link.symlink_to(take)
    assert client.main(["a bell", "--url", url, "--quiet", "-o", str(link)]) == 0
    assert link.is_symlink() and take.read_bytes() == AUDIO and list(take.parent.iterdir()) == [take]
    stdout = tmp_path / "stdout"
    stdout.symlink_to("/proc/self/fd/1")
    with open(tmp_path / "redirected.wav", "wb") as redirected:
        done = subprocess.run([sys.executable, "-m", "stable_audio_bento.client", "a bell", "--url", url, "--quiet",
                               "-o", str(stdout)], stdout=redirected, stderr=subprocess.PIPE, timeout=60)
    assert done.returncode == 0, done.stderr
    assert stdout.is_symlink() and (tmp_path / "redirected.wav").read_bytes() == AUDIO


def test_audio_written_to_a_piped_stdout_is_all_that_stdout_carries(stand_in):
    url, _ = stand_in
    done = subprocess.run([sys.executable, "-m", "stable_audio_bento.client", "a bell", "--url", url, "--quiet",
                           "-o", "/dev/stdout"], capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == AUDIO and b"wrote /dev/stdout (10 bytes, " in done.stderr


def test_a_file_another_client_is_writing_to_the_same_output_is_left_alone(tmp_path):
    """Each client writes a temporary file of its own: with one name for all, two at once wrote into one file and
    each renamed the other's audio, or nothing, into place."""
    output, others = tmp_path / "out.wav", tmp_path / ".out.wav.part"
    others.write_bytes(b"another client's audio, half written")
    client.save(output, AUDIO)
    assert output.read_bytes() == AUDIO and others.read_bytes() == b"another client's audio, half written"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(output.stat().st_mode) == 0o666 & ~umask  # as any file the user creates, not mkstemp's 0600


def test_a_device_is_checked_for_writing_itself_not_its_folder(monkeypatch, capsys):
    """A user who may not write in /dev (anyone but root) may write /dev/null and /dev/stdout."""
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != Path("/dev") and real_access(path, mode))
    assert client.parse_args(["a bell", "-o", "/dev/null"]).output == Path("/dev/null")
    with pytest.raises(SystemExit) as exit_:
        client.parse_args(["a bell", "-o", "/dev/bell.wav"])
    assert exit_.value.code == 2 and "cannot write /dev/bell.wav" in capsys.readouterr().err


def test_a_job_the_server_no_longer_has_is_reported_as_gone_and_not_cancelled(stand_in, tmp_path, capsys):
    url, handler = stand_in
    handler.polls = ["running", 404]
    assert run_client(url, tmp_path) == 1
    assert "DELETE" not in [method for method, _ in handler.seen]
    err = capsys.readouterr().err
    assert "job job_1 is gone from the server (404): it expired or the server restarted" in err, err


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
@pytest.mark.parametrize("cancel", ["cancelled", "drop"])
def test_ctrl_c_or_sigterm_cancels_the_job_even_when_the_cancel_fails(stand_in, tmp_path, cancel, stop):
    url, handler = stand_in
    handler.polls, handler.cancel = ["running"], cancel
    process = subprocess.Popen([sys.executable, "-m", "stable_audio_bento.client", "a bell", "--url", url, "--quiet",
                                "-o", str(tmp_path / "out.wav")], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while ("GET", JOB_PATH) not in handler.seen:  # polling
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.05)
    process.send_signal(stop)
    err = process.communicate(timeout=20)[1]
    assert process.returncode == 130 and err.splitlines()[-1] == "cancelled", err
    assert handler.seen[-1] == ("DELETE", JOB_PATH)
    assert ("could not cancel job job_1 on the server" in err) == (cancel == "drop"), err


@pytest.mark.parametrize("stops", [[signal.SIGINT], [signal.SIGTERM], [signal.SIGINT, signal.SIGINT]],
                         ids=["ctrl-c", "sigterm", "ctrl-c-twice"])
def test_a_stop_while_the_job_is_submitted_waits_for_its_id_to_cancel_it(stand_in, tmp_path, stops):
    """The server gives the job's id only in its answer to the submission; a second stop quits without it, and
    says that the job may run on."""
    url, handler = stand_in
    handler.polls, handler.held = ["running"], threading.Event()
    process = subprocess.Popen([sys.executable, "-m", "stable_audio_bento.client", "a bell", "--url", url, "--quiet",
                                "-o", str(tmp_path / "out.wav")], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while ("POST", "/v1/audio/jobs") not in handler.seen:  # the submission is waiting for its answer
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.05)
    seen = []
    for stop in stops:
        process.send_signal(stop)
        seen.append(process.stderr.readline())  # each stop is answered with a line
    handler.held.set()
    process.wait(20)
    # read(), not communicate(timeout=...): that reads the pipe itself, past the text readline() already buffered
    err = "".join(seen) + process.stderr.read()
    assert process.returncode == 130 and err.splitlines()[-1] == "cancelled", err
    assert "stopping once the server answers" in err, err
    if len(stops) == 1:
        assert handler.seen[-1] == ("DELETE", JOB_PATH), handler.seen
    else:
        assert "DELETE" not in [method for method, _ in handler.seen]
        assert "it cannot be cancelled" in err, err


@pytest.fixture
def dripping_server(request):
    """A server's URL that answers anything with a job's JSON, a byte every 0.2 s from ``request.param`` on ("status
    line" or "body"): each read gets a byte well within any socket timeout."""
    listener, stopped = socket.create_server(("127.0.0.1", 0)), threading.Event()
    listener.settimeout(0.2)  # accept() looks at ``stopped`` this often
    body = json.dumps(StandInServer.JOB).encode()
    head = f"HTTP/1.1 202 Accepted\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    at_once = head if request.param == "body" else b""

    def drip(connection: socket.socket) -> None:
        with connection, contextlib.suppress(ConnectionError):  # the client shuts it at its deadline
            connection.recv(65536)  # the request, or enough of it
            connection.sendall(at_once)
            for byte in (head + body)[len(at_once):]:
                if stopped.wait(0.2):
                    return
                connection.sendall(bytes([byte]))

    def serve() -> None:
        while not stopped.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=drip, args=(connection,), daemon=True).start()

    server = threading.Thread(target=serve)
    server.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stopped.set()
    server.join()
    listener.close()


@pytest.mark.parametrize("dripping_server", ["status line", "body"], indirect=True)
def test_a_server_that_drips_its_answer_cannot_hold_the_client_past_its_timeout(dripping_server, tmp_path, capsys,
                                                                                 monkeypatch):
    """Cut at --timeout; the submission's answer is lost, so the client asks once more for the job it may have made
    (to cancel it), which is bounded as the cancel is."""
    monkeypatch.setattr(client, "CANCEL_TIMEOUT_S", 1.0)
    started = time.monotonic()
    assert client.main(["a bell", "--url", dripping_server, "--timeout", "2", "--quiet",
                        "-o", str(tmp_path / "out.wav")]) == 1
    assert time.monotonic() - started < 2 + 1.0 + 1.5
    err = capsys.readouterr().err
    assert "POST /v1/audio/jobs: the server's answer did not arrive whole within 2.0 s" in err, err
    assert "could not learn whether the server made the job" in err, err


@pytest.mark.parametrize("output", ["missing-folder/out.wav", "."])
def test_an_output_the_client_cannot_write_is_refused_before_anything_is_generated(stand_in, tmp_path, output,
                                                                                   monkeypatch, capsys):
    url, handler = stand_in
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        client.main(["a bell", "--url", url, "-o", output])
    assert exit_.value.code == 2 and handler.seen == []
    assert f"cannot write {output}" in capsys.readouterr().err


@pytest.mark.parametrize("suffix, response_format", [(".ogg", "opus"), (".OPUS", "opus"), (".flac", "flac"),
                                                     ("", None)])
def test_the_output_suffix_picks_the_format(suffix, response_format):
    body = client.request_body(client.parse_args(["a bell", "-o", "out" + suffix]))
    assert body.get("response_format") == response_format


def test_a_format_that_contradicts_the_output_suffix_is_refused_before_anything_is_sent(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        client.parse_args(["a bell", "-o", str(tmp_path / "bell.mp3"), "--response-format", "wav"])
    assert exit_.value.code == 2 and "bell.mp3 names mp3 audio but --response-format asks for wav" in (
        capsys.readouterr().err)
    with pytest.raises(SystemExit) as exit_:  # a suffix no format is served as: WAV in a .m4a would be a broken file
        client.parse_args(["a bell", "-o", str(tmp_path / "bell.m4a")])
    assert exit_.value.code == 2 and "no format is served as .m4a" in capsys.readouterr().err
    agreeing = client.parse_args(["a bell", "-o", str(tmp_path / "bell.ogg"), "--response-format", "opus"])
    unknown_suffix = client.parse_args(["a bell", "-o", str(tmp_path / "bell.audio"), "--response-format", "wav"])
    assert client.request_body(agreeing)["response_format"] == "opus"
    assert client.request_body(unknown_suffix)["response_format"] == "wav"


@pytest.mark.parametrize("output, given, sent", [("out", "MP3", "mp3"), ("out", "ogg", "opus"),
                                                  ("out.ogg", "OGG", "opus"), ("out.opus", "ogg", "opus")])
def test_a_response_format_is_sent_as_the_server_names_it(output, given, sent):
    """The server takes lowercase names, and opus for ogg (as the client reads a .ogg suffix)."""
    body = client.request_body(client.parse_args(["a bell", "-o", output, "--response-format", given]))
    assert body["response_format"] == sent


def test_an_unknown_response_format_is_refused_before_anything_is_sent(capsys):
    with pytest.raises(SystemExit) as exit_:
        client.parse_args(["a bell", "--response-format", "m4a"])
    formats = "'m4a' is not a format the server writes: give wav, mp3, flac, pcm, opus (or ogg) or aac"
    assert exit_.value.code == 2 and formats in capsys.readouterr().err


def test_an_init_audio_that_cannot_be_read_is_refused_before_anything_is_sent(tmp_path, capsys):
    missing = tmp_path / "loop.wav"
    with pytest.raises(SystemExit) as exit_:
        client.parse_args(["a bell", "--init-audio", str(missing)])
    assert exit_.value.code == 2 and f"cannot read --init-audio {missing}: " in capsys.readouterr().err


def test_an_api_key_is_sent_without_surrounding_whitespace(stand_in, tmp_path, monkeypatch):
    """A key file read with $(cat) or an editor's final newline: the server strips its own key too."""
    url, handler = stand_in
    monkeypatch.setenv("STABLE_AUDIO_API_KEY", "sekrit\n")
    assert run_client(url, tmp_path) == 0
    assert run_client(url, tmp_path, "--api-key", " s3k-r1t ") == 0
    assert handler.authorizations == [b"Bearer sekrit", b"Bearer s3k-r1t"]


@pytest.mark.parametrize("key", ["sek rit", "sek\trit", "sek\nrit", "sek\x7frit", "sek\u2028rit", "sekrét"])
def test_an_api_key_no_server_can_have_is_refused_without_showing_it(key, capsys):
    """http.client refused it with the header, key included, in its message: a key in the logs."""
    with pytest.raises(SystemExit) as exit_:
        client.parse_args(["a bell", "--api-key", key])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "has a space, a control or a non-ASCII character inside" in err
    assert "sek" not in err


@pytest.mark.parametrize("timeout", ["inf", "nan", "0", "-5", "1e10"])
def test_a_timeout_no_timer_can_wait_is_refused_before_anything_is_sent(timeout, capsys):
    """A call's watchdog waits until --timeout: a timer past the platform's limit died in its thread, and the call
    then had no bound at all."""
    with pytest.raises(SystemExit) as exit_:
        client.parse_args(["a bell", "--timeout", timeout])
    assert exit_.value.code == 2 and "--timeout must be over 0 and at most 2.592e+06 s" in capsys.readouterr().err


def test_metrics_count_requests_batches_steps_and_audio(server):
    before = metric_samples(server)
    ok = httpx.post(server + "/v1/audio/generate", json={**BODY, "response_format": "mp3"}, timeout=120)
    bad = httpx.post(server + "/v1/audio/generate", json={"input": "x", "guidance_scale": -1, "response_format": "flac"})
    upload = io.BytesIO()
    soundfile.write(upload, np.zeros((4410, 2)), 44100, format="WAV")
    edit = httpx.post(server + "/v1/audio/edits", files={"audio": ("in.wav", upload.getvalue(), "audio/wav")},
                      data={"input": "x", "audio_length": "0.1", "num_inference_steps": "2", "response_format": "flac"},
                      timeout=120)
    assert (ok.status_code, bad.status_code, edit.status_code) == (200, 400, 200)
    after = metric_samples(server)
    engine_s = 0.0  # the two generations' prepare, denoise and decode, from their Server-Timing (ms)
    for response in (ok, edit):
        stages = server_timing_ms(response)
        engine_s += sum(stages[stage] for stage in ("prepare", "denoise", "decode")) / 1000

    def grew(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert grew('stable_audio_requests_total{endpoint="/v1/audio/generate",format="mp3",status="200"}') == 1
    assert grew('stable_audio_requests_total{endpoint="/v1/audio/generate",format="flac",status="400"}') == 1
    assert grew('stable_audio_requests_total{endpoint="/v1/audio/edits",format="flac",status="200"}') == 1
    assert grew("stable_audio_generated_audio_seconds_total") == pytest.approx(2.1)
    forwards = grew('stable_audio_engine_steps_total{worker="0"}')
    assert forwards >= 12 + 1  # one alone, then the other: an edit with its default strength takes at least one
    assert grew("stable_audio_batch_size_count") == grew("stable_audio_denoise_step_seconds_count") == forwards
    assert grew("stable_audio_batch_size_sum") == forwards  # one request per forward
    assert grew("stable_audio_generation_seconds_per_audio_second_count") == 2
    assert grew('stable_audio_engine_generations_total{outcome="ok",worker="0"}') == 2
    # The engine's step loop worked through both requests' encoding, steps and decoding, not their forwards alone.
    busy_s = grew('stable_audio_engine_busy_seconds_total{worker="0"}')
    assert 0.95 * engine_s <= busy_s and grew("stable_audio_denoise_step_seconds_sum") < busy_s
    assert after["stable_audio_pending_generations"] == 0


@pytest.mark.parametrize("position, shown", [(2, "queued, position 2"), (None, "queued")])
def test_the_progress_bar_names_a_queue_position_only_when_the_server_knows_it(capsys, position, shown):
    client.ProgressBar(True)({"status": "queued", "progress": None, "queue_position": position})
    assert capsys.readouterr().err.rstrip().endswith(f".] {shown}")  # no step counts before it starts
