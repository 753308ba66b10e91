"""Stable Audio 3 served end to end: `bentoml serve` with STABLE_AUDIO_MODEL=tiny-sa3 over HTTP, its audio equal to
the family run in-process from the same saved model, its limits and defaults taken from the model; its edits
(audio-to-audio, inpainting, continuation) on /v1/audio/edits, its jobs route and the CLI."""

from __future__ import annotations

import io
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import soundfile

from stable_audio_bento.audio import encode_audio
from stable_audio_bento.generation import AudioRequest
from stable_audio_bento.sa3 import BatchedStableAudio3
from stable_audio_bento.sa3_loading import TINY_MAX_SECONDS, TINY_SA3, load_tiny_sa3
from stable_audio_bento.step_loop import run_to_completion

BODIES = [  # different latent lengths, guidance on and off, a negative prompt, the default and other step counts
    {"input": "a bell", "audio_length": 2.0, "seed": 3},
    {"input": "rain", "audio_length": 2.0, "seed": 4, "guidance_scale": 3.0, "negative_prompt": "wind"},
    {"input": "a dog", "audio_length": 3.3, "seed": 5, "num_inference_steps": 5},
    {"input": "a drum", "audio_length": 1.25, "seed": 6, "num_inference_steps": 12, "guidance_scale": 2.0},
]


@pytest.fixture(scope="module")
def family():
    return BatchedStableAudio3(load_tiny_sa3(), TINY_MAX_SECONDS)


def post(url: str, body: dict) -> httpx.Response:
    return httpx.post(url + "/v1/audio/generate", json=body, timeout=300)


def test_health_and_models_describe_the_served_family(sa3_server):
    health = httpx.get(sa3_server + "/health").json()
    assert health.items() >= {"status": "ok", "ready": True, "model": TINY_SA3, "model_tag": None,
                              "sample_rate": 44100, "max_audio_length": TINY_MAX_SECONDS}.items()
    [model] = httpx.get(sa3_server + "/v1/models").json()["data"]
    assert model["id"] == TINY_SA3 and model["max_audio_length"] == TINY_MAX_SECONDS
    assert (model["default_inference_steps"], model["default_guidance_scale"], model["fixed_start"],
            model["edits"], model["inpainting"], model["min_strength_per_step"]) == (8, 1.0, True, True, True, 0.0)


def test_audio_equals_the_family_in_process_with_the_model_defaults(sa3_server, family):
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


# --- edits ------------------------------------------------------------------------------------------------------

def upload_wav(seconds: float) -> tuple[bytes, np.ndarray]:
    """A float WAV at 44.1 kHz (read back exactly, not resampled) and the (2, samples) array the engine gets."""
    t = np.arange(round(seconds * 44100)) / 44100
    audio = np.stack([0.4 * np.sin(2 * np.pi * 220 * t), 0.3 * np.sin(2 * np.pi * 330 * t)]).astype(np.float32)
    buffer = io.BytesIO()
    soundfile.write(buffer, audio.T, 44100, format="WAV", subtype="FLOAT")
    return buffer.getvalue(), audio


def post_edit(url: str, fields: dict, seconds: float = 1.5, route: str = "/v1/audio/edits") -> httpx.Response:
    files = {"audio": ("loop.wav", upload_wav(seconds)[0], "audio/wav")}
    return httpx.post(url + route, data=fields, files=files, timeout=300)


EDITS = {  # form fields → the engine request they must produce (the upload is 1.5 s)
    "variation, as long as the upload by default": (
        {"input": "a cello", "seed": "3", "strength": "0.6", "num_inference_steps": "3"},
        dict(audio_length=1.5, strength=0.6, num_inference_steps=3)),
    "inpainting": (
        {"input": "a cello", "seed": "4", "mask_start": "0.4", "mask_end": "1.1", "num_inference_steps": "2"},
        dict(audio_length=1.5, mask_start=0.4, mask_end=1.1, num_inference_steps=2)),
    "continuation, mask_end the end by default": (
        {"input": "a cello", "seed": "5", "mask_start": "1.5", "audio_length": "2.5"},
        dict(audio_length=2.5, mask_start=1.5, mask_end=2.5, num_inference_steps=8)),
}


def test_edits_equal_the_family_in_process(sa3_server, family):
    with ThreadPoolExecutor(len(EDITS)) as pool:  # together, so they share the step loop
        responses = list(pool.map(lambda case: post_edit(sa3_server, case[0]), EDITS.values()))
    audio = upload_wav(1.5)[1]
    for (name, (fields, expected)), response in zip(EDITS.items(), responses):
        assert response.status_code == 200, (name, response.text)
        request = AudioRequest(fields["input"], seed=int(fields["seed"]), guidance_scale=1.0, init_audio=audio,
                               **expected)
        [alone] = run_to_completion(family, [request])
        assert response.content == encode_audio(alone.audio, 44100, "wav"), name
        assert soundfile.info(io.BytesIO(response.content)).frames == int(expected["audio_length"] * 44100)


def test_the_default_length_is_the_uploads_to_the_sample(sa3_server):
    """44 109 samples: 44109 / 44100 s cuts back to 44 108 samples with the pipeline's int()."""
    assert int(44109 / 44100 * 44100) == 44108
    fields = {"input": "a cello", "seed": "3", "num_inference_steps": "1"}
    for length in (44109 / 44100, 44100 / 44100):
        response = post_edit(sa3_server, fields, seconds=length)
        assert response.status_code == 200, response.text
        assert soundfile.info(io.BytesIO(response.content)).frames == round(length * 44100)


def test_continuation_through_the_cli_and_the_jobs_route(sa3_server, tmp_path):
    loop = tmp_path / "loop.wav"
    loop.write_bytes(upload_wav(1.5)[0])
    fields = {"input": "a cello", "seed": "6", "mask_start": "1.5", "audio_length": "2.0", "num_inference_steps": "2"}
    command = [sys.executable, "-m", "stable_audio_bento.client", "a cello", "--url", sa3_server, "--init-audio",
               str(loop), "--mask-start", "1.5", "--audio-length", "2.0", "--num-inference-steps", "2", "--seed", "6",
               "-o", str(tmp_path / "more.wav")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "2/2 steps" in done.stderr
    assert (tmp_path / "more.wav").read_bytes() == post_edit(sa3_server, fields).content
    refused = subprocess.run(command[:4] + ["--mask-end", "1.0"], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "--mask-end needs --init-audio" in refused.stderr


EDIT_ERRORS = {  # the upload is 1.5 s
    "mask_end past audio_length": ({"mask_start": "0.2", "mask_end": "2", "audio_length": "1.5"}, "mask_end"),
    "mask_start not before mask_end": ({"mask_start": "1.0", "mask_end": "1.0"}, "mask_start"),
    "mask_start at audio_length": ({"mask_start": "1.5", "audio_length": "1.5"}, "mask_start"),
    "mask_start negative": ({"mask_start": "-0.5"}, "mask_start"),
    "mask_end not a number": ({"mask_end": "soon"}, "mask_end"),
    "mask_start NaN": ({"mask_start": "NaN"}, "mask_start"),
    "strength with a mask": ({"mask_start": "0.5", "strength": "0.5"}, "strength"),
    "a gap after the upload": ({"mask_start": "2.0", "audio_length": "3.0"}, "mask_start"),
    "kept audio past the upload": ({"mask_start": "0.5", "mask_end": "1.0", "audio_length": "3.0"}, "mask_end"),
}


@pytest.mark.parametrize("case", EDIT_ERRORS)
def test_bad_sa3_edits_are_400_naming_the_field(sa3_server, case):
    fields, param = EDIT_ERRORS[case]
    for route in ("/v1/audio/edits", "/v1/audio/edits/jobs"):
        response = post_edit(sa3_server, {"input": "a cello", **fields}, route=route)
        assert response.status_code == 400, (route, response.text)
        error = response.json()["error"]
        assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"], route
