"""Stable Audio 3 benchmarks on CPU with full-size dummy weights (random, so speed and memory, not sound quality).
Every figure is printed beside its baseline, measured in the same run.

    python benchmarks/bench_sa3.py                                    # everything at full size: well over an hour
    python benchmarks/bench_sa3.py --lengths 10 --batches 1,2 --decode-lengths 30   # < 10 min on 2 cores
    python benchmarks/bench_sa3.py --only decode_memory --decode-vae same-l --decode-lengths 30,120,380 \
        --decode-windows none,128                                     # SAME-L; the whole 380 s decode needs ~40 GB

Sections (``--only`` picks some, comma-separated):
  throughput     seconds of audio per second of compute, for B requests of equal length run together through the
                 step loop (``run_to_completion``, the engine's defaults: windowed decode) against diffusers'
                 ``StableAudio3Pipeline`` on the same requests one after another (each request is timed once
                 through the pipeline; batch B is compared with the sum of the first B). No SNR here: a freshly
                 initialised SAME decoder ignores its latents (its attention and feed-forward outputs start at
                 zero), so dummy audio cannot tell; tests/test_sa3.py checks the audio on the tiny model
  decode_memory  peak memory and time of the SAME decoder alone: the whole clip at once (the pipeline's decode, the
                 baseline) against windows of N latent frames (``SA3Options.window_frames``); each run in a
                 fresh process, whose peak resident memory above the loaded autoencoder is reported
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from diffusers.models.autoencoders.autoencoder_same import AutoencoderSAME  # noqa: E402

from stable_audio_bento.config import EngineConfig  # noqa: E402
from stable_audio_bento.generation import AudioRequest  # noqa: E402
from stable_audio_bento.loading import load_sa3_engine  # noqa: E402
from stable_audio_bento.same_windows import decode_in_windows, decoder_reach_frames  # noqa: E402
from stable_audio_bento.sa3_loading import MEDIUM_ARCHITECTURE, SMALL_ARCHITECTURE, TINY_ARCHITECTURE  # noqa: E402
from stable_audio_bento.step_loop import run_to_completion  # noqa: E402

SECTIONS = ["throughput", "decode_memory"]
PROMPTS = ["Thunder and rain sounds", "A piano playing a gentle melody", "Ocean waves crashing on a beach",
           "The sound of a dog barking", "Guitar playing", "Audience clapping and cheering in a stadium"]
# The tiny model's decoder has the same band mask as the real ones (17 tokens per frame, the same length), so it
# shows the mask's memory in seconds where a whole SAME-S decode of 120 s takes many minutes on 2 cores.
AUTOENCODERS = {"same-s": SMALL_ARCHITECTURE.vae, "same-l": MEDIUM_ARCHITECTURE.vae, "tiny": TINY_ARCHITECTURE.vae}
SAMPLE_RATE, HOP = 44100, 4096
REPORT: dict = {}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections (default: all)")
    parser.add_argument("--model", default="stabilityai/stable-audio-3-small-music",
                        help="a published Stable Audio 3 model id, built at full size with random weights")
    parser.add_argument("--lengths", default="10,30,120", help="seconds of audio per request (throughput)")
    parser.add_argument("--batches", default="1,2,4,8", help="requests run together (throughput)")
    parser.add_argument("--steps", type=int, default=8, help="denoising steps per request (8: the distilled default)")
    parser.add_argument("--decode-vae", default="same-s", choices=sorted(AUTOENCODERS))
    parser.add_argument("--decode-lengths", default="30,120", help="seconds decoded (decode_memory)")
    parser.add_argument("--decode-windows", default="none,128,32",
                        help="latent frames per window, 'none' for the whole clip at once (decode_memory)")
    parser.add_argument("--json", type=Path, default=REPO / "artifacts" / "bench-sa3.json")
    parser.add_argument("--decode-child", nargs=3, metavar=("VAE", "SECONDS", "WINDOW"), help=argparse.SUPPRESS)
    return parser.parse_args()


def numbers(text: str, kind: type = float) -> list:
    return [kind(value) for value in text.split(",") if value]


def timed(function, *args) -> tuple[float, object]:
    started = time.perf_counter()
    result = function(*args)
    return time.perf_counter() - started, result


def say(line: str = "") -> None:
    print(line, flush=True)


# --------------------------------------------------------------------------------------------------- throughput
def pipeline_audio(pipe, request: AudioRequest) -> torch.Tensor:
    return pipe(request.prompt, duration=request.audio_length, num_inference_steps=request.num_inference_steps,
                guidance_scale=request.guidance_scale,
                generator=torch.Generator().manual_seed(request.seed)).audios[0]


def bench_throughput(args) -> None:
    started = time.perf_counter()
    engine = load_sa3_engine(EngineConfig(model=args.model, load_format="dummy", device="cpu"))
    say(f"\nbuilt {args.model} (dummy) in {time.perf_counter() - started:.0f} s")
    # The first forwards of a shape pay for oneDNN's kernel choice and page faults: not what is measured.
    run_to_completion(engine, [AudioRequest("warm-up", seed=0, audio_length=1.0, guidance_scale=1.0,
                                            num_inference_steps=1)])
    pipeline_audio(engine.pipe, AudioRequest("warm-up", seed=0, audio_length=1.0, guidance_scale=1.0,
                                             num_inference_steps=1))
    batches = numbers(args.batches, int)
    say(f"\n## throughput: {args.model} (dummy), {args.steps} steps, unguided; seconds of audio per second of "
        "compute")
    say("| audio | batch | pipeline, one at a time: s | audio s/s | step loop, together: s | audio s/s | speedup "
        "|\n|---|---|---|---|---|---|---|")
    rows = []
    for length in numbers(args.lengths):
        requests = [AudioRequest(PROMPTS[i % len(PROMPTS)], seed=i, audio_length=length, guidance_scale=1.0,
                                 num_inference_steps=args.steps) for i in range(max(batches))]
        solo = [timed(pipeline_audio, engine.pipe, request)[0] for request in requests]
        for batch in batches:
            seconds, results = timed(run_to_completion, engine, requests[:batch])
            baseline = sum(solo[:batch])
            audio = batch * length
            if any(result.error for result in results):
                sys.exit(f"the step loop failed: {results[0].error}")
            rows.append({"audio_s": length, "batch": batch, "pipeline_s": baseline, "engine_s": seconds,
                         "pipeline_rate": audio / baseline, "engine_rate": audio / seconds,
                         "speedup": baseline / seconds})
            say(f"| {length:g} s | {batch} | {baseline:.1f} | {audio / baseline:.2f} | {seconds:.1f} | "
                f"{audio / seconds:.2f} | {baseline / seconds:.2f}x |")
    REPORT["throughput"] = rows


# ------------------------------------------------------------------------------------------------ decode memory
def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_resident_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports kilobytes


@torch.no_grad()
def decode_child(vae_name: str, seconds: float, window: str) -> None:
    """One decode in this fresh process; prints what it measured as JSON."""
    torch.manual_seed(0)
    vae = AutoencoderSAME(**AUTOENCODERS[vae_name]).eval()
    latents = torch.randn(1, vae.config.latent_dim, int(np.ceil(seconds * SAMPLE_RATE / HOP)))
    loaded = resident_bytes()
    elapsed, audio = timed(decode_in_windows, vae, latents, None if window == "none" else int(window),
                           decoder_reach_frames(vae))
    print(json.dumps({"loaded_bytes": loaded, "peak_bytes": peak_resident_bytes(), "seconds": elapsed,
                      "samples": audio.shape[-1]}))


def measure_decode(vae_name: str, seconds: float, window: str) -> dict | None:
    """A decode in a fresh process, so its peak is its own; None if it failed (e.g. killed for memory)."""
    done = subprocess.run([sys.executable, __file__, "--decode-child", vae_name, str(seconds), window],
                          capture_output=True, text=True)
    if done.returncode != 0:
        say(f"    ({vae_name}, {seconds:g} s, window {window}: exit {done.returncode} {done.stderr[-300:]!r})")
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_decode_memory(args) -> None:
    reach = decoder_reach_frames(AutoencoderSAME(**AUTOENCODERS[args.decode_vae]))
    say(f"\n## decode_memory: {args.decode_vae.upper()} decoder (random weights), whole clip (baseline) vs windows "
        f"of N latent frames with {reach} more on each side; peak resident memory of a fresh process above the "
        "loaded autoencoder")
    say("| audio | frames | window | peak above loaded, GB | decode s | peak vs whole | time vs whole |\n"
        "|---|---|---|---|---|---|---|")
    rows = []
    for seconds in numbers(args.decode_lengths):
        whole = None
        for window in args.decode_windows.split(","):
            measured = measure_decode(args.decode_vae, seconds, window)
            if measured is None:
                continue
            peak = (measured["peak_bytes"] - measured["loaded_bytes"]) / 1e9
            row = {"vae": args.decode_vae, "audio_s": seconds, "window": window, "peak_above_loaded_gb": peak,
                   "decode_s": measured["seconds"]}
            whole = row if window == "none" else whole
            relative = (f"{peak / whole['peak_above_loaded_gb']:.3f} | "
                        f"{measured['seconds'] / whole['decode_s']:.2f}" if whole and whole is not row else "- | -")
            say(f"| {seconds:g} s | {int(np.ceil(seconds * SAMPLE_RATE / HOP))} | {window} | {peak:.2f} | "
                f"{measured['seconds']:.1f} | {relative} |")
            rows.append(row)
    REPORT["decode_memory"] = rows


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def main() -> None:
    args = parse_args()
    if args.decode_child:
        decode_child(args.decode_child[0], float(args.decode_child[1]), args.decode_child[2])
        return
    sections = [section for section in args.only.split(",") if section]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        sys.exit(f"unknown sections: {', '.join(sorted(unknown))}")
    cpu = cpu_name()
    REPORT["meta"] = {"date": datetime.date.today().isoformat(), "cpu": cpu, "threads": torch.get_num_threads(),
                      "torch": torch.__version__, "args": {k: str(v) for k, v in vars(args).items()}}
    say(f"# Stable Audio 3 benchmarks, {REPORT['meta']['date']}, CPU {cpu}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}")
    started = time.perf_counter()
    if "decode_memory" in sections:  # first: its processes need the memory the throughput section's model holds
        bench_decode_memory(args)
    if "throughput" in sections:
        bench_throughput(args)
    REPORT["meta"]["total_s"] = time.perf_counter() - started
    say(f"\ntotal {REPORT['meta']['total_s']:.0f} s")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(REPORT, indent=2, default=str))


if __name__ == "__main__":
    main()
