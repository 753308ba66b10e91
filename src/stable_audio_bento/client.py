"""Command-line client (standard library only, so it runs anywhere). It submits a job, shows a progress bar
while polling it, then downloads the audio. A busy server's refusal (429, or 503 while shutting down) is retried
after its Retry-After until --timeout, and so is a submission, poll or download that fails on the way (a dropped
connection, a proxy's 502/504): the submission carries an Idempotency-Key, so the server answers a copy with the
job the first made (keys live on the instance that took them: behind a load balancer, poll with affinity).
Whatever makes the client give up on a job still queued or running (--timeout, Ctrl-C, an error), it cancels the
job on the server, so that no GPU time goes to audio nobody will fetch; also a job that a submission whose answer
was lost may have made. Once connected, no exchange with the server outlasts --timeout, not even an answer that
trickles in (connecting is bounded per address by the call's socket timeout).

    python -m stable_audio_bento.client "Thunder and rain sounds" --audio-length 15 --seed 42 -o rain.wav
    python -m stable_audio_bento.client "A cello" --init-audio loop.wav --strength 0.5 -o cello.wav
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import signal
import socket
import ssl
import stat
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, TypeVar

POLL_INTERVAL_S = 0.25
BAR_WIDTH = 30
DEFAULT_RETRY_AFTER_S = 1.0
# A call that fails on the way may work at the next try: the connection dropped, was refused or timed out (a
# restarting proxy, a flaky network), or the server or a proxy answered busy (429), bad gateway (502), unavailable
# (503: shutting down; behind a load balancer the next try may reach another replica) or gateway timeout (504).
# Tried again after Retry-After, until --timeout.
TRANSIENT_STATUSES = (429, 502, 503, 504)
# ... and a submission whose copy, sent before, is still being taken (409). A submission carries an Idempotency-Key,
# so that sending it again after a lost answer gets the job a lost answer named, not a second job.
SUBMISSION_RETRIED_STATUSES = (409, *TRANSIENT_STATUSES)
# A submission answered with these made no job (a refusal, a redirect); see made_nothing.
NOTHING_MADE_STATUSES = (*range(300, 400), 400, 401, 403, 404, 405, 408, 413, 415, 422, 429, 503)
ACTIVE = ("queued", "running")
# Name lookups that say the host does not exist, as a mistyped --url does; not EAI_AGAIN, a resolver failing for now.
NO_SUCH_HOST = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}
CANCEL_TIMEOUT_S = 10.0  # the client is already giving up: a cancel that hangs must not keep it from exiting
MAX_TIMEOUT_S = 30 * 86400.0
MIN_CALL_TIMEOUT_S = 0.5  # a call at the deadline still gets this long, so that its failure says why
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C, and kill or a container stop (see stop_on_sigterm)
T = TypeVar("T")
SUFFIX_FORMATS = {"wav": "wav", "flac": "flac", "mp3": "mp3", "pcm": "pcm", "opus": "opus", "ogg": "opus",
                  "aac": "aac"}


def response_format(text: str) -> str:
    """--response-format as the server names it: it takes lowercase names only, and no ogg (opus is in ogg)."""
    served = SUFFIX_FORMATS.get(text.lower())
    if served is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a format the server writes: give wav, mp3, flac, pcm, "
                                         "opus (or ogg) or aac")
    return served


FIELDS = {  # flag -> (type, help); None values are left out so the server applies its defaults
    "audio_length": (float, "seconds of audio (default: the model's maximum, 47.55 s for stable-audio-open-1.0; "
                            "an edit on Stable Audio 3: the file's length)"),
    "audio_start": (float, "start of the returned window in seconds (default 0)"),
    "negative_prompt": (str, "what to avoid"),
    "guidance_scale": (float, "classifier-free guidance scale (default: the model's; <= 1 disables guidance)"),
    "num_inference_steps": (int, "denoising steps (default: the model's, 100 for stable-audio-open-1.0)"),
    "seed": (int, "random seed; the same seed and request give the same audio"),
    "response_format": (response_format, "wav, mp3, flac, pcm, opus (or ogg) or aac (default: from the output "
                                         "file's suffix; wav for a file without one)"),
    "model": (str, "model name; must match the served model if given"),
    "strength": (float, "with --init-audio: how far from it to go, over 0 and at most 1 (default 0.5)"),
    "mask_start": (float, "with --init-audio, Stable Audio 3: regenerate from here (seconds), keep the rest"),
    "mask_end": (float, "with --init-audio, Stable Audio 3: ... up to here (seconds; default: the end)"),
}
EDIT_FIELDS = ("strength", "mask_start", "mask_end")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Generate audio with a stable-audio-bento server.")
    parser.add_argument("input", help="text prompt")
    for name, (kind, help_text) in FIELDS.items():
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, help=help_text)
    parser.add_argument("--init-audio", type=Path, help="start from this audio file (audio-to-audio)")
    parser.add_argument("--trim-silence", action="store_true",
                        help="cut the silence after the sound (the file may be shorter than --audio-length)")
    parser.add_argument("-o", "--output", type=Path, default=Path("output.wav"), help="output file (default output.wav)")
    parser.add_argument("--url", default="http://localhost:8091", help="server address (default http://localhost:8091)")
    parser.add_argument("--api-key", default=os.environ.get("STABLE_AUDIO_API_KEY"),
                        help="sent as 'Authorization: Bearer KEY' (default: $STABLE_AUDIO_API_KEY); leading and "
                             "trailing whitespace is dropped, as the server drops it from its key file's line")
    parser.add_argument("--timeout", type=float, default=3600.0,
                        help="seconds to wait, retries of a busy server included, before cancelling the job "
                             "(default 3600)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if not 0 < args.timeout <= MAX_TIMEOUT_S:  # inf or nan too: a timer cannot wait that long
        parser.error(f"--timeout must be over 0 and at most {MAX_TIMEOUT_S:g} s (30 days), not {args.timeout:g}")
    for name in EDIT_FIELDS:
        if getattr(args, name) is not None and args.init_audio is None:
            parser.error(f"--{name.replace('_', '-')} needs --init-audio")
    if args.api_key is not None:
        args.api_key = args.api_key.strip()
        if not usable_key(args.api_key):  # the key itself is not shown: this line may end up in a shared log
            parser.error("the API key (--api-key or $STABLE_AUDIO_API_KEY) has a space, a control or a non-ASCII "
                         "character inside; the server's key is printable ASCII")
    if args.init_audio is not None and not (args.init_audio.is_file() and os.access(args.init_audio, os.R_OK)):
        parser.error(f"cannot read --init-audio {args.init_audio}: give an audio file this user can read")
    if not writable(args.output):  # known now, not after the generation
        parser.error(f"cannot write {args.output}: give a file in an existing folder this user can write to, or a "
                     "device such as /dev/stdout")
    suffix = args.output.suffix.lstrip(".").lower()
    named = SUFFIX_FORMATS.get(suffix)
    if named is not None and args.response_format is not None and args.response_format != named:
        parser.error(f"{args.output} names {named} audio but --response-format asks for {args.response_format}: "
                     "drop one, or give the file the format's suffix")
    if suffix and named is None and args.response_format is None:  # e.g. .m4a: WAV in it would be a broken file
        parser.error(f"{args.output}: no format is served as .{suffix}; name the file .wav, .mp3, .flac, .pcm, "
                     ".opus (or .ogg) or .aac, or give --response-format")
    return args


def usable_key(key: str) -> bool:
    """Whether the key is one a server can have: printable ASCII without spaces (the server refuses any other at
    start). A space would end it in the header, a line feed end the header, and http.client refuses a control
    character with the header's value, key included, in its message."""
    return key.isascii() and key.isprintable() and " " not in key


def in_place(path: Path) -> bool:
    """Whether -o names something other than a regular file, reached through links or not: a device (/dev/null) or
    a pipe (/dev/stdout piped), written directly, as there is no file to rename over."""
    try:
        return not stat.S_ISREG(os.stat(path).st_mode)
    except OSError:  # nothing there yet
        return False


def writable(path: Path) -> bool:
    """Whether ``save`` can write ``path``: a device or pipe this user may write to, or else a folder to rename a
    file in, the one the link's target (if any) is in."""
    if path.is_dir():
        return False
    if in_place(path):
        return os.access(path, os.W_OK)
    folder = Path(os.path.realpath(path)).parent
    return folder.is_dir() and os.access(folder, os.W_OK)


def request_body(args: argparse.Namespace) -> dict:
    body = {"input": args.input}
    body.update({name: getattr(args, name) for name in FIELDS if getattr(args, name) is not None})
    if args.trim_silence:
        body["trim_silence"] = True
    suffix = args.output.suffix.lstrip(".").lower()
    if "response_format" not in body and suffix in SUFFIX_FORMATS:
        body["response_format"] = SUFFIX_FORMATS[suffix]
    return body


class RefusedRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is answered as the error it is, not followed: urllib would send the API key to wherever it
    points, and turn a POST into a GET."""

    def redirect_request(self, *args, **kwargs) -> None:
        return None


class Watchdog:
    """Shuts an exchange's socket down once ``seconds`` have passed, and then raises TimeoutError as the exchange
    ends, whatever it returned or raised (a body cut short by the shutdown may look whole). A socket timeout bounds
    each read alone: a server or proxy that sends a byte now and then would hold the exchange for ever; a socket
    shut down ends the read it is blocked in. It gets the socket only once connected: name resolution is not
    bounded here, and connecting is bounded by the socket timeout for each address tried (see Server)."""

    def __init__(self, seconds: float, what: str):
        self.seconds, self.what = seconds, what
        self.lock, self.sock, self.fired = threading.Lock(), None, False
        self.timer = threading.Timer(seconds, self.fire)
        self.timer.daemon = True  # a timer left over never keeps the process alive

    def watch(self, sock: socket.socket) -> None:
        """The exchange's socket, once connected (each address tried is bounded by the socket timeout alone)."""
        with self.lock:
            self.sock = sock
            if self.fired:
                shut(sock)

    def fire(self) -> None:
        with self.lock:
            self.fired = True
            if self.sock is not None:
                shut(self.sock)

    def __enter__(self) -> "Watchdog":
        self.timer.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.timer.cancel()
        if self.fired:
            raise TimeoutError(f"{self.what}: the server's answer did not arrive whole within {self.seconds:.1f} s")


def shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # closed meanwhile: the exchange is over
        pass


class WatchedHandler:
    """Mixed into urllib's HTTP and HTTPS handlers: each connection hands its socket to its request's Watchdog."""

    def do_open(self, http_class, request, **connection_args):
        class Watched(http_class):
            def connect(self):
                super().connect()
                request.watchdog.watch(self.sock)

        return super().do_open(Watched, request, **connection_args)


class WatchedHTTPHandler(WatchedHandler, urllib.request.HTTPHandler):
    pass


class WatchedHTTPSHandler(WatchedHandler, urllib.request.HTTPSHandler):
    pass


class Server:
    """``timeout``: the socket timeout of a call, bounding each read (and each address's connect) alone.
    deadline: a time.monotonic() past which no call waits (the --timeout of generate), unless it names its own
    timeout (the cancel on the way out). Once connected, a call's exchange is bounded as a whole (sending and the
    whole answer, an error's body included) by the deadline, or without one by the call's timeout: a steady but
    slow download is not cut before --timeout. Connecting is not: each address the name resolves to is tried with
    the socket timeout (N addresses: up to N times it), and the name's resolution is not bounded at all."""

    def __init__(self, url: str, api_key: str | None, timeout: float = 60.0):
        self.url, self.timeout = url.rstrip("/"), timeout
        self.deadline: float | None = None
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.opener = urllib.request.build_opener(RefusedRedirect, WatchedHTTPHandler, WatchedHTTPSHandler)

    def call(self, method: str, path: str, body: dict | None = None, form: tuple[bytes, str] | None = None,
             timeout: float | None = None, headers: dict[str, str] | None = None) -> tuple[bytes, dict[str, str]]:
        """A JSON ``body``, or a ``form`` (multipart body and its Content-Type), or neither."""
        data, headers = None if body is None else json.dumps(body).encode(), {**self.headers, **(headers or {})}
        if form is not None:
            data, headers = form[0], {**headers, "Content-Type": form[1]}
        whole = timeout  # the bound of the whole exchange, once connected
        if timeout is None:
            timeout = whole = self.timeout
            if self.deadline is not None:
                whole = max(MIN_CALL_TIMEOUT_S, self.deadline - time.monotonic())
                timeout = min(timeout, whole)
        request = urllib.request.Request(self.url + path, data, headers, method=method)
        with Watchdog(whole, f"{method} {path}") as request.watchdog:
            return self.exchange(request, timeout)

    def exchange(self, request: urllib.request.Request, timeout: float) -> tuple[bytes, dict[str, str]]:
        """An HTTPError comes with its body already read, so that reading it later cannot outlast the watchdog."""
        try:
            with self.opener.open(request, timeout=timeout) as response:
                return response.read(), dict(response.headers)
        except urllib.error.HTTPError as error:
            raise urllib.error.HTTPError(error.filename, error.code, error.reason, error.headers,
                                         io.BytesIO(error.read())) from None

    def job(self, method: str, path: str) -> dict:
        return json.loads(self.call(method, path)[0])


def multipart_form(fields: dict, audio: Path) -> tuple[bytes, str]:
    """multipart/form-data (RFC 7578) with each field as JSON text, as the server reads form values, and the file
    in ``audio``."""
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{json.dumps(value)}\r\n'.encode()
             for name, value in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="audio"; filename="upload"\r\n'
                 "Content-Type: application/octet-stream\r\n\r\n".encode())
    parts += [audio.read_bytes(), f"\r\n--{boundary}--\r\n".encode()]
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def generate(server: Server, body: dict, timeout: float, show: "ProgressBar", init_audio: Path | None = None
             ) -> tuple[bytes, dict]:
    """Submit (an edit of ``init_audio`` if given), poll until the job ends, download. Returns the audio and the
    final job status."""
    deadline = server.deadline = time.monotonic() + timeout
    job = wait_for(server, submit(server, body, init_audio, deadline, show), deadline, timeout, show)
    show(job)
    if job["status"] != "succeeded":
        error = job["error"] or {}  # a cancelled job may have none
        code = f" ({error['code']})" if error.get("code") else ""
        raise RuntimeError(f"job {job['status']}" + (f": {error['message']}{code}" if error else ""))
    # The result stays on the server until the job expires, so a failed download can be tried again too.
    try:
        audio, headers = retrying(lambda: server.call("GET", job["result_url"]), deadline, show,
                                  "downloading the audio")
    except KeyboardInterrupt:
        raise DownloadStopped(job) from None
    media_type = {name.lower(): value for name, value in headers.items()}.get("content-type", "")
    if not media_type.startswith("audio/"):  # a proxy's page, say, answered in the server's place
        raise ValueError(f"the download of job {job['id']} is not audio (Content-Type: {media_type or 'none'})")
    return audio, job


def wait_for(server: Server, job: dict, deadline: float, timeout: float, show: "ProgressBar") -> dict:
    """Polls the job until it has ended. Whatever ends the wait before that (--timeout, Ctrl-C, an error that a
    retry does not get past, a bug), the job is cancelled on the server on the way out: the server would otherwise
    go on generating audio that nobody fetches. Not when the server no longer has the job (404)."""
    job_id = job["id"]  # kept for the cancel: a later answer may be of another shape
    path = f"/v1/audio/jobs/{job_id}"
    try:
        while job["status"] in ACTIVE:
            show(job)
            if time.monotonic() > deadline:
                raise TimeoutError(f"the job took longer than {timeout:g} s")
            time.sleep(POLL_INTERVAL_S)
            job = retrying(lambda: server.job("GET", path), deadline, show, "polling the job")
    except urllib.error.HTTPError as error:
        if error.code != 404:
            cancel(server, job_id, show)
            raise
        raise RuntimeError(f"job {job_id} is gone from the server (404): it expired or the server restarted, "
                           "so its audio is lost") from None
    except BaseException:  # KeyboardInterrupt included
        cancel(server, job_id, show)
        raise
    return job


def retrying(attempt: Callable[[], T], deadline: float, show: "ProgressBar", what: str,
             statuses: tuple[int, ...] = TRANSIENT_STATUSES) -> T:
    """``attempt()``, tried again after a short wait while it fails transiently (on the way, or with one of
    ``statuses``) and the deadline allows; else its error is raised. A run of failures is reported once on stderr,
    not at every try."""
    reported = False
    while True:
        try:
            return attempt()
        except (OSError, http.client.HTTPException) as error:  # URLError, HTTPError and socket timeouts are OSErrors
            if isinstance(error, urllib.error.HTTPError) and error.code not in statuses or never_passes(error):
                raise
            wait = retry_after(error) if isinstance(error, urllib.error.HTTPError) else DEFAULT_RETRY_AFTER_S
            if time.monotonic() + wait > deadline:
                if wait > DEFAULT_RETRY_AFTER_S:
                    show.note(f"{what} failed ({describe(error)}); the server asks to retry after {wait:g} s, "
                              "past --timeout")
                raise
            if not reported:
                show.note(f"{what} failed ({describe(error)}); retrying until --timeout")
                reported = True
            time.sleep(wait)


def never_passes(error: BaseException) -> bool:
    """A failure no retry gets past: a URL that cannot be used (an unknown scheme, no host, a port that is not a
    number), a host name that does not exist (not a lookup that failed for now), or a TLS handshake that failed for
    good (a certificate that does not verify, TLS to a plain HTTP port). A connection cut during the handshake may
    pass, and is tried again."""
    if isinstance(error, http.client.InvalidURL):
        return True
    if isinstance(error, urllib.error.HTTPError) or not isinstance(error, urllib.error.URLError):
        return False  # an answer (its status decides), or a failure on the way
    reason = error.reason
    if isinstance(reason, socket.gaierror):
        return reason.errno in NO_SUCH_HOST
    cut = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError)
    return isinstance(reason, str) or isinstance(reason, ssl.SSLError) and not isinstance(reason, cut)


def describe(error: BaseException) -> str:
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    return str(error) or type(error).__name__  # RemoteDisconnected and the like can have an empty message


def cancel(server: Server, job_id: str, show: "ProgressBar", timeout: float = CANCEL_TIMEOUT_S) -> None:
    """Best effort: the caller is already on its way out with an error of its own, which must not be replaced by
    this one (the server may well be unreachable, which is why we are giving up)."""
    try:
        server.call("DELETE", f"/v1/audio/jobs/{job_id}", timeout=timeout)
    except Exception as error:
        show.note(f"could not cancel job {job_id} on the server ({describe(error)}); it may run to its end there")


@dataclass
class Submission:
    """One job's POST, the same at every try: its body or form, and its Idempotency-Key (the server answers a copy
    with the job the first made, on the instance that took it)."""

    body: dict
    form: tuple[bytes, str] | None
    key: dict[str, str] = field(default_factory=lambda: {"Idempotency-Key": uuid.uuid4().hex})
    job: dict | None = None  # the job an answer named, once one has

    def send(self, server: Server, timeout: float | None = None) -> dict:
        path = "/v1/audio/jobs" if self.form is None else "/v1/audio/edits/jobs"
        body = None if self.form is not None else self.body
        return json.loads(server.call("POST", path, body, self.form, timeout=timeout, headers=self.key)[0])


def submit(server: Server, body: dict, init_audio: Path | None, deadline: float, show: "ProgressBar") -> dict:
    """The new job. Sent again while the deadline allows when refused for now or when its answer is lost (see
    SUBMISSION_RETRIED_STATUSES), each time with the same Idempotency-Key: a job created by a try whose answer never
    came is the one the next try is answered with, not a second job generating unseen. Given up on (--timeout,
    Ctrl-C, an error) after a try that may have made a job, that job is found and cancelled."""
    submission = Submission(body, None if init_audio is None else multipart_form(body, init_audio))
    maybe_made = False

    def attempt() -> dict:
        nonlocal maybe_made
        try:
            return create(server, submission, show)
        except BaseException as error:
            maybe_made = maybe_made or not made_nothing(error)
            raise

    try:
        return retrying(attempt, deadline, show, "submitting the job", SUBMISSION_RETRIED_STATUSES)
    except StoppedAgain:
        raise
    except BaseException:
        if submission.job is not None:
            cancel(server, submission.job["id"], show)
        elif maybe_made:
            cancel_unseen(server, submission, show)
        raise


def made_nothing(error: BaseException) -> bool:
    """Whether a submission that failed so surely made no job. An answer says so by its status; urllib raises a
    URLError that is not an answer only while connecting or sending (the server has no whole request), and a
    ValueError for a URL it cannot use. Anything else may have lost the answer of a job made: a connection dropped
    or timed out while the answer was awaited, a proxy's 502 or 504, a 409 (an earlier copy is being taken), a Ctrl-C
    held until the answer came (it takes the answer's place)."""
    if isinstance(error, urllib.error.HTTPError):
        return error.code in NOTHING_MADE_STATUSES
    return isinstance(error, urllib.error.URLError) or isinstance(error, ValueError) and not isinstance(
        error, json.JSONDecodeError) or never_passes(error)


def create(server: Server, submission: Submission, show: "ProgressBar") -> dict:
    """POSTs the job. The server names a job only in its answer, so a stop while the answer is awaited waits for
    it (see stops_deferred), for the job it names to be cancelled."""
    with stops_deferred(show):
        submission.job = submission.send(server)
    return submission.job


def cancel_unseen(server: Server, submission: Submission, show: "ProgressBar") -> None:
    """The job a lost answer may have named: the submission sent once more, with its key, names it (or makes it
    now), and it is cancelled. Best effort, within CANCEL_TIMEOUT_S, as ``cancel``."""
    show.note("giving up: asking the server for the job a lost answer may have named, to cancel it; stop again to "
              "quit at once")
    give_up_at = time.monotonic() + CANCEL_TIMEOUT_S

    def left() -> float:
        return max(MIN_CALL_TIMEOUT_S, give_up_at - time.monotonic())

    try:
        while True:
            try:
                job_id = submission.send(server, timeout=left())["id"]
                break
            except urllib.error.HTTPError as error:  # 409: the first copy is still being taken
                if error.code != 409 or time.monotonic() + retry_after(error) > give_up_at:
                    raise
                time.sleep(retry_after(error))
    except Exception as error:
        show.note(f"could not learn whether the server made the job ({describe(error)}); if it did, it may run to "
                  "its end there")
        return
    cancel(server, job_id, show, timeout=left())


class DownloadStopped(KeyboardInterrupt):
    """A stop once the job has succeeded: nothing is left to cancel, and the job's audio stays on the server."""

    def __init__(self, job: dict):
        super().__init__()
        self.job = job


class StoppedAgain(KeyboardInterrupt):
    """A second Ctrl-C or SIGTERM while the first waits: quit at once, without finding the job to cancel it."""


@contextmanager
def stops_deferred(show: "ProgressBar") -> Iterator[None]:
    """The first Ctrl-C or SIGTERM inside is held until the block ends, then raised as KeyboardInterrupt in place of
    whatever the block returned or raised: the block ends by itself, its exchange bounded by --timeout. A second
    one is raised at once, as that bound may be long for a user who wants out. Only in the main thread, the one
    that gets signals (and the only one that may set their handlers): elsewhere the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stops = []

    def hold(signum, frame) -> None:
        if stops:
            show.note("stopped before the server answered: if it has created the job, the job runs to its end "
                      "there (the server names it only in that answer), and it cannot be cancelled from here")
            raise StoppedAgain
        stops.append(signum)
        show.note("stopping once the server answers, to cancel the job it creates; stop again to quit at once")

    # A signal ignored (as sh starts a background job's SIGINT) stays ignored: the stop is meant for others.
    previous = {signum: signal.signal(signum, hold) for signum in STOP_SIGNALS
                if signal.getsignal(signum) is not signal.SIG_IGN}
    again = False
    try:
        yield
    except StoppedAgain:
        again = True
        raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if stops and not again:
            raise KeyboardInterrupt


def error_message(body: bytes) -> str:
    """What an error answer says: our API's message, else the first line of the body (a proxy's page), cut short."""
    text = body.decode(errors="replace")
    try:
        return str(json.loads(text)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        lines = text.strip().splitlines() or ["(no body)"]
        return lines[0][:200] + (" …" if len(lines) > 1 or len(lines[0]) > 200 else "")


def retry_after(error: urllib.error.HTTPError) -> float:
    """The refusal's Retry-After in seconds (the server sends whole seconds), else a default."""
    try:
        return max(0.0, float(error.headers.get("Retry-After", DEFAULT_RETRY_AFTER_S)))
    except ValueError:  # an HTTP date, from a proxy
        return DEFAULT_RETRY_AFTER_S


class ProgressBar:
    """One line on stderr, redrawn in place on a terminal; elsewhere a line per 10 % of progress."""

    def __init__(self, enabled: bool):
        self.enabled, self.interactive, self.last_tenth = enabled, sys.stderr.isatty(), -1
        self.line_open = False  # a bar drawn in place and not yet ended by a newline

    def note(self, message: str) -> None:
        """A message on a line of its own, below the bar (shown even with --quiet: it is not progress)."""
        print(("\n" if self.line_open else "") + message, file=sys.stderr, flush=True)
        self.line_open = False

    def __call__(self, job: dict) -> None:
        if not self.enabled:
            return
        progress = job.get("progress")  # None until the job starts
        fraction = progress["steps_done"] / progress["steps_total"] if progress and progress["steps_total"] else 0.0
        filled = round(BAR_WIDTH * fraction)
        queued_at = job["queue_position"]  # unknown (None) while the server cannot ask its engine
        state = job["status"] if job["status"] != "queued" or queued_at is None else f"queued, position {queued_at}"
        steps = f"{progress['steps_done']}/{progress['steps_total']} steps  " if progress else ""
        line = f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {steps}{state}"
        final = job["status"] not in ACTIVE
        if self.interactive:
            print("\r" + line.ljust(70), end="\n" if final else "", file=sys.stderr, flush=True)
            self.line_open = not final
        elif final or int(10 * fraction) > self.last_tenth:
            self.last_tenth = int(10 * fraction)
            print(line, file=sys.stderr, flush=True)


def stop_on_sigterm(signum, frame) -> None:
    """``kill``, a container stop or a CI timeout gives up like Ctrl-C: the job is cancelled on the way out."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    previous = signal.signal(signal.SIGTERM, stop_on_sigterm)
    try:
        return run(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(args: argparse.Namespace) -> int:
    server, bar = Server(args.url, args.api_key), ProgressBar(not args.quiet)
    try:
        audio, job = generate(server, request_body(args), args.timeout, bar, args.init_audio)
    except urllib.error.HTTPError as error:
        if 300 <= error.code < 400:
            bar.note(f"error {error.code}: {redirect_advice(server, error)}")
        else:
            bar.note(f"error {error.code}: {error_message(error.read())}")
        return 1
    except (OSError, RuntimeError, ValueError, http.client.HTTPException) as error:  # URLError and TimeoutError
        # are OSErrors, as is an unreadable file; HTTPException: a response cut short or garbled, past --timeout;
        # ValueError: a 200 that is not the JSON expected (a proxy's HTML page), or a download that is not audio
        bar.note(f"failed ({args.url}): {error}")
        return 1
    except (KeyError, TypeError) as error:  # JSON, but not a job's
        bar.note(f"failed ({args.url}): the server's answer is not a job ({type(error).__name__}: {error})")
        return 1
    except DownloadStopped as stop:
        bar.note(f"interrupted while downloading the audio of job {stop.job['id']}, which succeeded; it stays on the "
                 f"server until the job expires: {server.url}{stop.job['result_url']}")
        return 130
    except KeyboardInterrupt:
        bar.note("cancelled")
        return 130
    try:
        save(args.output, audio)
    except OSError as error:
        bar.note(f"could not write {args.output} ({error}); the audio stays on the server until the job expires: "
                 f"{server.url}{job['result_url']}")
        return 1
    # On stderr like every message: with -o /dev/stdout, stdout holds the audio alone.
    bar.note(f"wrote {args.output} ({len(audio)} bytes, {job['audio_duration']:.3f} s of {job['response_format']}, "
             f"seed {job['seed']})")
    return 0


def redirect_advice(server: Server, error: urllib.error.HTTPError) -> str:
    """What to give as --url instead: the Location names the route the call was sent to, so the server's address
    is what comes before that route, when the Location ends with it."""
    location = urllib.parse.urljoin(error.filename, error.headers.get("Location", ""))
    route = error.filename[len(server.url):]
    refused = f"the server redirects to {location}, which is not followed (it would get the API key)"
    if location.endswith(route) and location != error.filename:
        return f"{refused}: give {location[:-len(route)]} as --url"
    return f"{refused}; it is not this route at another address: check --url"


def save(path: Path, data: bytes) -> None:
    """Whole or not at all: written to a file of its own beside the target, then renamed over it. Through a link,
    the link's target is replaced and the link kept (/dev/stdout redirected to a file is such a link); a device or
    a pipe (/dev/null, /dev/stdout piped) is written directly."""
    if in_place(path):
        path.write_bytes(data)
        return
    target = Path(os.path.realpath(path))
    handle, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.chmod(partial, 0o666 & ~current_umask())  # not mkstemp's 0600: as a file the user created
        Path(partial).replace(target)
    finally:
        Path(partial).unlink(missing_ok=True)


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


if __name__ == "__main__":
    sys.exit(main())
