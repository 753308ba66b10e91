"""The prepared GPU script runs end to end on CPU (tiny model), so GPU minutes are never lost to a typo."""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from stable_audio_bento.sa3_loading import ensure_tiny_sa3_model

REPO = Path(__file__).resolve().parents[1]


def test_rates_and_latencies_count_only_answered_requests(monkeypatch):
    """A 429 is quick and no audio: counted as throughput, it would flatter the service against diffusers."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    bench = importlib.import_module("bench")
    answered = {"status": 200, "latency_s": 8.0, "audio_s": 10.0, "queue_s": 2.0, "batch_size": 2, "steps": 50,
                "denoise_s": 5.0, "short": False}
    refused = {**answered, "status": 429, "latency_s": 0.01, "queue_s": float("nan"), "batch_size": 0}
    summary = bench.summary([answered, refused, refused, refused], wall=10.0)
    assert (summary["requests"], summary["ok"]) == (4, 1)
    assert (summary["req_per_s"], summary["audio_s_per_s"], summary["p50_s"]) == (0.1, 1.0, 8.0)
    assert (summary["queued_share"], summary["mean_batch_header"]) == (0.25, 2)


def test_gpu_script_cpu_smoke(tmp_path, model_cache):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    done = subprocess.run(["bash", "benchmarks/gpu.sh", "model", "throughput", "arrivals", "graphs", "compile",
                           "--cpu-smoke"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    model = json.loads((tmp_path / "bench-model.json").read_text())
    assert all(row["snr_db"] >= 100 and row["speedup"] == pytest.approx(row["full_s"] / row["trimmed_s"])
               for row in model["decode"])
    assert all(row["snr_db"] >= 30 for row in model["precision"] if row["component"] == "DiT + T5")
    assert [row["case"] for row in model["latency"]] == ["10 s, exact window", "10 s, short window"]
    assert model["scheduler"][0]["vectorized_s"] > 0 and model["scheduler"][0]["tree_s"] > 0
    assert model["scheduler"][0]["samplers"] == {"exact": "BrownianTreeNoiseSampler", "vectorized": "GaussianIncrements"}
    assert [row["batch"] for row in model["drift"]] == [2] and model["drift"][0]["snr_db"] > 30
    assert model["profile"]["aten_calls"] > 100 and 0 < sum(row["share"] for row in model["profile"]["top"]) <= 1
    tree = json.loads((tmp_path / "bench-tree.json").read_text())
    assert tree["meta"]["args"]["sde_noise"] == "exact" and len(tree["latency"]) == 2
    compiled = json.loads((tmp_path / "bench-compile.json").read_text())
    assert [row["case"] for row in compiled["latency"] if row.get("reduce-overhead", 0) > 0] == [
        "10 s, exact window"]  # the full window only
    assert compiled["latency"][0]["reduce-overhead_snr_db"] > 40  # Inductor's kernels, bf16 rounding apart
    # graphs: tests/test_cuda_graphs.py, all passed or skipped (replays need a GPU)
    assert re.search(r"^\d+ passed, \d+ skipped", done.stdout, re.MULTILINE), done.stdout[-4000:]

    serving = json.loads((tmp_path / "bench-throughput.json").read_text())
    assert serving["serving"]["http_s"] > 0 and serving["serving"]["direct_s"] > 0
    rows, baseline = serving["throughput"]["service"], serving["throughput"]["baseline"]
    assert all(row["ok"] == row["requests"] for row in rows)
    for row in rows:  # the ratios the table prints, each the right way round
        assert row["speedup"] == pytest.approx(row["req_per_s"] / baseline["req_per_s"])
        assert row["vs_first_row"] == pytest.approx(row["req_per_s"] / rows[0]["req_per_s"])
    # the GPU's layout in-process too (a half-precision DiT beside the fp32 VAE): diffusers got a VAE in the DiT's dtype
    assert baseline["dit_dtype"] == baseline["vae_dtype"] == "torch.bfloat16"
    # each server's log beside its report: how the engine ran comes back from the device machine with the figures
    assert "DiT forward: eager" in (tmp_path / "bench-throughput-server.log").read_text()
    assert all((tmp_path / f"bench-arrivals-server-{mode}.log").exists() for mode in ("whole", "continuous"))
    arrivals = json.loads((tmp_path / "bench-arrivals.json").read_text())["arrivals"]
    assert [row["load"] for row in arrivals] == [0.5, 0.9]
    assert all(row["ok"] == row["requests"] for row in arrivals)
    assert "## throughput" in done.stdout and "## arrivals" in done.stdout


def test_gpu_script_sa3_cpu_smoke(tmp_path, model_cache):
    """The Stable Audio 3 part in the GPU layout (half-precision DiT, fp32 VAE) with tiny-sa3."""
    ensure_tiny_sa3_model()  # in the cache the script reads (model_cache sets it)
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    done = subprocess.run(["bash", "benchmarks/gpu.sh", "sa3", "--cpu-smoke"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    report = json.loads((tmp_path / "bench-sa3.json").read_text())
    assert [(row["audio_s"], row["batch"]) for row in report["throughput"]] == [(10, 1), (10, 2), (30, 1), (30, 2)]
    assert all(row["engine_error"] is None and row["engine_s"] > 0 and row["pipeline_s"] > 0
               for row in report["throughput"])
    for direction in ("encode_memory", "decode_memory"):
        peaks = {(row["audio_s"], row["window"]): row["peak_above_loaded_gb"] for row in report[direction]}
        assert peaks[(30, "128")] < 0.5 * peaks[(30, "none")], direction  # windows: a fraction of the whole clip
    assert (tmp_path / "bench-sa3.log").read_text().count("| 30 s |") >= 4
