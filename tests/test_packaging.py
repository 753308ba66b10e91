"""`bentoml build` from the repo makes a Bento whose image has what the service needs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def test_bentoml_build_produces_a_complete_bento(tmp_path):
    env = dict(os.environ, BENTOML_HOME=str(tmp_path), BENTOML_DO_NOT_TRACK="True")
    done = subprocess.run([sys.executable, "-m", "bentoml", "build", ".", "--output", "tag"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    [bento] = [path for path in (tmp_path / "bentos" / "stable-audio-bento").iterdir() if path.name != "latest"]

    sources = {str(path.relative_to(bento / "src")) for path in (bento / "src").rglob("*.py")}
    assert {"service.py", "src/stable_audio_bento/pipeline.py", "src/stable_audio_bento/loading.py"} <= sources
    assert not any(name.startswith("tests/") for name in sources)
    assert (bento / "src" / "configuration.yaml").is_file()

    dockerfile = (bento / "env" / "docker" / "Dockerfile").read_text()
    assert "FROM python:3.11" in dockerfile
    assert "libsndfile1" in dockerfile
    assert "ENV BENTOML_CONFIG=$BENTOML_CONFIG" in dockerfile
    # No model setting in the image: it would override a model baked in with stable-audio-import-model.
    assert "STABLE_AUDIO_MODEL" not in dockerfile
    services = yaml.safe_load((bento / "bento.yaml").read_text())["services"]
    assert all(service["models"] == [] for service in services)  # an empty model store builds a Bento without one

    locked = (bento / "env" / "python" / "requirements.txt").read_text().splitlines()
    pins = {line.split("==")[0].lower(): line.split("==")[1].split()[0] for line in locked if "==" in line}
    assert pins["torch"] == "2.13.0"
    assert pins["nvidia-cuda-runtime"].startswith("13.")  # torch's CUDA 13 runtime ships inside the image
    for package in ("bentoml", "diffusers", "transformers", "torchsde", "soundfile", "sentencepiece", "fastapi"):
        assert package in pins, package

    spec = yaml.safe_load((bento / "apis" / "openapi.yaml").read_text())
    body = spec["paths"]["/v1/audio/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"input", "audio_length", "seed", "response_format"} <= set(body["properties"])
