"""Fuzzing POST /v1/audio/generate and POST /v1/audio/edits against a real `bentoml serve` of the tiny model, and
Stable Audio 3's edits (audio-to-audio, inpainting, continuation) against one of tiny-sa3.

Generated bodies, content types and headers (hypothesis), plus explicit 413 / non-JSON checks. Every response must
be below 500; a 200 must be a decodable audio file of the requested duration; every rejection must be JSON in the
OpenAI error shape; a body that is valid except for one field must be rejected naming that field.

The server caps ``num_inference_steps`` at 4, so a body that is valid by accident is cheap: the default of 100
steps is already a 400. What stays expensive is the length (a 47.55 s clip takes ~5 s on 2 CPU cores with the tiny
model, whatever the step count), so generated bodies that might be valid get a short ``audio_length``
(`bound_cost`); the default-length path is covered by tests/test_service.py.
"""

from __future__ import annotations

import io
import json
import math
import operator
import urllib.parse
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from stable_audio_bento.local_server import local_server

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
ROUTE = "/v1/audio/generate"
MAX_STEPS = 4
SAMPLE_RATE = 44100
MAX_SAMPLES = 1024 * 2048
MAX_SECONDS = MAX_SAMPLES / SAMPLE_RATE
MAX_SEED = 2**64 - 1
MAX_PROMPT_CHARS = 10_000
MAX_BODY_BYTES = 1 << 20
FORMATS = ("wav", "flac", "mp3", "pcm")  # generated requests use these (decoded here without ffmpeg)
VALID_FORMATS = (*FORMATS, "opus", "aac")
MEDIA_TYPES = {"audio/wav": "wav", "audio/flac": "flac", "audio/mpeg": "mp3", "audio/pcm": "pcm"}
FIELDS = ("input", "audio_length", "audio_start", "negative_prompt", "guidance_scale", "num_inference_steps",
          "seed", "response_format", "model", "timeout", "trim_silence")
EDIT_ONLY_FIELDS = ("strength", "mask_start", "mask_end")  # /v1/audio/edits reads these: never an unknown key
SERVED_MODEL = "tiny"
CHEAP_SECONDS = 1.0  # the longest clip a generated body may ask for (~0.1-0.3 s per request)
TIMEOUT_S = 10  # a rejection takes milliseconds and a CHEAP_SECONDS clip well under a second: no answer is a bug

# Requests sent, per test; the last test asserts the file sent at least 1,000 generated ones.
REQUESTS: Counter[str] = Counter()
EXAMPLES = {"test_generated_objects": 350, "test_arbitrary_json_values": 150, "test_arbitrary_bytes": 150,
            "test_content_types_and_headers": 250, "test_body_with_one_invalid_field_names_it": 30 * len(FIELDS),
            "test_valid_bodies_return_audio_of_the_requested_length": 40, "test_other_methods": 40,
            "test_edit_forms_and_uploads": 150, "test_edit_with_one_invalid_field_names_it": 5 * (len(FIELDS) + 2),
            "test_valid_edits_return_audio_of_the_requested_length": 4, "test_stable_audio_3_edits": 60}

FUZZ = dict(deadline=None, database=None, print_blob=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                                   HealthCheck.large_base_example])


@pytest.fixture(scope="module")
def fuzz_server(model_cache) -> str:
    env = {"STABLE_AUDIO_MODEL": "tiny", "STABLE_AUDIO_MAX_STEPS": str(MAX_STEPS)}
    with local_server(env, ARTIFACTS / "fuzz-server.log", startup_timeout_s=180) as url:
        yield url


@pytest.fixture(scope="module")
def client(fuzz_server) -> httpx.Client:
    with httpx.Client(base_url=fuzz_server, timeout=TIMEOUT_S) as shared:
        yield shared


def test_a_maximum_below_the_models_default_steps_is_served_with_a_warning(client):
    """Every request without steps is a 400 on this server: said once at start, and by each 400."""
    assert ("the model's default of 100 steps is above STABLE_AUDIO_MAX_STEPS=4: a request must give "
            "num_inference_steps") in (ARTIFACTS / "fuzz-server.log").read_text()
    error = error_of(client.post(ROUTE, json={"input": "x", "audio_length": 0.5}))
    assert error["param"] == "num_inference_steps" and "the default of 100 is above that" in error["message"]


def send(client: httpx.Client, test: str, content=b"", headers: dict | None = None,
         method: str = "POST", route: str = ROUTE) -> httpx.Response:
    REQUESTS[test] += 1
    try:
        return client.request(method, route, content=content, headers=headers or {})
    except httpx.TimeoutException as exc:
        shown = content[:200] if isinstance(content, bytes) else "(streamed)"
        raise AssertionError(f"no response within {TIMEOUT_S} s to {method} {headers} {shown!r}") from exc


# --- what every response must satisfy --------------------------------------------------------------------------


def error_of(response: httpx.Response) -> dict:
    """The ``error`` object of a rejection, after checking the OpenAI shape."""
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:500])
    assert response.headers.get("content-type", "").startswith("application/json"), response.headers
    body = response.json()
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error, dict) and {"message", "type", "param", "code"} <= set(error), error
    assert isinstance(error["message"], str) and error["message"].strip(), error
    assert "Traceback" not in error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    assert error["param"] is None or isinstance(error["param"], str), error
    assert error["code"] is None or isinstance(error["code"], (str, int)), error
    return error


def as_number(value) -> float:
    """A field value as the server read it (JSON numbers, or the strings of a form)."""
    return float(value.strip() if isinstance(value, str) else value)


def expected_samples(fields: dict) -> int:
    start = as_number(fields.get("audio_start") or 0.0)
    length = fields.get("audio_length")
    length = MAX_SECONDS - start if length is None else as_number(length)
    return round(length * SAMPLE_RATE)


def check_audio(response: httpx.Response, fields) -> None:
    """A 200 is an audio file of the requested duration (stereo, 44.1 kHz)."""
    assert isinstance(fields, dict), f"200 for a body that is not an object of fields: {fields!r}"
    media_type = response.headers.get("content-type", "").split(";")[0].strip()
    assert media_type in MEDIA_TYPES, response.headers
    response_format = MEDIA_TYPES[media_type]
    assert fields.get("response_format", "wav") == response_format, (fields, media_type)
    if response_format == "pcm":
        assert len(response.content) % 4 == 0
        samples, rate = np.frombuffer(response.content, dtype="<i2").reshape(-1, 2), SAMPLE_RATE
    else:
        samples, rate = soundfile.read(io.BytesIO(response.content), dtype="float32", always_2d=True)
    assert rate == SAMPLE_RATE and samples.shape[1] == 2, (rate, samples.shape)
    expected = expected_samples(fields)
    returned = round(float(response.headers["x-audio-duration"]) * SAMPLE_RATE)  # what went into the encoder
    if trims_silence(fields):
        assert 0 < returned <= expected, (returned, expected, fields)
    else:
        assert returned == expected, (returned, expected, fields)
    if response_format == "mp3":  # the MP3 frame grid pads the end by less than one frame plus decoder delay
        assert abs(samples.shape[0] - returned) < 0.06 * SAMPLE_RATE, (samples.shape, returned, fields)
    else:
        assert samples.shape[0] == returned, (samples.shape, returned, fields)


def trims_silence(fields: dict) -> bool:
    """Whether an accepted request asked for trimming: JSON true, or a form's text that parses as it."""
    value = fields.get("trim_silence")
    return value is True or (isinstance(value, str) and value.strip() == "true")


def check_response(response: httpx.Response, fields=None) -> None:
    """status < 500; 200 => audio of the requested length; otherwise the OpenAI error shape."""
    timeout = fields.get("timeout") if isinstance(fields, dict) else None
    if response.status_code == 504 and isinstance(timeout, (int, float)) and timeout < TIMEOUT_S:
        assert response.json()["error"]["param"] == "timeout"  # a valid body with a tiny timeout of its own
        return
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if response.status_code == 200:
        check_audio(response, fields)
    else:
        error_of(response)


# --- values ---------------------------------------------------------------------------------------------------

EDGE_FLOATS = [0.0, -0.0, 1e308, -1e308, 5e-324, -5e-324, 1.0, 0.5 / SAMPLE_RATE, 1 / SAMPLE_RATE, 1e-6,
               MAX_SECONDS, math.nextafter(MAX_SECONDS, math.inf), 47.55, 47.6, 50.0, math.nextafter(50.0, math.inf),
               float("nan"), float("inf"), float("-inf"), 2.5, -1.0]
EDGE_INTS = [0, 1, MAX_STEPS, MAX_STEPS + 1, -1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, MAX_SEED, MAX_SEED + 1, -(2**63),
             -(2**64), 10**100]
EDGE_STRINGS = ["", " ", "\n\t", "\u3000", "\x00", "NaN", "nan", "Infinity", "-Infinity", "1e308", "1e999", "-0.0",
                "0", "5", "42", "1.5", "true", "null", "wav", "WAV", " wav", "mp3", "ogg", "tiny",
                "stabilityai/stable-audio-open-1.0", "\U0001f600" * 3, "\u202e\u0301\ufeff"]


def repeated(unit, times: int) -> st.SearchStrategy:
    """``unit * times``, built lazily so that hypothesis does not print it in every strategy's repr."""
    return st.builds(operator.mul, st.just(unit), st.just(times))


scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(), st.sampled_from(EDGE_INTS), st.builds(pow, st.just(10), st.just(4000)),  # 4,001 digits
    st.floats(), st.sampled_from(EDGE_FLOATS),
    st.text(max_size=40), st.sampled_from(EDGE_STRINGS), repeated("a", 10_001), repeated("\U0010ffff", 10_001),
    st.text(min_size=1, max_size=3).map(lambda s: s * 4000),  # long (and sometimes > 10,000 characters)
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=10), inner, max_size=5)),
    max_leaves=20,
)
# Values that are valid somewhere, so that bodies get past the type checks into the range and model checks.
plausible = {
    "input": st.one_of(st.text(max_size=60), st.sampled_from(["rain", "The sound of a dog barking"])),
    "audio_length": st.one_of(st.floats(0, 60), st.integers(-1, 60), st.sampled_from(EDGE_FLOATS)),
    "audio_start": st.one_of(st.floats(-1, 60), st.integers(-1, 60), st.sampled_from(EDGE_FLOATS)),
    "negative_prompt": st.one_of(st.none(), st.text(max_size=30)),
    "guidance_scale": st.one_of(st.floats(-5, 60), st.integers(-5, 60), st.sampled_from(EDGE_FLOATS)),
    "num_inference_steps": st.one_of(st.integers(-2, 8), st.sampled_from(EDGE_INTS)),
    "seed": st.one_of(st.none(), st.integers(-5, 2**65), st.sampled_from(EDGE_INTS)),
    "response_format": st.sampled_from([*FORMATS, "WAV", "ogg", ""]),
    "model": st.sampled_from([None, SERVED_MODEL, "other-model", ""]),
    "timeout": st.one_of(st.none(), st.floats(TIMEOUT_S, 86_400), st.sampled_from([0, -1.0, 86_401, 1e308])),
    "trim_silence": st.one_of(st.booleans(), st.sampled_from(["true", 0, 1, None])),
}
generated_objects = st.builds(
    lambda known, extra: {**extra, **known},
    st.fixed_dictionaries({}, optional={field: st.one_of(plausible[field], json_values) for field in FIELDS}),
    st.dictionaries(st.text(max_size=12).filter(lambda key: key not in FIELDS), json_values, max_size=4),
)


def _maybe_int(value) -> int | None:
    try:
        return int(as_number(value)) if not isinstance(value, (list, dict)) and value is not None else None
    except (TypeError, ValueError, OverflowError):
        return None


def bound_cost(fields: dict) -> dict:
    """A body whose step count may be valid asks for at most CHEAP_SECONDS of audio (a 47 s clip costs ~5 s)."""
    steps = _maybe_int(fields.get("num_inference_steps"))
    if steps is None or not 1 <= steps <= MAX_STEPS:
        return fields
    length = fields.get("audio_length")
    try:
        too_long = length is None or not as_number(length) <= CHEAP_SECONDS
    except (TypeError, ValueError, OverflowError):
        too_long = False
    if length is None:
        try:
            too_long = not as_number(fields.get("audio_start") or 0.0) >= MAX_SECONDS - CHEAP_SECONDS
        except (TypeError, ValueError, OverflowError):
            too_long = True
    return {**fields, "audio_length": CHEAP_SECONDS} if too_long else fields


def dumps(value, ascii: bool = False) -> bytes:
    """JSON as a permissive client writes it: NaN and Infinity literals, unicode escaped or raw UTF-8."""
    return json.dumps(value, ensure_ascii=ascii).encode("utf-8", "surrogatepass")


def form_encode(fields: dict) -> bytes:
    return urllib.parse.urlencode({k: v if isinstance(v, str) else json.dumps(v) for k, v in fields.items()},
                                  encoding="utf-8", errors="surrogatepass").encode()


BOUNDARY = "fuzzboundary7MA4YWxkTrZu0gW"


def multipart_encode(fields: dict) -> bytes:
    parts = [f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n'.encode()
             + (v if isinstance(v, str) else json.dumps(v)).encode("utf-8", "surrogatepass") + b"\r\n"
             for k, v in fields.items() if k.isidentifier()]
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


# --- the generated requests -----------------------------------------------------------------------------------


@settings(max_examples=EXAMPLES["test_generated_objects"], **FUZZ)
@given(body=generated_objects, ascii=st.booleans())
def test_generated_objects(client, body, ascii):
    """JSON objects from the API's fields (every JSON type, edge values, unknown fields, fields missing)."""
    body = bound_cost(body)
    response = send(client, "test_generated_objects", dumps(body, ascii), {"content-type": "application/json"})
    check_response(response, body)


@settings(max_examples=EXAMPLES["test_arbitrary_json_values"], **FUZZ)
@given(value=json_values.filter(lambda v: not isinstance(v, dict)))
def test_arbitrary_json_values(client, value):
    """A JSON value that is not an object (scalar, array) is a 400 with no field named."""
    response = send(client, "test_arbitrary_json_values", dumps(value), {"content-type": "application/json"})
    assert response.status_code == 400, (response.status_code, response.text[:500])
    assert error_of(response)["param"] is None


def _not_json(data: bytes) -> bool:
    try:
        json.loads(data)
    except (ValueError, RecursionError):
        return True
    return False


raw_bodies = st.one_of(
    st.binary(min_size=1, max_size=2000),
    st.text(min_size=1, max_size=200).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.text(min_size=1, max_size=100).map(lambda s: s.encode("utf-16")),
    st.builds(lambda d, cut: dumps(d)[:cut], generated_objects, st.integers(1, 40)),  # truncated JSON
    st.builds(lambda d, tail: dumps(d) + tail, generated_objects, st.binary(min_size=1, max_size=10)
              .filter(lambda b: b.strip())),  # trailing garbage
    st.builds(lambda d: b"\xef\xbb\xbf" + dumps(d), generated_objects),  # BOM
    st.builds(lambda d, junk: dumps(d).replace(b'"', b'"' + junk, 1), generated_objects,
              st.sampled_from([b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\x80"])),  # invalid UTF-8
    st.sampled_from([b"{", b"}", b"[", b"{'input': 'x'}", b'{"input": "x",}', b"{input: 1}", b"\x00",
                     b'{"input": "\\ud800"}', b'{"input": "x", "seed": 1e}', b'{"input": "x", "seed": 0x10}']),
    repeated(b"[", 100_000), repeated(b'{"a":', 50_000),  # deeper than any parser's limit
    st.builds(lambda digits: b'{"input": "x", "seed": 1' + b"0" * digits + b"}", st.integers(4300, 6000)),
).filter(_not_json)


@settings(max_examples=EXAMPLES["test_arbitrary_bytes"], **FUZZ)
@given(data=raw_bodies, content_type=st.sampled_from(["application/json", None]))
def test_arbitrary_bytes(client, data, content_type):
    """Bytes that are not JSON (garbage, invalid UTF-8, truncated, trailing junk) are a 400, no field named."""
    headers = {"content-type": content_type} if content_type else {}
    response = send(client, "test_arbitrary_bytes", data, headers)
    assert response.status_code == 400, (response.status_code, response.text[:500])
    assert error_of(response)["param"] is None


header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40).map(str.strip)
content_types = st.one_of(
    st.sampled_from(["application/json", "application/json; charset=utf-8", "application/json; charset=latin-1",
                     "text/plain", "text/json", "multipart/form-data", f"multipart/form-data; boundary={BOUNDARY}",
                     "multipart/form-data; boundary=", "multipart/mixed", "application/x-www-form-urlencoded",
                     "application/octet-stream", "audio/wav", "*/*", "", ";", "garbage", "application/json,text/plain",
                     "application/x-www-form-urlencoded; charset=utf-16"]),
    header_text,
)
odd_headers = st.fixed_dictionaries({}, optional={
    "content-encoding": st.sampled_from(["gzip", "deflate", "br", "identity", "zstd", "garbage"]),
    "accept": st.sampled_from(["audio/wav", "application/json", "*/*", "text/html", "audio/*;q=0.1", "", "garbage"]),
    "accept-encoding": st.sampled_from(["gzip", "identity;q=0", "*"]),
    "authorization": st.sampled_from(["Bearer nothing", "Basic Zm9vOmJhcg==", ""]),
    "x-request-id": header_text,
})


MATCHING = {"json": "application/json", "form": "application/x-www-form-urlencoded",
            "multipart": f"multipart/form-data; boundary={BOUNDARY}"}


@settings(max_examples=EXAMPLES["test_content_types_and_headers"], **FUZZ)
@given(body=st.one_of(generated_objects, json_values, raw_bodies),
       encoding=st.sampled_from(["json", "form", "multipart"]),
       content_type=st.one_of(st.just("matching"), st.none(), content_types), extra=odd_headers)
def test_content_types_and_headers(client, body, encoding, content_type, extra):
    """Any content type (or none), form and multipart encodings, odd headers: never a 5xx."""
    fields = None
    if isinstance(body, dict):
        fields = body = bound_cost(body)
    if isinstance(body, bytes):
        data = body
    elif encoding == "form" and isinstance(body, dict):
        data = form_encode(body)
    elif encoding == "multipart" and isinstance(body, dict):
        data = multipart_encode(body)
    else:
        data, encoding = dumps(body), "json"
    headers = dict(extra)
    if content_type == "matching":
        content_type = MATCHING[encoding]
    if content_type is not None:
        headers["content-type"] = content_type
    response = send(client, "test_content_types_and_headers", data, headers)
    assert response.status_code < 500, (response.status_code, response.text[:500], headers, data[:300])
    if response.status_code == 200:
        check_audio(response, fields)
    else:
        error_of(response)


# --- valid bodies, and valid bodies with exactly one field made invalid --------------------------------------------

prompts = st.text(max_size=80).filter(str.strip)


@st.composite
def valid_bodies(draw) -> dict:
    """A cheap valid request (<= CHEAP_SECONDS of audio, <= MAX_STEPS steps) with any subset of optional fields."""
    body = {"input": draw(prompts), "num_inference_steps": draw(st.integers(1, MAX_STEPS))}
    length = draw(st.one_of(st.floats(0.6 / SAMPLE_RATE, CHEAP_SECONDS), st.integers(1, 1),
                            st.sampled_from([1 / SAMPLE_RATE, 0.6 / SAMPLE_RATE, 0.1, CHEAP_SECONDS]), st.none()))
    latest = MAX_SECONDS - (CHEAP_SECONDS if length is None else length) - 1 / SAMPLE_RATE
    start = draw(st.one_of(st.none(), st.floats(0, latest), st.sampled_from([0, 0.0, -0.0, latest]),
                           st.integers(0, int(latest))))
    if length is None:  # the default runs to the end of the window: keep it short
        start = draw(st.floats(MAX_SECONDS - CHEAP_SECONDS, MAX_SECONDS - 1 / SAMPLE_RATE))
    if length is not None:
        body["audio_length"] = length
    if start is not None:
        body["audio_start"] = start
    optional = {
        "negative_prompt": st.one_of(st.none(), st.text(max_size=40)),
        "guidance_scale": st.one_of(st.floats(0, 50), st.integers(0, 50), st.sampled_from([0.0, 1.0, 50.0, 5e-324])),
        "seed": st.one_of(st.none(), st.integers(0, MAX_SEED), st.sampled_from([0, MAX_SEED, 2**63])),
        "response_format": st.sampled_from(FORMATS),
        "model": st.sampled_from([None, SERVED_MODEL]),
        "timeout": st.one_of(st.none(), st.floats(TIMEOUT_S, 86_400)),
        "trim_silence": st.booleans(),
    }
    for field, values in optional.items():
        if draw(st.booleans()):
            body[field] = draw(values)
    if draw(st.booleans()):
        unknown = st.text(max_size=12).filter(lambda key: key not in (*FIELDS, *EDIT_ONLY_FIELDS))
        body.update(draw(st.dictionaries(unknown, json_values, max_size=3)))
    return body


def wrong_types(*keep: type) -> st.SearchStrategy:
    """JSON values of every type but ``keep`` (bool is never an int or a float here: types are strict)."""
    def wrong(value) -> bool:
        if isinstance(value, bool):
            return bool not in keep
        return not isinstance(value, keep)
    return json_values.filter(wrong)


long_text = st.builds(lambda c, n: c * n, st.characters(exclude_categories=["Cs"]),
                      st.integers(MAX_PROMPT_CHARS + 1, MAX_PROMPT_CHARS + 50))
blank_text = st.text(st.sampled_from([chr(c) for c in range(0x3001) if chr(c).isspace()]), max_size=20)
non_finite = st.sampled_from([float("nan"), float("inf"), float("-inf")])
MISSING = object()
PAST_END = object()  # an audio_start that is in range but pushes the clip past the end of the window

INVALID = {
    "input": st.one_of(st.none(), blank_text, long_text, wrong_types(str), st.just(MISSING)),
    "audio_length": st.one_of(st.floats(max_value=0), st.integers(max_value=0), non_finite,
                              st.sampled_from([1e308, 4.1e303, 10**303 * 5, -1e308]),
                              st.floats(0, 0.49 / SAMPLE_RATE, exclude_min=True),  # less than one sample
                              st.floats(min_value=math.nextafter(MAX_SECONDS, math.inf), allow_infinity=False),
                              st.integers(48, 10**300), wrong_types(int, float, type(None))),
    "audio_start": st.one_of(st.just(PAST_END), st.floats(max_value=-1e-300), st.integers(max_value=-1), non_finite,
                             st.floats(min_value=MAX_SECONDS, allow_infinity=False), st.integers(48, 10**300),
                             st.none(), wrong_types(int, float)),
    "negative_prompt": st.one_of(long_text, wrong_types(str, type(None))),
    "guidance_scale": st.one_of(st.floats(max_value=-1e-300), st.floats(min_value=math.nextafter(50.0, math.inf)),
                                st.integers(max_value=-1), st.integers(min_value=51), non_finite,
                                wrong_types(int, float, type(None))),  # null: the model's default
    "num_inference_steps": st.one_of(st.integers(max_value=0), st.integers(min_value=MAX_STEPS + 1),
                                     st.none(),  # the default, 100, is over this server's cap
                                     st.sampled_from([1.0, 2.5, 1e0]), wrong_types(int)),
    "seed": st.one_of(st.integers(max_value=-1), st.integers(min_value=MAX_SEED + 1), st.sampled_from([1.0, 42.0]),
                      wrong_types(int, type(None))),
    "response_format": st.one_of(st.text(max_size=10).filter(lambda s: s not in VALID_FORMATS),
                                 st.sampled_from(["WAV", " wav", "wav ", "ogg", "audio/wav"]),
                                 st.none(), wrong_types(str)),
    "model": st.one_of(st.text(max_size=40).filter(lambda s: s != SERVED_MODEL),  # 404
                       st.sampled_from(["stabilityai/stable-audio-open-1.0", "TINY", " tiny"]),
                       wrong_types(str, type(None))),
    "timeout": st.one_of(st.floats(max_value=0), st.integers(max_value=0), non_finite,
                         st.floats(min_value=86_400, exclude_min=True, allow_infinity=False),
                         wrong_types(int, float, type(None))),
    "trim_silence": wrong_types(bool),  # null too: the field is a plain boolean
}


@st.composite
def with_one_invalid_field(draw, field: str, invalid: dict = INVALID) -> dict:
    """A valid body with ``field`` made invalid (or missing, for ``input``); the other fields stay valid."""
    body = draw(valid_bodies())
    value = draw(invalid[field])
    if field == "audio_start" and body.get("audio_length") is None:
        body["audio_length"] = 0.5  # a default length would run from an out-of-range start
    if value is PAST_END:
        length = round(body["audio_length"] * SAMPLE_RATE)
        first = MAX_SAMPLES - length + 1  # the first start sample that puts the end past the window
        sample = draw(st.integers(first, max(first, MAX_SAMPLES - 1)))
        value = sample / SAMPLE_RATE  # the server starts at int(value * rate), which can land a sample below:
        if int(value * SAMPLE_RATE) < sample:
            value = math.nextafter(value, math.inf)  # one float up cannot
    if value is MISSING:
        del body[field]
    else:
        body[field] = value
    return body


@pytest.mark.parametrize("field", FIELDS)
@settings(max_examples=EXAMPLES["test_body_with_one_invalid_field_names_it"] // len(FIELDS), **FUZZ)
@given(data=st.data())
def test_body_with_one_invalid_field_names_it(client, field, data):
    """A valid body with exactly one field made invalid: 400 (404 for an unknown model name) naming that field."""
    body = data.draw(with_one_invalid_field(field), label="body")
    response = send(client, "test_body_with_one_invalid_field_names_it", dumps(body),
                    {"content-type": "application/json"})
    error = error_of(response)
    expected_status = 404 if field == "model" and isinstance(body[field], str) else 400
    assert response.status_code == expected_status, (response.status_code, error, field)
    assert error["param"] == field, (error, field)
    assert field in error["message"], (error, field)


@settings(max_examples=EXAMPLES["test_valid_bodies_return_audio_of_the_requested_length"], **FUZZ)
@given(body=valid_bodies())
def test_valid_bodies_return_audio_of_the_requested_length(client, body):
    response = send(client, "test_valid_bodies_return_audio_of_the_requested_length", dumps(body),
                    {"content-type": "application/json"})
    assert response.status_code == 200, (response.status_code, response.text[:500], body)
    check_audio(response, body)
    if body.get("seed") is not None:
        assert response.headers["x-seed"] == str(body["seed"])


@settings(max_examples=EXAMPLES["test_other_methods"], **FUZZ)
@given(method=st.sampled_from(["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]),
       body=st.one_of(st.just(b""), raw_bodies, generated_objects.map(dumps)))
def test_other_methods(client, method, body):
    """Only POST is served on the route: the others are a 4xx (405) in the error shape."""
    response = send(client, "test_other_methods", body, {"content-type": "application/json"}, method=method)
    assert 400 <= response.status_code < 500, (method, response.status_code, response.text[:300])
    if method != "HEAD":
        error_of(response)


# --- POST /v1/audio/edits: multipart forms and uploads ------------------------------------------------------------

EDIT_ROUTE = "/v1/audio/edits"
EDIT_FIELDS = (*FIELDS, "strength")
EDIT_TIMEOUT_S = 120  # an accepted edit encodes its upload (plus 32 latent frames) with the tiny VAE: seconds


def upload_bytes(rate: int, channels: int, seconds: float, file_format: str = "WAV") -> bytes:
    t = np.arange(max(1, round(rate * seconds))) / rate
    audio = np.stack([0.4 * np.sin(2 * np.pi * (220 + 110 * c) * t) for c in range(channels)], axis=1)
    buffer = io.BytesIO()
    soundfile.write(buffer, audio, rate, format=file_format, subtype={"OGG": "VORBIS"}.get(file_format, "PCM_16"))
    return buffer.getvalue()


SMALL_WAV = upload_bytes(SAMPLE_RATE, 2, 0.1)
decodable = st.builds(upload_bytes, st.sampled_from([8000, 22050, 44100, 48000, 96000]), st.integers(1, 3),
                      st.floats(0.001, 0.3), st.sampled_from(["WAV", "FLAC", "OGG"]))
uploads = st.one_of(
    st.none(),  # no file part at all
    st.tuples(st.just("text"), st.one_of(st.text(max_size=40), st.sampled_from(["http://127.0.0.1:9/a.wav", "/etc/hostname"]))),
    st.tuples(st.just("file"), st.one_of(
        st.binary(max_size=3000), decodable,
        st.builds(lambda data, cut: data[:cut], decodable, st.integers(0, 200)),  # truncated
        st.builds(lambda data, at, junk: data[:at] + junk + data[at + len(junk):], decodable,  # corrupted
                  st.integers(0, 100), st.binary(min_size=1, max_size=40)),
        st.builds(lambda data, junk: data + junk, decodable, st.binary(min_size=1, max_size=100)),  # trailing junk
    )),
)
field_names = st.one_of(st.sampled_from(EDIT_FIELDS), st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E,
                                                                            exclude_characters='"\\'), max_size=12))
form_values = st.one_of(
    st.builds(json.dumps, st.one_of(*plausible.values(), json_values, st.floats(-1, 2))),  # as JSON text
    st.text(max_size=40), st.sampled_from(EDGE_STRINGS), st.sampled_from(["0.5", "1", "1.0", "0", "true", " 2 "]),
    repeated("[", 5000), st.builds(lambda digits: "1" + "0" * digits, st.integers(4300, 6000)),
)
def as_form(body: dict) -> dict:
    """A JSON body as form fields, each value as its JSON text (which the server reads back as that value)."""
    return {name: json.dumps(value) for name, value in body.items() if name.isidentifier() and name != "audio"}


form_fields = st.one_of(form_values, st.lists(form_values, min_size=2, max_size=3))  # a list: repeated parts
forms = st.one_of(
    st.dictionaries(field_names, form_fields, max_size=len(EDIT_FIELDS) + 3),
    # a valid form with a few fields replaced or added, to get past the first check
    st.builds(lambda body, changes: {**as_form(body), **changes}, valid_bodies(),
              st.dictionaries(field_names, form_fields, max_size=3)),
).filter(lambda form: "audio" not in form)


def send_edit(client: httpx.Client, test: str, form: dict, upload, file_fields: dict | None = None
              ) -> httpx.Response:
    """``upload``: None (no part), ("text", value) or ("file", bytes); ``file_fields``: other fields sent as file
    parts (bytes)."""
    REQUESTS[test] += 1
    data = dict(form)
    files = [(name, ("field.bin", content)) for name, content in (file_fields or {}).items()]
    if upload is not None and upload[0] == "text":
        data["audio"] = upload[1]
    elif upload is not None:
        files.append(("audio", ("upload.bin", upload[1], "application/octet-stream")))
    if not files:  # still multipart: a form of text parts only
        files = [(name, (None, value)) for name, value in data.items() if isinstance(value, str)] or [("_", (None, ""))]
        data = {name: value for name, value in data.items() if not isinstance(value, str)}
    try:
        return client.post(EDIT_ROUTE, data=data, files=files, timeout=EDIT_TIMEOUT_S)
    except httpx.TimeoutException as exc:
        raise AssertionError(f"no response within {EDIT_TIMEOUT_S} s to an edit with {form!r}") from exc


def read_form(form: dict) -> dict:
    """The values as the server reads them (BentoML): a repeated field's last part, as JSON where it parses."""
    read = {}
    for name, value in form.items():
        text = value[-1] if isinstance(value, list) else value
        try:
            read[name] = json.loads(text)
        except (ValueError, RecursionError):
            read[name] = text
    return read


def check_edit_response(response: httpx.Response, form: dict) -> None:
    """status < 500; 200 => audio of the requested length; every 4xx in the error shape naming a field."""
    assert response.status_code < 500, (response.status_code, response.text[:500], form)
    if response.status_code == 200:
        event("200")
        check_audio(response, read_form(form))
        return
    error = error_of(response)
    event(f"{response.status_code} {error['param']}")
    assert error["param"] in (*EDIT_FIELDS, "audio", *form), (error, form)  # unknown fields are read too
    if response.status_code == 504:  # a valid form that allowed itself less time than an edit takes
        assert error["param"] == "timeout" and read_form(form)["timeout"] < EDIT_TIMEOUT_S, (error, form)


def bound_edit_cost(form: dict) -> dict:
    """bound_cost for a form: a form that may be valid asks for at most CHEAP_SECONDS of audio."""
    read = read_form(form)
    bounded = bound_cost(read)
    return form if bounded is read else {**form, "audio_length": json.dumps(bounded["audio_length"])}


@settings(max_examples=EXAMPLES["test_edit_forms_and_uploads"], **FUZZ)
@given(form=forms, upload=uploads,
       file_fields=st.dictionaries(field_names.filter(lambda name: name != "audio"), st.binary(max_size=40), max_size=2))
def test_edit_forms_and_uploads(client, form, upload, file_fields):
    """Random form fields (known and unknown names, repeated parts, JSON and plain text values, file parts where
    text belongs) with no file, a text part, or random, truncated, corrupted or decodable file bytes: never a 5xx,
    every 4xx names a field."""
    form = bound_edit_cost({name: value for name, value in form.items() if name not in file_fields})
    response = send_edit(client, "test_edit_forms_and_uploads", form, upload, file_fields)
    check_edit_response(response, {**form, **{name: content.decode(errors="replace")
                                              for name, content in file_fields.items()}})


def least_strength(client: httpx.Client, steps: int) -> float:
    """The served model's least edit strength at this step count, from /v1/models."""
    [model] = client.get("/v1/models").json()["data"]
    return model["min_strength_per_step"] * (steps - 1)


BELOW_LEAST = object()  # a strength over 0 but under the least the body's step count allows

INVALID_EDIT = {
    **INVALID,
    # Not null: BentoML fills a form field that was not sent with None, so null means "not given" (the default).
    "strength": st.one_of(st.floats(max_value=0), st.floats(min_value=1, exclude_min=True), st.integers(max_value=0),
                          st.integers(min_value=2), non_finite, wrong_types(int, float, type(None)),
                          st.just(BELOW_LEAST)),
}
INVALID_UPLOADS = st.one_of(st.none(), st.tuples(st.just("text"), st.text(max_size=30)),
                            st.tuples(st.just("file"), st.one_of(st.just(b""), st.binary(min_size=1, max_size=500),
                                                                 st.just(upload_bytes(8000, 1, 48.0)))))


@pytest.mark.parametrize("field", (*EDIT_FIELDS, "audio"))
@settings(max_examples=EXAMPLES["test_edit_with_one_invalid_field_names_it"] // (len(EDIT_FIELDS) + 1), **FUZZ)
@given(data=st.data())
def test_edit_with_one_invalid_field_names_it(client, field, data):
    """A valid edit (each value sent as its JSON text) with one field, or the upload, made invalid."""
    if field == "audio":
        body, upload = data.draw(valid_bodies(), label="body"), data.draw(INVALID_UPLOADS, label="upload")
    else:
        body, upload = data.draw(with_one_invalid_field(field, INVALID_EDIT), label="body"), ("file", SMALL_WAV)
    if body.get("strength") is BELOW_LEAST:
        steps = body["num_inference_steps"] = data.draw(st.integers(2, MAX_STEPS), label="steps")
        least = least_strength(client, steps)
        body["strength"] = data.draw(st.floats(0, least, exclude_min=True, exclude_max=True), label="strength")
    form = as_form(body)
    response = send_edit(client, "test_edit_with_one_invalid_field_names_it", form, upload)
    error = error_of(response)
    expected_status = 404 if field == "model" and isinstance(body[field], str) else 400
    assert response.status_code == expected_status, (response.status_code, error, field)
    assert error["param"] == field and field in error["message"], (error, field)


@settings(max_examples=EXAMPLES["test_valid_edits_return_audio_of_the_requested_length"], **FUZZ)
@given(body=valid_bodies(), upload=decodable, data=st.data())
def test_valid_edits_return_audio_of_the_requested_length(client, body, upload, data):
    least = least_strength(client, body["num_inference_steps"])
    strength = data.draw(st.floats(least, 1, exclude_min=least == 0), label="strength")  # 0 is never valid
    if body.get("timeout") is not None:
        body["timeout"] = max(body["timeout"], EDIT_TIMEOUT_S)
    form = as_form({**body, "strength": strength})
    response = send_edit(client, "test_valid_edits_return_audio_of_the_requested_length", form, ("file", upload))
    assert response.status_code == 200, (response.status_code, response.text[:500], form)
    check_audio(response, read_form(form))


# --- POST /v1/audio/edits on Stable Audio 3: audio-to-audio, inpainting, continuation ------------------------

SA3_EDIT_FIELDS = ("strength", "mask_start", "mask_end", "audio_length")
SA3_CHEAP_SECONDS = 2.0  # the longest clip (or upload) a generated form asks for: well under a second each


@pytest.fixture(scope="module")
def sa3_client(sa3_server) -> httpx.Client:
    with httpx.Client(base_url=sa3_server, timeout=TIMEOUT_S) as shared:
        yield shared


def sa3_seconds(upload_seconds: float, least: float = -1.0) -> st.SearchStrategy:
    """Seconds from ``least`` up to a little past SA3_CHEAP_SECONDS, often where an SA3 edit's checks change their
    answer: 0, within the upload, its end, and one latent frame (2048 samples) or one sample either side of that."""
    frame, sample = 2048 / SAMPLE_RATE, 1 / SAMPLE_RATE
    edges = [0.0, -0.0, sample, frame, upload_seconds, upload_seconds - sample, upload_seconds + sample,
             upload_seconds - frame, upload_seconds + frame, SA3_CHEAP_SECONDS]
    return st.one_of(st.sampled_from([edge for edge in edges if edge >= least]),
                     st.floats(0, 1, exclude_min=True).map(lambda share: share * upload_seconds),
                     st.floats(max(least, -1.0), SA3_CHEAP_SECONDS)).filter(lambda seconds: seconds >= least)


@st.composite
def sa3_edits(draw) -> tuple[dict, bytes, float, int]:
    """(fields, upload, its seconds, its rate): an upload and the fields of audio-to-audio, of inpainting, or any
    mix of the edit fields, each unset, near an edge, or anywhere; the request fields stay valid and cheap."""
    rate = draw(st.sampled_from([22050, 44100, 48000]))
    upload_seconds = draw(st.one_of(st.floats(0.001, SA3_CHEAP_SECONDS), st.sampled_from([1.0, 1 / 1000])))
    upload = upload_bytes(rate, draw(st.integers(1, 2)), upload_seconds)
    fields = {"input": draw(prompts), "num_inference_steps": draw(st.integers(1, MAX_STEPS)),
              "seed": draw(st.integers(0, MAX_SEED)), "response_format": draw(st.sampled_from(FORMATS))}
    choices = {"audio_length": sa3_seconds(upload_seconds, least=5e-324),
               "mask_start": sa3_seconds(upload_seconds), "mask_end": sa3_seconds(upload_seconds),
               "strength": st.one_of(st.floats(0, 1), st.sampled_from([5e-324, 1e-9, 1.0]))}
    kinds = {"audio-to-audio": st.sets(st.sampled_from(["strength", "audio_length"])),
             "inpainting": st.sets(st.sampled_from(["mask_start", "mask_end", "audio_length"]), min_size=1),
             "any": st.sets(st.sampled_from(SA3_EDIT_FIELDS))}
    for name in draw(kinds[draw(st.sampled_from(list(kinds)))]):
        fields[name] = draw(choices[name])
    if draw(st.booleans()):
        fields["guidance_scale"] = draw(st.floats(0, 5))
    return fields, upload, upload_seconds, rate


@settings(max_examples=EXAMPLES["test_stable_audio_3_edits"], **FUZZ)
@given(edit=sa3_edits())
def test_stable_audio_3_edits(sa3_client, edit):
    """Audio-to-audio, inpainting and continuation forms with their fields at and around every edge: never a 5xx;
    a 200 is the requested length (by default the upload's, exactly when it needs no resampling); a 4xx names an
    edit field."""
    fields, upload, upload_seconds, upload_rate = edit
    form = as_form(fields)
    response = send_edit(sa3_client, "test_stable_audio_3_edits", form, ("file", upload))
    assert response.status_code < 500, (response.status_code, response.text[:500], fields)
    if response.status_code != 200:
        error = error_of(response)
        event(f"{response.status_code} {error['param']}")
        assert error["param"] in SA3_EDIT_FIELDS, (error, fields)
        return
    event("200 inpainting" if {"mask_start", "mask_end"} & set(fields) else "200 audio-to-audio")
    samples, rate = soundfile.read(io.BytesIO(response.content), dtype="float32", always_2d=True) \
        if fields["response_format"] != "pcm" else (np.frombuffer(response.content, "<i2").reshape(-1, 2), SAMPLE_RATE)
    assert rate == SAMPLE_RATE and samples.shape[1] == 2, (rate, samples.shape)
    returned = round(float(response.headers["x-audio-duration"]) * SAMPLE_RATE)
    if "audio_length" in fields:  # the pipeline's cut: int(seconds x rate)
        assert returned == int(fields["audio_length"] * SAMPLE_RATE), (returned, fields)
    elif upload_rate == SAMPLE_RATE:
        assert returned == max(1, round(upload_seconds * SAMPLE_RATE)), (returned, upload_seconds, fields)
    else:  # resampling may round the upload's length either way
        assert abs(returned - upload_seconds * SAMPLE_RATE) <= 1.5, (returned, upload_seconds, fields)
    if fields["response_format"] != "mp3":
        assert samples.shape[0] == returned, (samples.shape, returned)
    assert np.isfinite(samples).all()


# --- explicit checks ------------------------------------------------------------------------------------------

OVERSIZED = b'{"input": "' + b"x" * (3 * MAX_BODY_BYTES // 2) + b'"}'  # 1.5 MiB


@pytest.mark.parametrize("content_type", ["application/json", "multipart/form-data", "text/plain", None])
def test_oversized_body_is_a_413_with_content_length(client, content_type):
    headers = {"content-type": content_type} if content_type else {}
    response = send(client, "explicit", OVERSIZED, headers)
    assert response.status_code == 413
    assert "content-length" in {k.lower() for k in response.request.headers}
    assert error_of(response)["type"] == "invalid_request_error"


def test_oversized_chunked_body_is_a_413(client):
    def chunks():  # no Content-Length: the limit holds on what arrives
        for offset in range(0, len(OVERSIZED), 64 << 10):
            yield OVERSIZED[offset:offset + (64 << 10)]

    response = send(client, "explicit", chunks(), {"content-type": "application/json"})
    assert response.request.headers.get("transfer-encoding") == "chunked"
    assert "content-length" not in response.request.headers
    assert response.status_code == 413
    assert error_of(response)["type"] == "invalid_request_error"


@pytest.mark.parametrize("audio_length", [1e308, 4.1e303, 10**304])
def test_huge_audio_length_is_a_400(client, audio_length):
    """Found by test_body_with_one_invalid_field_names_it: audio_length x 44100 overflowed to inf and
    round(inf) raised OverflowError, a 500."""
    body = {"input": "x", "num_inference_steps": 1, "audio_length": audio_length}
    response = send(client, "explicit", dumps(body), {"content-type": "application/json"})
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["param"] == "audio_length" and "audio_length" in error["message"]


def test_body_at_the_limit_is_not_a_413(client):
    body = b'{"input": "x", "num_inference_steps": 0, "pad": "' + b"x" * MAX_BODY_BYTES + b'"}'
    body = body[: MAX_BODY_BYTES - 2] + b'"}'
    assert len(body) == MAX_BODY_BYTES
    response = send(client, "explicit", body, {"content-type": "application/json"})
    assert response.status_code == 400
    assert error_of(response)["param"] == "num_inference_steps"


JSON_ROUTES = [ROUTE, "/v1/audio/speech", "/v1/audio/jobs"]  # read by BentoML (the first) or by FastAPI
UTF16_BODY = "{\"input\": \"x\"}".encode("utf-16")  # FastAPI's json.loads alone would read it


@pytest.mark.parametrize("data", [b"not json at all", b'{"input": "x",', b"\xff\xfe\xfd", b'{"input": "\xff"}',
                                  b'{"input": "caf\xe9", "audio_length": 0.5}',
                                  UTF16_BODY, UTF16_BODY[2:], '{"input": "x"}'.encode("utf-32-le"),
                                  b'\xef\xbb\xbf{"input": "x"}', b"<xml/>", b"input=x",
                                  b'{"input": "x", "pad": ' + b"9" * 5000 + b"}"],
                         ids=["text", "truncated", "bytes", "bad-utf8", "latin-1", "utf16", "utf16-no-bom",
                              "utf32-no-bom", "utf8-bom", "xml", "form-like", "5000-digits"])
@pytest.mark.parametrize("content_type", ["application/json", "text/plain", None])
@pytest.mark.parametrize("route", JSON_ROUTES)
def test_non_json_is_a_400(client, data, content_type, route):
    headers = {"content-type": content_type} if content_type else {}
    response = send(client, "explicit", data, headers, route=route)
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["type"] == "invalid_request_error"
    assert error["param"] is None and "JSON" in error["message"]


@pytest.mark.parametrize("data", [b"[" * 1000, b"[" * 1000 + b"]" * 1000, b'{"a":' * 1000, b'{"input": ' + b"[" * 1000,
                                  b"[" * 100_000],
                         ids=["arrays", "closed-arrays", "objects", "in-a-field", "very-deep"])
@pytest.mark.parametrize("route", JSON_ROUTES)
def test_deeply_nested_json_is_a_400(client, data, route):
    """Nesting past any parser's recursion limit is rejected like any other bad body, and answered."""
    response = send(client, "explicit", data, {"content-type": "application/json"}, route=route)
    assert response.status_code == 400, response.text
    assert error_of(response)["param"] is None


@pytest.mark.parametrize("content_type", ["multipart/form-data", "multipart/form-data; boundary=zzz"])
@pytest.mark.parametrize("data", [b'{"input": "x"}', b"--zzz\r\n\r\nx\r\n--zzz--\r\n", b"garbage"])
def test_multipart_is_refused_with_415(client, data, content_type):
    response = send(client, "explicit", data, {"content-type": content_type})
    assert response.status_code == 415, (response.status_code, response.text)
    assert "application/json" in error_of(response)["message"]


@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "text/plain", None])
def test_json_is_read_as_json_whatever_the_content_type_says(client, content_type):
    """`curl -d '{...}'` without -H sends form-urlencoded; the body is still the API's JSON."""
    body = {"input": "x", "audio_length": 0.5, "num_inference_steps": 1, "seed": 3}
    response = send(client, "explicit", dumps(body), {"content-type": content_type} if content_type else {})
    check_response(response, body)
    assert response.status_code == 200
    form = send(client, "explicit", form_encode(body), {"content-type": "application/x-www-form-urlencoded"})
    assert form.status_code == 400 and error_of(form)["message"] == "request body is not valid JSON"


def test_request_count():
    """The file sends at least 1,000 generated requests (when it runs whole and its fuzz tests pass)."""
    short = {name: REQUESTS[name] for name, examples in EXAMPLES.items() if REQUESTS[name] < examples}
    if short:  # deselected, or stopped at a failing example (reported by that test)
        pytest.skip(f"fuzz tests that did not run all their examples: {short}")
    total = sum(REQUESTS.values())
    generated = total - REQUESTS["explicit"]
    print(f"\nfuzz requests: {total} ({generated} generated): {dict(REQUESTS)}")
    assert generated >= 1000, dict(REQUESTS)
