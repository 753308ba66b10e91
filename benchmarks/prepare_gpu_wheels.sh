#!/usr/bin/env bash
# Download, into .whl/ (git-ignored), the Python 3.12 wheels that benchmarks/gpu.sh installs on the GPU machine,
# which has torch, transformers, numpy and most common packages but not these. Versions are those of ./.venv.
# .whl/transformers/ holds ./.venv's transformers for an image whose own predates T5Gemma (Stable Audio 3's text
# encoder; `gpu.sh sa3` installs it only then), with the packages its import checks the versions of
# (transformers/dependency_versions_check.py) and wants newer than an older image may have: tokenizers,
# huggingface-hub (its httpx2 is in .whl/), safetensors, regex.
# typing-extensions, idna, anyio and certifi are in the image too, but older than pydantic, httpx2 and bentoml
# require (their versions there are unrecorded): ./.venv's shadow them, all four keeping their older APIs.
# Needs PyPI; the result is about 33 MiB, 18 of them in transformers/. Carry it with the device tool: carry=[".whl"].
set -euo pipefail
cd "$(dirname "$0")/.."
NEEDED="bentoml diffusers torchsde trampoline soundfile cffi pycparser pydantic pydantic-core annotated-types
  typing-inspection fastapi starlette a2wsgi aiohttp-asgi-connector aiosqlite asgiref cattrs click-option-group
  httpx-ws httpx2 httpcore2 importlib-metadata kantoku lazy-importer opentelemetry-api opentelemetry-sdk
  opentelemetry-instrumentation opentelemetry-instrumentation-aiohttp-client opentelemetry-instrumentation-asgi
  opentelemetry-semantic-conventions opentelemetry-util-http pip-requirements-parser python-json-logger
  pydub soxr pytest pluggy iniconfig pygments python-multipart pyzmq rich-toolkit schema simple-di tomli-w tornado
  truststore uvicorn watchfiles wsproto typing-extensions idna anyio certifi"
TRANSFORMERS="transformers tokenizers huggingface-hub safetensors regex"
pins() {
  .venv/bin/python - "$@" <<'PY'
import sys
from importlib.metadata import version
print(" ".join(f"{name}=={version(name)}" for name in sys.argv[1:]))
PY
}
download() {  # FOLDER NAME...: ./.venv's versions as Python 3.12 x86-64 wheels
  local folder=$1
  shift
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d "$folder" $(pins "$@")
}
rm -rf .whl && mkdir -p .whl/transformers
download .whl $NEEDED
download .whl/transformers $TRANSFORMERS
du -sh .whl; du -sh .whl/transformers
