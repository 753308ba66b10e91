#!/usr/bin/env bash
# Everything the GPU must show, from one command, offline, sized for about 8 minutes on an H100:
# precision (fp16/bf16 vs fp32 SNR), single-request latency (47 s / 10 s exact / 10 s short window), scheduler
# cost for batch 1-16, decode, where the VAE decode of a finished request should run (inline in the step loop or
# beside it), serving overhead, 1-16 concurrent clients vs diffusers sequential, and Poisson arrivals at 50 % and
# 90 % of capacity against both batching modes (whole, then continuous: one server each, the same arrivals).
#
#   bash benchmarks/prepare_gpu_wheels.sh     # here, once: the missing packages as Python 3.12 wheels in .whl/
#   (device tool) run  command="bash benchmarks/gpu.sh"  carry=[".whl"]
#   bash benchmarks/gpu.sh --cpu-smoke        # here: the same sequence with the tiny model on CPU (~2 minutes)
#
# Figures are printed as Markdown tables for benchmarks/RESULTS.md; JSON reports go to $OUT (or artifacts/).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
out="${OUT:-artifacts}"
mkdir -p "$out"

if [[ "${1:-}" == "--cpu-smoke" ]]; then
  python="${PYTHON:-.venv/bin/python}"
  model=(--model tiny --quick --arrival-requests 4)  # --only below overrides --quick's section choice
else
  python=python3
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  # arrivals: 32 mixed requests (2-47.55 s, 10/25/50/100 steps) per load and per batching mode, 16 for capacity
  model=(--model dummy --requests 16 --concurrency 1,2,4,8,16 --arrival-requests 32 --capacity-requests 16)
fi

"$python" benchmarks/bench.py "${model[@]}" --only precision,latency,scheduler,decode,decode_placement \
  --json "$out/bench-model.json"
"$python" benchmarks/bench.py "${model[@]}" --only latency --sde-noise vectorized --json "$out/bench-vectorized.json"
"$python" benchmarks/bench.py "${model[@]}" --only serving,throughput,arrivals --json "$out/bench-serving.json"
