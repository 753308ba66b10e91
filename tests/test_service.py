"""End to end: `bentoml serve` with the tiny model, driven over HTTP like the existing clients do."""

from __future__ import annotations

import io
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import bentoml
import httpx
import numpy as np
import pytest
import soundfile

from conftest import server_timing_ms

MAX_SECONDS = 1024 * 2048 / 44100
MEDIA_TYPES = {"wav": "audio/wav", "mp3": "audio/mpeg", "flac": "audio/flac", "pcm": "audio/pcm"}

# The request bodies of API.md, verbatim.
CLIENT_BODIES = [
    {"input": "The sound audience clapping and cheering in a stadium"},
    {"input": "The sound of a dog barking", "audio_length": 5.0},
    {"input": "A piano playing a gentle melody", "audio_length": 10.0, "negative_prompt": "Low quality, distorted, noisy"},
    {"input": "Thunder and rain sounds", "audio_length": 15.0, "negative_prompt": "Low quality", "guidance_scale": 7.0,
     "num_inference_steps": 100, "seed": 42},
    {"input": "Ocean waves crashing on a beach", "audio_length": 8.0, "num_inference_steps": 50},
    {"input": "Guitar playing", "audio_length": 10.0, "audio_start": 0.0, "negative_prompt": "Low quality",
     "guidance_scale": 7.0, "num_inference_steps": 100, "response_format": "mp3"},
    {"input": "...", "num_inference_steps": 150, "guidance_scale": 8.0},
]


def post(url: str, body, **kwargs) -> httpx.Response:
    if isinstance(body, (dict, list)):
        return httpx.post(url + "/v1/audio/generate", json=body, timeout=300, **kwargs)
    return httpx.post(url + "/v1/audio/generate", content=body, timeout=300, **kwargs)


def decode(response: httpx.Response, response_format: str = "wav") -> tuple[np.ndarray, int]:
    """(samples, channels) array and sample rate of a response body."""
    if response_format == "pcm":
        return np.frombuffer(response.content, dtype="<i2").reshape(-1, 2), 44100
    return soundfile.read(io.BytesIO(response.content), dtype="float32")


def test_health(server):
    response = httpx.get(server + "/health")
    assert response.status_code == 200
    assert response.json()["model"] == "tiny"
    assert response.json()["max_audio_length"] == pytest.approx(MAX_SECONDS)


@pytest.mark.parametrize("body", CLIENT_BODIES, ids=[b["input"][:24] for b in CLIENT_BODIES])
def test_existing_client_bodies_return_audio_of_the_requested_duration(server, body):
    response = post(server, body)
    assert response.status_code == 200, response.text
    response_format = body.get("response_format", "wav")
    assert response.headers["content-type"] == MEDIA_TYPES[response_format]
    samples, rate = decode(response, response_format)
    expected = round(body.get("audio_length", MAX_SECONDS) * 44100)
    assert rate == 44100 and samples.shape[1] == 2
    if response_format == "mp3":  # the MP3 frame grid pads the end by less than one frame plus decoder delay
        assert abs(samples.shape[0] - expected) < 0.06 * 44100
    else:
        assert samples.shape[0] == expected
    assert np.abs(samples).max() > 0
    if "seed" in body:
        assert response.headers["x-seed"] == str(body["seed"])


@pytest.mark.parametrize("response_format", ["wav", "flac", "pcm", "mp3"])
def test_every_format_over_http(server, response_format):
    body = {"input": "a bell", "audio_length": 1.5, "num_inference_steps": 2, "seed": 1,
            "response_format": response_format}
    response = post(server, body)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == MEDIA_TYPES[response_format]
    samples, rate = decode(response, response_format)
    assert rate == 44100 and samples.shape[1] == 2
    assert abs(samples.shape[0] - round(1.5 * 44100)) < (0.06 * 44100 if response_format == "mp3" else 1)


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(server):
    body = {"input": "Thunder and rain sounds", "audio_length": 3.0, "num_inference_steps": 4, "seed": 1234}
    first, second = post(server, body), post(server, body)
    other = post(server, {**body, "seed": 1235})
    assert first.status_code == second.status_code == other.status_code == 200
    assert first.content == second.content
    assert first.content != other.content


def test_seedless_requests_report_the_seed_that_reproduces_them(server):
    body = {"input": "wind chimes", "audio_length": 1.0, "num_inference_steps": 2}
    random_one = post(server, body)
    replay = post(server, {**body, "seed": int(random_one.headers["x-seed"])})
    assert random_one.content == replay.content


BAD_REQUESTS = [
    ({"input": ""}, "input"),
    ({"input": "   \n"}, "input"),
    ({}, "input"),
    ({"input": 42}, "input"),
    ({"input": "x", "audio_length": 0}, "audio_length"),
    ({"input": "x", "audio_length": -3.0}, "audio_length"),
    ({"input": "x", "audio_length": 47.6}, "audio_length"),
    ({"input": "x", "audio_length": "ten"}, "audio_length"),
    ({"input": "x", "audio_start": -1.0}, "audio_start"),
    ({"input": "x", "audio_start": 40.0, "audio_length": 10.0}, "audio_start"),
    ({"input": "x", "num_inference_steps": 0}, "num_inference_steps"),
    ({"input": "x", "num_inference_steps": 100000}, "num_inference_steps"),
    ({"input": "x", "num_inference_steps": 2.5}, "num_inference_steps"),
    ({"input": "x", "guidance_scale": -1}, "guidance_scale"),
    ({"input": "x", "guidance_scale": 1000}, "guidance_scale"),
    ({"input": "x", "seed": -1}, "seed"),
    ({"input": "x", "seed": 2**64}, "seed"),
    ({"input": "x", "seed": "42"}, "seed"),
    ({"input": "x", "seed": True}, "seed"),
    ({"input": "x", "response_format": "ogg"}, "response_format"),
    ({"input": "x", "negative_prompt": ["a", "b"]}, "negative_prompt"),
    (b'{"input": "x", "audio_length": NaN}', "audio_length"),
    (b'{"input": "x", "guidance_scale": Infinity}', "guidance_scale"),
    (b'{"input": "x", "audio_length": 1e999}', "audio_length"),
    (b"not json at all", None),
    (b'{"input": "x",', None),
    (b"[1, 2]", None),
]


@pytest.mark.parametrize("body, param", BAD_REQUESTS, ids=[str(b)[:40] for b, _ in BAD_REQUESTS])
def test_bad_input_is_a_400_naming_the_field(server, body, param):
    response = post(server, body, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["message"] and "Traceback" not in error["message"] and len(response.content) < 1000
    if param:
        assert param in error["message"]


@pytest.mark.parametrize("route", ["/v1/audio/generate", "/v1/audio/speech", "/v1/audio/jobs"])
def test_an_empty_body_names_input_on_every_route(server, route):
    response = httpx.post(server + route, content=b"", headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "input" and "input" in response.json()["error"]["message"]


def test_a_method_a_route_does_not_take_is_a_405_with_a_readable_message(server):
    response = httpx.put(server + "/v1/audio/jobs/job_x")
    assert response.status_code == 405
    assert response.json()["error"]["message"] == "Method Not Allowed"


def test_unknown_model_is_a_404(server):
    response = post(server, {"input": "x", "model": "stabilityai/stable-audio-open-2.0"})
    assert response.status_code == 404
    error = response.json()["error"]  # OpenAI's answer to an unknown model, field for field
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "model_not_found", "model")


CONCURRENT_BODIES = [
    {"input": f"sound number {i}", "audio_length": 2.0 + i % 3, "audio_start": float(i % 2),
     "num_inference_steps": 3 + i % 4, "seed": 100 + i, "guidance_scale": [7.0, 1.0, 3.5][i % 3],
     "negative_prompt": "noise" if i % 2 else None}
    for i in range(8)
]


def test_concurrent_requests_are_batched_and_equal_their_sequential_results(server):
    with ThreadPoolExecutor(len(CONCURRENT_BODIES)) as pool:
        concurrent = list(pool.map(lambda body: post(server, body), CONCURRENT_BODIES))
    assert all(r.status_code == 200 for r in concurrent), [r.text for r in concurrent if r.status_code != 200]
    batch_sizes = [int(r.headers["x-batch-size"]) for r in concurrent]
    assert max(batch_sizes) > 1, batch_sizes
    for body, together in zip(CONCURRENT_BODIES, concurrent):
        alone = post(server, body)
        assert alone.headers["x-batch-size"] == "1"
        assert together.content == alone.content, body


def test_bentoml_python_client(server, tmp_path):
    with bentoml.SyncHTTPClient(server, timeout=300) as client:
        path = client.generate(input="The sound of a dog barking", audio_length=2.0, num_inference_steps=3, seed=42,
                               response_format="flac")
        samples, rate = soundfile.read(path)
        assert (rate, samples.shape) == (44100, (88200, 2))
        with pytest.raises(bentoml.exceptions.InvalidArgument, match="audio_length"):
            client.generate(input="x", audio_length=100.0)


def test_command_line_client(server, tmp_path):
    output = tmp_path / "rain.flac"
    command = [sys.executable, "-m", "stable_audio_bento.client", "Thunder and rain sounds", "--url", server,
               "--audio-length", "1.5", "--num-inference-steps", "3", "--seed", "42",
               "--negative-prompt", "Low quality", "-o", str(output)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    info = soundfile.info(output)
    assert (info.format, info.samplerate, info.channels, info.frames) == ("FLAC", 44100, 2, 66150)

    refused = subprocess.run(command[:-2] + ["--guidance-scale", "-2", "-o", str(tmp_path / "x.wav")],
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1 and "guidance_scale" in refused.stderr


def test_server_timing_reports_each_stage_in_milliseconds(server):
    started = time.perf_counter()
    response = post(server, {"input": "a gong", "audio_length": 1.0, "num_inference_steps": 2, "seed": 5})
    elapsed_ms = 1000 * (time.perf_counter() - started)
    stages = server_timing_ms(response)
    assert {"queue", "prepare", "denoise", "decode", "encode"} <= set(stages)
    assert all(ms >= 0 for ms in stages.values()) and stages["denoise"] > 0
    assert 10 < sum(stages.values()) <= elapsed_ms  # a text encoding, two steps and a decode take over 10 ms


JOINERS = [  # sent one after another while a long generation runs: steps, lengths, guidance and prompts all differ
    {"input": "a click", "audio_length": 1.0, "num_inference_steps": 3, "seed": 11},
    {"input": "a bell", "audio_length": 4.0, "audio_start": 2.0, "num_inference_steps": 5, "seed": 12,
     "negative_prompt": "noise"},
    {"input": "wind", "audio_length": 2.5, "num_inference_steps": 4, "seed": 13, "guidance_scale": 1.0},
    {"input": "a snare drum", "audio_length": 1.5, "num_inference_steps": 6, "seed": 14, "guidance_scale": 3.0,
     "response_format": "flac"},
]


def test_requests_join_a_running_generation_at_a_step_and_keep_their_solo_audio(server):
    """Continuous batching: short requests sent while a long one denoises are admitted at its next step, finish
    long before it, and sound exactly as they do alone."""
    long_body = {"input": "a long drone", "num_inference_steps": 200, "seed": 10}
    finished_at = {}

    def timed_post(name, body, delay):
        time.sleep(delay)
        response = post(server, body)
        finished_at[name] = time.monotonic()
        return response

    with ThreadPoolExecutor(1 + len(JOINERS)) as pool:
        long_call = pool.submit(timed_post, "long", long_body, 0.0)
        joiner_calls = [pool.submit(timed_post, i, body, 1.5 + 0.4 * i) for i, body in enumerate(JOINERS)]
        joined = [call.result() for call in joiner_calls]
        long_response = long_call.result()
    assert long_response.status_code == 200 and int(long_response.headers["x-batch-size"]) >= 2
    for i, (body, response) in enumerate(zip(JOINERS, joined)):
        assert response.status_code == 200, response.text
        assert finished_at[i] < finished_at["long"], body  # did not wait for the long generation to end
        assert int(response.headers["x-batch-size"]) >= 2, body  # it really shared steps
        alone = post(server, body)
        assert alone.headers["x-batch-size"] == "1" and response.content == alone.content, body
    assert long_response.content == post(server, long_body).content
