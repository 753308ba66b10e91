"""trim_silence: where the cut lands on known audio, that untouched audio stays bit-identical, the response's
X-Audio-Duration, and the field over HTTP on every route that generates."""

from __future__ import annotations

import io
import time

import httpx
import numpy as np
import pytest
import soundfile

from stable_audio_bento.client import parse_args, request_body
from stable_audio_bento.gateway import Delivery, deliver
from stable_audio_bento.silence import CHUNK_MS, MIN_KEPT_S, SILENCE_THRESHOLD_DBFS, trim_trailing_silence

RATE = 44100
TOLERANCE = RATE * CHUNK_MS // 1000  # 10 ms of samples


def tone(seconds: float, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(round(seconds * RATE)) / RATE
    return np.stack([amplitude * np.sin(2 * np.pi * 440 * t), amplitude * np.sin(2 * np.pi * 660 * t + 1)]
                    ).astype(np.float32)


def followed_by(clip: np.ndarray, tail: np.ndarray) -> np.ndarray:
    return np.concatenate([clip, tail], axis=1)


def noise(seconds: float, dbfs: float) -> np.ndarray:
    """White noise whose RMS over both channels is ``dbfs``."""
    samples = np.random.default_rng(3).standard_normal((2, round(seconds * RATE)))
    return (samples * 10 ** (dbfs / 20)).astype(np.float32)


@pytest.mark.parametrize("clip_s, silence_s", [(1.2345, 3.0), (0.61, 0.0071), (3.0, 44.55), (2.0001, 0.02)])
def test_clip_followed_by_digital_silence_is_cut_within_10_ms_of_its_end(clip_s, silence_s):
    clip = tone(clip_s)
    audio = followed_by(clip, np.zeros((2, round(silence_s * RATE)), np.float32))
    trimmed = trim_trailing_silence(audio, RATE)
    end = clip.shape[1]
    assert end <= trimmed.shape[1] <= end + TOLERANCE, (trimmed.shape, end)
    assert np.array_equal(trimmed, audio[:, : trimmed.shape[1]])  # a cut, nothing else changed


@pytest.mark.parametrize("audio", [tone(2.5), noise(1.0, -30.0), tone(0.2), followed_by(tone(1.0), noise(0.5, -40))],
                         ids=["tone", "noise", "shorter-than-min-kept", "quiet-but-above-threshold-tail"])
def test_audio_without_trailing_silence_is_unchanged(audio):
    trimmed = trim_trailing_silence(audio, RATE)
    assert trimmed.dtype == audio.dtype and trimmed.shape == audio.shape
    assert np.array_equal(trimmed, audio)  # bit-identical samples


def test_the_threshold_decides_what_is_silent():
    clip = tone(1.0)
    below = followed_by(clip, noise(2.0, SILENCE_THRESHOLD_DBFS - 6))
    above = followed_by(clip, noise(2.0, SILENCE_THRESHOLD_DBFS + 6))
    assert trim_trailing_silence(below, RATE).shape[1] <= clip.shape[1] + TOLERANCE
    assert trim_trailing_silence(above, RATE).shape[1] == above.shape[1]


def test_quiet_audio_keeps_the_minimum_length():
    audio = followed_by(tone(0.1, amplitude=1e-4), np.zeros((2, 3 * RATE), np.float32))
    assert trim_trailing_silence(audio, RATE).shape[1] == round(MIN_KEPT_S * RATE)


@pytest.mark.parametrize("response_format", ["wav", "flac", "pcm"])
def test_delivery_trims_before_encoding_and_reports_the_seconds_encoded(response_format):
    clip = tone(1.5)
    audio = followed_by(clip, np.zeros((2, 2 * RATE), np.float32))
    untouched, seconds = deliver(audio, RATE, Delivery(response_format))
    trimmed, trimmed_seconds = deliver(audio, RATE, Delivery(response_format, trim_silence=True))
    assert seconds == audio.shape[1] / RATE
    assert clip.shape[1] / RATE <= trimmed_seconds <= clip.shape[1] / RATE + CHUNK_MS / 1000
    for data, expected in ((untouched, seconds), (trimmed, trimmed_seconds)):
        if response_format == "pcm":
            frames = len(data) // 4
        else:
            frames = soundfile.info(io.BytesIO(data)).frames
        assert frames == round(expected * RATE)


def test_command_line_flag():
    assert request_body(parse_args(["rain", "--trim-silence"]))["trim_silence"] is True
    assert "trim_silence" not in request_body(parse_args(["rain"]))


# --- over HTTP (the tiny model: its noise has no silent end, so trimming keeps it whole) -----------------------

BODY = {"input": "a door closing", "audio_length": 0.75, "num_inference_steps": 2, "seed": 11}


def decoded_frames(response: httpx.Response) -> int:
    assert response.status_code == 200, response.text
    return soundfile.info(io.BytesIO(response.content)).frames


def header_seconds(response: httpx.Response) -> float:
    return float(response.headers["x-audio-duration"])


@pytest.mark.parametrize("trim", [None, False, True])
def test_generate_reports_the_duration_it_returns(server, trim):
    body = BODY if trim is None else {**BODY, "trim_silence": trim}
    response = httpx.post(server + "/v1/audio/generate", json=body, timeout=120)
    frames = decoded_frames(response)
    assert header_seconds(response) == pytest.approx(frames / RATE, abs=1e-6)
    if trim:
        assert frames <= round(BODY["audio_length"] * RATE)
    else:
        assert frames == round(BODY["audio_length"] * RATE)  # the exact-length contract


def test_jobs_and_edits_take_the_field_and_report_the_duration(server):
    submitted = httpx.post(server + "/v1/audio/jobs", json={**BODY, "trim_silence": True}, timeout=60)
    assert submitted.status_code == 202, submitted.text
    assert submitted.json()["trim_silence"] is True
    job_url = f"{server}/v1/audio/jobs/{submitted.json()['id']}"
    deadline = time.monotonic() + 120
    while (job := httpx.get(job_url).json())["status"] in ("queued", "running"):
        assert time.monotonic() < deadline
        time.sleep(0.3)
    content = httpx.get(job_url + "/content")
    seconds = decoded_frames(content) / RATE
    assert job["audio_duration"] == pytest.approx(seconds, abs=1e-9)
    assert header_seconds(content) == pytest.approx(seconds, abs=1e-6)

    upload = io.BytesIO()
    soundfile.write(upload, tone(0.25).T, RATE, format="WAV")
    form = {key: str(value) for key, value in BODY.items()} | {"trim_silence": "true", "strength": "0.6"}
    edited = httpx.post(server + "/v1/audio/edits", data=form, files={"audio": ("in.wav", upload.getvalue())},
                        timeout=300)
    assert header_seconds(edited) == pytest.approx(decoded_frames(edited) / RATE, abs=1e-6)


@pytest.mark.parametrize("value", ["true", 1, 0, None, "yes", [True], {"on": True}])
def test_a_non_boolean_is_a_400_naming_the_field(server, value):
    response = httpx.post(server + "/v1/audio/generate", json={**BODY, "trim_silence": value}, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "trim_silence" and "trim_silence" in error["message"]


@pytest.mark.parametrize("route", ["/v1/audio/edits", "/v1/audio/edits/jobs"])
def test_a_non_boolean_form_value_is_a_400_naming_the_field(server, route):
    form = {key: str(value) for key, value in BODY.items()} | {"trim_silence": "yes"}
    response = httpx.post(server + route, data=form, files={"audio": ("in.wav", b"RIFF")}, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "trim_silence"


def test_the_openai_speech_route_takes_the_field(server):
    body = {**BODY, "voice": "alloy", "trim_silence": True}
    response = httpx.post(server + "/v1/audio/speech", json=body, timeout=120)
    assert header_seconds(response) == pytest.approx(decoded_frames(response) / RATE, abs=1e-6)
    refused = httpx.post(server + "/v1/audio/speech", json={**body, "trim_silence": "on"}, timeout=60)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "trim_silence"
