"""Request defaults and model-dependent checks, without a server (the HTTP error table is in test_service)."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest

from stable_audio_bento.generation import ModelLimits
from stable_audio_bento.protocol import DEFAULT_STRENGTH, MAX_SEED, APIError, EditRequest, GenerateRequest

LIMITS = ModelLimits(sample_rate=44100, channels=2, hop_length=2048, latent_frames=1024)


def audio_request(**fields):
    return GenerateRequest(**fields).to_audio_request(LIMITS, "stabilityai/stable-audio-open-1.0", 100, 500)


def test_defaults_fill_the_model_window():
    request = audio_request(input="rain")
    assert request.audio_length == pytest.approx(47.5545, abs=1e-4)
    assert (request.audio_start, request.guidance_scale, request.num_inference_steps) == (0.0, 7.0, 100)
    assert request.negative_prompt is None
    assert 0 <= request.seed <= MAX_SEED


def test_a_default_step_count_above_the_servers_maximum_asks_for_the_field():
    with pytest.raises(APIError, match=r"at most 4 on this server \(the default of 100 is above that: give "
                                       r"num_inference_steps\)") as raised:
        GenerateRequest(input="rain").to_audio_request(LIMITS, "stabilityai/stable-audio-open-1.0", 100, 4)
    assert raised.value.param == "num_inference_steps"
    with pytest.raises(APIError, match=r"at most 4 on this server \(got 5\)"):
        GenerateRequest(input="rain", num_inference_steps=5).to_audio_request(LIMITS, "x", 100, 4)


def test_default_length_runs_to_the_end_of_the_window_from_audio_start():
    request = audio_request(input="rain", audio_start=40.0)
    assert round((request.audio_start + request.audio_length) * 44100) == 1024 * 2048


def test_random_seeds_differ_and_given_seeds_are_kept():
    assert audio_request(input="x").seed != audio_request(input="x").seed
    assert audio_request(input="x", seed=MAX_SEED).seed == MAX_SEED


@pytest.mark.parametrize("fields, param, status", [
    ({"audio_length": 47.6}, "audio_length", 400),
    ({"audio_start": 40.0, "audio_length": 8.0}, "audio_start", 400),
    ({"audio_start": 47.56}, "audio_start", 400),
    ({"audio_start": 47.55446}, "audio_start", 400),  # in the window, but half a sample from its end: no default length
    ({"audio_length": 1e-6}, "audio_length", 400),
    ({"num_inference_steps": 501}, "num_inference_steps", 400),
    ({"model": "stabilityai/stable-audio-open-2.0"}, "model", 404),
])
def test_model_dependent_limits(fields, param, status):
    with pytest.raises(APIError) as raised:
        audio_request(input="x", **fields)
    assert (raised.value.param, raised.value.status) == (param, status)
    assert raised.value.body()["error"]["param"] == param


SA3_LIMITS = ModelLimits(sample_rate=44100, channels=2, hop_length=4096, latent_frames=1292, max_duration_s=120.0,
                         fixed_start=True)


def sa3_request(**fields):
    return GenerateRequest(**fields).to_audio_request(SA3_LIMITS, "tiny-sa3", 8, 500, 1.0)


def test_stable_audio_3_defaults_come_from_the_model():
    request = sa3_request(input="rain")
    assert (request.audio_length, request.num_inference_steps, request.guidance_scale) == (120.0, 8, 1.0)
    assert sa3_request(input="rain", guidance_scale=4.0).guidance_scale == 4.0
    assert audio_request(input="rain", guidance_scale=None).guidance_scale == 7.0


@pytest.mark.parametrize("fields, param", [
    ({"audio_start": 1.0, "audio_length": 2.0}, "audio_start"),
    ({"audio_length": 120.01}, "audio_length"),
    ({"audio_length": 0.9 / 44100}, "audio_length"),  # the pipeline cuts to int(seconds × rate) samples: none
])
def test_stable_audio_3_limits(fields, param):
    with pytest.raises(APIError) as raised:
        sa3_request(input="x", **fields)
    assert raised.value.param == param and raised.value.status == 400


EDIT_LIMITS = replace(LIMITS, min_strength_per_step=1e-3)


def edit_fields(inpainting_served: bool = True, steps: int = 100, **fields) -> dict:
    job = audio_request(input="x", audio_length=10.0, num_inference_steps=steps)
    return EditRequest(input="x", audio=Path("upload.wav"), **fields).edit_fields(job, EDIT_LIMITS, inpainting_served)


def test_edit_fields_fill_in_the_other_end_of_the_region_or_the_strength():
    assert edit_fields() == {"strength": DEFAULT_STRENGTH} and edit_fields(strength=0.2) == {"strength": 0.2}
    assert edit_fields(mask_start=4.0) == {"mask_start": 4.0, "mask_end": 10.0}
    assert edit_fields(mask_end=2.5) == {"mask_start": 0.0, "mask_end": 2.5}
    assert edit_fields(mask_start=1, mask_end=10) == {"mask_start": 1, "mask_end": 10}


def test_the_least_strength_grows_with_the_step_count():
    """EDIT_LIMITS: at least 1e-3 per step after the first, so 0.099 at 100 steps, 0.1 at 101, any at 1 step."""
    assert edit_fields(steps=1, strength=1e-300) == {"strength": 1e-300}
    assert edit_fields(steps=100, strength=0.0995) == {"strength": 0.0995}
    with pytest.raises(APIError) as raised:
        edit_fields(steps=101, strength=0.0995)
    assert (raised.value.param, raised.value.status) == ("strength", 400)
    assert "at least 0.1 with 101 inference steps" in raised.value.message
    assert edit_fields(steps=101, strength=0.1005) == {"strength": 0.1005}


@pytest.mark.parametrize("fields, param", [
    ({"mask_start": 1.0, "inpainting_served": False}, "mask_start"),
    ({"mask_end": 1.0, "inpainting_served": False}, "mask_end"),
    ({"mask_start": 1.0, "strength": 0.5}, "strength"),
    ({"mask_end": 10.5}, "mask_end"),
    ({"mask_start": 3.0, "mask_end": 2.0}, "mask_start"),
])
def test_edit_fields_refused(fields, param):
    with pytest.raises(APIError) as raised:
        edit_fields(**fields)
    assert (raised.value.param, raised.value.status) == (param, 400)


@pytest.mark.parametrize("fields, upload_seconds, param", [
    ({"mask_start": 6.0, "mask_end": 10.0}, 5.0, "mask_start"),  # a gap between the upload and the region
    ({"mask_start": 1.0, "mask_end": 2.0}, 5.0, "mask_end"),  # 5-10 s would be kept, but there is nothing there
    ({"mask_start": 5.05, "mask_end": 10.0}, 5.0, None),  # within a latent frame of the upload's end
    ({"mask_start": 1.0, "mask_end": 2.0}, 10.0, None),
    ({"strength": 0.5}, 1.0, None),  # audio-to-audio pads a short upload
])
def test_kept_audio_must_be_in_the_upload(fields, upload_seconds, param):
    if param is None:
        EditRequest.check_kept_audio(fields, 10.0, upload_seconds, 4096 / 44100)
        return
    with pytest.raises(APIError) as raised:
        EditRequest.check_kept_audio(fields, 10.0, upload_seconds, 4096 / 44100)
    assert raised.value.param == param


@pytest.mark.parametrize("limits", [LIMITS, SA3_LIMITS], ids=["round", "int"])
def test_a_count_of_samples_as_seconds_cuts_back_to_that_count(limits):
    """An upload's length as the default audio_length: n / rate * rate lands below n for 8 % of counts (15, 23,
    30, ...), which Stable Audio 3's int cut would make one sample short."""
    assert int(15 / 44100 * 44100) == 14
    counts = range(1, 200_000)
    assert all(limits.samples(limits.seconds(n)) == n for n in counts)
    assert all(abs(limits.seconds(n) - n / 44100) <= math.ulp(n / 44100) for n in counts)
