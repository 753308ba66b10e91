#!/usr/bin/env bash
# Everything the GPU must show, from one command, offline.
#
# stable-audio-open-1.0 (the default), sized for about 8 minutes on an H100: precision (fp16/bf16 vs fp32 SNR),
# single-request latency (47 s / 10 s exact / 10 s short window), scheduler cost for batch 1-16, decode, where the
# VAE decode of a finished request should run (inline in the step loop or beside it), serving overhead, 1-16
# concurrent clients vs diffusers sequential, and Poisson arrivals at 50 % and 90 % of capacity against both
# batching modes (whole, then continuous: one server each, the same arrivals).
#
# sa3: Stable Audio 3 medium (full-size dummy weights), sized for under 5 minutes on an H100 (see the estimate
# below): SAME-L decode and encode memory, whole clip vs windows of 128 latent frames, at 30/120/380 s; then
# throughput of the step loop at 30/120/380 s for batches 1, 2, 4, 8 vs StableAudio3Pipeline one at a time.
#
#   bash benchmarks/prepare_gpu_wheels.sh     # here, once: the missing packages as Python 3.12 wheels in .whl/
#   (device tool) run  command="bash benchmarks/gpu.sh"      carry=[".whl"]
#   (device tool) run  command="bash benchmarks/gpu.sh sa3"  carry=[".whl"]
#   bash benchmarks/gpu.sh --cpu-smoke        # here: the same sequence with the tiny model on CPU (~2 minutes)
#   bash benchmarks/gpu.sh sa3 --cpu-smoke    # here: the SA3 sequence with tiny-sa3 on CPU (~2 minutes)
#
# Figures are printed as Markdown tables for benchmarks/RESULTS.md; JSON reports (and the SA3 log, kept even if
# the call is cut off) go to $OUT (or artifacts/).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
out="${OUT:-artifacts}"
mkdir -p "$out"

family=stable-audio-open cpu_smoke=false
for argument in "$@"; do
  case "$argument" in
    sa3) family=sa3 ;;
    --cpu-smoke) cpu_smoke=true ;;
    *) echo "usage: bash benchmarks/gpu.sh [sa3] [--cpu-smoke]" >&2; exit 2 ;;
  esac
done

if $cpu_smoke; then
  python="${PYTHON:-.venv/bin/python}"
else
  python=python3
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
fi

if [[ $family == stable-audio-open ]]; then
  if $cpu_smoke; then
    model=(--model tiny --quick --arrival-requests 4)  # --only below overrides --quick's section choice
  else
    # arrivals: 32 mixed requests (2-47.55 s, 10/25/50/100 steps) per load and per batching mode, 16 for capacity
    model=(--model dummy --requests 16 --concurrency 1,2,4,8,16 --arrival-requests 32 --capacity-requests 16)
  fi
  "$python" benchmarks/bench.py "${model[@]}" --only precision,latency,scheduler,decode,decode_placement \
    --json "$out/bench-model.json"
  "$python" benchmarks/bench.py "${model[@]}" --only latency --sde-noise vectorized --json "$out/bench-vectorized.json"
  "$python" benchmarks/bench.py "${model[@]}" --only serving,throughput,arrivals --json "$out/bench-serving.json"
  exit 0
fi

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
set -o pipefail
"$python" benchmarks/bench_sa3.py "${sa3[@]}" --only decode_memory,encode_memory,throughput \
  --json "$out/bench-sa3.json" 2>&1 | tee "$out/bench-sa3.log"
