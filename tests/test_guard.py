"""API key and body-size limit, against a real server started with a key file."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import bentoml
import httpx
import pytest

from stable_audio_bento.local_server import local_server
from stable_audio_bento.metrics import RequestMetricsMiddleware
from stable_audio_bento.serving import GuardSettings, RequestGuardMiddleware, send_json

from conftest import metric_samples, own_bentoml_home

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
KEY = "s3cret-key-for-tests"
BODY = {"input": "a door creaking", "audio_length": 1.0, "num_inference_steps": 2, "seed": 3}


@pytest.fixture(scope="module")
def keyed_server(model_cache, tmp_path_factory) -> str:
    key_file = tmp_path_factory.mktemp("secrets") / "api-key"
    key_file.write_text(KEY + "\n")
    env = {"STABLE_AUDIO_MODEL": "tiny", "STABLE_AUDIO_API_KEY_FILE": str(key_file),
           "STABLE_AUDIO_PUBLIC_PATHS": "/health,/metrics", **own_bentoml_home(tmp_path_factory)}
    with local_server(env, ARTIFACTS / "server-keyed.log", startup_timeout_s=180) as url:
        yield url


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                                     {"Authorization": f"Bearer {KEY}x"}])
def test_missing_or_wrong_key_is_a_401_in_the_error_shape(keyed_server, headers):
    response = httpx.post(keyed_server + "/v1/audio/generate", json=BODY, headers=headers, timeout=60)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_api_key")  # OpenAI's answer


OVERSIZED = b'{"input": "' + b"x" * (1 << 20) + b'", "response_format": "mp3"}'


@pytest.mark.parametrize("status, body, headers", [
    (401, json.dumps(BODY).encode(), {}),
    (413, OVERSIZED, {"Authorization": f"Bearer {KEY}"}),  # one chunk or two: the format is never read
])
def test_a_refusal_before_the_body_is_parsed_is_counted_as_unread(keyed_server, status, body, headers):
    key = f'stable_audio_requests_total{{endpoint="/v1/audio/generate",format="unread",status="{status}"}}'

    before = metric_samples(keyed_server).get(key, 0.0)
    response = httpx.post(keyed_server + "/v1/audio/generate", content=body, headers=headers, timeout=60)
    assert response.status_code == status
    assert metric_samples(keyed_server).get(key, 0.0) == before + 1


@pytest.mark.parametrize("scheme", ["Bearer", "bearer"])
def test_right_key_generates_and_public_paths_stay_open(keyed_server, scheme):
    response = httpx.post(keyed_server + "/v1/audio/generate", json=BODY,
                          headers={"Authorization": f"{scheme} {KEY}"}, timeout=300)
    assert response.status_code == 200 and response.headers["content-type"] == "audio/wav"
    assert httpx.get(keyed_server + "/health").status_code == 200
    assert httpx.get(keyed_server + "/metrics").status_code == 200
    assert httpx.get(keyed_server + "/docs.json").status_code == 401


def test_bentoml_client_sends_the_key_as_a_bearer_token(keyed_server):
    with bentoml.SyncHTTPClient(keyed_server, token=KEY, timeout=300) as client:
        assert client.generate(**BODY).stat().st_size == 44 + 44100 * 2 * 2


def test_oversized_body_is_a_413(server):
    body = b'{"input": "' + b"x" * (1 << 20) + b'"}'
    response = httpx.post(server + "/v1/audio/generate", content=body, timeout=60,
                          headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert response.json()["error"]["type"] == "invalid_request_error"

    def chunks():  # no Content-Length: the limit still holds
        yield body[: 1 << 19]
        yield body[1 << 19 :]

    response = httpx.post(server + "/v1/audio/generate", content=chunks(), timeout=60,
                          headers={"content-type": "application/json"})
    assert response.status_code == 413


def test_command_line_client_sends_the_key(keyed_server, tmp_path):
    command = [sys.executable, "-m", "stable_audio_bento.client", "a door creaking", "--url", keyed_server,
               "--audio-length", "1", "--num-inference-steps", "2", "-o", str(tmp_path / "door.wav")]
    refused = subprocess.run(command, capture_output=True, text=True, timeout=300,
                             env={k: v for k, v in os.environ.items() if k != "STABLE_AUDIO_API_KEY"})
    assert refused.returncode == 1 and "401" in refused.stderr
    accepted = subprocess.run(command + ["--api-key", KEY], capture_output=True, text=True, timeout=300)
    assert accepted.returncode == 0, accepted.stderr
    assert (tmp_path / "door.wav").stat().st_size == 44 + 44100 * 2 * 2


@pytest.mark.parametrize(("content", "message"), [(None, "cannot read it"), ("", "first line is empty"),
                                                  ("\nkey-on-line-two\n", "first line is empty")])
def test_a_key_file_without_a_key_is_refused(tmp_path, monkeypatch, content, message):
    key_file = tmp_path / "api-key"
    if content is not None:
        key_file.write_text(content)
    monkeypatch.setenv("STABLE_AUDIO_API_KEY_FILE", str(key_file))
    with pytest.raises(ValueError, match=f"STABLE_AUDIO_API_KEY_FILE=.*{message}"):
        GuardSettings.from_env()


def test_an_api_key_from_a_secret_with_its_line_feed_is_stripped_and_an_unsendable_one_refused(tmp_path,
                                                                                               monkeypatch):
    """A Kubernetes Secret made from a file ends in a line feed: kept, no client could match the key (every request
    401, nothing said at start)."""
    monkeypatch.setenv("STABLE_AUDIO_API_KEY", "s3cret-key\n")
    assert GuardSettings.from_env().api_key == "s3cret-key"
    for unsendable, why in ((" \n", "only whitespace"), ("s3cret key", "a space, a control or a non-ASCII"),
                            ("s3crét", "a space, a control or a non-ASCII")):
        monkeypatch.setenv("STABLE_AUDIO_API_KEY", unsendable)
        with pytest.raises(ValueError, match=f"^STABLE_AUDIO_API_KEY: the key (has|is) {why}") as refused:
            GuardSettings.from_env()
        assert "s3cr" not in str(refused.value)  # a log line is no place for the key
    monkeypatch.delenv("STABLE_AUDIO_API_KEY")
    (key_file := tmp_path / "api-key").write_text("s3cret\tkey\n")
    monkeypatch.setenv("STABLE_AUDIO_API_KEY_FILE", str(key_file))
    with pytest.raises(ValueError, match="STABLE_AUDIO_API_KEY_FILE=.*a space, a control"):
        GuardSettings.from_env()


def test_body_limits_must_be_whole_numbers(monkeypatch):
    monkeypatch.setenv("STABLE_AUDIO_MAX_BODY_BYTES", "1MB")
    with pytest.raises(ValueError, match="STABLE_AUDIO_MAX_BODY_BYTES='1MB'"):
        GuardSettings.from_env()


def test_the_front_middlewares_let_an_upload_go_once_the_service_has_read_it():
    """An upload is up to 128 MiB and a generation takes minutes: once the service has read the body, neither the
    request metrics nor the guard keep a copy of it. The format label is the form's last response_format part,
    the one BentoML reads."""
    import prometheus_client

    def part(headers: bytes, value: bytes) -> bytes:
        return b"--fence\r\nContent-Disposition: form-data; " + headers + b"\r\n\r\n" + value + b"\r\n"

    upload = 32 << 20
    form = (part(b'name="audio"; filename="in.wav"\r\nContent-Type: audio/wav', b"\1" * upload)
            + part(b'name="response_format"', b"mp3") + part(b'name="response_format"', b"flac") + b"--fence--\r\n")
    chunk = 1 << 20
    size, chunks = len(form), [form[at:at + chunk] for at in range(0, len(form), chunk)]
    del form
    held_while_generating = []

    async def service(scope, receive, send):
        message = await receive()
        assert len(message["body"]) == size
        del message  # the service has parsed it and let it go
        gc.collect()
        held_while_generating.append(tracemalloc.get_traced_memory()[0])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def arriving():
        if chunks:
            return {"type": "http.request", "body": chunks.pop(0), "more_body": bool(chunks)}
        await asyncio.Event().wait()  # the client stays connected

    sent = []

    async def recorded(message):
        sent.append(message)

    counted = {"endpoint": "/v1/audio/edits", "status": "200", "format": "flac"}
    before = prometheus_client.REGISTRY.get_sample_value("stable_audio_requests_total", counted) or 0.0
    scope = {"type": "http", "method": "POST", "path": "/v1/audio/edits", "query_string": b"",
             "headers": [(b"content-type", b"multipart/form-data; boundary=fence")]}
    stack = RequestMetricsMiddleware(RequestGuardMiddleware(service, GuardSettings()))
    tracemalloc.start()
    try:
        asyncio.run(stack(scope, arriving, recorded))
    finally:
        tracemalloc.stop()
    assert sent[0]["status"] == 200
    assert held_while_generating[0] < upload // 8, held_while_generating
    assert prometheus_client.REGISTRY.get_sample_value("stable_audio_requests_total", counted) == before + 1


def test_control_characters_a_client_sent_are_escaped_in_the_log_lines_of_its_request():
    """BentoML's access line prints the path (unquoted: %0a is a line feed) and the Content-Type as sent: escape
    sequences must not reach a terminal, nor a line feed start a forged line."""
    from stable_audio_bento import serving

    record = logging.LogRecord("bentoml.access", logging.INFO, __file__, 1, "path=%s,type=%s",
                               ("/v1/models\n2026-12-07 [ERROR] forged", "text/x\x1b[2J\x1b[31mEVIL\r"), None)
    token = serving._current_request.set(serving.RequestContext("ticket-1"))
    try:
        assert serving.RequestIdLogFilter().filter(record)
    finally:
        serving._current_request.reset(token)
    assert record.getMessage() == ("path=/v1/models\\x0a2026-12-07 [ERROR] forged,"
                                   "type=text/x\\x1b[2J\\x1b[31mEVIL\\x0d [request_id=ticket-1]")


def test_a_stalled_body_gets_408_and_uploads_past_the_cap_get_429_before_their_body_is_read():
    """A client that stops sending (or trickles) would hold its body's memory for as long as it keeps the
    connection; uploads are held up to 128 MiB each, so only so many are received at once."""
    reached = []

    async def service(scope, receive, send):
        reached.append(scope["path"])
        await send_json(send, 200, {})

    async def stalled():  # one chunk of an upload, then nothing: the client keeps the connection open
        yield {"type": "http.request", "body": b"--fence\r\n", "more_body": True}
        await asyncio.Event().wait()

    def answer_of(guard, path="/v1/audio/edits"):
        sent, chunks = [], stalled()

        async def recorded(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": path, "query_string": b"", "headers": []}
        return guard(scope, chunks.__anext__, recorded), sent

    async def scenario():
        guard = RequestGuardMiddleware(service, GuardSettings(body_timeout_s=0.5, max_uploads=1))
        (first, first_sent), (second, second_sent) = answer_of(guard), answer_of(guard)
        receiving = asyncio.ensure_future(first)
        await asyncio.sleep(0.1)
        await second  # refused at once: the one upload allowed is being received
        await receiving  # its body never completes
        later, later_sent = answer_of(guard, "/v1/audio/generate")
        await later
        return first_sent, second_sent, later_sent

    first, second, later = asyncio.run(scenario())
    assert first[0]["status"] == 408 and json.loads(first[1]["body"])["error"]["param"] == "audio"
    assert "not received whole within 0.5 s (9 bytes came)" in json.loads(first[1]["body"])["error"]["message"]
    assert second[0]["status"] == 429 and (b"retry-after", b"5") in second[0]["headers"]
    assert json.loads(second[1]["body"])["error"]["code"] == "server_busy"
    assert later[0]["status"] == 408 and reached == []  # a JSON body has the same deadline; nothing reached the service


def run_through_the_front(scope_path: str, chunks: list[bytes], settings: GuardSettings, pause_s: float = 0.0,
                          content_type: bytes = b"multipart/form-data; boundary=fence", then_leave: bool = False,
                          while_serving=lambda: None, method: str = "POST",
                          extra_headers: list[tuple[bytes, bytes]] = ()) -> tuple[list[dict], list]:
    """Sends ``chunks`` (``pause_s`` apart) through the request metrics and the guard to a service that answers
    200, the client staying connected or, ``then_leave``, going away; returns what was sent back and what reached
    the service; ``while_serving`` is called in the service, once it has read the body."""
    reached = []

    async def service(scope, receive, send):
        reached.append((await receive())["body"])
        while_serving()
        await send_json(send, 200, {})

    pending = list(chunks)

    async def arriving():
        if pending:
            await asyncio.sleep(pause_s)
            return {"type": "http.request", "body": pending.pop(0), "more_body": bool(pending) or then_leave}
        if then_leave:
            return {"type": "http.disconnect"}
        await asyncio.Event().wait()  # the client stays connected

    sent = []

    async def recorded(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": scope_path, "query_string": b"",
             "headers": [(b"content-type", content_type), *extra_headers]}
    asyncio.run(RequestMetricsMiddleware(RequestGuardMiddleware(service, settings))(scope, arriving, recorded))
    return sent, reached


def test_a_form_crafted_to_be_searched_is_read_once_by_a_parser():
    """A body repeating a part header used to cost the front's event loop time quadratic in its size: 2.5 minutes
    for 1 MiB, every other request on that process waiting. The guard's parser reads the form once, and the metrics
    take the format from it."""
    import prometheus_client

    crafted = b'name="response_format"\r\n' * ((2 << 20) // 24)  # 2 MiB of the header a search looks for
    form = (b'--fence\r\nContent-Disposition: form-data; name="audio"; filename="in.wav"\r\n\r\n' + crafted
            + b'\r\n--fence\r\nContent-Disposition: form-data; name="response_format"\r\n\r\nmp3\r\n--fence--\r\n')
    counted = {"endpoint": "/v1/audio/edits", "status": "200", "format": "mp3"}
    before = prometheus_client.REGISTRY.get_sample_value("stable_audio_requests_total", counted) or 0.0
    started = time.perf_counter()
    sent, reached = run_through_the_front("/v1/audio/edits", [form], GuardSettings())
    assert time.perf_counter() - started < 5  # a parser takes a fraction of a second
    assert sent[0]["status"] == 200 and reached == [form]
    assert prometheus_client.REGISTRY.get_sample_value("stable_audio_requests_total", counted) == before + 1


def test_a_body_trickling_below_the_minimum_rate_gets_408_and_a_steady_one_arrives(monkeypatch):
    """Each byte buys 1 / body_min_rate seconds past a grace period: a client sending a few bytes at a time
    cannot hold one of the few upload slots for the whole body deadline."""
    from stable_audio_bento import serving

    monkeypatch.setattr(serving, "BODY_GRACE_S", 0.3)
    settings = GuardSettings(body_timeout_s=30, body_min_rate=2000)
    started = time.perf_counter()
    sent, reached = run_through_the_front("/v1/audio/edits", [b"x" * 10] * 100, settings, pause_s=0.05)  # 200 B/s
    assert time.perf_counter() - started < 3 and reached == []
    error = json.loads(sent[1]["body"])["error"]
    assert sent[0]["status"] == 408 and error["param"] == "audio"
    assert "arrived slower than 2000 bytes/s" in error["message"]
    sent, reached = run_through_the_front("/v1/audio/generate", [b"{" + b" " * 498, b"}"],
                                          settings, pause_s=0.2, content_type=b"application/json")
    assert sent[0]["status"] == 200 and reached == [b"{" + b" " * 498 + b"}"]  # 500 bytes in 0.4 s: in time


@pytest.mark.parametrize("path", ["/v1/audio/edits", "/v1/audio/generate"])
def test_a_client_that_leaves_mid_body_is_counted_as_499(path):
    import prometheus_client

    counted = {"endpoint": path, "status": "499", "format": "unread"}
    before = prometheus_client.REGISTRY.get_sample_value("stable_audio_requests_total", counted) or 0.0
    sent, reached = run_through_the_front(path, [b"--fence\r\n"], GuardSettings(), then_leave=True)
    assert sent == [] and reached == []
    assert prometheus_client.REGISTRY.get_sample_value("stable_audio_requests_total", counted) == before + 1


def test_of_an_upload_form_the_front_keeps_only_the_format_for_the_request():
    """Each text part is parsed as JSON (BentoML's reading) to check it can be; a form of JSON arrays takes about
    eight times its size parsed, and must not be held for the generation's minutes."""
    import prometheus_client

    def part(name: bytes, value: bytes) -> bytes:
        return b"--fence\r\nContent-Disposition: form-data; name=\"" + name + b"\"\r\n\r\n" + value + b"\r\n"

    array = b"[" + b"1.5," * 50_000 + b"1.5]"  # 200 kB of text, about 1.6 MB parsed; 5 of them: under 1 MiB
    form = (b'--fence\r\nContent-Disposition: form-data; name="audio"; filename="in.wav"\r\n\r\nRIFF\r\n'
            + b"".join(part(b"junk%d" % index, array) for index in range(5)) + part(b"response_format", b'"mp3"')
            + b"--fence--\r\n")
    held = []

    def measure():
        gc.collect()
        held.append(tracemalloc.get_traced_memory()[0])

    counted = {"endpoint": "/v1/audio/edits", "status": "200", "format": "mp3"}
    before = prometheus_client.REGISTRY.get_sample_value("stable_audio_requests_total", counted) or 0.0
    tracemalloc.start()
    try:
        sent, reached = run_through_the_front("/v1/audio/edits", [form], GuardSettings(), while_serving=measure)
    finally:
        tracemalloc.stop()
    assert sent[0]["status"] == 200 and len(reached[0]) == len(form)
    assert held[0] < 4 * len(form), (held, len(form))  # the 1 MB body, once or twice; not 8 MB of parsed arrays
    assert prometheus_client.REGISTRY.get_sample_value("stable_audio_requests_total", counted) == before + 1


@pytest.mark.parametrize("extra_part, message, param", [
    (b'name="seed"; filename="seed.txt"\r\n\r\n42', "seed: only audio is a file; send this field as text", "seed"),
    (b'name="input"\r\n\r\n' + b"x" * ((1 << 20) + 1),
     "input: the form's fields other than audio come to 1048577 bytes, over the 1048576", "input"),
    (b''.join(b'name="x%d"\r\n\r\n1\r\n--fence\r\nContent-Disposition: form-data; ' % n for n in range(64))
     + b'name="x"\r\n\r\n1', "Too many fields", None),
    (b'name="notes"\r\n\r\n' + b"[" * 100_000 + b"]" * 100_000, "notes: nested too deeply", "notes"),
])
def test_an_upload_form_that_is_costly_or_unsafe_to_read_is_refused_naming_its_field(extra_part, message, param):
    """Read as BentoML reads a form, every value goes through the JSON parser on the event loop, and a file part in
    any field is taken whole: only audio may be a file, text parts are kept to what an edit's fields need."""
    form = (b'--fence\r\nContent-Disposition: form-data; name="audio"; filename="in.wav"\r\n\r\nRIFF\r\n'
            b"--fence\r\nContent-Disposition: form-data; " + extra_part + b"\r\n--fence--\r\n")
    sent, reached = run_through_the_front("/v1/audio/edits", [form], GuardSettings())
    error = json.loads(sent[1]["body"])["error"]
    assert sent[0]["status"] == (413 if param == "input" else 400) and reached == []
    assert error["param"] == param and message in error["message"], error


@pytest.mark.parametrize("path", ["/v1/audio/generate", "/v1/audio/edits"])
def test_a_request_with_two_content_types_is_a_400(path):
    """The guard's checks would read the last Content-Type and the service the first: a form sent as JSON (with
    none of the form's bounds) or JSON sent as a form (with the upload's body limit)."""
    form = b'--fence\r\nContent-Disposition: form-data; name="input"\r\n\r\nrain\r\n--fence--\r\n'
    sent, reached = run_through_the_front(path, [form], GuardSettings(),
                                          extra_headers=[(b"content-type", b"application/json")])
    error = json.loads(sent[1]["body"])["error"]
    assert sent[0]["status"] == 400 and reached == [] and "send one Content-Type header" in error["message"]


@pytest.mark.parametrize("first_part", [b'name="audio"\r\n\r\nhttp://127.0.0.1:8091/ui',
                                        b'name="audio"; filename="' + b"x" * 300 + b'.wav"\r\n\r\nRIFF'],
                         ids=["text-url", "unkeepable-name"])
def test_an_upload_with_two_audio_parts_is_a_400_naming_audio(first_part):
    """BentoML reads every audio part (text as a URL to fetch from this server's network, a name it cannot keep as
    a 500) and keeps the first; the checks above would have read only the last, a valid file."""
    form = (b"--fence\r\nContent-Disposition: form-data; " + first_part + b"\r\n--fence\r\nContent-Disposition: "
            b'form-data; name="audio"; filename="in.wav"\r\n\r\nRIFF\r\n--fence--\r\n')
    sent, reached = run_through_the_front("/v1/audio/edits", [form], GuardSettings())
    error = json.loads(sent[1]["body"])["error"]
    assert sent[0]["status"] == 400 and reached == [] and error["param"] == "audio", error
    assert "send one audio part" in error["message"]


@pytest.mark.parametrize("file_name", ["音" * 82 + ".wav", "x" * 300 + ".wav", "in\x00.wav"],
                         ids=["250-bytes-utf8", "304-bytes", "nul"])
def test_an_upload_whose_file_name_cannot_be_kept_is_a_400_naming_audio(file_name):
    """BentoML keeps the upload in a temporary file named after it: past 244 bytes (or with a NUL) that file
    cannot be made, and it answered 500."""
    form = (b'--fence\r\nContent-Disposition: form-data; name="audio"; filename="' + file_name.encode()
            + b'"\r\n\r\nRIFF\r\n--fence--\r\n')
    sent, reached = run_through_the_front("/v1/audio/edits", [form], GuardSettings())
    error = json.loads(sent[1]["body"])["error"]
    assert sent[0]["status"] == 400 and reached == [] and error["param"] == "audio", error
    assert "rename the file" in error["message"]


def test_an_upload_with_a_long_but_usable_file_name_goes_through():
    form = (b'--fence\r\nContent-Disposition: form-data; name="audio"; filename="' + ("音" * 60).encode()
            + b'.wav"\r\n\r\nRIFF\r\n--fence--\r\n')  # 184 bytes
    sent, reached = run_through_the_front("/v1/audio/edits", [form], GuardSettings())
    assert sent[0]["status"] == 200 and len(reached) == 1



def test_a_response_its_client_stops_reading_is_dropped_once_a_chunk_waits_past_the_send_timeout(monkeypatch, caplog):
    """The admission slot is free once the audio is made: a client that never reads would keep its response (tens of
    MB, or a file and its descriptor) for as long as it keeps the connection, and could ask for another meanwhile."""
    from stable_audio_bento import serving

    monkeypatch.setattr(serving, "SEND_TIMEOUT_S", 0.2)
    chunks_sent = []

    async def service(scope, receive, send):
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for _ in range(100):
            await send({"type": "http.response.body", "body": b"\0" * 65536, "more_body": True})
            chunks_sent.append(1)

    async def stalled_connection(message):  # the start and one chunk fit in the buffers, then nothing is read
        if message["type"] == "http.response.body" and chunks_sent:
            await asyncio.Event().wait()

    bodies = [{"type": "http.request", "body": b"{}", "more_body": False}]

    async def arriving():
        if bodies:
            return bodies.pop()
        await asyncio.Event().wait()  # the client stays connected

    scope = {"type": "http", "method": "POST", "path": "/v1/audio/speech", "query_string": b"",
             "headers": [(b"content-type", b"application/json")]}
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, "stable_audio_bento.serving"):
        asyncio.run(asyncio.wait_for(RequestGuardMiddleware(service, GuardSettings())(scope, arriving,
                                                                                     stalled_connection), 10))
    assert time.monotonic() - started < 2 and len(chunks_sent) == 1
    assert "the client took nothing of its response for 0.2 s: the response is dropped" in caplog.text

    # uvicorn's own ERROR line for the unfinished response is left out for such a request, and only for it, in
    # whichever order the filters sit on a handler (the request id's filter rewrites the message)
    def logged(dropped: bool, id_first: bool) -> bool:
        record = logging.LogRecord("uvicorn.error", logging.ERROR, __file__, 1, serving.INCOMPLETE_RESPONSE, (), None)
        filters = [serving.DroppedResponseLogFilter(), serving.RequestIdLogFilter()]
        token = serving._current_request.set(serving.RequestContext("ticket-1", response_dropped=dropped))
        try:
            return all(log_filter.filter(record) for log_filter in (filters[::-1] if id_first else filters))
        finally:
            serving._current_request.reset(token)

    for id_first in (False, True):
        assert not logged(dropped=True, id_first=id_first) and logged(dropped=False, id_first=id_first)


@pytest.mark.parametrize(("method", "fetch_site", "status"), [
    ("POST", b"cross-site", 403), ("DELETE", b"cross-site", 403), ("POST", b"same-origin", 200),
    ("POST", b"none", 200), ("POST", None, 200), ("GET", b"cross-site", 200)])
def test_a_request_a_browser_sent_from_another_site_that_would_change_something_is_refused(method, fetch_site, status):
    """A page on any site can make a visitor's browser POST to a keyless server on their machine or network (a form,
    a no-cors fetch with a text/plain body, which is read as JSON): it would spend that server's GPU. Browsers say
    where a request comes from (Sec-Fetch-Site); the playground's requests are same-origin, a typed URL's none, and
    programs send nothing."""
    sent, reached = run_through_the_front("/v1/audio/jobs", [b'{"input": "rain"}'], GuardSettings(),
                                          content_type=b"text/plain", method=method,
                                          extra_headers=[(b"sec-fetch-site", fetch_site)] if fetch_site else [])
    assert sent[0]["status"] == status and len(reached) == (status == 200)
    if status == 403:
        assert json.loads(sent[1]["body"])["error"]["code"] == "cross_site_request"
