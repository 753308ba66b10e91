"""HTTP checks against a running stable-audio-bento container, used by check.sh.

It needs only httpx, numpy and soundfile, which the image carries, so check.sh runs it in a container of the same
image joined to the checked container's network namespace (that one has no network of its own).

    probe.py health URL MODEL waits up to 5 s for /health: prints it when ok and naming MODEL, else exits 2
    probe.py serving URL      two formats decoded with their real properties; errors in the project's error shape
    probe.py auth URL KEY     401 without or with a wrong key, audio with it; /health stays open
    probe.py drain URL        one long request in flight; prints "in flight" and waits for the caller's SIGTERM:
                              new requests and /health get 503 shutting_down, the request in flight finishes
"""

from __future__ import annotations

import io
import sys
import threading
import time

import httpx
import numpy
import soundfile

SAMPLE_RATE = 44100
# stable-audio-open-1.0 cuts int(seconds * 44100) samples; lengths chosen so that rounding would give the same.
WAV = {"input": "rain on a tin roof", "audio_length": 3.0, "num_inference_steps": 4, "seed": 7,
       "response_format": "wav"}
FLAC = {"input": "a distant church bell", "audio_length": 1.5, "num_inference_steps": 4, "seed": 8,
        "response_format": "flac"}
# Seconds in flight on the tiny model (every step denoises the whole window), yet well inside the stop timeout.
LONG = {"input": "a long drone", "audio_length": 10.0, "num_inference_steps": 100, "response_format": "wav"}
SHORT = {"input": "a click", "audio_length": 1.0, "num_inference_steps": 2}


def fail(message: str) -> None:
    raise SystemExit(f"probe: FAILED: {message}")


def expect(condition: bool, message: str) -> None:
    if not condition:
        fail(message)


def decoded(response: httpx.Response, container: str, frames: int) -> numpy.ndarray:
    """The response's audio, checked for status, container, rate, channels, length, finiteness and signal."""
    expect(response.status_code == 200, f"{response.request.url.path}: {response.status_code} {response.text[:300]}")
    info = soundfile.info(io.BytesIO(response.content))
    got = (info.format, info.samplerate, info.channels, info.frames)
    expect(got == (container, SAMPLE_RATE, 2, frames), f"decoded {got}, expected {(container, SAMPLE_RATE, 2, frames)}")
    audio, _ = soundfile.read(io.BytesIO(response.content), dtype="float32")
    expect(bool(numpy.isfinite(audio).all()) and float(numpy.abs(audio).max()) > 0, "audio is silent or not finite")
    print(f"probe: {container}: {info.samplerate} Hz, {info.channels} channels, {info.frames / info.samplerate:.4f} s "
          f"({info.frames} frames), peak {float(numpy.abs(audio).max()):.3f}")
    return audio


def expect_error(response: httpx.Response, status: int, param: str | None, code: str | None = None) -> None:
    """The project's error shape: {"error": {"message", "type", "param", "code"}} with the field named."""
    expect(response.status_code == status, f"expected {status}, got {response.status_code} {response.text[:300]}")
    error = response.json().get("error")
    expect(isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}, f"error shape: {error}")
    expect(error["param"] == param and (code is None or error["code"] == code), f"error names {error}")
    expect(bool(error["message"]) and (param is None or param in error["message"]), f"message: {error['message']}")
    print(f"probe: {status} {error['type']} param={error['param']} code={error['code']}: {error['message']}")


def generate(client: httpx.Client, url: str, body: dict, **kwargs) -> httpx.Response:
    return client.post(url + "/v1/audio/generate", json=body, **kwargs)


def check_health(url: str, model: str) -> None:
    deadline = time.monotonic() + 5  # then the caller checks that the container still runs, and asks again
    while True:
        try:
            response = httpx.get(url + "/health", timeout=5)
            if response.status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(2)
        time.sleep(0.25)
    expect(response.json().get("model") == model, f"/health does not name {model}: {response.text}")
    print(response.text)


def check_serving(url: str) -> None:
    with httpx.Client(timeout=300) as client:
        decoded(generate(client, url, WAV), "WAV", int(WAV["audio_length"] * SAMPLE_RATE))
        decoded(generate(client, url, FLAC), "FLAC", int(FLAC["audio_length"] * SAMPLE_RATE))
        expect_error(generate(client, url, {"input": "too long", "audio_length": 60}), 400, "audio_length")
        expect_error(generate(client, url, {"input": "x", "response_format": "midi"}), 400, "response_format")


def check_auth(url: str, key: str) -> None:
    with httpx.Client(timeout=300) as client:
        expect(client.get(url + "/health").status_code == 200, "/health needs the key")
        expect_error(generate(client, url, WAV), 401, None, "invalid_api_key")
        expect_error(generate(client, url, WAV, headers={"Authorization": "Bearer not-" + key}), 401, None,
                     "invalid_api_key")
        decoded(generate(client, url, WAV, headers={"Authorization": f"Bearer {key}"}), "WAV",
                int(WAV["audio_length"] * SAMPLE_RATE))


def pending_generations(client: httpx.Client, url: str) -> float:
    for line in client.get(url + "/metrics").text.splitlines():
        if line.startswith("stable_audio_pending_generations "):
            return float(line.split()[1])
    return 0.0


def check_drain(url: str) -> None:
    outcome: dict[str, httpx.Response | BaseException] = {}

    def send_long() -> None:
        try:
            with httpx.Client(timeout=600) as client:
                outcome["long"] = generate(client, url, LONG)
        except BaseException as exc:  # reported below, from the main thread
            outcome["long"] = exc

    sender = threading.Thread(target=send_long)
    sender.start()
    with httpx.Client(timeout=30) as client:
        deadline = time.monotonic() + 60
        while pending_generations(client, url) < 1:
            expect(time.monotonic() < deadline and sender.is_alive(), f"the long request never ran: {outcome}")
            time.sleep(0.1)
        print("in flight", flush=True)  # check.sh sends SIGTERM now
        while (health := client.get(url + "/health")).status_code == 200:
            expect(sender.is_alive(), "the long request finished before SIGTERM arrived; nothing was drained")
            time.sleep(0.1)
        expect_error(health, 503, None, "shutting_down")
        refused = generate(client, url, SHORT)
        expect_error(refused, 503, None, "shutting_down")
        expect(bool(refused.headers.get("retry-after")), "503 without Retry-After")
    sender.join()
    long = outcome["long"]
    expect(isinstance(long, httpx.Response), f"the request in flight was lost: {long!r}")
    decoded(long, "WAV", int(LONG["audio_length"] * SAMPLE_RATE))
    print("probe: the request in flight finished after SIGTERM")


def main(argv: list[str]) -> None:
    checks = {"health": check_health, "serving": check_serving, "auth": check_auth, "drain": check_drain}
    if len(argv) < 2 or argv[0] not in checks:
        raise SystemExit(__doc__)
    checks[argv[0]](*argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
