#!/usr/bin/env bash
# Everything the GPU must show, from one command, offline, in parts that each fit one device call:
#
#   model    stable-audio-open-1.0 in-process: precision (fp16/bf16 vs fp32 SNR), single-request latency (47 s /
#            10 s exact / 10 s short window) with the served SDE noise and with the Brownian tree, scheduler cost for
#            batch 1-16, a request's drift alone vs batched, a profile of one batched step (top kernels, GPU busy
#            share), decode, where the VAE decode of a finished request should run. 2026-11-27 H200: 1.7 min
#            before drift and profile were added (estimated +30 s).
#   throughput  over HTTP: serving overhead, 1-16 concurrent clients vs diffusers one at a time (fp16). Estimated
#            4-5 min on an H200 (eager step times from the model part).
#   arrivals Poisson arrivals at 50 % and 90 % of capacity against both batching modes (whole, then continuous: one
#            server each, the same arrivals). The whole-mode half took 2.3 min on an H200: about 5 min.
#   graphs   STABLE_AUDIO_COMPILE=cuda-graphs (the eager forward replayed from CUDA graphs): tests/test_cuda_graphs.py
#            on the GPU (replays equal eager forwards, both families), then the latency cases eager and graphed.
#            Estimated 2 min (the model part's latencies twice, plus ~30 s of tests).
#   compile  the latency cases eager and torch.compile'd in mode reduce-overhead (CUDA graphs), in one run; stopped
#            after 5 min (compilation time unmeasured on a GPU).
#   sa3      Stable Audio 3 medium (full-size dummy weights), sized for under 5 minutes on an H100 (see the estimate
#            below): SAME-L decode and encode memory, whole clip vs windows of 128 latent frames, at 30/120/380 s;
#            then throughput of the step loop at 30/120/380 s for batches 1, 2, 4, 8 vs StableAudio3Pipeline one at
#            a time.
# With no part named: model, throughput, arrivals (over 10 min on an H200: too long for one device call). Name one
# or several to run them in that order. COMPILE=MODE (a STABLE_AUDIO_COMPILE value, e.g. cuda-graphs) runs the
# engine's DiT forward that way in model, throughput, arrivals and sa3 (in-process and in the servers).
#
#   bash benchmarks/prepare_gpu_wheels.sh     # here, once: the missing packages as Python 3.12 wheels in .whl/
#   (device tool) run  command="bash benchmarks/gpu.sh throughput"  carry=[".whl"]
#   e.g. one call: set -o pipefail; (bash benchmarks/gpu.sh graphs; COMPILE=cuda-graphs bash benchmarks/gpu.sh
#     throughput) 2>&1 | tee $OUT/run1.log; then, eager: THROUGHPUT_ONLY=throughput (no serving part again)
#   bash benchmarks/gpu.sh [PART...] --cpu-smoke   # here: the same sequence, tiny models on CPU (~2 min a part)
#
# Figures are printed as Markdown tables for benchmarks/RESULTS.md; JSON reports (written after each section, so a
# section that fails leaves the earlier ones' figures) and the SA3 log go to $OUT (or artifacts/). Tee the whole
# output into $OUT too (`... 2>&1 | tee $OUT/run1.log`): a traceback can push the tables out of the device tool's
# output tail. At most 8 files come back: a part writes 1-3 (its JSON, its servers' logs).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
out="${OUT:-artifacts}"
mkdir -p "$out"

parts=() cpu_smoke=false
for argument in "$@"; do
  case "$argument" in
    model|throughput|arrivals|graphs|compile|sa3) parts+=("$argument") ;;
    --cpu-smoke) cpu_smoke=true ;;
    *) echo "usage: [COMPILE=MODE] bash benchmarks/gpu.sh [model|throughput|arrivals|graphs|compile|sa3]..." \
         "[--cpu-smoke]" >&2
       exit 2 ;;
  esac
done
[[ ${#parts[@]} -gt 0 ]] || parts=(model throughput arrivals)

if $cpu_smoke; then
  python="${PYTHON:-.venv/bin/python}"
  # --only below overrides --quick's section choice; bf16 DiT beside the fp32 VAE: the GPU's layout
  model=(--model tiny --quick --arrival-requests 4 --dtype bfloat16)
else
  python=python3
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  # arrivals: 16 mixed requests (2-47.55 s, 10/25/50/100 steps) per load and per batching mode, 8 for capacity
  model=(--model dummy --requests 16 --concurrency 1,2,4,8,16 --arrival-requests 16 --capacity-requests 8)
fi
forward=()
[[ -z "${COMPILE:-}" ]] || forward=(--compile "$COMPILE")
bench() { "$python" benchmarks/bench.py "${model[@]}" "${forward[@]}" "$@"; }  # a later --compile wins

ensure_t5gemma() {
  # Stable Audio 3 needs transformers' T5Gemma (the names below are what diffusers' pipeline and src/ import); an
  # image whose transformers predates it gets ./.venv's (prepared in .whl/transformers/ with the dependencies its
  # import checks), in a folder of its own ahead of everything else.
  t5gemma="from transformers import GemmaTokenizer, GemmaTokenizerFast, T5GemmaConfig, T5GemmaEncoderModel"
  if ! "$python" -c "$t5gemma" 2>/dev/null; then
    echo "transformers here has no T5Gemma: installing .whl/transformers/"
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site-transformers .whl/transformers/*.whl
    export PYTHONPATH="/tmp/site-transformers${PYTHONPATH:+:$PYTHONPATH}"
    "$python" -c "$t5gemma"
  fi
  "$python" -c "import diffusers, transformers; print('diffusers', diffusers.__version__, 'transformers',
    transformers.__version__)"
}

sa3_part() {
  ensure_t5gemma

  if $cpu_smoke; then
    # bf16 DiT beside an fp32 VAE: the GPU layout, which the baseline pipeline needs a VAE copy for
    sa3=(--device cpu --dtype bfloat16 --model tiny-sa3 --lengths 10,30 --batches 1,2 --steps 2 --pipeline-runs 1
         --memory-vae tiny --memory-lengths 10,30 --memory-windows none,128)
  else
    # fp16 for the DiT and T5Gemma, as diffusers documents StableAudio3Pipeline (from_pretrained(..., torch_dtype=
    # torch.float16)); the engine's VAE stays fp32 (its default), the baseline pipeline gets an fp16 copy (all in
    # fp16, as documented).
    # Estimate on an H100 (FLOPs counted with torch's FlopCounterMode on the meta device; rates assumed): SAME-L
    # costs ~9 TFLOP to decode or encode 30 s whole, ~90 at 120 s (its dense band mask makes it quadratic), ~3.2 per
    # window of 128 + 2 x 12 frames, so ~35 per 120 s and ~103 per 380 s clip in windows; whole at 380 s needs
    # ~90 GB and fails at once (a reported OOM row, in the pipeline too). At ~30 TFLOP/s in fp32 (no TF32 for
    # matmuls by default): installs ~20 s; 12 memory processes ~100 s (5-7 s each to import and start CUDA, ~16 s of
    # work); the medium build on the CPU ~30 s; warm-ups ~10 s; the step loop's 15 requests per length ~75 s (its
    # decodes; the fp16 DiT, ~1.4 B parameters, adds ~6 s); the pipeline 2 requests per length ~7 s. About 4 min.
    # Cut: --pipeline-runs 2 (batches 4 and 8 compare with 4 and 8 times their mean): 6 more whole decodes per length
    # would add ~20 s here, and minutes on an H200, where the 380 s whole decode (~770 TFLOP) fits.
    sa3=(--device cuda --dtype float16 --model stabilityai/stable-audio-3-medium --lengths 30,120,380
         --batches 1,2,4,8 --pipeline-runs 2 --memory-vae same-l --memory-lengths 30,120,380 --memory-windows none,128)
  fi
  "$python" benchmarks/bench_sa3.py "${sa3[@]}" --only decode_memory,encode_memory,throughput \
    --compile "${COMPILE:-0}" --json "$out/bench-sa3${COMPILE:+-$COMPILE}.json" \
    2>&1 | tee "$out/bench-sa3${COMPILE:+-$COMPILE}.log"
}

for part in "${parts[@]}"; do
  case "$part" in
    model)
      bench --only precision,latency,scheduler,drift,profile,decode,decode_placement \
        --json "$out/bench-model${COMPILE:+-$COMPILE}.json"
      # the served SDE noise is vectorized on CUDA (exact on CPU): the Brownian tree's latency beside it
      bench --only latency --sde-noise exact --json "$out/bench-tree.json" ;;
    throughput)
      # THROUGHPUT_ONLY=throughput: a second run (another compile mode) leaves out serving, already measured
      bench --only "${THROUGHPUT_ONLY:-serving,throughput}" --json "$out/bench-throughput${COMPILE:+-$COMPILE}.json" ;;
    arrivals)
      bench --only arrivals --json "$out/bench-arrivals${COMPILE:+-$COMPILE}.json" ;;
    graphs)
      ensure_t5gemma  # the tests cover Stable Audio 3 too
      # No plugins: the image's (xdist, cov, benchmark, timeout...) are built for its own pytest, not the one from
      # .whl/ that runs them here, and these tests need none.
      # (so no pytest-timeout: `timeout` bounds a capture that hangs, which would take the whole device call)
      PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 timeout -k 10 240 "$python" -m \
        pytest -q -p no:cacheprovider tests/test_cuda_graphs.py 2>&1 | tee "$out/graphs-tests.log" \
        || echo "the CUDA-graph tests failed with status $?"
      # a failure here must not stop a `gpu.sh graphs && ... gpu.sh throughput` chain
      $cpu_smoke || bench --only latency --compile cuda-graphs --json "$out/bench-graphs.json" \
        || echo "the cuda-graphs latency part failed with status $?" ;;
    compile)
      # KILL 30 s after the INT, so the 5 min hold: Python handles the INT only between C++ calls, and its exit
      # waits for Inductor's compile workers to finish their builds
      timeout -k 30 -s INT 300 "$python" benchmarks/bench.py "${model[@]}" --only latency --compile reduce-overhead \
        --json "$out/bench-compile.json" || echo "compile part stopped with status $?" ;;
    sa3)
      sa3_part ;;
  esac
done
