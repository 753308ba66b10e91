"""Benchmarks for stable-audio-bento. Every figure is printed beside a baseline measured in the same run.

    python benchmarks/bench.py --quick                      # CPU, full-size dummy weights, < 10 min on 2 cores
    python benchmarks/bench.py --model tiny --only arrivals # Poisson arrivals against the tiny model
    bash benchmarks/gpu.sh                                  # everything the GPU must show (see that script)

Sections (``--only`` picks some, comma-separated):
  decode      full 1024-frame VAE decode vs the trimmed window decode (time and SNR), 5 / 10 / 47 s clips
  latency     one request end to end in-process: 47 s at N steps, 10 s exact, 10 s short-window
  scheduler   scheduler.step cost per request (Brownian tree vs vectorized) vs the DiT forward, batch 1-16
  precision   fp16 / bf16 DiT+T5 and VAE against fp32, same seed (SNR)
  serving     one request over HTTP vs the same call in-process
  throughput  N concurrent clients on the HTTP service vs diffusers StableAudioPipeline one at a time
  arrivals    Poisson arrivals at 50 % and 90 % of the measured capacity: latency percentiles, time queued
Figures from random weights measure speed and numerics, not sound quality.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import random
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from stable_audio_bento.config import EngineConfig  # noqa: E402
from stable_audio_bento.loading import load_pipeline  # noqa: E402
from stable_audio_bento.local_server import local_server  # noqa: E402
from stable_audio_bento.pipeline import (  # noqa: E402
    AudioRequest, BatchedStableAudio, GaussianIncrements, SamplingOptions)

SECTIONS = ["decode", "latency", "scheduler", "precision", "serving", "throughput", "arrivals"]
PROMPTS = ["Thunder and rain sounds", "A piano playing a gentle melody", "Ocean waves crashing on a beach",
           "The sound of a dog barking", "Guitar playing", "Audience clapping and cheering in a stadium"]
REPORT: dict = {}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dummy", help="'dummy' (full-size random weights) or a STABLE_AUDIO_MODEL")
    parser.add_argument("--quick", action="store_true",
                        help="CPU-sized: 1 step, 2 requests of 5-12 s, 5/10 s decodes; decode, latency, serving, "
                             "throughput")
    parser.add_argument("--only", help="comma-separated sections (default: all; with --quick all but precision)")
    parser.add_argument("--steps", default="50,100", help="step counts of the mixed workload")
    parser.add_argument("--latency-steps", type=int, default=100)
    parser.add_argument("--requests", type=int, default=16, help="requests in the throughput workload")
    parser.add_argument("--max-length", type=float, default=47.0, help="longest clip in the workload (from 5 s)")
    parser.add_argument("--concurrency", default="1,2,4,8,16")
    parser.add_argument("--arrival-requests", type=int, default=40)
    parser.add_argument("--sde-noise", default="exact", choices=["exact", "vectorized"])
    parser.add_argument("--compile", action="store_true", help="torch.compile in-process and in the server")
    parser.add_argument("--json", type=Path, default=REPO / "artifacts" / "bench.json")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.latency_steps, args.requests, args.concurrency = "1", 1, 2, "2"
        args.max_length = min(args.max_length, 12.0)
    if args.only is None:  # quick: what fits 10 CPU minutes; the rest runs alone or with --model tiny
        args.only = ",".join(s for s in SECTIONS if not (args.quick and s in ("precision", "scheduler", "arrivals")))
    return args


def timed(function, *args, **kwargs) -> tuple[float, object]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    result = function(*args, **kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - started, result


def snr_db(reference: np.ndarray, other: np.ndarray) -> float:
    noise = float(np.sum((reference.astype(np.float64) - other) ** 2))
    return float("inf") if noise == 0 else 10 * np.log10(float(np.sum(reference.astype(np.float64) ** 2)) / noise)


def say(line: str = "") -> None:
    print(line, flush=True)


def engine_config(args, **overrides) -> EngineConfig:
    load_format = "dummy" if args.model == "dummy" else "auto"
    model = "stabilityai/stable-audio-open-1.0" if args.model == "dummy" else args.model
    return replace(EngineConfig(model=model, load_format=load_format, compile=args.compile), **overrides)


def server_env(args) -> dict[str, str]:
    env = {"STABLE_AUDIO_SDE_NOISE": args.sde_noise, "STABLE_AUDIO_COMPILE": "1" if args.compile else "0"}
    if args.model == "dummy":
        return {**env, "STABLE_AUDIO_LOAD_FORMAT": "dummy"}
    return {**env, "STABLE_AUDIO_MODEL": args.model}


def mixed_workload(count: int, steps: list[int], max_length: float, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [
        {"input": rng.choice(PROMPTS), "audio_length": round(rng.uniform(5, max_length), 2), "seed": 1000 + i,
         "num_inference_steps": rng.choice(steps), "negative_prompt": rng.choice([None, "Low quality"])}
        for i in range(count)
    ]


def as_request(body: dict) -> AudioRequest:
    return AudioRequest(prompt=body["input"], seed=body["seed"], audio_length=body["audio_length"],
                        negative_prompt=body.get("negative_prompt"), guidance_scale=body.get("guidance_scale", 7.0),
                        num_inference_steps=body["num_inference_steps"])


# --------------------------------------------------------------------------------------------------- sections
def bench_decode(pipe, args) -> None:
    full = BatchedStableAudio(pipe, SamplingOptions(decode_margin_frames=None))
    trimmed = BatchedStableAudio(pipe)
    latents = torch.randn(1, 64, full.limits.latent_frames, generator=torch.Generator().manual_seed(0))
    latents = latents.to(full.device)
    lengths = [5.0, 10.0] if args.quick else [5.0, 10.0, full.limits.max_seconds]
    say("\n## decode: full 1024-frame decode + crop (baseline) vs trimmed window (margin 16 frames)")
    say("| clip | full decode s | trimmed s | speedup | SNR of trimmed vs full, dB |\n|---|---|---|---|---|")
    full_seconds, full_audio = timed(full.decode_window, latents, AudioRequest("", 0, full.limits.max_seconds))
    rows = []
    for length in lengths:
        request = AudioRequest("", 0, length)
        trimmed_seconds, audio = timed(trimmed.decode_window, latents, request)
        reference = full_audio[:, : audio.shape[1]]
        rows.append({"clip_s": length, "full_s": full_seconds, "trimmed_s": trimmed_seconds,
                     "speedup": full_seconds / trimmed_seconds, "snr_db": snr_db(reference, audio)})
        r = rows[-1]
        say(f"| {length:.2f} s | {full_seconds:.2f} | {trimmed_seconds:.2f} | {r['speedup']:.2f}x | {r['snr_db']:.1f} |")
    REPORT["decode"] = rows


def bench_latency(pipe, args) -> None:
    exact = BatchedStableAudio(pipe, SamplingOptions(sde_noise=args.sde_noise))
    short = BatchedStableAudio(pipe, SamplingOptions(sde_noise=args.sde_noise, denoise_window="short"))
    if args.compile:
        for engine in (exact, short):
            engine.compile()
            engine.warm_up()
    steps = args.latency_steps
    cases = [("10 s, exact window", exact, 10.0), ("10 s, short window", short, 10.0)]
    if not args.quick:
        cases.insert(0, (f"{exact.limits.max_seconds:.2f} s, exact window", exact, exact.limits.max_seconds))
    say(f"\n## latency: one guided request in-process, {steps} steps (baseline: the first row)")
    say("| case | seconds | vs first row |\n|---|---|---|")
    rows = []
    for name, engine, length in cases:
        seconds, _ = timed(engine, [AudioRequest(PROMPTS[0], 1, length, num_inference_steps=steps)])
        rows.append({"case": name, "steps": steps, "seconds": seconds})
        say(f"| {name} | {seconds:.3f} | {seconds / rows[0]['seconds']:.2f}x |")
    REPORT["latency"] = rows


def bench_scheduler(pipe, args) -> None:
    engine = BatchedStableAudio(pipe)
    batch_sizes = [1, 2, 4, 8, 16] if not args.quick else [1]
    say("\n## scheduler: per-step cost of scheduler.step for B requests (serial) vs one DiT forward for B guided "
        "requests")
    say("| B | DiT forward s | Brownian tree steps s | share of step | vectorized steps s | share |")
    say("|---|---|---|---|---|---|")
    rows = []
    for batch in batch_sizes:
        requests = [AudioRequest(PROMPTS[i % len(PROMPTS)], i, 10.0, num_inference_steps=100) for i in range(batch)]
        states = [engine.prepare_request(request) for request in requests]
        with torch.no_grad():
            if torch.cuda.is_available():
                engine.predict_noise(states)  # the first CUDA call pays for kernel selection; time the second
            forward_s, predictions = timed(engine.predict_noise, states)
        costs = {}
        for mode in ("exact", "vectorized"):
            fresh = [engine.prepare_request(request) for request in requests]
            if mode == "vectorized":
                for state in fresh:
                    state.scheduler.noise_sampler = GaussianIncrements(state.generator, state.latents)
            for state, noise in zip(fresh, predictions):  # the first step builds the Brownian tree
                engine.scheduler_step(state, noise)
            costs[mode], _ = timed(lambda: [engine.scheduler_step(s, n) for s, n in zip(fresh, predictions)])
        exact_share = costs["exact"] / (forward_s + costs["exact"])
        vector_share = costs["vectorized"] / (forward_s + costs["vectorized"])
        rows.append({"batch": batch, "forward_s": forward_s, "tree_s": costs["exact"],
                     "vectorized_s": costs["vectorized"], "tree_share": exact_share, "vectorized_share": vector_share})
        say(f"| {batch} | {forward_s:.4f} | {costs['exact']:.4f} | {exact_share:.1%} | {costs['vectorized']:.4f} "
            f"| {vector_share:.1%} |")
    REPORT["scheduler"] = rows


def bench_precision(pipe, args) -> None:
    request = AudioRequest(PROMPTS[1], 3, 10.0, num_inference_steps=20 if not args.quick else 2)
    reference = BatchedStableAudio(pipe)([request])[0].audio
    half_dtypes = [torch.float16, torch.bfloat16] if torch.cuda.is_available() else [torch.bfloat16]
    say("\n## precision: SNR against fp32 on the same seed (>= 30 dB required)")
    say("| component in low precision | dtype | SNR dB | seconds (fp32 baseline first) |\n|---|---|---|---|")
    fp32_seconds, _ = timed(BatchedStableAudio(pipe), [request])
    say(f"| none (fp32) | float32 | inf | {fp32_seconds:.3f} |")
    rows = []
    for dtype in half_dtypes:
        for component, modules in (("DiT + T5", ("transformer", "text_encoder", "projection_model")), ("VAE", ("vae",))):
            for name in modules:
                getattr(pipe, name).to(dtype)
            seconds, [result] = timed(BatchedStableAudio(pipe), [request])
            for name in modules:
                getattr(pipe, name).to(torch.float32)
            snr = snr_db(reference, result.audio) if result.error is None else float("nan")
            rows.append({"component": component, "dtype": str(dtype), "snr_db": snr, "seconds": seconds})
            say(f"| {component} | {dtype} | {snr:.1f} | {seconds:.3f} |")
    REPORT["precision"] = rows


def post(url: str, body: dict) -> dict:
    started = time.perf_counter()
    response = httpx.post(url + "/v1/audio/generate", json=body, timeout=3600)
    latency = time.perf_counter() - started
    timing = dict(part.strip().split(";dur=") for part in response.headers.get("server-timing", "").split(",") if
                  ";dur=" in part)
    return {"status": response.status_code, "latency_s": latency, "bytes": len(response.content),
            "queue_s": float(timing.get("queue", "nan")) / 1000, "denoise_s": float(timing.get("denoise", "nan")) / 1000,
            "batch_size": int(response.headers.get("x-batch-size", 0)), "steps": body["num_inference_steps"],
            "audio_s": body["audio_length"]}


def bench_serving(pipe, url, args) -> None:
    engine = BatchedStableAudio(pipe, SamplingOptions(sde_noise=args.sde_noise))
    body = {"input": PROMPTS[3], "audio_length": 2.0, "guidance_scale": 1.0, "seed": 7,
            "num_inference_steps": args.latency_steps if not args.quick else 1}
    request = replace(as_request(body), guidance_scale=1.0)
    repeats = 2 if args.quick else 5
    if not args.quick:  # warm both paths; on CPU the engine is warm from the sections before
        engine([request])
        post(url, body)
    direct = statistics.median(timed(engine, [request])[0] for _ in range(repeats))
    over_http = statistics.median(post(url, body)["latency_s"] for _ in range(repeats))
    say("\n## serving: one request over HTTP vs the same generation in-process (median of "
        f"{repeats}; {body['num_inference_steps']} steps, 2 s clip, no guidance)")
    say(f"| direct s | HTTP s | overhead |\n|---|---|---|\n| {direct:.3f} | {over_http:.3f} | "
        f"{over_http / direct - 1:+.1%} |")
    REPORT["serving"] = {"direct_s": direct, "http_s": over_http, "overhead": over_http / direct - 1}


def summarize(results: list[dict], wall: float) -> dict:
    latencies = sorted(r["latency_s"] for r in results)
    return {"requests": len(results), "ok": sum(r["status"] == 200 for r in results), "wall_s": wall,
            "req_per_s": len(results) / wall, "audio_s_per_s": sum(r["audio_s"] for r in results) / wall,
            "p50_s": float(np.percentile(latencies, 50)), "p95_s": float(np.percentile(latencies, 95)),
            "p99_s": float(np.percentile(latencies, 99)),
            "queued_share": sum(r["queue_s"] for r in results) / sum(latencies),
            "mean_batch": statistics.mean(r["batch_size"] for r in results)}


def bench_throughput(pipe, url, args) -> None:
    workload = mixed_workload(args.requests, [int(s) for s in args.steps.split(",")], args.max_length)
    say(f"\n## throughput: {len(workload)} mixed requests (5-{args.max_length:g} s, steps {args.steps}, half with a "
        "negative prompt)")
    pipe.set_progress_bar_config(disable=True)
    started = time.perf_counter()
    for body in workload:  # the reference server: diffusers, one request at a time, always the full window
        pipe(body["input"], audio_end_in_s=body["audio_length"], num_inference_steps=body["num_inference_steps"],
             negative_prompt=body["negative_prompt"], generator=torch.Generator().manual_seed(body["seed"]))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    baseline_wall = time.perf_counter() - started
    baseline = {"req_per_s": len(workload) / baseline_wall,
                "audio_s_per_s": sum(b["audio_length"] for b in workload) / baseline_wall}
    say("| clients | req/s | audio s/s | p50 s | p95 s | mean batch | vs diffusers sequential |")
    say("|---|---|---|---|---|---|---|")
    say(f"| diffusers, 1 at a time | {baseline['req_per_s']:.4f} | {baseline['audio_s_per_s']:.3f} | | | 1 | 1.00x |")
    rows = []
    for clients in [int(c) for c in args.concurrency.split(",")]:
        started = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(lambda body: post(url, body), workload))
        row = {"clients": clients, **summarize(results, time.perf_counter() - started)}
        row["speedup"] = row["req_per_s"] / baseline["req_per_s"]
        rows.append(row)
        say(f"| {clients} | {row['req_per_s']:.4f} | {row['audio_s_per_s']:.3f} | {row['p50_s']:.2f} | "
            f"{row['p95_s']:.2f} | {row['mean_batch']:.1f} | {row['speedup']:.2f}x |")
        if row["ok"] != row["requests"]:
            say(f"  ({row['requests'] - row['ok']} requests failed)")
    REPORT["throughput"] = {"baseline": baseline, "service": rows}


def bench_arrivals(url, args) -> None:
    steps = [int(s) for s in args.steps.split(",")]
    workload = mixed_workload(args.arrival_requests, steps, args.max_length, seed=1)
    capacity = max((row["req_per_s"] for row in REPORT.get("throughput", {}).get("service", [])), default=None)
    if capacity is None:  # measure saturation throughput with everything at once
        started = time.perf_counter()
        burst = mixed_workload(min(16, args.arrival_requests), steps, args.max_length, seed=2)
        with ThreadPoolExecutor(len(burst)) as pool:
            list(pool.map(lambda body: post(url, body), burst))
        capacity = len(burst) / (time.perf_counter() - started)
    say(f"\n## arrivals: Poisson arrivals, {len(workload)} requests per rate, capacity {capacity:.4f} req/s "
        "(saturated throughput measured above)")
    say("| load | rate req/s | p50 s | p95 s | p99 s | time queued | mean batch | mean step s |")
    say("|---|---|---|---|---|---|---|---|")
    rows = []
    for load in (0.5, 0.9):
        rate = load * capacity
        rng = random.Random(int(load * 100))
        results: list[dict] = []
        lock = threading.Lock()

        def fire(body: dict) -> None:
            result = post(url, body)
            with lock:
                results.append(result)

        threads, started = [], time.perf_counter()
        next_at = 0.0
        for body in workload:
            next_at += rng.expovariate(rate)
            time.sleep(max(0.0, started + next_at - time.perf_counter()))
            threads.append(threading.Thread(target=fire, args=(body,)))
            threads[-1].start()
        for thread in threads:
            thread.join()
        row = {"load": load, "rate": rate, **summarize(results, time.perf_counter() - started)}
        row["mean_step_s"] = statistics.mean(r["denoise_s"] / r["steps"] for r in results)
        rows.append(row)
        say(f"| {load:.0%} | {rate:.4f} | {row['p50_s']:.2f} | {row['p95_s']:.2f} | {row['p99_s']:.2f} | "
            f"{row['queued_share']:.1%} | {row['mean_batch']:.2f} | {row['mean_step_s']:.4f} |")
    REPORT["arrivals"] = rows


def main() -> None:
    args = parse_args()
    sections = [s for s in args.only.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        sys.exit(f"unknown sections: {', '.join(sorted(unknown))}")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    REPORT["meta"] = {"date": datetime.date.today().isoformat(), "device": device, "model": args.model,
                      "torch": torch.__version__, "python": platform.python_version(), "args": vars(args) | {
                          "json": str(args.json)}}
    say(f"# stable-audio-bento benchmarks, {REPORT['meta']['date']}, {device}, model {args.model}, torch "
        f"{torch.__version__}")
    started = time.perf_counter()
    pipe = None
    if set(sections) & {"decode", "latency", "scheduler", "precision", "serving", "throughput"}:
        pipe = load_pipeline(engine_config(args, dtype="float32" if "precision" in sections else "auto"))
        if "precision" in sections:
            bench_precision(pipe, args)
            pipe = load_pipeline(engine_config(args))
        for name, bench in (("decode", bench_decode), ("latency", bench_latency), ("scheduler", bench_scheduler)):
            if name in sections:
                bench(pipe, args)
    if set(sections) & {"serving", "throughput", "arrivals"}:
        with local_server(server_env(args), REPO / "artifacts" / "bench-server.log") as url:
            if "serving" in sections:
                bench_serving(pipe, url, args)
            if "throughput" in sections:
                bench_throughput(pipe, url, args)
            if "arrivals" in sections:
                bench_arrivals(url, args)
    REPORT["meta"]["total_s"] = time.perf_counter() - started
    say(f"\ntotal {REPORT['meta']['total_s']:.0f} s")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(REPORT, indent=2, default=str))


if __name__ == "__main__":
    main()
