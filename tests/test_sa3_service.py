"""Stable Audio 3 served end to end: `bentoml serve` with STABLE_AUDIO_MODEL=tiny-sa3 over HTTP, its audio equal to
the family run in-process from the same saved model, its limits and defaults taken from the model."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import soundfile

from stable_audio_bento.audio import encode_audio
from stable_audio_bento.generation import AudioRequest
from stable_audio_bento.local_server import local_server
from stable_audio_bento.sa3 import BatchedStableAudio3
from stable_audio_bento.sa3_loading import TINY_MAX_SECONDS, TINY_SA3, ensure_tiny_sa3_model, load_tiny_sa3
from stable_audio_bento.step_loop import run_to_completion

from conftest import ARTIFACTS

BODIES = [  # different latent lengths, guidance on and off, a negative prompt, the default and other step counts
    {"input": "a bell", "audio_length": 2.0, "seed": 3},
    {"input": "rain", "audio_length": 2.0, "seed": 4, "guidance_scale": 3.0, "negative_prompt": "wind"},
    {"input": "a dog", "audio_length": 3.3, "seed": 5, "num_inference_steps": 5},
    {"input": "a drum", "audio_length": 1.25, "seed": 6, "num_inference_steps": 12, "guidance_scale": 2.0},
]


@pytest.fixture(scope="module")
def sa3_server(model_cache):
    ensure_tiny_sa3_model()  # built here once, in the cache the server reads too
    with local_server({"STABLE_AUDIO_MODEL": TINY_SA3}, ARTIFACTS / "sa3-server.log", startup_timeout_s=180) as url:
        yield url


def post(url: str, body: dict) -> httpx.Response:
    return httpx.post(url + "/v1/audio/generate", json=body, timeout=300)


def test_health_and_models_describe_the_served_family(sa3_server):
    health = httpx.get(sa3_server + "/health").json()
    assert health.items() >= {"status": "ok", "ready": True, "model": TINY_SA3, "sample_rate": 44100,
                              "max_audio_length": TINY_MAX_SECONDS}.items()
    [model] = httpx.get(sa3_server + "/v1/models").json()["data"]
    assert model["id"] == TINY_SA3 and model["max_audio_length"] == TINY_MAX_SECONDS


def test_audio_equals_the_family_in_process_with_the_model_defaults(sa3_server):
    family = BatchedStableAudio3(load_tiny_sa3(), TINY_MAX_SECONDS)
    body = BODIES[0]
    response = post(sa3_server, body)
    assert response.status_code == 200, response.text
    audio, rate = soundfile.read(io.BytesIO(response.content), dtype="float32")
    assert (rate, audio.shape) == (44100, (88200, 2))
    # Defaults filled from the model: 8 steps, no guidance.
    [expected] = run_to_completion(family, [AudioRequest(body["input"], seed=body["seed"], audio_length=2.0,
                                                         guidance_scale=1.0, num_inference_steps=8)])
    assert response.content == encode_audio(expected.audio, 44100, "wav")
    assert np.abs(audio).max() > 0


def test_concurrent_requests_equal_their_sequential_results(sa3_server):
    with ThreadPoolExecutor(len(BODIES)) as pool:
        together = list(pool.map(lambda body: post(sa3_server, body), BODIES))
    for body, response in zip(BODIES, together):
        assert response.status_code == 200, response.text
        assert soundfile.info(io.BytesIO(response.content)).frames == int(body["audio_length"] * 44100)
        assert response.content == post(sa3_server, body).content, body
    assert max(int(r.headers["x-batch-size"]) for r in together) > 1


@pytest.mark.parametrize("body, param", [
    ({"input": "x", "audio_start": 1.0, "audio_length": 2.0}, "audio_start"),
    ({"input": "x", "audio_length": TINY_MAX_SECONDS + 1}, "audio_length"),
])
def test_stable_audio_3_limits_over_http(sa3_server, body, param):
    response = post(sa3_server, body)
    assert response.status_code == 400 and response.json()["error"]["param"] == param
