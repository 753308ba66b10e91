"""Command-line client for POST /v1/audio/generate (standard library only, so it runs anywhere).

    python -m stable_audio_bento.client "Thunder and rain sounds" --audio-length 15 --seed 42 -o rain.wav
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

FIELDS = {  # flag -> (type, help); None values are left out so the server applies its defaults
    "audio_length": (float, "seconds of audio (default: the model maximum, 47.55 s)"),
    "audio_start": (float, "start of the returned window in seconds (default 0)"),
    "negative_prompt": (str, "what to avoid"),
    "guidance_scale": (float, "classifier-free guidance scale (default 7; <= 1 disables guidance)"),
    "num_inference_steps": (int, "denoising steps (default 100)"),
    "seed": (int, "random seed; the same seed and request give the same audio"),
    "response_format": (str, "wav, mp3, flac or pcm (default: from the output file's suffix, else wav)"),
    "model": (str, "model name; must match the served model if given"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Generate audio with a stable-audio-bento server.")
    parser.add_argument("input", help="text prompt")
    for name, (kind, help_text) in FIELDS.items():
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, help=help_text)
    parser.add_argument("-o", "--output", type=Path, default=Path("output.wav"), help="output file (default output.wav)")
    parser.add_argument("--url", default="http://localhost:8091", help="server address (default http://localhost:8091)")
    parser.add_argument("--api-key", default=os.environ.get("STABLE_AUDIO_API_KEY"),
                        help="sent as 'Authorization: Bearer KEY' (default: $STABLE_AUDIO_API_KEY)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait (default 300)")
    return parser.parse_args(argv)


def request_body(args: argparse.Namespace) -> dict:
    body = {"input": args.input}
    body.update({name: getattr(args, name) for name in FIELDS if getattr(args, name) is not None})
    suffix = args.output.suffix.lstrip(".").lower()
    if "response_format" not in body and suffix in ("wav", "mp3", "flac", "pcm"):
        body["response_format"] = suffix
    return body


def generate(url: str, body: dict, timeout: float, api_key: str | None = None) -> tuple[bytes, dict[str, str]]:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url.rstrip("/") + "/v1/audio/generate", json.dumps(body).encode(), headers)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read(), dict(response.headers)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        audio, headers = generate(args.url, request_body(args), args.timeout, args.api_key)
    except urllib.error.HTTPError as error:
        print(f"error {error.code}: {error.read().decode(errors='replace')}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, TimeoutError) as error:
        print(f"could not reach {args.url}: {error}", file=sys.stderr)
        return 1
    args.output.write_bytes(audio)
    print(f"wrote {args.output} ({len(audio)} bytes, {headers.get('Content-Type')}, seed {headers.get('X-Seed')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
