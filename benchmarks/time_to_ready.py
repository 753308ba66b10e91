"""Seconds from starting `bentoml serve` to the first 200 from /readyz, and the engine's own load and warm-up times.

    python benchmarks/time_to_ready.py tiny
    STABLE_AUDIO_LOAD_FORMAT=dummy python benchmarks/time_to_ready.py stabilityai/stable-audio-open-1.0

The server's environment is this one's, with STABLE_AUDIO_MODEL set to the argument; its log goes to
artifacts/time-to-ready.log. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from stable_audio_bento.config import REPO_ROOT  # noqa: E402
from stable_audio_bento.local_server import free_port, why_it_stopped  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--timeout-s", type=float, default=1800)
    args = parser.parse_args()
    port = free_port()
    log_path = REPO_ROOT / "artifacts" / "time-to-ready.log"
    log_path.parent.mkdir(exist_ok=True)
    started = time.monotonic()
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "bentoml", "serve", ".", "--port", str(port), "--host", "127.0.0.1"],
            cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "BENTOML_CONFIG": str(REPO_ROOT / "configuration.yaml"), "STABLE_AUDIO_MODEL": args.model})
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if process.poll() is not None:
                sys.exit(f"bentoml serve exited with {process.returncode}; from {log_path}:\n"
                         + why_it_stopped(log_path))
            if time.monotonic() - started > args.timeout_s:
                sys.exit(f"not ready after {args.timeout_s:.0f} s; see {log_path}")
            try:
                if httpx.get(url + "/readyz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        ready_s = time.monotonic() - started
        health = httpx.get(url + "/health", timeout=10).json()
        print(json.dumps({"model": args.model, "load_format": os.environ.get("STABLE_AUDIO_LOAD_FORMAT", "auto"),
                          "seconds_to_ready": round(ready_s, 1), "engine_load_s": health["load_s"],
                          "engine_warmup_s": health["warmup_s"], "load_average_1min": round(os.getloadavg()[0], 1)}))
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(120)


if __name__ == "__main__":
    main()
