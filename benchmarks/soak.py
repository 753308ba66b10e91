"""Soak test: mixed valid, invalid, cancelled, deadline, burst, job, edit and speech requests against a loopback server
for a set time.

    python benchmarks/soak.py                                  # starts `bentoml serve` of the tiny model, 600 s
    python benchmarks/soak.py --duration-s 60 --json           # a short run; JSON summary as the last line
    python benchmarks/soak.py --url http://127.0.0.1:8091      # a server that is already running (loopback only)
    python benchmarks/soak.py --job-ttl-s 20                   # then idle past the started server's job TTL

Request kinds (--mix): valid (POST /v1/audio/generate), repeat (a fixed-seed body), invalid, cancel, deadline,
probe, speech (POST /v1/audio/speech), edit (POST /v1/audio/edits: a generated WAV upload and a strength), job
(POST /v1/audio/jobs, polled until it ends, then its /content), job_cancel (a job DELETEd once it runs),
job_unfetched (a job polled until it ends, its audio never fetched) and idempotent (a job submitted twice with one
Idempotency-Key, then once more with another body under it; then polled and fetched as a job). The formats of
valid, speech, edit and job requests are drawn from all six; opus and aac need the server's ffmpeg.
Before any load, each fixed-seed body is sent once, one at a time: its bytes are the reference every repeat
must equal, under whatever load (a seed means the same audio however requests are batched).

Every request is classified:
  completed  200 whose body decodes as the requested format, stereo, at 44.1 kHz (48 kHz for opus), with the
             requested duration (within 1 sample for wav / flac / pcm / opus, 60 ms for mp3, and for aac up to
             2047 samples longer: ADTS keeps the encoder's priming and last-frame padding); a repeated fixed-seed
             body must give the reference's bytes; for a job or an idempotent one, its /content so checked once
             it has succeeded; a job_unfetched that succeeded; an idempotent resend answered 202 with the first
             one's job id and `Idempotent-Replayed: true` (the first answer without it), and another body under
             the same key refused with 422 naming Idempotency-Key in the OpenAI error shape
  rejected   as expected: an invalid body -> 4xx in the OpenAI error shape {"error": {message, type, param, code}};
             overload -> 429 / 503 with Retry-After; a request with a "timeout" field past its deadline -> 504
  probe      GET /health or /livez -> 200 (only with --mix probe=N: cheap requests for the front's memory)
  cancelled  the client closed the connection on purpose (a longer request, cancelled after 0.05-1 s); or a
             job_cancel, DELETEd once its status said running, whose status then ended `cancelled`
  lost       anything else: other 5xx, a connection error the client did not cause, no answer within
             --request-bound-s (for a job, its whole exchange), a 200 with wrong or undecodable audio, an invalid
             body accepted, a wrong error shape, a 503 whose error code is engine_unavailable (the front lost its
             call to a live engine), a job that ended otherwise than it should (a job_cancel that succeeded
             included) or whose status could not be read, an idempotent resend not answered as above
Server processes: each one's RSS, open file descriptors and threads, and the files and folders under the server's
TMPDIR (BentoML writes uploads and responses there, a folder per request; counted when the server's environment
names one, as the server this script starts does), after a warm-up and a few idle seconds, every --rss-every-s,
and at the end after a few idle seconds; --rss-svg PATH plots each process's RSS.
With --job-ttl-s (a server this script starts), the end sample comes after idling past the jobs' TTL, so that the
audio of unfetched jobs should have been released.
Exit status: 1 if any request was lost, 2 if a server process's idle RSS grew more than --max-rss-growth-pct from
after the warm-up to the end (each process apart: a sum would hide the front's growth in the engine's size), 3 if
a process's open file descriptors grew by more than --max-fd-growth over the same span, else 0.
Bounded: --duration-s of new requests, --max-requests in all, each request at most --request-bound-s.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import io
import json
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import psutil
import soundfile
from pydub import AudioSegment

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

sys.path.insert(0, str(REPO / "benchmarks"))

from stable_audio_bento.local_server import local_server  # noqa: E402
from svg_plot import line_chart  # noqa: E402

GENERATE = "/v1/audio/generate"
SPEECH = "/v1/audio/speech"
EDITS = "/v1/audio/edits"
JOBS = "/v1/audio/jobs"
JOB_ENDED = {"succeeded", "failed", "cancelled"}
JOB_POLL_S = 0.1  # as often as the command-line client polls
JOB_CANCEL_STEPS = (100, 200)  # DELETEd once running: long enough that it cannot finish before the DELETE arrives
# Before an idle sample: the last requests' keep-alive connections, the front's to the engine too, hold a file
# descriptor at each end until uvicorn's 5 s idle timeout closes them.
IDLE_SETTLE_S = 6.0
JOB_EXPIRY_MARGIN_S = 5.0  # idled past the job TTL: the server drops an expired job's audio a moment after its TTL
REPLAYED = "Idempotent-Replayed"
SAMPLE_RATE = 44100
LOOPBACK_HOSTS = {"127.0.0.1", "::1", "localhost"}
MP3_TOLERANCE = round(0.06 * SAMPLE_RATE)  # the MP3 frame grid pads the end by under one frame plus decoder delay


# The wire contract (shared/API.md) written out, not read from stable_audio_bento.audio.FORMATS: a wrong media type
# or rate there must fail the soak, not move its expectation along.
@dataclass(frozen=True)
class Format:
    media_type: str
    rate: int = SAMPLE_RATE
    extra_frames: tuple[int, int] = (-1, 1)  # decoded frames minus the requested length's, at the least and most
    ffmpeg: bool = False  # decoded by ffmpeg (through pydub): libsndfile reads no ADTS


FORMATS = {"wav": Format("audio/wav"), "flac": Format("audio/flac"),
           "mp3": Format("audio/mpeg", extra_frames=(-MP3_TOLERANCE, MP3_TOLERANCE)), "pcm": Format("audio/pcm"),
           "opus": Format("audio/ogg", rate=48000, ffmpeg=True),  # resampled to Opus's only rate
           # ADTS cannot mark the encoder's 1024 priming samples nor the last frame's padding: a decoder plays both
           "aac": Format("audio/aac", extra_frames=(0, 2047), ffmpeg=True)}
PROMPTS = ["Thunder and rain sounds", "A piano playing a gentle melody", "Ocean waves crashing on a beach",
           "The sound of a dog barking", "Guitar playing", "Audience clapping and cheering in a stadium"]
# Fixed-seed bodies sent again and again: each must always come back as the same bytes.
REPEATED_BODIES = [
    {"input": "Thunder and rain sounds", "audio_length": 1.5, "num_inference_steps": 3, "seed": 42,
     "response_format": "wav"},
    {"input": "A bell", "audio_length": 0.75, "num_inference_steps": 2, "seed": 7, "guidance_scale": 1.0,
     "response_format": "flac"},
    {"input": "Guitar playing", "audio_length": 2.0, "audio_start": 1.0, "num_inference_steps": 4, "seed": 2**63,
     "negative_prompt": "Low quality", "response_format": "pcm"},
    {"input": "Wind chimes", "audio_length": 1.0, "num_inference_steps": 1, "seed": 0, "response_format": "mp3"},
]
# Bodies the server must refuse with a 4xx in the OpenAI error shape.
INVALID_BODIES: list[dict | bytes] = [
    {}, {"input": ""}, {"input": "   \n"}, {"input": 42}, {"input": None}, {"audio_length": 1.0},
    {"input": "x", "audio_length": 0}, {"input": "x", "audio_length": -3.0}, {"input": "x", "audio_length": 47.6},
    {"input": "x", "audio_length": "ten"}, {"input": "x", "audio_length": True},
    {"input": "x", "audio_start": -1.0}, {"input": "x", "audio_start": 40.0, "audio_length": 10.0},
    {"input": "x", "num_inference_steps": 0}, {"input": "x", "num_inference_steps": 100000},
    {"input": "x", "num_inference_steps": 2.5}, {"input": "x", "num_inference_steps": "4"},
    {"input": "x", "guidance_scale": -1}, {"input": "x", "guidance_scale": 1000},
    {"input": "x", "seed": -1}, {"input": "x", "seed": 2**64}, {"input": "x", "seed": "42"},
    {"input": "x", "seed": True},
    {"input": "x", "response_format": "wma"}, {"input": "x", "response_format": 3},
    {"input": "x", "negative_prompt": ["a", "b"]}, {"input": "x", "model": "stabilityai/stable-audio-open-2.0"},
    b'{"input": "x", "audio_length": NaN}', b'{"input": "x", "guidance_scale": Infinity}',
    b'{"input": "x", "audio_length": 1e999}', b"not json at all", b'{"input": "x",', b"[1, 2]", b"", b"null",
    b'"just a string"', b'{"input": "x", "audio_length": 1.0}' + b" " * (1 << 20),  # over the 1 MiB body limit
]
PROBE_PATHS = ["/health", "/livez"]
KINDS = ["valid", "repeat", "invalid", "cancel", "deadline", "probe", "speech", "edit", "job", "job_cancel",
         "job_unfetched", "idempotent"]
JOB_KINDS = {"job", "job_cancel", "job_unfetched", "idempotent"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server (loopback only); default: start the tiny model here")
    parser.add_argument("--duration-s", type=float, default=600.0, help="seconds of new requests (default 600)")
    parser.add_argument("--concurrency", type=int, default=8, help="client workers (default 8)")
    parser.add_argument("--max-requests", type=int, default=100_000, help="hard bound on requests sent")
    parser.add_argument("--seed", type=int, default=0, help="seed of the request mix")
    parser.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    parser.add_argument("--mix", default="valid=30,repeat=12,invalid=20,cancel=6,deadline=10,speech=4,edit=6,job=5,"
                                         "job_cancel=3,job_unfetched=2,idempotent=2",
                        help="relative weights of the request kinds (%(default)s)")
    parser.add_argument("--warmup-s", type=float, default=60.0,
                        help="seconds of the same mix (bursts included; each kind at least once, however long "
                             "that takes) before the first RSS sample, so that it is taken once the server has met "
                             "every request shape (default 60)")
    parser.add_argument("--warmup-requests", type=int, help="end the warm-up after this many requests")
    parser.add_argument("--burst-size", type=int, default=48,
                        help="concurrent short requests in a burst (above the server's admission bound)")
    parser.add_argument("--burst-every-s", type=float, default=60.0, help="seconds between bursts (0: none)")
    parser.add_argument("--cancel-steps", default="20,40", help="step range of the requests that get cancelled")
    parser.add_argument("--request-bound-s", type=float, default=120.0,
                        help="a request unanswered after this long is lost")
    parser.add_argument("--rss-every-s", type=float, default=30.0, help="seconds between RSS samples")
    parser.add_argument("--rss-svg", type=Path, help="plot each server process's RSS over time to this SVG file")
    parser.add_argument("--max-rss-growth-pct", type=float, default=25.0,
                        help="exit 2 if a server process's idle RSS grew more than this from after the warm-up to "
                             "the end (default 25: 1 MB leaked per request fails a 10-minute soak many times over; "
                             "the clean 10-minute tiny-model soak grew its front 15 %%, its engine 6 %%)")
    parser.add_argument("--max-fd-growth", type=int, default=20,
                        help="exit 3 if a server process's open file descriptors grew by more than this from after "
                             "the warm-up to the end (default 20: a descriptor leaked per request passes it in "
                             "seconds, while pools and caches filled in the warm-up stay put)")
    parser.add_argument("--job-ttl-s", type=float,
                        help="the job TTL (STABLE_AUDIO_JOB_TTL_S) of the server this script starts; the end sample "
                             "then waits until it has passed, so that unfetched jobs' audio should be gone")
    parser.add_argument("--no-seed-check", action="store_true",
                        help="do not require identical bytes for a repeated seed (GPU kernels may differ by batch)")
    parser.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment of the server this script starts (repeatable)")
    parser.add_argument("--server-log", type=Path, default=REPO / "artifacts" / "soak-server.log")
    args = parser.parse_args(argv)
    args.weights = {kind: 0.0 for kind in KINDS}
    for part in args.mix.split(","):
        kind, _, weight = part.partition("=")
        if kind.strip() not in args.weights:
            parser.error(f"unknown request kind in --mix: {kind!r} (kinds: {', '.join(KINDS)})")
        args.weights[kind.strip()] = float(weight)
    args.cancel_steps = tuple(int(s) for s in args.cancel_steps.split(","))
    if args.url:
        host = urlsplit(args.url).hostname
        if host not in LOOPBACK_HOSTS:
            parser.error(f"refusing {args.url}: only a loopback server ({', '.join(sorted(LOOPBACK_HOSTS))})")
        args.url = args.url.rstrip("/")
        if args.job_ttl_s is not None:
            parser.error("--job-ttl-s sets the TTL of the server this script starts: not with --url")
    for item in args.server_env:
        if "=" not in item:
            parser.error(f"--server-env wants KEY=VALUE, got {item!r}")
    return args


def say(line: str = "") -> None:
    print(line, flush=True)


# ------------------------------------------------------------------------------------------------- requests
@dataclass
class Request:
    kind: str  # one of KINDS, or reference, burst, final
    body: dict | bytes  # for a probe, the path to GET; for an edit, its form fields
    repeat_index: int | None = None
    deadline_s: float | None = None  # the body's "timeout" field
    cancel_after_s: float | None = None
    upload: bytes | None = None  # an edit's audio file

    @property
    def expects_audio(self) -> bool:
        return self.kind not in ("invalid", "probe")


def valid_body(rng: random.Random, steps: tuple[int, int] = (1, 4), length: tuple[float, float] = (0.5, 3.0)) -> dict:
    body = {"input": rng.choice(PROMPTS), "audio_length": round(rng.uniform(*length), 2),
            "num_inference_steps": rng.randint(*steps), "response_format": rng.choice(list(FORMATS))}
    if rng.random() < 0.5:
        body["seed"] = rng.randrange(2**64)
    if rng.random() < 0.3:
        body["guidance_scale"] = rng.choice([1.0, 3.5, 12.0])
    if rng.random() < 0.3:
        body["negative_prompt"] = "Low quality"
    if rng.random() < 0.2:
        body["audio_start"] = round(rng.uniform(0, 10), 2)
    return body


def tone_wav(rng: random.Random) -> bytes:
    """0.5-2 s of a stereo sine as a 16-bit WAV: an edit's upload."""
    t = np.arange(round(rng.uniform(0.5, 2.0) * SAMPLE_RATE)) / SAMPLE_RATE
    tone = 0.3 * np.sin(2 * np.pi * rng.uniform(110.0, 880.0) * t)
    buffer = io.BytesIO()
    soundfile.write(buffer, np.stack([tone, tone], axis=1), SAMPLE_RATE, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def draw(kind: str, rng: random.Random, args) -> Request:
    if kind == "repeat":
        index = rng.randrange(len(REPEATED_BODIES))
        return Request(kind, dict(REPEATED_BODIES[index]), repeat_index=index)
    if kind == "invalid":
        return Request(kind, rng.choice(INVALID_BODIES))
    if kind == "probe":
        return Request(kind, rng.choice(PROBE_PATHS).encode())
    if kind == "cancel":
        return Request(kind, valid_body(rng, steps=args.cancel_steps), cancel_after_s=rng.uniform(0.05, 1.0))
    if kind == "deadline":  # most deadlines are shorter than the work, some are generous
        body = valid_body(rng, steps=(5, 30))
        body["timeout"] = round(rng.uniform(0.2, 3.0), 2) if rng.random() < 0.75 else 60.0
        return Request(kind, body, deadline_s=body["timeout"])
    if kind == "edit":
        return Request(kind, {**valid_body(rng), "strength": round(rng.uniform(0.1, 1.0), 2)}, upload=tone_wav(rng))
    if kind == "speech":  # the OpenAI SDK's body: its voice is ignored, our fields ride along
        return Request(kind, {**valid_body(rng), "voice": "alloy"})
    if kind == "job_cancel":
        return Request(kind, valid_body(rng, steps=JOB_CANCEL_STEPS))
    return Request(kind, valid_body(rng))


def error_shape_problem(response: httpx.Response) -> str | None:
    """None if the body is {"error": {"message": str, "type": str, "param": str|None, "code": ...}}."""
    try:
        data = response.json()
    except ValueError:
        return "error body is not JSON"
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict) or not {"message", "type", "param", "code"} <= set(error):
        return "error body is not {'error': {message, type, param, code}}"
    if not (isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)):
        return "error message or type is not a non-empty string"
    if error["param"] is not None and not isinstance(error["param"], str):
        return "error param is neither a string nor null"
    if "Traceback" in error["message"]:
        return "error message holds a traceback"
    return None


def audio_problem(body: dict, response: httpx.Response) -> str | None:
    """None if the response is the requested format, stereo at the format's rate, of the requested duration."""
    response_format = body.get("response_format", "wav")
    spec = FORMATS[response_format]
    content_type = response.headers.get("content-type", "").split(";")[0].strip()
    if content_type != spec.media_type:
        return f"content-type {content_type!r} for {response_format}"
    data = response.content
    if response_format == "pcm":
        if len(data) % 4:
            return f"pcm body of {len(data)} bytes is not whole stereo s16 frames"
        frames, rate, channels = len(data) // 4, SAMPLE_RATE, 2
        samples = np.frombuffer(data, dtype="<i2")
    elif spec.ffmpeg:
        try:
            segment = AudioSegment.from_file(io.BytesIO(data))
        except Exception as error:  # noqa: BLE001 (any decoder failure is the finding)
            return f"{response_format} body does not decode: {error}"
        samples, rate, channels = np.array(segment.get_array_of_samples()), segment.frame_rate, segment.channels
        frames = int(segment.frame_count())
    else:
        try:
            samples, rate = soundfile.read(io.BytesIO(data), dtype="int16", always_2d=True)
        except Exception as error:  # noqa: BLE001 (any decoder failure is the finding)
            return f"{response_format} body does not decode: {error}"
        frames, channels = samples.shape
    if rate != spec.rate or channels != 2:
        return f"{rate} Hz, {channels} channels"
    # the model's samples, resampled (opus) from them
    expected = round(round(body["audio_length"] * SAMPLE_RATE) * spec.rate / SAMPLE_RATE)
    least, most = spec.extra_frames
    if not least <= frames - expected <= most:
        return f"{frames} frames, expected {expected} ({least:+d} to {most:+d})"
    if not np.any(samples):
        return "all-zero audio"
    if "seed" in body and response.headers.get("x-seed") != str(body["seed"]):
        return f"X-Seed {response.headers.get('x-seed')!r} for seed {body['seed']}"
    return None


# ---------------------------------------------------------------------------------------------------- stats
@dataclass
class Stats:
    sent: int = 0
    categories: collections.Counter = field(default_factory=collections.Counter)  # completed / rejected / ...
    by_kind: dict = field(default_factory=lambda: collections.defaultdict(collections.Counter))
    statuses: collections.Counter = field(default_factory=collections.Counter)
    reasons: collections.Counter = field(default_factory=collections.Counter)  # rejected and lost, by reason
    lost_examples: dict = field(default_factory=lambda: collections.defaultdict(list))
    latencies: dict = field(default_factory=lambda: collections.defaultdict(list))  # completed, by kind
    deadline_overshoot_s: list = field(default_factory=list)  # 504 arrival minus the body's timeout
    deadline_ignored: int = 0  # 200 arriving more than 1 s past the body's timeout
    repeat_digests: dict = field(default_factory=dict)
    repeat_checked: int = 0

    def record(self, request: Request, category: str, reason: str, status: int | None, latency: float,
               detail: str = "") -> None:
        self.categories[category] += 1
        self.by_kind[request.kind][category] += 1
        if status is not None:
            self.statuses[status] += 1
        if category in ("rejected", "lost"):
            self.reasons[f"{category}: {reason}"] += 1
        if category == "completed":
            self.latencies[request.kind].append(latency)
        if category == "lost" and len(self.lost_examples[reason]) < 3:
            body = request.body if isinstance(request.body, dict) else request.body[:120].decode(errors="replace")
            self.lost_examples[reason].append({"kind": request.kind, "body": body, "status": status,
                                               "latency_s": round(latency, 3), "detail": detail[:300]})


class Settled(Exception):
    """A job's exchange decided its request's outcome on the way: no answer is left for `classify`."""

    def __init__(self, category: str, reason: str, detail: str = "", status: int | None = None):
        super().__init__(reason)
        self.category, self.reason, self.detail, self.status = category, reason, detail, status


async def post(client: httpx.AsyncClient, url: str, request: Request) -> httpx.Response:
    """The request's exchange with the server; returns the answer to classify (for a job, its submission's if
    refused, else its content's) or raises Settled."""
    body = request.body
    if request.kind == "probe":
        return await client.get(url + body.decode())
    if request.kind in JOB_KINDS:
        return await run_job(client, url, request)
    if request.kind == "edit":  # form values are read as JSON when they parse: numbers stay numbers
        return await client.post(url + EDITS, data={name: str(value) for name, value in body.items()},
                                 files={"audio": ("tone.wav", request.upload, "audio/wav")})
    if request.kind == "speech":
        return await client.post(url + SPEECH, json=body)
    if isinstance(body, dict):
        return await client.post(url + GENERATE, json=body)
    return await client.post(url + GENERATE, content=body, headers={"content-type": "application/json"})


async def run_job(client: httpx.AsyncClient, url: str, request: Request) -> httpx.Response:
    key = {"Idempotency-Key": uuid.uuid4().hex} if request.kind == "idempotent" else {}
    submitted = await client.post(url + JOBS, json=request.body, headers=key)
    if submitted.status_code != 202:
        return submitted
    job_id = submitted.json()["id"]
    if request.kind == "idempotent":
        await check_idempotency(client, url, request, key, submitted)
    if request.kind == "job_cancel":
        job = await job_state(client, url, job_id, {"running"})
        if job["status"] == "running":
            deleted = await client.delete(f"{url}{JOBS}/{job_id}")
            if deleted.status_code != 200:
                raise Settled("lost", f"job DELETE answered {deleted.status_code}", deleted.text, deleted.status_code)
    job = await job_state(client, url, job_id, JOB_ENDED)
    expected = "cancelled" if request.kind == "job_cancel" else "succeeded"
    if job["status"] != expected:
        raise Settled("lost", f"{request.kind} ended {job['status']}, not {expected}", json.dumps(job["error"]))
    if request.kind == "job_cancel":
        raise Settled("cancelled", "job DELETEd while running")
    if request.kind == "job_unfetched":
        raise Settled("completed", "job succeeded, left unfetched")
    return await client.get(url + job["result_url"])


async def job_state(client: httpx.AsyncClient, url: str, job_id: str, until: set[str]) -> dict:
    """The job's status once it is one of `until`, or has ended."""
    while True:
        polled = await client.get(f"{url}{JOBS}/{job_id}")
        if polled.status_code != 200:
            raise Settled("lost", f"job status answered {polled.status_code}", polled.text, polled.status_code)
        job = polled.json()
        if job["status"] in until | JOB_ENDED:
            return job
        await asyncio.sleep(JOB_POLL_S)


async def check_idempotency(client: httpx.AsyncClient, url: str, request: Request, key: dict,
                            submitted: httpx.Response) -> None:
    """The same body again under the key is answered with the first one's job, marked a replay; another body under
    it is refused with 422 naming the header."""
    if REPLAYED in submitted.headers:
        raise Settled("lost", f"a first submission answered with {REPLAYED}", submitted.text, 202)
    resent = await client.post(url + JOBS, json=request.body, headers=key)
    if resent.status_code != 202 or resent.json()["id"] != submitted.json()["id"] \
            or resent.headers.get(REPLAYED) != "true":
        raise Settled("lost", "idempotent resend not answered with the first job as a replay",
                      f"{REPLAYED}: {resent.headers.get(REPLAYED)}; {resent.text}", resent.status_code)
    other = await client.post(url + JOBS, json={**request.body, "input": request.body["input"] + ", louder"},
                              headers=key)
    shape = error_shape_problem(other)
    if other.status_code != 422 or shape or other.json()["error"]["param"] != "Idempotency-Key":
        raise Settled("lost", "another body under a used Idempotency-Key not refused with 422",
                      shape or other.text, other.status_code)


async def classify(request: Request, response: httpx.Response, latency: float, stats: Stats, args) -> None:
    status = response.status_code

    def record(category: str, reason: str, detail: str = "") -> None:
        stats.record(request, category, reason, status, latency, detail)

    if request.kind == "probe":
        return record("completed", "probe 200") if status == 200 else record("lost", f"probe {status}", response.text)
    if status == 200:
        if not request.expects_audio:
            return record("lost", "invalid body accepted with 200")
        problem = await asyncio.to_thread(audio_problem, request.body, response)
        if problem:
            return record("lost", "200 with wrong audio", problem)
        if request.repeat_index is not None and not args.no_seed_check:
            digest = hashlib.sha256(response.content).hexdigest()
            # the reference pass, one request at a time, set it first (or, had that failed, the first repeat)
            reference = stats.repeat_digests.setdefault(request.repeat_index, digest)
            stats.repeat_checked += request.kind == "repeat"
            if digest != reference:
                return record("lost", "same seed, different bytes than alone",
                              f"repeated body #{request.repeat_index}")
        if request.deadline_s is not None and latency > request.deadline_s + 1.0:
            stats.deadline_ignored += 1
        return record("completed", "200")
    shape = error_shape_problem(response)
    code = None if shape else response.json()["error"]["code"]
    if status in (429, 503):
        if "retry-after" not in response.headers:
            return record("lost", f"{status} without Retry-After", response.text)
        if shape:
            return record("lost", f"{status}: {shape}", response.text)
        if code == "engine_unavailable":
            return record("lost", f"{status} {code}", response.text)
        return record("rejected", f"overload {status} ({code})")
    if status == 504 and request.deadline_s is not None:
        if shape:
            return record("lost", f"504: {shape}", response.text)
        stats.deadline_overshoot_s.append(latency - request.deadline_s)
        return record("rejected", "deadline 504")
    if 400 <= status < 500 and not request.expects_audio:
        if shape:
            return record("lost", f"{status}: {shape}", response.text)
        return record("rejected", f"invalid {status} ({code})")
    if 400 <= status < 500:
        return record("lost", f"valid body refused with {status}", response.text)
    return record("lost", f"HTTP {status}", response.text)


async def execute(request: Request, client: httpx.AsyncClient, stats: Stats, args) -> None:
    started = time.monotonic()
    task = asyncio.ensure_future(post(client, args.url, request))
    wait_s = args.request_bound_s if request.cancel_after_s is None else request.cancel_after_s
    done, _ = await asyncio.wait({task}, timeout=wait_s)
    latency = time.monotonic() - started
    if not done:
        task.cancel()  # httpx closes the connection of a cancelled request
        try:
            await task
        except BaseException:  # noqa: BLE001 (CancelledError, or whatever the aborted send raised)
            pass
        if request.cancel_after_s is not None:
            return stats.record(request, "cancelled", "client closed", None, latency)
        return stats.record(request, "lost", f"no answer within {args.request_bound_s:g} s", None, latency)
    error = task.exception()
    if isinstance(error, Settled):
        return stats.record(request, error.category, error.reason, error.status, latency, error.detail)
    if error is not None:
        return stats.record(request, "lost", f"connection error {type(error).__name__}", None, latency, str(error))
    await classify(request, task.result(), latency, stats, args)


# ------------------------------------------------------------------------------------- server processes
def server_root(url: str) -> psutil.Process | None:
    """The topmost `bentoml` process above whatever listens on the URL's port (None if it cannot be seen)."""
    port = urlsplit(url).port
    try:
        listeners = [c.pid for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN
                     and c.laddr and c.laddr.port == port and c.pid]
    except psutil.AccessDenied:
        return None
    if not listeners:
        return None
    process = psutil.Process(listeners[0])
    root = process
    for parent in process.parents():
        try:
            if "bentoml" in " ".join(parent.cmdline()):
                root = parent
        except psutil.Error:
            break
    return root


def process_label(process: psutil.Process) -> str:
    command = process.cmdline()
    for flag in ("--service-name", "--worker-id"):
        if flag in command[:-1]:
            return f"{command[command.index(flag) + 1]} ({process.pid})"
    return f"{' '.join(part.rsplit('/', 1)[-1] for part in command[:4])} ({process.pid})"


def tree_usage(root: psutil.Process | None) -> tuple[list[int], dict[str, dict[str, float]]] | None:
    """The pids of root and all its descendants, and by label each one's RSS in MiB ("mib"), open file descriptors
    ("fds") and threads."""
    if root is None:
        return None
    try:
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return None
    pids, each = [], {}
    for process in processes:
        try:
            with process.oneshot():
                each[process_label(process)] = {"mib": round(process.memory_info().rss / 2**20, 1),
                                                "fds": process.num_fds(), "threads": process.num_threads()}
            pids.append(process.pid)
        except psutil.Error:
            pass
    return sorted(pids), each


def server_temp_dir(root: psutil.Process | None) -> Path | None:
    """The server's TMPDIR, where BentoML writes uploads and responses; None if its environment names none (its
    files would be lost among everyone's in /tmp) or cannot be read."""
    try:
        folder = root.environ().get("TMPDIR") if root else None
    except psutil.Error:
        return None
    return Path(folder) if folder else None


def count_entries(folder: Path) -> int:
    """Files and folders under folder: BentoML makes a folder for each request that has files."""
    return sum(len(folders) + len(files) for _, folders, files in os.walk(folder))


# ------------------------------------------------------------------------------------------------------ run
async def soak(args, process: psutil.Process | None = None) -> dict:
    """Runs the soak against args.url; `process`, if given, is the server's root process (else found by port)."""
    references: dict[int, str] = {}  # the fixed-seed bodies' digests, shared by the phases
    stats = Stats(repeat_digests=references)
    warmup = Stats(repeat_digests=references)
    limits = httpx.Limits(max_connections=args.concurrency + args.burst_size + 8, max_keepalive_connections=0)
    # No keep-alive: every request opens its own connection, so a server closing an idle pooled connection
    # just as it is reused cannot be mistaken for a lost request.
    timeout = httpx.Timeout(args.request_bound_s + 5)
    root = process or server_root(args.url)
    temp_dir = server_temp_dir(root)
    rss_samples: list[dict] = []
    pid_sets: list[list[int]] = []
    soak_started = None

    async def sample(label: str) -> None:
        measured = await asyncio.to_thread(tree_usage, root)
        elapsed = 0.0 if soak_started is None else time.monotonic() - soak_started
        rss_text = "server RSS not visible"
        if measured is not None:
            pids, each = measured
            rss_mib = sum(usage["mib"] for usage in each.values())
            rss_samples.append({
                "label": label, "t_s": round(elapsed, 1), "rss_mib": round(rss_mib, 1), "processes": len(pids),
                **{f"by_process_{key}": {name: usage[key] for name, usage in each.items()}
                   for key in ("mib", "fds", "threads")},
                "temp_entries": None if temp_dir is None else await asyncio.to_thread(count_entries, temp_dir)})
            pid_sets.append(pids)
            rss_text = f"server RSS {rss_mib:.1f} MiB ({len(pids)} processes)"
        if label == "sample":
            c = stats.categories
            say(f"  t={elapsed:5.0f} s  sent {stats.sent}  completed {c['completed']}  rejected {c['rejected']}  "
                f"cancelled {c['cancelled']}  lost {c['lost']}  {rss_text}")

    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        kinds, weights = zip(*((k, w) for k, w in args.weights.items() if w > 0))

        def take(phase: Stats, count: int) -> int:
            granted = max(0, min(count, args.max_requests - stats.sent - warmup.sent))
            if phase is warmup and args.warmup_requests is not None:
                granted = max(0, min(granted, args.warmup_requests - warmup.sent))
            phase.sent += granted
            return granted

        async def run_phase(phase: Stats, name: str, started: float, seconds: float) -> None:
            """Workers drawing from the mix, plus a burst above the admission bound every --burst-every-s."""
            end = started + seconds

            async def worker(index: int) -> None:
                rng = random.Random(f"{args.seed}/{name}/{index}")
                # The warm-up opens with each kind of the mix, dealt among the workers, however long that takes: a
                # kind first met after the first sample (an upload's decoder, a job's) would grow it as if leaking.
                opening = list(kinds[index::args.concurrency]) if phase is warmup else []
                while (opening or time.monotonic() < end) and take(phase, 1):
                    kind = opening.pop(0) if opening else rng.choices(kinds, weights)[0]
                    await execute(draw(kind, rng, args), client, phase, args)

            async def burster() -> None:  # 1-step 0.5 s clips, all at once
                if args.burst_every_s <= 0 or args.burst_size <= 0:
                    return
                rng = random.Random(f"{args.seed}/{name}/burst")
                next_at = started + min(args.burst_every_s, seconds) / 2
                while True:
                    await asyncio.sleep(max(0.0, min(next_at, end) - time.monotonic()))
                    if time.monotonic() >= end:
                        return
                    count = take(phase, args.burst_size)
                    if not count:
                        return
                    bodies = [{**valid_body(rng, steps=(1, 1), length=(0.5, 0.5)), "response_format": "wav"}
                              for _ in range(count)]
                    await asyncio.gather(*(execute(Request("burst", b), client, phase, args) for b in bodies))
                    next_at += args.burst_every_s

            await asyncio.gather(burster(), *(worker(i) for i in range(args.concurrency)))

        # References: each fixed-seed body alone, before any load, so that a repeat batched with others under load
        # is compared with audio no other request shared a step with.
        if not args.no_seed_check:
            for index, body in enumerate(REPEATED_BODIES):
                if take(warmup, 1):
                    await execute(Request("reference", dict(body), repeat_index=index), client, warmup, args)
            say(f"references: {len(references)} of {len(REPEATED_BODIES)} fixed-seed bodies, sent one at a time")
        # Warm-up: the same traffic, so the first RSS sample is of a server that has met every request shape.
        warmup_started = time.monotonic()
        if args.warmup_s > 0:
            await run_phase(warmup, "warmup", warmup_started, args.warmup_s)
        say(f"warm-up: {time.monotonic() - warmup_started:.0f} s, {warmup.sent} requests, "
            f"{warmup.categories['completed']} completed, "
            f"{warmup.categories['lost']} lost")
        await asyncio.sleep(IDLE_SETTLE_S)
        await sample("start")
        if root is None:
            say("server RSS: the server's processes are not visible from here (no RSS figures)")

        async def sampler() -> None:
            while True:
                await asyncio.sleep(args.rss_every_s)
                await sample("sample")

        soak_started = time.monotonic()
        sampling = asyncio.ensure_future(sampler())
        await run_phase(stats, "soak", soak_started, args.duration_s)
        soak_s = time.monotonic() - soak_started
        sampling.cancel()
        # After the drain: one more plain request (it queues behind whatever the engine still runs, e.g. for
        # cancelled requests) and /health must both answer, then the last RSS sample.
        final = Stats()
        await execute(Request("final", {"input": "a gong", "audio_length": 1.0, "num_inference_steps": 2,
                                        "seed": 5}), client, final, args)
        try:
            health = (await client.get(args.url + "/health")).status_code
        except httpx.HTTPError as error:
            health = type(error).__name__
        if health != 200:
            final.record(Request("final", b"GET /health"), "lost", f"/health answered {health} after the soak",
                         None, 0.0)
        if args.job_ttl_s is None:
            await asyncio.sleep(IDLE_SETTLE_S)
        else:
            idle_s = max(IDLE_SETTLE_S, args.job_ttl_s + JOB_EXPIRY_MARGIN_S)
            say(f"idling {idle_s:g} s, past the server's job TTL of {args.job_ttl_s:g} s")
            await asyncio.sleep(idle_s)
        await sample("end")

    return summarize(args, stats, warmup, final, soak_s, rss_samples, pid_sets)


def percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 3) if values else None


def summarize(args, stats: Stats, warmup: Stats, final: Stats, soak_s: float, rss_samples: list[dict],
              pid_sets: list[list[int]]) -> dict:
    lost_examples = {}
    for source in (warmup, stats, final):
        for reason, examples in source.lost_examples.items():
            lost_examples.setdefault(reason, []).extend(examples)
    c = stats.categories
    summary = {
        "url": args.url, "duration_s": args.duration_s, "soak_s": round(soak_s, 1), "concurrency": args.concurrency,
        "seed": args.seed, "sent": stats.sent, "completed": c["completed"], "rejected": c["rejected"],
        "cancelled": c["cancelled"],
        "lost": c["lost"] + warmup.categories["lost"] + final.categories["lost"],
        "requests_per_s": round(stats.sent / soak_s, 3) if soak_s else None,
        "warmup": {"sent": warmup.sent, **warmup.categories,
                   "by_kind": {kind: dict(counter) for kind, counter in sorted(warmup.by_kind.items())}},
        "final_checks_ok": final.categories["lost"] == 0,
        "by_kind": {kind: dict(counter) for kind, counter in sorted(stats.by_kind.items())},
        "status_codes": {str(k): v for k, v in sorted(stats.statuses.items())},
        "reasons": dict(sorted(stats.reasons.items())),
        "latency_s": {kind: {"p50": percentile(v, 50), "p95": percentile(v, 95), "max": round(max(v), 3)}
                      for kind, v in sorted(stats.latencies.items())},
        "repeated_seed_checks": warmup.repeat_checked + stats.repeat_checked,
        "deadline": {"504": len(stats.deadline_overshoot_s),
                     "max_504_past_deadline_s": round(max(stats.deadline_overshoot_s), 3)
                     if stats.deadline_overshoot_s else None,
                     "completed_over_1s_past_deadline": stats.deadline_ignored},
        "lost_examples": lost_examples,
        "rss": None, "fds": None, "threads": None, "temp_entries": None,
    }
    if rss_samples:
        start, end = rss_samples[0]["rss_mib"], rss_samples[-1]["rss_mib"]
        first, last = rss_samples[0]["by_process_mib"], rss_samples[-1]["by_process_mib"]
        summary["rss"] = {"start_mib": start, "end_mib": end, "max_mib": max(s["rss_mib"] for s in rss_samples),
                          "growth_mib": round(end - start, 1),
                          "growth_pct": round(100 * (end - start) / start, 2) if start else None,
                          "growth_by_process_pct": {name: round(100 * (last[name] - mib) / mib, 2)
                                                    for name, mib in first.items() if name in last and mib},
                          "processes_changed": len({tuple(p) for p in pid_sets}) > 1, "samples": rss_samples}
        under_load = [s["rss_mib"] for s in rss_samples if s["label"] == "sample"]
        if len(under_load) >= 4:  # RSS under load swings with the batch in flight: compare halves, not two points
            half = len(under_load) // 2
            first, second = statistics.mean(under_load[:half]), statistics.mean(under_load[-half:])
            summary["rss"]["under_load_first_half_mib"] = round(first, 1)
            summary["rss"]["under_load_second_half_mib"] = round(second, 1)
            summary["rss"]["under_load_trend_pct"] = round(100 * (second - first) / first, 2)
        summary["fds"], summary["threads"] = (change(rss_samples, f"by_process_{key}") for key in ("fds", "threads"))
        if rss_samples[0]["temp_entries"] is not None:
            start, end = rss_samples[0]["temp_entries"], rss_samples[-1]["temp_entries"]
            summary["temp_entries"] = {"start": start, "end": end, "growth": end - start}
    return summary


def change(samples: list[dict], key: str) -> dict:
    """A per-process count's idle values after the warm-up and at the end, and each process's growth."""
    first, last = samples[0][key], samples[-1][key]
    return {"start": first, "end": last,
            "growth_by_process": {name: last[name] - count for name, count in first.items() if name in last}}


def report(summary: dict) -> None:
    say(f"\n## soak: {summary['soak_s']:.0f} s, {summary['concurrency']} workers, seed {summary['seed']}, "
        f"{summary['url']}")
    say(f"requests sent {summary['sent']} ({summary['requests_per_s']} req/s) | completed {summary['completed']} | "
        f"rejected {summary['rejected']} | cancelled {summary['cancelled']} | LOST {summary['lost']}")
    warmup = {key: count for key, count in summary["warmup"].items() if key != "by_kind"}
    say(f"warm-up {warmup}; after the soak, a request and /health: "
        f"{'ok' if summary['final_checks_ok'] else 'FAILED'}")
    say("| kind | " + " | ".join(("completed", "rejected", "cancelled", "lost")) + " |\n|---|---|---|---|---|")
    for kind, counts in summary["by_kind"].items():
        say(f"| {kind} | " + " | ".join(str(counts.get(c, 0)) for c in ("completed", "rejected", "cancelled", "lost"))
            + " |")
    say("status codes: " + ", ".join(f"{k}: {v}" for k, v in summary["status_codes"].items()))
    say("outcomes: " + "; ".join(f"{k} x{v}" for k, v in summary["reasons"].items()))
    say("completed latency s (p50 / p95 / max): " + "; ".join(
        f"{kind} {v['p50']} / {v['p95']} / {v['max']}" for kind, v in summary["latency_s"].items()))
    deadline = summary["deadline"]
    say(f"repeated-seed byte checks against the references: {summary['repeated_seed_checks']}; "
        f"deadline 504s: {deadline['504']} (latest {deadline['max_504_past_deadline_s']} s past the deadline), "
        f"completed > 1 s past the deadline: {deadline['completed_over_1s_past_deadline']}")
    rss = summary["rss"]
    if rss:
        say(f"server RSS: start {rss['start_mib']:.1f} MiB, end {rss['end_mib']:.1f} MiB, max {rss['max_mib']:.1f} "
            f"MiB, growth {rss['growth_mib']:+.1f} MiB ({rss['growth_pct']:+.2f} %)"
            + ("; the server's process set changed during the run" if rss["processes_changed"] else ""))
        if "under_load_trend_pct" in rss:
            say(f"  under load: mean of the first half of the samples {rss['under_load_first_half_mib']:.1f} MiB, "
                f"of the second half {rss['under_load_second_half_mib']:.1f} MiB ({rss['under_load_trend_pct']:+.2f} %)")
        first, last = rss["samples"][0]["by_process_mib"], rss["samples"][-1]["by_process_mib"]
        say("  by process (start -> end MiB): " + "; ".join(
            f"{name} {first.get(name, 0):.1f} -> {last.get(name, 0):.1f}" for name in sorted({*first, *last})))
        for key, what in (("fds", "open file descriptors"), ("threads", "threads")):
            first, last = summary[key]["start"], summary[key]["end"]
            say(f"  {what} by process (start -> end): " + "; ".join(
                f"{name} {first.get(name, 0)} -> {last.get(name, 0)}" for name in sorted({*first, *last})))
        entries = summary["temp_entries"]
        say("  files and folders in the server's TMPDIR (start -> end): "
            + (f"{entries['start']} -> {entries['end']}" if entries else
               "not counted (the server's environment names no TMPDIR)"))
    else:
        say("server RSS: not measured")
    for reason, examples in summary["lost_examples"].items():
        say(f"LOST: {reason}")
        for example in examples:
            say(f"    {json.dumps(example, default=str)[:600]}")


def plot_rss(samples: list[dict], path: Path) -> None:
    """Each process's RSS (MiB) against the soak's time (minutes; the warm-up ends at 0)."""
    series: dict[str, list[tuple[float, float]]] = {}
    for sample in samples:
        for name, mib in sample["by_process_mib"].items():
            series.setdefault(name, []).append((sample["t_s"] / 60, mib))
    line_chart(series, "Server RSS per process during the soak", "minutes after the warm-up", "RSS, MiB", path)
    say(f"RSS plot: {path}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.url:
        summary = asyncio.run(soak(args))
    else:
        ttl = {} if args.job_ttl_s is None else {"STABLE_AUDIO_JOB_TTL_S": str(args.job_ttl_s)}
        env = {"STABLE_AUDIO_MODEL": "tiny", **ttl, **dict(item.split("=", 1) for item in args.server_env)}
        say(f"starting bentoml serve ({env}); log in {args.server_log}")
        # a TMPDIR of its own: the files the server leaves there are counted apart from everyone else's in /tmp
        with tempfile.TemporaryDirectory(prefix="soak-tmp-") as temp_dir, \
                local_server({**env, "TMPDIR": temp_dir}, args.server_log) as url:
            args.url = str(url)
            started = getattr(url, "process", None)  # local_server's URL may carry its process
            summary = asyncio.run(soak(args, psutil.Process(started.pid) if started else None))
    report(summary)
    rss = summary["rss"]
    if args.rss_svg and rss:
        plot_rss(rss["samples"], args.rss_svg)
    grown = {name: pct for name, pct in (rss["growth_by_process_pct"] if rss else {}).items()
             if pct > args.max_rss_growth_pct}
    for name, pct in grown.items():
        say(f"server process {name}: idle RSS grew {pct:+.2f} %, above --max-rss-growth-pct "
            f"{args.max_rss_growth_pct:g}")
    leaking = {name: count for name, count in (summary["fds"]["growth_by_process"] if rss else {}).items()
               if count > args.max_fd_growth}
    for name, count in leaking.items():
        say(f"server process {name}: {count:+d} open file descriptors, above --max-fd-growth {args.max_fd_growth}")
    if args.json:
        print(json.dumps(summary, default=str), flush=True)
    return 1 if summary["lost"] else 2 if grown else 3 if leaking else 0


if __name__ == "__main__":
    sys.exit(main())
