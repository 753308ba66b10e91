"""Stable Audio 3 benchmarks with full-size dummy weights (random, so speed and memory, not sound quality), on
CPU or CUDA. Every figure is printed beside its baseline, measured in the same run.

    python benchmarks/bench_sa3.py                                    # everything at full size: well over an hour
    python benchmarks/bench_sa3.py --lengths 10 --batches 1,2 --memory-lengths 30   # < 10 min on 2 cores
    python benchmarks/bench_sa3.py --only decode_memory --memory-vae same-l --memory-lengths 30,120,380 \
        --memory-windows none,128                                     # SAME-L; the whole 380 s decode needs ~90 GB
    bash benchmarks/gpu.sh sa3                                        # the GPU figures (see that script)

Sections (``--only`` picks some, comma-separated):
  throughput     seconds of audio per second of compute, for B requests of equal length run together through the
                 step loop (``run_to_completion``, the engine's defaults: windowed decode) against diffusers'
                 ``StableAudio3Pipeline`` on the same requests one after another (each request is timed once
                 through the pipeline; batch B is compared with the sum of the first B, or with B times their mean
                 beyond ``--pipeline-runs``). No SNR here: a freshly initialised SAME decoder ignores its latents
                 (its attention and feed-forward outputs start at zero), so dummy audio cannot tell;
                 tests/test_sa3.py checks the audio on the tiny model
  decode_memory  peak memory and time of the SAME decoder alone: the whole clip at once (the pipeline's decode, the
                 baseline) against windows of N latent frames (``SA3Options.window_frames``) with the decoder's
                 reach as margin; each run in a fresh process. On CPU its peak resident memory above the loaded
                 autoencoder, on CUDA ``torch.cuda.max_memory_allocated`` above it; running out of memory is a row
  encode_memory  the same for the SAME encoder on random audio of that length (an upload's encode)
--model tiny-sa3 runs the tiny random model (built locally) instead of a published architecture.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from diffusers.models.autoencoders.autoencoder_same import AutoencoderSAME  # noqa: E402

from stable_audio_bento.config import EngineConfig, parse_compile_mode  # noqa: E402
from stable_audio_bento.generation import AudioRequest  # noqa: E402
from stable_audio_bento.loading import load_sa3_engine  # noqa: E402
from stable_audio_bento.same_windows import (  # noqa: E402
    decode_in_windows,
    decoder_reach_frames,
    encode_in_windows,
    encoder_reach_frames,
)
from stable_audio_bento.sa3_loading import (  # noqa: E402
    MEDIUM_ARCHITECTURE,
    SMALL_ARCHITECTURE,
    TINY_ARCHITECTURE,
    TINY_SA3,
    TINY_SA3_BASE,
    place_keeping_frequencies,
)
from stable_audio_bento.step_loop import run_to_completion  # noqa: E402

from baseline import documented_pipeline  # noqa: E402  (this folder is on sys.path when run as a script)
from report import finish, save  # noqa: E402

SECTIONS = ["throughput", "decode_memory", "encode_memory"]
PROMPTS = ["Thunder and rain sounds", "A piano playing a gentle melody", "Ocean waves crashing on a beach",
           "The sound of a dog barking", "Guitar playing", "Audience clapping and cheering in a stadium"]
# The tiny model's autoencoder has the same band mask as the real ones (17 tokens per frame, the same length), so
# it shows the mask's memory in seconds where a whole SAME-S decode of 120 s takes many minutes on 2 cores.
AUTOENCODERS = {"same-s": SMALL_ARCHITECTURE.vae, "same-l": MEDIUM_ARCHITECTURE.vae, "tiny": TINY_ARCHITECTURE.vae}
REACH = {"decode": decoder_reach_frames, "encode": encoder_reach_frames}
SAMPLE_RATE, HOP = 44100, 4096
REPORT: dict = {}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections (default: all)")
    parser.add_argument("--model", default="stabilityai/stable-audio-3-small-music",
                        help="a published Stable Audio 3 model id, built at full size with random weights, or "
                             "tiny-sa3")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                        help="of the DiT and the text encoder (default: float32 on CPU, float16 on CUDA)")
    parser.add_argument("--vae-dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                        help="of the autoencoder, in every section (default: float32, the engine's)")
    parser.add_argument("--lengths", default="10,30,120", help="seconds of audio per request (throughput)")
    parser.add_argument("--batches", default="1,2,4,8", help="requests run together (throughput)")
    parser.add_argument("--steps", type=int, default=8, help="denoising steps per request (8: the distilled default)")
    parser.add_argument("--pipeline-runs", type=int,
                        help="requests of each length timed through the pipeline (default: the largest batch)")
    parser.add_argument("--memory-vae", default="same-s", choices=sorted(AUTOENCODERS))
    parser.add_argument("--memory-lengths", default="30,120",
                        help="seconds encoded or decoded (encode_memory, decode_memory)")
    parser.add_argument("--memory-windows", default="none,128,32",
                        help="latent frames per window, 'none' for the whole clip at once (*_memory)")
    parser.add_argument("--compile", default="0", metavar="MODE",
                        help="how the step loop's DiT forward runs (STABLE_AUDIO_COMPILE's values: 0 for eager, "
                             "cuda-graphs, 1 or a torch.compile mode); the pipeline stays eager (throughput)")
    parser.add_argument("--json", type=Path, default=REPO / "artifacts" / "bench-sa3.json")
    parser.add_argument("--memory-child", nargs=4, metavar=("DIRECTION", "VAE", "SECONDS", "WINDOW"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.dtype = args.dtype or ("float16" if args.device == "cuda" else "float32")
    try:
        args.compile = parse_compile_mode(args.compile)
    except ValueError as error:
        parser.error(str(error))
    return args


def numbers(text: str, kind: type = float) -> list:
    return [kind(value) for value in text.split(",") if value]


def timed(function, *args) -> tuple[float, object]:
    """Wall time; on CUDA up to the end of the work queued, not of its launch."""
    synchronize()
    started = time.perf_counter()
    result = function(*args)
    synchronize()
    return time.perf_counter() - started, result


def synchronize() -> None:
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def release_cuda_memory() -> None:
    """After an out-of-memory error, once its traceback (which holds the failed call's tensors) is gone."""
    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def latent_frames(seconds: float) -> int:
    return int(np.ceil(seconds * SAMPLE_RATE / HOP))


def say(line: str = "") -> None:
    print(line, flush=True)


# --------------------------------------------------------------------------------------------------- throughput
def pipeline_audio(pipe, request: AudioRequest) -> torch.Tensor:
    return pipe(request.prompt, duration=request.audio_length, num_inference_steps=request.num_inference_steps,
                guidance_scale=request.guidance_scale,
                generator=torch.Generator().manual_seed(request.seed)).audios[0]


def pipeline_seconds(pipe, request: AudioRequest) -> float | None:
    """One request through the pipeline; None if it ran out of GPU memory (its whole-clip decode, at 380 s)."""
    try:
        return timed(pipeline_audio, pipe, request)[0]
    except torch.OutOfMemoryError:
        pass
    release_cuda_memory()
    return None


def warm_up_request(length: float, steps: int) -> AudioRequest:
    return AudioRequest("warm-up", seed=0, audio_length=length, guidance_scale=1.0, num_inference_steps=steps)


def bench_throughput(args) -> None:
    started = time.perf_counter()
    tiny = args.model in (TINY_SA3, TINY_SA3_BASE)
    engine = load_sa3_engine(EngineConfig(model=args.model, load_format="auto" if tiny else "dummy",
                                          device=args.device, dtype=args.dtype, vae_dtype=args.vae_dtype))
    if args.compile:
        engine.compile(args.compile)
    say(f"\nbuilt {args.model} ({'tiny' if tiny else 'dummy'}) on {args.device}, DiT {args.dtype}, VAE "
        f"{args.vae_dtype}, in {time.perf_counter() - started:.0f} s; the step loop's DiT forward: "
        f"{args.compile or 'eager'}")
    pipe = documented_pipeline(engine.pipe)
    batches, lengths = numbers(args.batches, int), numbers(args.lengths)
    pipeline_runs = args.pipeline_runs or max(batches)
    # The first forwards of a shape pay for kernel choice, module loading and allocator growth (oneDNN on CPU,
    # cuBLAS/cuDNN on CUDA), and with --compile for compilation (once for one row, once for any more) or for
    # CUDA-graph recording (on a shape's second call): not what is measured. Two steps of each length through the
    # loop (alone, and two together when compiled), one through the pipeline, cost little.
    fits_pipeline = {}
    for length in lengths:
        for batch in (1, 2) if args.compile else (1,):
            results = run_to_completion(engine, batch * [warm_up_request(length, steps=2)])
            if results[0].error:
                sys.exit(f"the step loop failed on its warm-up: {results[0].error}")
        fits_pipeline[length] = pipeline_seconds(pipe, warm_up_request(length, steps=1)) is not None
    say(f"\n## throughput: {args.model} ({'tiny' if tiny else 'dummy'}), {args.steps} steps, unguided; seconds of "
        "audio per second of compute" + (f"; the pipeline timed on the first {pipeline_runs}, larger batches "
                                         "against B times their mean (≈)" if pipeline_runs < max(batches) else ""))
    say("| audio | batch | pipeline, one at a time: s | audio s/s | step loop, together: s | audio s/s | speedup "
        "|\n|---|---|---|---|---|---|---|")
    rows = []
    for length in lengths:
        requests = [AudioRequest(PROMPTS[i % len(PROMPTS)], seed=i, audio_length=length, guidance_scale=1.0,
                                 num_inference_steps=args.steps) for i in range(max(batches))]
        solo = [pipeline_seconds(pipe, request) for request in requests[:pipeline_runs]
                ] if fits_pipeline[length] else [None]
        for batch in batches:
            seconds, results = timed(run_to_completion, engine, requests[:batch])
            error = next((result.error for result in results if result.error), None)
            audio = batch * length
            extrapolated = batch > len(solo)
            baseline = (None if None in solo else batch * statistics.mean(solo) if extrapolated
                        else sum(solo[:batch]))
            engine_s = None if error else seconds
            rows.append({"audio_s": length, "batch": batch, "pipeline_s": baseline,
                         "pipeline_extrapolated": baseline is not None and extrapolated, "engine_s": engine_s,
                         "engine_error": error, "pipeline_rate": baseline and audio / baseline,
                         "engine_rate": engine_s and audio / engine_s,
                         "speedup": baseline and engine_s and baseline / engine_s})
            pipeline = f"{'≈' * extrapolated}{baseline:.1f} | {audio / baseline:.2f}" if baseline else "OOM | -"
            engine_cells = f"{seconds:.1f} | {audio / seconds:.2f}" if engine_s else f"failed: {error[:60]} | -"
            speedup = f"{baseline / seconds:.2f}x" if baseline and engine_s else "-"
            say(f"| {length:g} s | {batch} | {pipeline} | {engine_cells} | {speedup} |")
    REPORT["throughput"] = rows


# ------------------------------------------------------------------------------------------- encode/decode memory
def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_resident_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports kilobytes


@torch.no_grad()
def memory_child(args) -> None:
    """One encode or decode in this fresh process; prints what it measured as JSON."""
    direction, vae_name, seconds, window = args.memory_child
    device, dtype = torch.device(args.device), getattr(torch, args.vae_dtype)
    torch.manual_seed(0)
    with device:  # random initialisation on the GPU takes no time; on the CPU it is where it happens anyway
        vae = AutoencoderSAME(**AUTOENCODERS[vae_name]).to(device).eval()
    place_keeping_frequencies(vae, device, dtype)
    frames = latent_frames(float(seconds))
    window_frames = None if window == "none" else int(window)
    if direction == "decode":
        latents = torch.randn(1, vae.config.latent_dim, frames, device=device, dtype=dtype)
        run = partial(decode_in_windows, vae, latents, window_frames, decoder_reach_frames(vae))
    else:
        audio = torch.randn(1, vae.config.audio_channels, round(float(seconds) * SAMPLE_RATE), device=device,
                            dtype=dtype)
        run = partial(encode_in_windows, vae, audio, window_frames, encoder_reach_frames(vae))
    if device.type == "cuda":
        synchronize()
        torch.cuda.reset_peak_memory_stats()
        loaded = torch.cuda.memory_allocated()
    else:
        loaded = resident_bytes()
    try:
        elapsed, result = timed(run)
    except torch.OutOfMemoryError:
        print(json.dumps({"oom": True}))
        return
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else peak_resident_bytes()
    print(json.dumps({"loaded_bytes": loaded, "peak_bytes": peak, "seconds": elapsed, "shape": list(result.shape)}))


def measure_memory(args, direction: str, seconds: float, window: str) -> dict:
    """An encode or decode in a fresh process, so its peak is its own; {"failed": why} if it did not finish."""
    done = subprocess.run([sys.executable, __file__, "--memory-child", direction, args.memory_vae, str(seconds),
                           window, "--device", args.device, "--vae-dtype", args.vae_dtype],
                          capture_output=True, text=True)
    if done.returncode != 0:  # on CPU the kernel kills a process that runs out of memory: exit -9
        say(f"    ({direction}, {args.memory_vae}, {seconds:g} s, window {window}: exit {done.returncode} "
            f"{done.stderr[-300:]!r})")
        return {"failed": f"exit {done.returncode}"}
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    return {"failed": "OOM"} if measured.get("oom") else measured


def bench_memory(args, direction: str) -> None:
    with torch.device("meta"):  # the reach is read off the blocks' shapes: no weights needed
        reach = REACH[direction](AutoencoderSAME(**AUTOENCODERS[args.memory_vae]))
    coder = "encoder" if direction == "encode" else "decoder"
    memory = ("torch.cuda.max_memory_allocated of a fresh process above the loaded autoencoder and its input"
              if args.device == "cuda" else "peak resident memory of a fresh process above the loaded autoencoder")
    say(f"\n## {direction}_memory: {args.memory_vae.upper()} {coder} (random weights, {args.vae_dtype}, "
        f"{args.device}), whole clip (baseline) vs windows of N latent frames with {reach} more on each side; "
        f"{memory}")
    say(f"| audio | frames | window | peak above loaded, GB | {direction} s | peak vs whole | time vs whole |\n"
        "|---|---|---|---|---|---|---|")
    rows = []
    for seconds in numbers(args.memory_lengths):
        whole = None
        for window in args.memory_windows.split(","):
            measured = measure_memory(args, direction, seconds, window)
            cells = f"| {seconds:g} s | {latent_frames(seconds)} | {window} |"
            row = {"vae": args.memory_vae, "audio_s": seconds, "window": window}
            if "failed" in measured:
                rows.append(row | {"failed": measured["failed"]})
                say(f"{cells} {measured['failed']} | - | - | - |")
                continue
            peak = (measured["peak_bytes"] - measured["loaded_bytes"]) / 1e9
            row |= {"peak_above_loaded_gb": peak, f"{direction}_s": measured["seconds"]}
            whole = row if window == "none" else whole
            relative = (f"{peak / whole['peak_above_loaded_gb']:.3f} | "
                        f"{measured['seconds'] / whole[f'{direction}_s']:.2f}" if whole and whole is not row
                        else "- | -")
            say(f"{cells} {peak:.2f} | {measured['seconds']:.2f} | {relative} |")
            rows.append(row)
    REPORT[f"{direction}_memory"] = rows


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def device_meta(device: str) -> dict:
    if device == "cuda":
        return {"gpu": torch.cuda.get_device_name(), "cuda": torch.version.cuda,
                "gpu_memory_gb": round(torch.cuda.get_device_properties(0).total_memory / 1e9, 1)}
    return {"cpu": cpu_name(), "threads": torch.get_num_threads()}


def main() -> None:
    args = parse_args()
    if args.memory_child:
        memory_child(args)
        return
    sections = [section for section in args.only.split(",") if section]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        sys.exit(f"unknown sections: {', '.join(sorted(unknown))}")
    device = device_meta(args.device)
    REPORT["meta"] = {"date": datetime.date.today().isoformat(), **device, "torch": torch.__version__,
                      "args": {k: str(v) for k, v in vars(args).items()}}
    where = (f"{device['gpu']} ({device['gpu_memory_gb']} GB), CUDA {device['cuda']}" if args.device == "cuda"
             else f"CPU {device['cpu']}, {device['threads']} threads")
    say(f"# Stable Audio 3 benchmarks, {REPORT['meta']['date']}, {where}, torch {torch.__version__}")
    started = time.perf_counter()
    for direction in ("decode", "encode"):  # first: their processes need the memory the throughput model holds
        if f"{direction}_memory" in sections:
            bench_memory(args, direction)
            save(REPORT, args.json)
    if "throughput" in sections:
        bench_throughput(args)
    finish(REPORT, started, args.json)


if __name__ == "__main__":
    main()
