"""Shared fixtures: the tiny model (built and saved once per run) and a real `bentoml serve` of it."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import numpy as np
import pytest

from stable_audio_bento.config import EngineConfig
from stable_audio_bento.loading import ensure_tiny_model, load_pipeline
from stable_audio_bento.local_server import local_server
from stable_audio_bento.pipeline import BatchedStableAudio, SamplingOptions
from stable_audio_bento.sa3_loading import TINY_SA3, ensure_tiny_sa3_model

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "artifacts"


def snr_db(reference, other) -> float:
    """Signal-to-noise ratio of ``other`` against ``reference`` (arrays or CPU tensors), in float64; inf if equal."""
    reference, other = np.asarray(reference, dtype=np.float64), np.asarray(other, dtype=np.float64)
    noise = np.sum((reference - other) ** 2)
    return float("inf") if noise == 0 else float(10 * np.log10(np.sum(reference ** 2) / noise))


def metric_samples(url: str, name: str = "") -> dict[str, float]:
    """The server's Prometheus samples whose name starts with ``name``: the sample with its labels -> value."""
    samples = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith(name) and line[:1] not in ("", "#"):
            sample, value = line.rsplit(" ", 1)
            samples[sample] = float(value)
    return samples


def server_timing_ms(response) -> dict[str, float]:
    """The response's Server-Timing header: milliseconds by stage."""
    return {name: float(ms) for name, ms in
            (part.strip().split(";dur=") for part in response.headers["server-timing"].split(","))}


def own_bentoml_home(tmp_path_factory) -> dict[str, str]:
    """For a server whose metrics a test reads: BentoML empties <BENTOML_HOME>/prometheus_multiproc_dir when a
    server starts, so a server started later under the same home would wipe this one's counters."""
    return {"BENTOML_HOME": str(tmp_path_factory.mktemp("bentoml-home"))}


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("model-cache")
    os.environ["STABLE_AUDIO_CACHE"] = str(cache)
    ensure_tiny_model()
    return cache


@pytest.fixture(scope="session")
def tiny_pipe(model_cache):
    pipe = load_pipeline(EngineConfig(model="tiny"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def exact_engine(tiny_pipe) -> BatchedStableAudio:
    """Decodes all 1024 frames then crops, exactly like diffusers."""
    return BatchedStableAudio(tiny_pipe, SamplingOptions(decode_margin_frames=None))


@pytest.fixture(scope="session")
def engine(tiny_pipe) -> BatchedStableAudio:
    """The served defaults: exact sampling, trimmed decode."""
    return BatchedStableAudio(tiny_pipe)


@pytest.fixture(scope="session")
def server(model_cache, tmp_path_factory) -> str:
    """`bentoml serve` from the repo root with the tiny model and default settings; yields its base URL."""
    env = {"STABLE_AUDIO_MODEL": "tiny", **own_bentoml_home(tmp_path_factory)}
    with local_server(env, ARTIFACTS / "server.log", startup_timeout_s=180) as url:
        yield url


@pytest.fixture(scope="session")
def sa3_server(model_cache) -> str:
    """`bentoml serve` with the tiny Stable Audio 3 model (tests/test_sa3_service.py, the playground's SA3 test)."""
    ensure_tiny_sa3_model()  # built here once, in the cache the server reads too
    with local_server({"STABLE_AUDIO_MODEL": TINY_SA3}, ARTIFACTS / "sa3-server.log", startup_timeout_s=180) as url:
        yield url
