"""Benchmarks for stable-audio-bento. Every figure is printed beside a baseline measured in the same run.

    python benchmarks/bench.py --quick                      # CPU, full-size dummy weights, < 10 min on 2 cores
    python benchmarks/bench.py --model tiny --only arrivals # whole vs continuous batching under Poisson arrivals
    python benchmarks/bench.py --model tiny --only arrivals --arrival-requests 32 --arrival-steps 10,10,10,100 \
        --arrival-min-length 6 --arrival-max-length 12      # the CPU figures: short vs long requests, ~12 min
    python benchmarks/bench.py --model tiny --only decode_placement  # VAE decode inline in the step loop or beside it
    bash benchmarks/gpu.sh                                  # everything the GPU must show (see that script)

Sections (``--only`` picks some, comma-separated):
  decode      full 1024-frame VAE decode vs the trimmed window decode (time and SNR), 5 / 10 / 47 s clips
  latency     one request end to end in-process: 47 s at N steps, 10 s exact, 10 s short-window
  scheduler   solver step (``advance``) cost per request (Brownian tree vs vectorized) vs the DiT forward, batch 1-16
  precision   fp16 / bf16 DiT+T5 and VAE against fp32, same seed (SNR)
  drift       one request alone vs batched with 1-15 others (SNR, bit-identity)
  profile     one batched step under torch.profiler: top operations by own device (CPU) time, ATen calls, GPU busy
  decode_placement
              in-process: one long request (full window, many steps) while short ones finish; the VAE decode inline
              in the loop's thread (what StepLoop does, the baseline) vs beside the loop in a thread (on CUDA also
              on its own stream): per-turn step times with and without a decode, the long request's total, the
              short ones' latency
  serving     one request over HTTP vs the same call in-process (server in continuous batching)
  throughput  N concurrent clients on the HTTP service (continuous batching) vs diffusers StableAudioPipeline one
              at a time
  arrivals    whole vs continuous batching (STABLE_AUDIO_BATCHING), one server each: the saturated capacity is
              measured once, in whole mode (a burst); then the same Poisson arrivals of the same mixed workload at
              50 % and 90 % of it for both modes: latency percentiles overall and for short requests, throughput,
              DiT rows per step (/metrics), X-Batch-Size, time queued; then continuous / whole against the targets
By default all sections run; --quick leaves out precision, scheduler, decode_placement and arrivals.
Figures from random weights measure speed and numerics, not sound quality.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import math
import platform
import random
import re
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

from stable_audio_bento.config import EngineConfig, parse_compile_mode  # noqa: E402
from stable_audio_bento.generation import AudioRequest, AudioResult  # noqa: E402
from stable_audio_bento.loading import load_pipeline  # noqa: E402
from stable_audio_bento.local_server import local_server  # noqa: E402
from stable_audio_bento.pipeline import BatchedStableAudio, SamplingOptions  # noqa: E402
from stable_audio_bento.step_loop import StepLoop, run_to_completion  # noqa: E402

from baseline import documented_pipeline  # noqa: E402  (this folder is on sys.path when run as a script)
from report import finish, save  # noqa: E402

SECTIONS = ["decode", "latency", "scheduler", "precision", "drift", "profile", "decode_placement", "serving",
            "throughput", "arrivals"]
QUICK_SKIPS = ("precision", "drift", "profile", "scheduler", "decode_placement", "arrivals")
NEEDS_PIPE = {"decode", "latency", "scheduler", "precision", "drift", "profile", "decode_placement", "serving",
              "throughput"}
PROMPTS = ["Thunder and rain sounds", "A piano playing a gentle melody", "Ocean waves crashing on a beach",
           "The sound of a dog barking", "Guitar playing", "Audience clapping and cheering in a stadium"]
WARM_UP = AudioRequest("warm-up", seed=0, audio_length=1.0, num_inference_steps=2)
BATCHING_MODES = ("whole", "continuous")  # whole first: it measures the capacity both modes are then loaded to
LOADS = (0.5, 0.9)
SHORT_STEPS, SHORT_AUDIO_S = 10, 5.0  # a request is "short" with at most this many steps or this much audio
REPORT: dict = {}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dummy", help="'dummy' (full-size random weights) or a STABLE_AUDIO_MODEL")
    parser.add_argument("--quick", action="store_true",
                        help="CPU-sized: 1 step, 2 requests of 5-12 s, 5/10 s decodes; decode, latency, serving, "
                             "throughput (other sections, when named, are sized down too)")
    parser.add_argument("--only", help="comma-separated sections (default: all; with --quick all but "
                                       + ", ".join(QUICK_SKIPS) + ")")
    parser.add_argument("--steps", default="50,100", help="step counts of the throughput workload")
    parser.add_argument("--latency-steps", type=int, default=100)
    parser.add_argument("--requests", type=int, default=16, help="requests in the throughput workload")
    parser.add_argument("--max-length", type=float, default=47.0, help="longest clip in the workload (from 5 s)")
    parser.add_argument("--concurrency", default="1,2,4,8,16")
    arrivals = parser.add_argument_group("arrivals")
    arrivals.add_argument("--arrival-requests", type=int, default=40, help="requests per load and batching mode")
    arrivals.add_argument("--arrival-steps", help="step counts, each once per round of as many requests in a "
                                                  "shuffled order (repeat one to weight it); default 10,25,50,100 "
                                                  "(--quick: 1,2)")
    arrivals.add_argument("--arrival-max-steps", type=int, help="clip every drawn step count to this")
    arrivals.add_argument("--arrival-min-length", type=float, default=2.0, help="shortest clip, seconds")
    arrivals.add_argument("--arrival-max-length", type=float,
                          help="longest clip, seconds (default: the model's maximum, 47.55 s; --quick: 12)")
    arrivals.add_argument("--arrival-unguided", type=float, default=0.25,
                          help="share of requests with guidance_scale 1.0 (one DiT row instead of two)")
    arrivals.add_argument("--capacity-requests", type=int,
                          help="requests sent at once to measure the saturated capacity (default 16; --quick: 8)")
    placement = parser.add_argument_group("decode_placement")
    placement.add_argument("--placement-long-steps", type=int, help="steps of the long request (default 60; "
                                                                    "--quick: 12)")
    placement.add_argument("--placement-shorts", type=int, help="short requests (default 4; --quick: 2)")
    placement.add_argument("--placement-short-steps", type=int, help="steps of each short one (default 10; "
                                                                     "--quick: 2)")
    placement.add_argument("--placement-short-length", type=float,
                           help="audio seconds of every short one (default: spread evenly from 2 s to the "
                                "model's maximum)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                        help="of the DiT and T5 (auto: float16 on CUDA, float32 on CPU); the VAE stays float32")
    parser.add_argument("--sde-noise", default="auto", choices=["auto", "exact", "vectorized"],
                        help="the engine's SDE noise (auto: vectorized on CUDA, exact on CPU, as served)")
    parser.add_argument("--compile", nargs="?", const="default", default="", metavar="MODE[,MODE...]",
                        help="how the DiT forward runs besides eagerly: cuda-graphs or a torch.compile mode "
                             "(STABLE_AUDIO_COMPILE's values; default: default). latency compares eager with each; "
                             "the server and decode_placement use the first")
    parser.add_argument("--json", type=Path, default=REPO / "artifacts" / "bench.json")
    args = parser.parse_args()
    try:
        args.compile = [mode for mode in map(parse_compile_mode, args.compile.split(",")) if mode]
    except ValueError as error:
        parser.error(str(error))
    if args.quick:
        args.steps, args.latency_steps, args.requests, args.concurrency = "1", 1, 2, "2"
        args.max_length = min(args.max_length, 12.0)
    sized = {"arrival_steps": ("10,25,50,100", "1,2"), "arrival_max_length": (None, 12.0),
             "capacity_requests": (16, 8), "placement_long_steps": (60, 12), "placement_shorts": (4, 2),
             "placement_short_steps": (10, 2)}
    for name, (full, quick) in sized.items():  # given ones win over both
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if args.only is None:  # quick: what fits 10 CPU minutes; the rest runs alone or with --model tiny
        args.only = ",".join(s for s in SECTIONS if not (args.quick and s in QUICK_SKIPS))
    return args


def timed(function, *args, **kwargs) -> tuple[float, object]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    result = function(*args, **kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - started, result


def median_timed(args, function, *arguments) -> tuple[float, object]:
    """The median time of 3 calls after an untimed one (a shape's first call pays for allocation and kernel choice);
    with --quick, one call."""
    if args.quick:
        return timed(function, *arguments)
    function(*arguments)
    runs = [timed(function, *arguments) for _ in range(3)]
    return statistics.median(seconds for seconds, _ in runs), runs[-1][1]


def snr_db(reference: np.ndarray, other: np.ndarray) -> float:
    noise = float(np.sum((reference.astype(np.float64) - other) ** 2))
    return float("inf") if noise == 0 else 10 * np.log10(float(np.sum(reference.astype(np.float64) ** 2)) / noise)


def say(line: str = "") -> None:
    print(line, flush=True)


def engine_config(args, **overrides) -> EngineConfig:
    load_format = "dummy" if args.model == "dummy" else "auto"
    model = "stabilityai/stable-audio-open-1.0" if args.model == "dummy" else args.model
    config = EngineConfig(model=model, load_format=load_format, dtype=args.dtype)
    return replace(config, **overrides)


def server_env(args) -> dict[str, str]:
    env = {"STABLE_AUDIO_SDE_NOISE": args.sde_noise, "STABLE_AUDIO_COMPILE": (args.compile or ["0"])[0],
           "STABLE_AUDIO_DTYPE": args.dtype}
    if args.model == "dummy":
        return {**env, "STABLE_AUDIO_LOAD_FORMAT": "dummy"}
    return {**env, "STABLE_AUDIO_MODEL": args.model}


def server_log(args, name: str = "server") -> Path:
    """Beside the JSON report (gpu.sh: in $OUT, which comes back from the device machine): only the server's log
    says how its engine ran, e.g. a CUDA-graph recording that failed and left that shape eager."""
    return args.json.with_name(f"{args.json.stem}-{name}.log")


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


def bench_engine(pipe, args, compile_mode: str | None = None, window: str = "full") -> BatchedStableAudio:
    """An engine over ``pipe`` with the run's SDE noise, its DiT forward eager or in ``compile_mode``."""
    engine = BatchedStableAudio(pipe, SamplingOptions(sde_noise=args.sde_noise, denoise_window=window))
    if compile_mode:
        engine.compile(compile_mode)
    return engine


def served_engine(pipe, args) -> BatchedStableAudio:
    """The engine as the server runs it: the DiT forward in the first --compile mode."""
    return bench_engine(pipe, args, args.compile[0] if args.compile else None)


def generate(engine: BatchedStableAudio, requests: list[AudioRequest]) -> list[AudioResult]:
    """The requests run to their end in-process through the engine's step loop, all admitted at once."""
    return run_to_completion(engine, requests)


# --------------------------------------------------------------------------------------------------- sections
def bench_decode(pipe, args) -> None:
    full = BatchedStableAudio(pipe, SamplingOptions(decode_margin_frames=None))
    trimmed = BatchedStableAudio(pipe)
    channels = pipe.vae.config.decoder_input_channels
    latents = torch.randn(1, channels, full.limits.latent_frames, generator=torch.Generator().manual_seed(0))
    latents = latents.to(full.device)
    lengths = [5.0, 10.0] if args.quick else [5.0, 10.0, full.limits.max_seconds]
    say("\n## decode: full 1024-frame decode + crop (baseline) vs trimmed window (margin 16 frames)")
    say("| clip | full decode s | trimmed s | speedup | SNR of trimmed vs full, dB |\n|---|---|---|---|---|")
    whole = AudioRequest("", 0, full.limits.max_seconds)
    full_seconds, full_audio = median_timed(args, full.decode_window, latents, whole)
    rows = []
    for length in lengths:
        request = AudioRequest("", 0, length)
        trimmed_seconds, audio = median_timed(args, trimmed.decode_window, latents, request)
        reference = full_audio[:, : audio.shape[1]]
        rows.append({"clip_s": length, "full_s": full_seconds, "trimmed_s": trimmed_seconds,
                     "speedup": full_seconds / trimmed_seconds, "snr_db": snr_db(reference, audio)})
        r = rows[-1]
        say(f"| {length:.2f} s | {full_seconds:.2f} | {trimmed_seconds:.2f} | {r['speedup']:.2f}x | {r['snr_db']:.1f} |")
    REPORT["decode"] = rows


def bench_latency(pipe, args) -> None:
    """Each case eagerly (the baseline: its first row); with --compile the full-window cases also in each mode, in
    the same run (the full window only: the short window's varying frames would add a compilation each, minutes on
    a GPU), with each mode's audio against the eager audio. One mode after another, a line as each case ends, so a
    mode that stalls (the run's time limit) leaves the others' figures."""
    steps = args.latency_steps
    longest = bench_engine(pipe, args).limits.max_seconds
    cases = [("10 s, exact window", "full", 10.0), ("10 s, short window", "short", 10.0)]
    if not args.quick:
        cases.insert(0, (f"{longest:.2f} s, exact window", "full", longest))
    modes = [None] + args.compile
    say(f"\n## latency: one guided request in-process, {steps} steps, SDE noise {args.sde_noise} (baseline: the first "
        "row, eager)")
    rows = [{"case": name, "steps": steps} for name, _, _ in cases]
    eager_audio = {}
    for mode in modes:
        variant = mode or "eager"
        engines = {window: bench_engine(pipe, args, mode, window) for window in ("full", "short")
                   if mode is None or window == "full"}
        for row, (name, window, length) in zip(rows, cases):
            if window not in engines:
                continue
            request = AudioRequest(PROMPTS[0], 1, length, num_inference_steps=steps)
            generate(engines[window], [replace(request, num_inference_steps=2)])  # kernels, compilation, graphs
            # the median of 3 (a GPU's runs of one case differ by up to ±20 %: one run each made the speed-ups noise)
            runs = [timed(generate, engines[window], [request]) for _ in range(1 if args.quick else 3)]
            row[variant], (result,) = statistics.median(seconds for seconds, _ in runs), runs[-1][1]
            if mode is None:
                eager_audio[name] = result.audio
            else:
                row[f"{variant}_snr_db"] = snr_db(eager_audio[name], result.audio)
            # a recording that fails falls back to eager with one WARNING: the count shows the column is graphs
            recorded = getattr(engines[window]._transformer_forward, "recorded", None)
            if recorded is not None:
                row[f"{variant}_graphs_recorded"] = len(recorded)
            say(f"  {name}, {variant}: {row[variant]:.3f} s" + (f", {row[f'{variant}_snr_db']:.1f} dB from eager"
                                                                  if mode else "")
                + (f", {len(recorded)} graphs recorded" if recorded is not None else ""))
    for row in rows:
        row["seconds"] = row["eager"]
    say("| case | " + " | ".join(f"{mode or 'eager'} s" for mode in modes) + " | vs first row |"
        + "".join(f" {mode} speed-up | {mode} SNR vs eager, dB |" for mode in args.compile))
    say("|---|" + "---|" * (len(modes) + 1 + 2 * len(args.compile)))
    for row in rows:
        cells = [f"{row[mode or 'eager']:.3f}" if (mode or "eager") in row else "-" for mode in modes]
        cells.append(f"{row['eager'] / rows[0]['eager']:.2f}x")
        for mode in args.compile:
            cells += [f"{row['eager'] / row[mode]:.2f}x", f"{row[f'{mode}_snr_db']:.1f}"] if mode in row else ["-"] * 2
        say(f"| {row['case']} | " + " | ".join(cells) + " |")
    REPORT["latency"] = rows


def bench_drift(pipe, args) -> None:
    """One request alone (the baseline), then sharing every forward with 1-15 others of other lengths, prompts and
    guidance: how far batched kernels move its audio (bit-identical on CPU; on a GPU a taller matrix product may
    take another kernel)."""
    engine = bench_engine(pipe, args)
    steps = 2 if args.quick else 20
    request = AudioRequest(PROMPTS[2], 7, 10.0, num_inference_steps=steps)
    others = [AudioRequest(PROMPTS[i % len(PROMPTS)], 100 + i, 3.0 + 2.5 * i, num_inference_steps=steps,
                           guidance_scale=1.0 if i % 3 == 0 else 7.0) for i in range(15)]
    alone = generate(engine, [request])[0].audio
    say(f"\n## drift: one request's audio alone (baseline) vs batched with others, {steps} steps, SDE noise "
        f"{args.sde_noise}")
    say("| requests in each forward | SNR vs alone, dB | bit-identical |\n|---|---|---|")
    rows = []
    for batch in [2] if args.quick else [2, 4, 8, 16]:
        batched = generate(engine, [request] + others[: batch - 1])[0].audio
        rows.append({"batch": batch, "snr_db": snr_db(alone, batched),
                     "identical": bool(np.array_equal(alone, batched))})
        say(f"| {batch} | {rows[-1]['snr_db']:.1f} | {'yes' if rows[-1]['identical'] else 'no'} |")
    REPORT["drift"] = rows


def bench_profile(pipe, args) -> None:
    """One batched denoising step (8 guided 10 s requests in the full window; --quick: 2) under torch.profiler: the
    operations that take the most of their own device time (CPU time on CPU), how many ATen calls the step makes,
    and how busy the device is over the step: a low share means the host, not the GPU, sets the pace."""
    engine = bench_engine(pipe, args)
    batch = 2 if args.quick else 8
    states = [engine.prepare_request(AudioRequest(PROMPTS[i % len(PROMPTS)], i, 10.0, num_inference_steps=100))
              for i in range(batch)]

    def step() -> None:
        for state, noise in zip(states, engine.forward(states)):
            engine.advance(state, noise)

    step()  # kernel selection and the Brownian tree's first query stay out of the figures
    step_s, _ = timed(step)
    cuda = torch.cuda.is_available()
    activities = [torch.profiler.ProfilerActivity.CPU] + [torch.profiler.ProfilerActivity.CUDA] * cuda
    with torch.profiler.profile(activities=activities) as profiler:
        profiled_s, _ = timed(step)
    averages = profiler.key_averages()
    aten_calls = sum(event.count for event in averages if event.key.startswith("aten::"))
    # on CUDA the kernels themselves (an operator's device time is its kernels' again); on CPU the operators
    own = "self_device_time_total" if cuda else "self_cpu_time_total"
    if cuda:
        averages = [event for event in averages if event.device_type == torch.autograd.DeviceType.CUDA]
    total_us = sum(getattr(event, own) for event in averages)
    say(f"\n## profile: one step of {batch} guided requests (full window), SDE noise {args.sde_noise}: {step_s:.4f} s "
        f"unprofiled, {profiled_s:.4f} s profiled; {aten_calls} ATen calls"
        + (f"; the GPU busy {total_us / 1e6 / profiled_s:.0%} of the profiled step" if cuda else ""))
    say(f"| {'kernel' if cuda else 'operation'} | calls | own {'device' if cuda else 'CPU'} ms | share |\n|---|---|---|---|")
    rows = []
    for event in sorted(averages, key=lambda event: getattr(event, own), reverse=True)[:12]:
        rows.append({"operation": event.key, "calls": event.count, "ms": getattr(event, own) / 1000,
                     "share": getattr(event, own) / total_us})
        say(f"| {event.key[:70]} | {event.count} | {rows[-1]['ms']:.2f} | {rows[-1]['share']:.1%} |")
    REPORT["profile"] = {"batch": batch, "step_s": step_s, "profiled_s": profiled_s, "aten_calls": aten_calls,
                         "device": "cuda" if cuda else "cpu", "busy_share": total_us / 1e6 / profiled_s if cuda
                         else None, "top": rows}


def bench_scheduler(pipe, args) -> None:
    # Each column's sampler named, not "auto" (which is vectorized on CUDA: both columns would time it)
    engines = {mode: BatchedStableAudio(pipe, SamplingOptions(sde_noise=mode)) for mode in ("exact", "vectorized")}
    engine = engines["exact"]
    batch_sizes = [1, 2, 4, 8, 16] if not args.quick else [1]
    say("\n## scheduler: per-step cost of the solver step (advance) for B requests (serial) vs one DiT forward for "
        "B guided requests")
    say("| B | DiT forward s | Brownian tree steps s | share of step | vectorized steps s | share |")
    say("|---|---|---|---|---|---|")
    rows = []
    for batch in batch_sizes:
        requests = [AudioRequest(PROMPTS[i % len(PROMPTS)], i, 10.0, num_inference_steps=100) for i in range(batch)]
        states = [engine.prepare_request(request) for request in requests]
        if torch.cuda.is_available():
            engine.forward(states)  # the first CUDA call pays for kernel selection; time the second
        forward_s, predictions = timed(engine.forward, states)
        costs, samplers = {}, {}
        for mode, sampling in engines.items():
            fresh = [sampling.prepare_request(request) for request in requests]
            for state, noise in zip(fresh, predictions):  # the first step builds the Brownian tree
                sampling.advance(state, noise)
            costs[mode], _ = timed(lambda: [sampling.advance(s, n) for s, n in zip(fresh, predictions)])
            samplers[mode] = type(fresh[0].scheduler.noise_sampler).__name__
        exact_share = costs["exact"] / (forward_s + costs["exact"])
        vector_share = costs["vectorized"] / (forward_s + costs["vectorized"])
        rows.append({"batch": batch, "forward_s": forward_s, "tree_s": costs["exact"],
                     "vectorized_s": costs["vectorized"], "tree_share": exact_share, "vectorized_share": vector_share,
                     "samplers": samplers})
        say(f"| {batch} | {forward_s:.4f} | {costs['exact']:.4f} | {exact_share:.1%} | {costs['vectorized']:.4f} "
            f"| {vector_share:.1%} |")
    REPORT["scheduler"] = rows


def bench_precision(pipe, args) -> None:
    request = AudioRequest(PROMPTS[1], 3, 10.0, num_inference_steps=20 if not args.quick else 2)
    reference = generate(BatchedStableAudio(pipe), [request])[0].audio
    half_dtypes = [torch.float16, torch.bfloat16] if torch.cuda.is_available() else [torch.bfloat16]
    say("\n## precision: SNR against fp32 on the same seed (>= 30 dB required)")
    say("| component in low precision | dtype | SNR dB | seconds (fp32 baseline first, each after a warm-up) |\n"
        "|---|---|---|---|")
    fp32_seconds, _ = timed(generate, BatchedStableAudio(pipe), [request])
    say(f"| none (fp32) | float32 | inf | {fp32_seconds:.3f} |")
    rows = []
    for dtype in half_dtypes:
        for component, modules in (("DiT + T5", ("transformer", "text_encoder", "projection_model")), ("VAE", ("vae",))):
            for name in modules:
                getattr(pipe, name).to(dtype)
            generate(BatchedStableAudio(pipe), [WARM_UP])  # the dtype's first kernels stay out of its time
            seconds, [result] = timed(generate, BatchedStableAudio(pipe), [request])
            for name in modules:
                getattr(pipe, name).to(torch.float32)
            snr = snr_db(reference, result.audio) if result.error is None else float("nan")
            rows.append({"component": component, "dtype": str(dtype), "snr_db": snr, "seconds": seconds})
            say(f"| {component} | {dtype} | {snr:.1f} | {seconds:.3f} |")
    REPORT["precision"] = rows


class TimedStages:
    """The engine's stages as the loop sees them, recording when each prepare and each decode ran (perf_counter
    intervals), so that a loop turn can be told apart by what ran during it."""

    def __init__(self, engine: BatchedStableAudio, sync):
        self.engine, self.sync = engine, sync
        self.prepares: list[tuple[float, float]] = []
        self.decodes: list[tuple[float, float]] = []

    def __getattr__(self, name):  # forward, advance, forward_key, release_memory, wait_for_device: the engine's own
        return getattr(self.engine, name)

    def prepare_request(self, request: AudioRequest):
        started = time.perf_counter()
        state = self.engine.prepare_request(request)
        self.sync()
        self.prepares.append((started, time.perf_counter()))
        return state

    def decode(self, state) -> AudioResult:
        started = time.perf_counter()
        result = self.engine.decode(state)  # ends in .cpu(): nothing of it is left in flight
        self.decodes.append((started, time.perf_counter()))
        return result


class DecodeBesideLoop(StepLoop):
    """StepLoop with each finished request's VAE decode handed to one thread beside the loop: the loop goes on with
    the next step at once, and the result is delivered from that thread when its decode is done. With ``stream``
    (CUDA) the decode runs on its own stream, after an event that marks the request's last step on the loop's."""

    def __init__(self, family, stream=None):
        super().__init__(family)
        self.stream = stream
        self.decoder = ThreadPoolExecutor(1, thread_name_prefix="decode")
        self.decoding: list = []

    def _retire_finished(self) -> None:
        for held in [held for held in self._active if held.state.finished]:
            self._active.remove(held)
            held.timings["denoise_s"] = time.perf_counter() - held.denoise_started
            ready = None
            if self.stream is not None:
                ready = torch.cuda.Event()
                ready.record()  # on the loop's stream, after the request's last solver step
            self.decoding.append(self.decoder.submit(self._decode, held, ready))

    def _decode(self, held, ready) -> None:
        started = time.perf_counter()
        try:
            if self.stream is None:
                result = self.family.decode(held.state)
            else:
                with torch.cuda.stream(self.stream):
                    self.stream.wait_event(ready)
                    result = self.family.decode(held.state)
        except Exception as exc:  # noqa: BLE001 - as StepLoop: a failed decode loses this request only
            result = self._failure(exc)
        held.timings["decode_s"] = time.perf_counter() - started
        self._finish(held, result)

    def drain(self) -> None:
        for future in self.decoding:
            future.result()
        self.decoder.shutdown()


def overlaps(interval: tuple[float, float], others: list[tuple[float, float]]) -> bool:
    return any(start < interval[1] and end > interval[0] for start, end in others)


def drive_placement(loop: StepLoop, stages: TimedStages, plan: dict[int, list[AudioRequest]]) -> dict:
    """Runs the loop turn by turn in this thread, submitting the planned requests before their turns; returns the
    turns' wall times by kind and each request's submit-to-delivery latency."""
    submitted: dict[str, float] = {}
    delivered: dict[str, tuple[float, AudioResult]] = {}
    turns: list[tuple[float, float]] = []
    turn = 0
    while turn <= max(plan) or loop.busy:
        for request in plan.get(turn, []):
            submitted[request.id] = time.perf_counter()
            loop.submit(request, lambda result, key=request.id: delivered.__setitem__(key, (time.perf_counter(),
                                                                                            result)))
        started = time.perf_counter()
        loop.step()
        stages.sync()
        turns.append((started, time.perf_counter()))
        turn += 1
    if isinstance(loop, DecodeBesideLoop):
        loop.drain()
    with_decode = [end - start for start, end in turns if overlaps((start, end), stages.decodes)]
    plain = [end - start for start, end in turns
             if not overlaps((start, end), stages.decodes) and not overlaps((start, end), stages.prepares)]
    latency = {key: delivered[key][0] - submitted[key] for key in submitted}
    failed = [key for key, (_, result) in delivered.items() if result.error is not None]
    return {"turns": len(turns), "plain_steps": len(plain), "mean_step_s": mean_or_nan(plain),
            "decode_steps": len(with_decode), "mean_step_with_decode_s": mean_or_nan(with_decode),
            "max_step_s": max(end - start for start, end in turns),
            "mean_decode_s": mean_or_nan([end - start for start, end in stages.decodes]),
            "long_s": latency["long"], "long_denoise_s": delivered["long"][1].timings.get("denoise_s", float("nan")),
            "mean_short_latency_s": mean_or_nan([value for key, value in latency.items() if key != "long"]),
            "failed": failed, "long_audio": delivered["long"][1].audio}


def mean_or_nan(values: list[float]) -> float:
    return statistics.mean(values) if values else float("nan")


def bench_decode_placement(pipe, args) -> None:
    engine = served_engine(pipe, args)
    cuda = engine.device.type == "cuda"
    sync = torch.cuda.current_stream(engine.device).synchronize if cuda else (lambda: None)
    top = engine.limits.max_seconds
    long_steps, shorts, short_steps = args.placement_long_steps, args.placement_shorts, args.placement_short_steps
    if args.placement_short_length:
        short_lengths = [min(args.placement_short_length, top)] * shorts
    else:  # spread evenly from 2 s to the longest, so the decodes range from the cheapest to the costliest
        short_lengths = [round(2.0 + (top - 2.0) * i / max(1, shorts - 1), 2) for i in range(shorts)]
    # A full-length decode warms the VAE as well as the DiT; then the same plan for every placement.
    generate(engine, [replace(WARM_UP, audio_length=top)])
    spacing = max(1, (long_steps - short_steps - 4) // max(1, shorts))
    plan: dict[int, list[AudioRequest]] = {0: [AudioRequest(PROMPTS[0], 1, top, negative_prompt="Low quality",
                                                            num_inference_steps=long_steps, id="long")]}
    for i in range(shorts):
        plan.setdefault(2 + i * spacing, []).append(
            AudioRequest(PROMPTS[1 + i % (len(PROMPTS) - 1)], 100 + i, short_lengths[i],
                         num_inference_steps=short_steps, id=f"short-{i}"))
    placements = [("inline (StepLoop)", lambda stages: StepLoop(stages)),
                  ("beside: 1 thread", lambda stages: DecodeBesideLoop(stages))]
    if cuda:
        placements.append(("beside: 1 thread, own CUDA stream",
                           lambda stages: DecodeBesideLoop(stages, torch.cuda.Stream(engine.device))))
    lengths = ", ".join(f"{length:g}" for length in short_lengths)
    say(f"\n## decode_placement: a {long_steps}-step {top:.2f} s guided request while {shorts} guided "
        f"{short_steps}-step requests of {lengths} s join and finish (one every {spacing} turns); the VAE decode "
        "inline in the loop's turn (baseline) vs in a thread beside the loop. A step 'with decode' ran while a decode "
        "did (inline: in the same turn); steps without exclude turns that admitted a request.")
    say("| mode | long request total s | long request denoise s | mean step s without decode | mean step s with "
        "decode | turns with decode | max step s | mean decode s | mean short latency s | long vs inline "
        "| same audio |")
    say("|---|---|---|---|---|---|---|---|---|---|---|")
    rows, inline_audio = [], None
    for name, make_loop in placements:
        stages = TimedStages(engine, sync)
        row = {"mode": name, **drive_placement(make_loop(stages), stages, plan)}
        audio = row.pop("long_audio")
        inline_audio = audio if inline_audio is None else inline_audio
        row["same_audio_as_inline"] = audio is not None and bool(np.array_equal(audio, inline_audio))
        rows.append(row)
        say(f"| {name} | {row['long_s']:.3f} | {row['long_denoise_s']:.3f} | {row['mean_step_s']:.4f} | "
            f"{row['mean_step_with_decode_s']:.4f} | "
            f"{row['decode_steps']} of {row['turns']} | {row['max_step_s']:.4f} | {row['mean_decode_s']:.4f} | "
            f"{row['mean_short_latency_s']:.3f} | {row['long_s'] / rows[0]['long_s']:.2f}x | "
            f"{'yes' if row['same_audio_as_inline'] else 'NO'} |")
        if row["failed"]:
            say(f"  (failed: {', '.join(row['failed'])})")
    REPORT["decode_placement"] = {"plan": {"long_steps": long_steps, "shorts": shorts, "short_steps": short_steps,
                                           "short_lengths_s": short_lengths, "spacing_turns": spacing}, "modes": rows}


def is_short(body: dict) -> bool:
    return body["num_inference_steps"] <= SHORT_STEPS or body["audio_length"] <= SHORT_AUDIO_S


def post(url: str, body: dict) -> dict:
    started = time.perf_counter()
    measured = {"steps": body["num_inference_steps"], "audio_s": body["audio_length"], "short": is_short(body)}
    try:
        response = httpx.post(url + "/v1/audio/generate", json=body, timeout=3600)
    except httpx.HTTPError as error:  # counted as not ok, not a crash of the whole benchmark
        say(f"  (request failed: {type(error).__name__}: {error})")
        return {"status": 0, "latency_s": time.perf_counter() - started, "bytes": 0, "queue_s": float("nan"),
                "denoise_s": float("nan"), "batch_size": 0, **measured}
    latency = time.perf_counter() - started
    timing = dict(part.strip().split(";dur=") for part in response.headers.get("server-timing", "").split(",") if
                  ";dur=" in part)
    return {"status": response.status_code, "latency_s": latency, "bytes": len(response.content),
            "queue_s": float(timing.get("queue", "nan")) / 1000, "denoise_s": float(timing.get("denoise", "nan")) / 1000,
            "batch_size": int(response.headers.get("x-batch-size", 0)), **measured}


def bench_serving(pipe, url, args) -> None:
    engine = served_engine(pipe, args)  # the server's forward, so that only HTTP differs
    body = {"input": PROMPTS[3], "audio_length": 2.0, "guidance_scale": 1.0, "seed": 7,
            "num_inference_steps": args.latency_steps if not args.quick else 1}
    request = replace(as_request(body), guidance_scale=1.0)
    repeats = 3 if args.quick else 5
    if not args.quick:  # warm both paths; on CPU the engine is warm from the sections before
        generate(engine, [request])
        post(url, body)
    direct = statistics.median(timed(generate, engine, [request])[0] for _ in range(repeats))
    over_http = statistics.median(post(url, body)["latency_s"] for _ in range(repeats))
    say("\n## serving: one request over HTTP (continuous batching) vs the same generation in-process (median of "
        f"{repeats}; {body['num_inference_steps']} steps, 2 s clip, no guidance)")
    say(f"| direct s | HTTP s | overhead |\n|---|---|---|\n| {direct:.3f} | {over_http:.3f} | "
        f"{over_http / direct - 1:+.1%} |")
    REPORT["serving"] = {"direct_s": direct, "http_s": over_http, "overhead": over_http / direct - 1}


def bench_throughput(pipe, url, args) -> None:
    workload = mixed_workload(args.requests, [int(s) for s in args.steps.split(",")], args.max_length)
    say(f"\n## throughput: {len(workload)} mixed requests (5-{args.max_length:g} s, steps {args.steps}, half with a "
        "negative prompt), continuous batching")
    reference = documented_pipeline(pipe)
    reference.set_progress_bar_config(disable=True)
    warm_up = workload[0]  # untimed, as the server warmed up at its start
    reference(warm_up["input"], audio_end_in_s=warm_up["audio_length"], num_inference_steps=2)
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # diffusers returns before its decode's kernels have run
    started = time.perf_counter()
    for body in workload:  # the reference server: diffusers, one request at a time, always the full window
        reference(body["input"], audio_end_in_s=body["audio_length"], num_inference_steps=body["num_inference_steps"],
             negative_prompt=body["negative_prompt"], generator=torch.Generator().manual_seed(body["seed"]))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    baseline_wall = time.perf_counter() - started
    baseline = {"req_per_s": len(workload) / baseline_wall,
                "audio_s_per_s": sum(b["audio_length"] for b in workload) / baseline_wall,
                "dit_dtype": str(reference.transformer.dtype), "vae_dtype": str(reference.vae.dtype)}
    # The ratio to diffusers holds everything the service does differently (its forward's compile mode, SDE noise,
    # trimmed decode, batching); the ratio to the service's first row, one client, is what batching alone adds.
    say("| clients | req/s | audio s/s | p50 s | p95 s | mean batch | vs diffusers sequential | vs first row |")
    say("|---|---|---|---|---|---|---|---|")
    say(f"| diffusers, 1 at a time | {baseline['req_per_s']:.4f} | {baseline['audio_s_per_s']:.3f} | | | 1 | 1.00x | |")
    rows = []
    REPORT["throughput"] = {"baseline": baseline, "service": rows}
    for clients in [int(c) for c in args.concurrency.split(",")]:
        started = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(lambda body: post(url, body), workload))
        row = {"clients": clients, **summary(results, time.perf_counter() - started)}
        row["speedup"] = row["req_per_s"] / baseline["req_per_s"]
        rows.append(row)
        row["vs_first_row"] = row["req_per_s"] / rows[0]["req_per_s"]
        say(f"| {clients} | {row['req_per_s']:.4f} | {row['audio_s_per_s']:.3f} | {row['p50_s']:.2f} | "
            f"{row['p95_s']:.2f} | {row['mean_batch_header']:.1f} | {row['speedup']:.2f}x | {row['vs_first_row']:.2f}x |")
        if row["ok"] != row["requests"]:
            say(f"  ({row['requests'] - row['ok']} requests failed: the row counts only the answered ones)")
        save(REPORT, args.json)  # a run cut by its time limit keeps the rows it finished


# ----------------------------------------------------------------------------------------- arrivals: both modes
def arrival_workload(count: int, args, max_seconds: float, seed: int) -> list[dict]:
    """Mixed requests: lengths uniform in [min, max] (clipped to the model), step counts from --arrival-steps in
    shuffled rounds (every round of len(steps) requests has each listed count once, so even a few requests keep the
    mix), half with a negative prompt, --arrival-unguided of them with guidance_scale 1.0. Same seed, same workload."""
    rng = random.Random(seed)
    steps = [int(s) for s in args.arrival_steps.split(",")]
    if args.arrival_max_steps:
        steps = [min(s, args.arrival_max_steps) for s in steps]
    top = min(args.arrival_max_length or max_seconds, max_seconds)
    bottom = min(args.arrival_min_length, top)
    workload, round_ = [], []
    for i in range(count):  # the same draws per request whatever they give, so the sequence never shifts
        if not round_:
            round_ = rng.sample(steps, len(steps))
        length = max(0.01, math.floor(rng.uniform(bottom, top) * 100) / 100)
        body = {"input": rng.choice(PROMPTS), "audio_length": length, "seed": 2000 + i,
                "num_inference_steps": round_.pop()}
        body["negative_prompt"] = "Low quality" if rng.random() < 0.5 else None
        body["guidance_scale"] = 1.0 if rng.random() < args.arrival_unguided else 7.0
        workload.append(body)
    return workload


def poisson_offsets(count: int, rate: float, seed: int) -> list[float]:
    rng, at, offsets = random.Random(seed), 0.0, []
    for _ in range(count):
        at += rng.expovariate(rate)
        offsets.append(at)
    return offsets


def run_arrivals(url: str, workload: list[dict], offsets: list[float]) -> tuple[list[dict], float]:
    """Each request sent at its offset from the start (its own thread); the wall time runs to the last answer."""
    results: list[dict | None] = [None] * len(workload)

    def fire(index: int) -> None:
        results[index] = post(url, workload[index])

    threads, started = [], time.perf_counter()
    for index, at in enumerate(offsets):
        time.sleep(max(0.0, started + at - time.perf_counter()))
        threads.append(threading.Thread(target=fire, args=(index,)))
        threads[-1].start()
    for thread in threads:
        thread.join()
    return [r for r in results if r is not None], time.perf_counter() - started


def engine_counters(url: str) -> dict[str, float]:
    """The engine's step histograms' _sum and _count from /metrics (summed over label sets and processes)."""
    totals: dict[str, float] = {}
    for line in httpx.get(url + "/metrics", timeout=60).text.splitlines():
        found = re.match(r"(stable_audio_(?:step_rows|batch_size)_(?:sum|count))(?:\{[^}]*\})?\s+(\S+)$", line)
        if found:
            totals[found[1]] = totals.get(found[1], 0.0) + float(found[2])
    return totals


def per_step(before: dict[str, float], after: dict[str, float], name: str) -> float:
    steps = after.get(f"{name}_count", 0.0) - before.get(f"{name}_count", 0.0)
    return (after.get(f"{name}_sum", 0.0) - before.get(f"{name}_sum", 0.0)) / steps if steps else float("nan")


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def summary(results: list[dict], wall: float) -> dict:
    """Rates and latencies of the answered requests (200) alone: a refusal is quick and no audio."""
    ok = [r for r in results if r["status"] == 200]
    latencies = [r["latency_s"] for r in ok]
    short = [r["latency_s"] for r in ok if r["short"]]
    return {"requests": len(results), "ok": len(ok), "short_requests": len(short), "wall_s": wall,
            "req_per_s": len(ok) / wall, "audio_s_per_s": sum(r["audio_s"] for r in ok) / wall,
            "p50_s": percentile(latencies, 50), "p95_s": percentile(latencies, 95), "p99_s": percentile(latencies, 99),
            "short_p50_s": percentile(short, 50), "short_p95_s": percentile(short, 95),
            "queued_share": sum(r["queue_s"] for r in ok) / sum(latencies) if ok else float("nan"),
            "mean_batch_header": statistics.mean(r["batch_size"] for r in ok) if ok else float("nan"),
            "mean_step_s": statistics.mean(r["denoise_s"] / r["steps"] for r in ok) if ok else float("nan")}


# (figure, key in the summary, the target: where it applies, comparison, bound)
TARGETS = [("short requests' p50 latency", "short_p50_s", "CPU, tiny model", "<=", 0.5),
           ("throughput, req/s", "req_per_s", "CPU, tiny model", ">=", 0.95),
           ("overall p95 latency", "p95_s", "GPU", "<=", 0.6)]


def bench_arrivals(args) -> None:
    """Both batching modes, one server each, whole first; the same workload, rates and arrival times for both."""
    on_gpu = torch.cuda.is_available()
    runs: dict[tuple[str, float], dict] = {}
    capacity: dict = {}
    mix: dict = {}
    workload: list[dict] = []
    offsets: dict[float, list[float]] = {}
    max_pending = max(64, 2 * args.arrival_requests, 2 * args.capacity_requests)  # measure waiting, never 429
    for mode in BATCHING_MODES:
        env = {**server_env(args), "STABLE_AUDIO_BATCHING": mode, "STABLE_AUDIO_MAX_PENDING": str(max_pending)}
        with local_server(env, server_log(args, f"server-{mode}")) as url:
            warm_up = {"input": WARM_UP.prompt, "audio_length": WARM_UP.audio_length, "seed": WARM_UP.seed,
                       "num_inference_steps": WARM_UP.num_inference_steps}
            post(url, warm_up)
            if not capacity:  # once, in whole mode: everything sent at once
                max_seconds = float(httpx.get(url + "/health", timeout=60).json()["max_audio_length"])
                workload = arrival_workload(args.arrival_requests, args, max_seconds, seed=1)
                burst = arrival_workload(args.capacity_requests, args, max_seconds, seed=2)
                started = time.perf_counter()
                with ThreadPoolExecutor(len(burst)) as pool:
                    burst_results = list(pool.map(lambda body: post(url, body), burst))
                wall = time.perf_counter() - started
                ok = sum(r["status"] == 200 for r in burst_results)
                capacity = {"mode": mode, "requests": len(burst), "ok": ok, "wall_s": wall, "req_per_s": ok / wall}
                offsets = {load: poisson_offsets(len(workload), load * capacity["req_per_s"], int(load * 100))
                           for load in LOADS}
                mix = {"requests": len(workload), "short": sum(is_short(body) for body in workload),
                       "short_means": f"<= {SHORT_STEPS} steps or <= {SHORT_AUDIO_S:g} s of audio",
                       "steps": sorted({body["num_inference_steps"] for body in workload}),
                       "audio_s": [min(b["audio_length"] for b in workload), max(b["audio_length"] for b in workload)],
                       "negative_prompt": sum(b["negative_prompt"] is not None for b in workload),
                       "unguided": sum(b["guidance_scale"] == 1.0 for b in workload)}
                say(f"\n## arrivals: whole vs continuous batching, {mix['requests']} requests per load and mode "
                    f"({mix['short']} short: {mix['short_means']}), audio "
                    f"{mix['audio_s'][0]:.2f}-{mix['audio_s'][1]:.2f} s, steps {args.arrival_steps} in shuffled rounds"
                    + (f" clipped to {args.arrival_max_steps}" if args.arrival_max_steps else "")
                    + f", {mix['negative_prompt']} with a negative prompt, {mix['unguided']} unguided")
                say(f"capacity {capacity['req_per_s']:.4f} req/s: {len(burst)} requests sent at once to the whole-mode "
                    f"server ({capacity['ok']} ok, {wall:.1f} s); both modes get the same Poisson arrival times at "
                    "50 % and 90 % of it. Rows/step: DiT rows per denoising step from /metrics; X-Batch-Size: the "
                    "most requests sharing a step with each one; time queued: share of latency before the loop "
                    "admitted it.")
                say("| mode | load | rate req/s | ok | p50 s | p95 s | p99 s | short p50 s | short p95 s | req/s | "
                    "audio s/s | rows/step | mean X-Batch-Size | time queued |")
                say("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
            for load in LOADS:
                before = engine_counters(url)
                results, wall = run_arrivals(url, workload, offsets[load])
                after = engine_counters(url)
                row = {"rate": load * capacity["req_per_s"], **summary(results, wall),
                       "rows_per_step": per_step(before, after, "stable_audio_step_rows"),
                       "requests_per_step": per_step(before, after, "stable_audio_batch_size")}
                runs[mode, load] = row
                say(f"| {mode} | {load:.0%} | {row['rate']:.4f} | {row['ok']}/{row['requests']} | {row['p50_s']:.2f} | "
                    f"{row['p95_s']:.2f} | {row['p99_s']:.2f} | {row['short_p50_s']:.2f} | {row['short_p95_s']:.2f} | "
                    f"{row['req_per_s']:.4f} | {row['audio_s_per_s']:.3f} | {row['rows_per_step']:.2f} | "
                    f"{row['mean_batch_header']:.2f} | {row['queued_share']:.1%} |")

    report = []
    for load in LOADS:
        whole, continuous = runs["whole", load], runs["continuous", load]
        ratios = {key: continuous[key] / whole[key] if whole[key] else float("nan")
                  for key in ("p50_s", "p95_s", "p99_s", "short_p50_s", "short_p95_s", "req_per_s", "audio_s_per_s")}
        report.append({"load": load, "rate": load * capacity["req_per_s"], "capacity": capacity, "workload": mix,
                       "requests": whole["requests"] + continuous["requests"], "ok": whole["ok"] + continuous["ok"],
                       "whole": whole, "continuous": continuous, "ratios": ratios})
    device = "GPU" if on_gpu else "CPU, tiny model" if args.model == "tiny" else "CPU"
    say(f"\ncontinuous / whole at 90 % load, against the issue's targets (this run: {device}):")
    say("| figure at 90 % load | whole | continuous | continuous / whole | target | verdict |")
    say("|---|---|---|---|---|---|")
    targets = []
    for figure, key, where, comparison, bound in TARGETS:
        whole, continuous, ratio = runs["whole", 0.9][key], runs["continuous", 0.9][key], report[-1]["ratios"][key]
        met = (ratio <= bound if comparison == "<=" else ratio >= bound) if math.isfinite(ratio) else None
        verdict = "n/a (no data)" if met is None else "met" if met else "not met"
        applies = where == device
        targets.append({"figure": figure, "ratio": ratio, "target": f"{comparison} {bound}", "applies_to": where,
                        "applies": applies, "met": met})
        say(f"| {figure} | {whole:.4f} | {continuous:.4f} | {ratio:.2f}x | {where}: {comparison} {bound}x | "
            f"{verdict}{'' if applies else ' (target for ' + where + ' runs)'} |")
    report[-1]["targets"] = targets
    REPORT["arrivals"] = report


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
    if set(sections) & NEEDS_PIPE:
        # --dtype for every section but precision, which compares each half precision against fp32 itself
        config = engine_config(args)
        pipe = load_pipeline(replace(config, dtype="float32") if "precision" in sections else config)
        if "precision" in sections:
            bench_precision(pipe, args)
            save(REPORT, args.json)
            pipe = load_pipeline(config)
        for name, bench in (("decode", bench_decode), ("latency", bench_latency), ("scheduler", bench_scheduler),
                            ("drift", bench_drift), ("profile", bench_profile),
                            ("decode_placement", bench_decode_placement)):
            if name in sections:
                bench(pipe, args)
                save(REPORT, args.json)
    if set(sections) & {"serving", "throughput"}:
        env = {**server_env(args), "STABLE_AUDIO_BATCHING": "continuous"}
        with local_server(env, server_log(args)) as url:
            if "serving" in sections:
                bench_serving(pipe, url, args)
                save(REPORT, args.json)
            if "throughput" in sections:
                bench_throughput(pipe, url, args)
    if "arrivals" in sections:
        if pipe is not None:  # the servers need the memory more than this process does
            del pipe
            gc.collect()  # an engine refers to itself (its bound forward), so only the collector frees its pipe
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        bench_arrivals(args)
    finish(REPORT, started, args.json)


if __name__ == "__main__":
    main()
