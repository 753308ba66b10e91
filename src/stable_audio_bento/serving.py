"""HTTP-side glue that BentoML does not provide: the model card exchanged between services, a middleware that
gives every error response the OpenAI shape ``{"error": {"message", "type", "param", "code"}}``, and one that
guards each request (API key, body size) and gives it an id and a way to notice that its client went away."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import hmac
import json
import logging
import os
import re
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import pydantic
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.responses import StreamingResponse

from .env_values import env_integer, env_seconds, env_text
from .generation import ModelLimits
from .protocol import APIError, describe_validation_error, error_body, shown

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 5  # when nothing better is known: BentoML's own 429/503, or before any generation finished
FASTAPI_UNPARSABLE_BODY = "There was an error parsing the body"  # fastapi.routing's 400 detail, word for word


@dataclass(frozen=True)
class ModelCard:
    """What the engine serves; the front validates requests against it."""

    model: str
    limits: ModelLimits
    default_steps: int
    max_steps: int
    default_guidance_scale: float = 7.0
    edits: bool = False  # whether the model family starts from init audio (POST /v1/audio/edits)
    inpainting: bool = False  # ... and regenerates a region of it (mask_start / mask_end)
    model_tag: str | None = None  # the model store's tag of the served weights, if they come from the store

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "max_seconds": self.limits.max_seconds}

    def openai_model(self) -> dict[str, Any]:
        """The model as /v1/models lists it: OpenAI's model object, with the limits and defaults a client needs."""
        return {"id": self.model, "object": "model", "created": 0, "owned_by": "stable-audio-bento",
                "max_audio_length": self.limits.max_seconds, "sample_rate": self.limits.sample_rate,
                "default_inference_steps": self.default_steps, "max_inference_steps": self.max_steps,
                "default_guidance_scale": self.default_guidance_scale, "fixed_start": self.limits.fixed_start,
                "edits": self.edits, "inpainting": self.inpainting,
                # an edit's strength must be at least this times (num_inference_steps - 1)
                "min_strength_per_step": self.limits.min_strength_per_step}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelCard":
        return cls(data["model"], ModelLimits(**data["limits"]), data["default_steps"], data["max_steps"],
                   data.get("default_guidance_scale", 7.0), data.get("edits", False),
                   data.get("inpainting", False), data.get("model_tag"))


class OpenAIErrorMiddleware:
    """Rewrites JSON error bodies from BentoML (validation, overload, timeout) into the OpenAI error shape.

    Bodies already in that shape pass through; 429 and 503 get a Retry-After header."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        held: dict[str, Any] = {}
        chunks: list[bytes] = []

        async def rewrite(message):
            if message["type"] == "http.response.start" and message["status"] >= 400:
                held["start"] = message
                return
            if "start" not in held or message["type"] != "http.response.body":
                return await send(message)
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            start = held["start"]
            body = self.openai_body(start["status"], b"".join(chunks))
            headers = [(k, v) for k, v in start["headers"] if k.lower() not in (b"content-length", b"content-type")]
            headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            if start["status"] in (429, 503) and not any(k.lower() == b"retry-after" for k, _ in headers):
                headers.append((b"retry-after", str(RETRY_AFTER_S).encode()))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, rewrite)

    @staticmethod
    def openai_body(status: int, raw: bytes) -> bytes:
        try:
            data = json.loads(raw)
        except ValueError:
            data = raw.decode(errors="replace").strip()
        if isinstance(data, dict) and isinstance(data.get("error"), dict):
            return raw
        param = None
        detail = data.get("detail") if isinstance(data, dict) else None
        if isinstance(detail, list) and status == 400:  # BentoML's validation errors
            message, param = describe_validation_error(detail)
        elif detail == FASTAPI_UNPARSABLE_BODY and status == 400:
            # FastAPI's answer when decoding the body fails other than as JSON syntax: bytes that are not UTF-8, a
            # number past Python's 4300-digit limit, arrays nested past its recursion limit
            message = ("request body could not be read as JSON: it must be UTF-8, with numbers under 4300 digits "
                       "and nesting under 1000 levels")
        elif isinstance(detail, str):  # FastAPI's own: 404, 405
            message = detail
        elif isinstance(data, dict) and isinstance(data.get("error"), str):
            message = data["error"]
        elif isinstance(data, list) and data and isinstance(data[0], dict):
            message = str(data[0].get("error", data[0]))
        else:
            message = str(data) or f"HTTP {status}"
        return json.dumps(error_body(message, status, param)).encode()


# The OpenAI SDK resends a 5xx (twice by default) unless the answer says not to: a request that ran out of time
# would only run out of time again, holding an engine as long each time.
NOT_TO_BE_RETRIED = {"X-Should-Retry": "false"}


def error_headers(error: APIError) -> dict[str, str]:
    headers = {"Retry-After": str(error.retry_after)} if error.retry_after is not None else {}
    return {**headers, **NOT_TO_BE_RETRIED} if error.status == 504 else headers


RESPONSE_CHUNK_BYTES = 64 << 10


def streamed(data: bytes, media_type: str, headers: dict[str, str]) -> StreamingResponse:
    """``data`` sent a chunk at a time, each once the connection has taken the last: sent whole, it is copied into
    the buffer of every connection whose client reads slowly or not at all (tens of MB each, held until it reads)."""
    view = memoryview(data)

    async def chunks():
        for start in range(0, len(view), RESPONSE_CHUNK_BYTES):
            yield view[start:start + RESPONSE_CHUNK_BYTES]
            # A turn of the event loop between chunks: a connection the client reset is only marked lost on the
            # next turn, and until then every chunk written into it logged a warning (about 100 per hang-up).
            await asyncio.sleep(0)

    return StreamingResponse(chunks(), media_type=media_type, headers={**headers, "Content-Length": str(len(data))})


async def send_json(send, status: int, body: dict[str, Any], extra_headers: list[tuple[bytes, bytes]] = ()) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *extra_headers]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


@dataclass(frozen=True)
class GuardSettings:
    """Optional API key and the request-body limit (environment variables in brackets).

    api_key [STABLE_AUDIO_API_KEY, or the first line of the file named by STABLE_AUDIO_API_KEY_FILE]: when set,
        every path except ``public_paths`` needs ``Authorization: Bearer <key>``.
    public_paths [STABLE_AUDIO_PUBLIC_PATHS, comma-separated]: open without a key (the playground page asks for
        the key itself); add /docs or /metrics here.
    max_body_bytes [STABLE_AUDIO_MAX_BODY_BYTES]: larger request bodies get 413, as do the text fields of an upload's
        form together.
    max_upload_bytes [STABLE_AUDIO_MAX_UPLOAD_BYTES]: the same for the routes that take a file (UPLOAD_PATHS).
    body_timeout_s [STABLE_AUDIO_BODY_TIMEOUT_S]: a body not received whole in this time gets 408: a stalled or
        trickling upload would otherwise hold its memory for as long as its client keeps the connection open.
    body_min_rate [STABLE_AUDIO_BODY_MIN_RATE, bytes per second]: past its first ``BODY_GRACE_S`` a body must keep
        arriving at this average rate, else 408, so that a client trickling a few bytes cannot hold one of the
        ``max_uploads`` for the whole ``body_timeout_s``.
    max_uploads [STABLE_AUDIO_MAX_UPLOADS]: upload bodies received at once by this front process (each is held in
        memory until it is read whole); past them an upload gets 429 before its body is read.
    """

    api_key: str | None = None
    # /schema.json: BentoML's client reads it when it opens, before any call; behind the key, a client without it
    # failed with "500 Failed to fetch schema" instead of the 401 its first call now gets.
    public_paths: tuple[str, ...] = ("/health", "/healthz", "/livez", "/readyz", "/ui", "/schema.json")
    max_body_bytes: int = 1 << 20
    # the longest window, Stable Audio 3 medium's 380 s, as 24-bit stereo WAV at 48 kHz is 109 MB
    max_upload_bytes: int = 128 << 20
    body_timeout_s: float = 300.0  # 128 MiB at 3.5 Mbit/s
    body_min_rate: int = 16 << 10  # 128 kbit/s
    max_uploads: int = 8

    @classmethod
    def from_env(cls) -> "GuardSettings":
        env = os.environ
        key = env_text(env, "STABLE_AUDIO_API_KEY")
        if key is not None:
            key = usable_key(key.strip(), "STABLE_AUDIO_API_KEY")
        elif (key_file := env_text(env, "STABLE_AUDIO_API_KEY_FILE")) is not None:
            key = read_key_file(key_file)
        paths = env_text(env, "STABLE_AUDIO_PUBLIC_PATHS")
        return cls(
            api_key=key,
            public_paths=tuple(p.strip() for p in paths.split(",") if p.strip()) if paths else cls.public_paths,
            max_body_bytes=env_integer(env, "STABLE_AUDIO_MAX_BODY_BYTES", cls.max_body_bytes, minimum=1),
            max_upload_bytes=env_integer(env, "STABLE_AUDIO_MAX_UPLOAD_BYTES", cls.max_upload_bytes, minimum=1),
            body_timeout_s=env_seconds(env, "STABLE_AUDIO_BODY_TIMEOUT_S", cls.body_timeout_s),
            body_min_rate=env_integer(env, "STABLE_AUDIO_BODY_MIN_RATE", cls.body_min_rate, minimum=1),
            max_uploads=env_integer(env, "STABLE_AUDIO_MAX_UPLOADS", cls.max_uploads, minimum=1),
        )


def read_key_file(path: str) -> str:
    """The key on the first line of the file. A file that cannot be read or starts with an empty line is refused:
    serving without the key its operator meant to set would open the service to anyone."""
    try:
        with open(path) as file:
            key = file.readline().strip()
    except OSError as error:
        raise ValueError(f"STABLE_AUDIO_API_KEY_FILE={path!r}: cannot read it ({error.strerror})") from None
    if not key:
        raise ValueError(f"STABLE_AUDIO_API_KEY_FILE={path!r}: its first line is empty; put the API key there")
    return usable_key(key, f"STABLE_AUDIO_API_KEY_FILE={path!r}")


# What a client can send after "Bearer " and the guard compare as sent: printable ASCII without spaces.
API_KEY_CHARACTERS = re.compile(r"[!-~]+")


def usable_key(key: str, source: str) -> str:
    """The key, which the caller has stripped (a Secret's trailing line feed; the guard strips the header's token
    too), if a client can send it; else refused without showing it: serving with it would lock every client out,
    and serving without the key its operator meant to set would open the service to anyone."""
    if not key:
        raise ValueError(f"{source}: the key is only whitespace")
    if not API_KEY_CHARACTERS.fullmatch(key):
        raise ValueError(f"{source}: the key has a space, a control or a non-ASCII character inside; clients send "
                         "it in an Authorization header: use printable ASCII")
    return key


# Their POST bodies are read as JSON whatever the Content-Type says (multipart is refused with 415).
JSON_BODY_PATHS = ("/v1/audio/generate", "/v1/audio/speech", "/v1/audio/jobs")
# Their POST bodies are multipart form data with a file in the named field, and have their own, larger limit.
UPLOAD_PATHS = {"/v1/audio/edits": "audio", "/v1/audio/edits/jobs": "audio"}
# A middleware outside the guard that wants an upload's form fields puts a dict at this scope key; once the guard
# has read the form it stores there, under "fields", its KEPT_FORM_FIELDS (read_upload_form). The form is read
# once, by a parser: searching the body for a field again cost time quadratic in a crafted body's size.
UPLOAD_FORM_SCOPE_KEY = "stable_audio.upload_form"
KEPT_FORM_FIELDS = ("response_format",)  # for the request metrics' label
MAX_FORM_FIELDS = 64  # an edit has 15; unknown ones are ignored
# BentoML keeps an upload in a temporary file whose name ends with the upload's: past 244 bytes the name is too long
# for the filesystem (255), and BentoML answered 500.
MAX_FILE_NAME_BYTES = 200
CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client went away"; nobody reads this response
BODY_GRACE_S = 10.0  # a body's first seconds, before body_min_rate applies: a connection's slow start, a pause
# A browser sends a page's form or a no-cors fetch to any site without asking it first (the body JSON in a text/plain
# request, which the guard reads as JSON for curl -d): a page could spend a keyless server's GPU, so a request
# that changes something and that the browser marks as sent from another site (Fetch Metadata) is refused. Clients
# that are not browsers send no such header; nothing here answers CORS, so such a page could not read an answer.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# A response's chunk (64 KiB) the client has not taken in this long: it stopped reading, and would keep the response
# (tens of MB in memory, or a file and its descriptor) for as long as it keeps the connection open.
SEND_TIMEOUT_S = 60.0
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")


class StalledReader(Exception):
    """The client stopped reading its response."""


@dataclass
class RequestContext:
    """What the handlers of one HTTP request may need from below the framework."""

    request_id: str
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)
    idempotency_key: str | None = None  # the Idempotency-Key header, as sent (the job store checks it)
    deadline: float | None = None  # time.time() when the server's traffic timeout ends the request
    response_dropped: bool = False  # its client stopped reading (SEND_TIMEOUT_S)


_current_request: contextvars.ContextVar[RequestContext | None] = contextvars.ContextVar("request", default=None)


def current_request() -> RequestContext:
    """The context of the request being handled; a detached one outside a request (e.g. direct calls in tests)."""
    return _current_request.get() or RequestContext(request_id=uuid.uuid4().hex)


# What a client sends can reach a log line (BentoML's access line prints the path, which uvicorn has unquoted, and
# the Content-Type): an escape sequence there would clear or recolour the terminal of whoever reads the log, and a
# line feed would start a forged line. A traceback comes from exc_info, apart from the message.
CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")


# uvicorn's ERROR line for a response the application left unfinished: for a dropped one, the guard's WARNING says
# why instead.
INCOMPLETE_RESPONSE = "ASGI callable returned without completing response."


class DroppedResponseLogFilter(logging.Filter):
    """Leaves out uvicorn's line for a response the guard dropped on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = _current_request.get()  # the message as sent, or with the request id RequestIdLogFilter adds
        return not (context is not None and context.response_dropped
                    and str(record.msg).startswith(INCOMPLETE_RESPONSE))


class RequestIdLogFilter(logging.Filter):
    """Appends the current request's id to every log line written while it is handled, with control characters
    written out as escapes."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = _current_request.get()
        if context is not None and not getattr(record, "request_id_added", False):
            message = CONTROL_CHARACTERS.sub(lambda found: f"\\x{ord(found.group()):02x}", record.getMessage())
            record.msg, record.args = f"{message} [request_id={context.request_id}]", None
            record.request_id_added = True
        return True


class ClientErrorLogFilter(logging.Filter):
    """BentoML logs a full traceback at ERROR for every body that fails validation. That is the client's mistake,
    answered with a 400, so it becomes one WARNING line naming the problem."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, pydantic.ValidationError) and record.msg == "Exception on %s [%s]":
            record.msg = f"rejected %s [%s]: {describe_validation_error(error.errors())[0]}"
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.levelname_bracketed = "[WARNING]"  # BentoML's formatter field, set by its filter before ours
        return True


def install_log_filters() -> None:
    """On the handlers BentoML configured (the root's and bentoml's), so that its own lines are covered too."""
    for handler in {*logging.getLogger().handlers, *logging.getLogger("bentoml").handlers}:
        for kind in (DroppedResponseLogFilter, ClientErrorLogFilter, RequestIdLogFilter):
            if not any(isinstance(existing, kind) for existing in handler.filters):
                handler.addFilter(kind())


async def read_upload_form(scope, body: bytes, file_field: str, max_text_bytes: int) -> dict[str, Any]:
    """The form's ``KEPT_FORM_FIELDS`` that it has, as BentoML reads them (JSON when it parses, else text; the last
    part of a name); the other text parts are parsed and let go (kept, a form of JSON arrays would take about eight
    times its size for the request's minutes).

    Refuses, naming the field, a form BentoML would answer with a 500, or that would cost the front's event loop
    seconds to read as BentoML does (every value through the JSON parser, about 40 ms per MiB of nested arrays):
    text in the ``file_field`` part (BentoML would take it for a URL and fetch it, from this server's network), a
    file in another part, text parts together over ``max_text_bytes`` (413, naming the largest: the fields of a
    JSON request have the same bound) or more than ``MAX_FORM_FIELDS`` of them, or a value that reading as JSON
    cannot survive (nesting past the parser's recursion limit, an integer past Python's digit limit)."""
    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    try:  # no part is larger than the body, already whole: the bound on text is checked below, on all of it
        form = await Request({**scope, "method": "POST"}, receive).form(
            max_files=MAX_FORM_FIELDS, max_fields=MAX_FORM_FIELDS, max_part_size=len(body) + 1)
    except (MultiPartException, HTTPException) as error:  # BentoML's own reading would raise the same: a 500
        reason = getattr(error, "detail", None) or getattr(error, "message", None) or type(error).__name__
        param = None if "maximum" in str(reason).lower() else file_field  # too many parts: none is to blame
        raise APIError(f"the request is not a multipart form that can be read ({shown(reason, 80)}): send the file "
                       f"as {file_field} (curl -F {file_field}=@FILE) and at most {MAX_FORM_FIELDS} other fields "
                       f"as text", param=param) from None
    try:
        if len(form.getlist(file_field)) > 1:  # BentoML reads every one (text as a URL to fetch), the checks one
            raise APIError(f"send one {file_field} part, the file (curl -F {file_field}=@FILE)", param=file_field)
        value = form.get(file_field)
        if value is not None and not isinstance(value, UploadFile):
            raise APIError(f"{file_field} must be a file (curl -F {file_field}=@FILE), not text", param=file_field)
        if value is not None and not usable_file_name(value.filename):
            raise APIError(f"{file_field}: the file's name cannot be kept (over {MAX_FILE_NAME_BYTES} bytes, or with a "
                           "NUL character); rename the file", param=file_field)
        sizes: dict[str, int] = {}
        for name, value in form.multi_items():
            if name == file_field:
                continue
            if isinstance(value, UploadFile):
                raise APIError(f"{shown(name, 40)}: only {file_field} is a file; send this field as text "
                               f"(curl -F {shown(name, 40)}=VALUE)", param=name)
            sizes[name] = sizes.get(name, 0) + len(value.encode())
        if sum(sizes.values()) > max_text_bytes:
            largest = max(sizes, key=sizes.__getitem__)
            raise APIError(f"{shown(largest, 40)}: the form's fields other than {file_field} come to "
                           f"{sum(sizes.values())} bytes, over the {max_text_bytes} a request's fields may take; "
                           f"this one is the largest", param=largest, status=413)
        values = {}
        for name in form:
            if name == file_field:
                continue
            value = form[name]  # the last part of that name, as BentoML reads it
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError:
                parsed = value  # read as text
            except RecursionError:
                raise APIError(f"{shown(name, 40)}: nested too deeply to read", param=name) from None
            except ValueError as error:  # e.g. an integer past Python's 4,300 digits
                raise APIError(f"{shown(name, 40)}: cannot be read: {shown(error, 80)}", param=name) from None
            if name in KEPT_FORM_FIELDS:
                values[name] = parsed
        return values
    finally:
        await form.close()


def usable_file_name(name: str | None) -> bool:
    base = os.path.basename(name or "")
    return len(base.encode("utf-8", "surrogateescape")) <= MAX_FILE_NAME_BYTES and "\0" not in base


def unreadable_json_text(body: bytes) -> str | None:
    """Why a JSON route's body is refused before any parser reads it: JSON text travels as UTF-8 with no byte order
    mark (RFC 8259, section 8.1). One rule for every JSON route: FastAPI's json.loads reads UTF-16, UTF-32 and a BOM
    on /v1/audio/speech and /v1/audio/jobs, where BentoML's parser refuses them on /v1/audio/generate. (An empty
    body is read as no fields on all three: a 400 naming ``input``.)"""
    if json.detect_encoding(body) != "utf-8":  # a byte order mark, or the NUL bytes of UTF-16 or UTF-32
        return "request body is not valid JSON: send it as UTF-8, without a byte order mark"
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"request body is not valid JSON: it is not UTF-8 (byte {exc.start})"
    return None


class RequestGuardMiddleware:
    """Per request, before BentoML sees it: an ``X-Request-Id`` (the client's if well-formed, else a new one)
    echoed in the response, the API key check (constant-time), the body-size cap, JSON bodies read as JSON
    whatever their Content-Type, and a watch on the connection that sets ``current_request().disconnected`` when
    the client goes away."""

    def __init__(self, app, settings: GuardSettings | None = None):
        self.app = app
        self._settings = settings
        self.uploads_receiving = 0

    @functools.cached_property
    def settings(self) -> GuardSettings:
        """Read at the first request, not when Starlette builds the middleware (for the application's start): an
        unusable setting must reach the front's own start-up check (``startup.front_settings``), which stops the
        server naming it; raised here it would fail every request, the start included, and stop nothing."""
        return self._settings or GuardSettings.from_env()

    @functools.cached_property
    def expected(self) -> bytes | None:
        """The key a request's ``Authorization: Bearer <key>`` must carry (the scheme in any case, RFC 7235)."""
        return self.settings.api_key.encode() if self.settings.api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        given_id = headers.get(b"x-request-id", b"").decode("latin-1")
        given_key = headers.get(b"idempotency-key")
        context = RequestContext(given_id if REQUEST_ID_PATTERN.fullmatch(given_id) else uuid.uuid4().hex,
                                 idempotency_key=None if given_key is None else given_key.decode("latin-1"))
        _current_request.set(context)

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message["headers"], (b"x-request-id", context.request_id.encode())]}
            try:
                await asyncio.wait_for(send(message), SEND_TIMEOUT_S)
            except asyncio.TimeoutError:
                raise StalledReader from None

        try:
            await self.guard(scope, receive, send_with_id, context, headers)
        except StalledReader:  # the server closes the connection, and the response is let go
            context.response_dropped = True
            logger.warning("the client took nothing of its response for %g s: the response is dropped",
                           SEND_TIMEOUT_S)

    async def receive_body(self, receive, upload: bool) -> bytes | None:
        """The whole body (None if the client went away first), within the size limit, ``body_timeout_s`` and
        ``body_min_rate``, and for an upload only while fewer than ``max_uploads`` are being received."""
        settings, param = self.settings, "audio" if upload else None
        if upload and self.uploads_receiving >= settings.max_uploads:
            raise APIError(f"{self.uploads_receiving} uploads are being received; retry shortly", param=param,
                           status=429, code="server_busy", retry_after=5)
        limit = settings.max_upload_bytes if upload else settings.max_body_bytes
        chunks, size = [], 0
        clock = asyncio.get_running_loop().time
        started = clock()
        self.uploads_receiving += upload
        try:
            while True:
                # Each byte received buys 1 / body_min_rate seconds more, up to the whole body's deadline.
                by_rate = BODY_GRACE_S + size / settings.body_min_rate
                allowed = min(settings.body_timeout_s, by_rate)
                try:
                    message = await asyncio.wait_for(receive(), max(0.0, started + allowed - clock()))
                except asyncio.TimeoutError:
                    why = (f"arrived slower than {settings.body_min_rate} bytes/s" if by_rate < settings.body_timeout_s
                           else f"was not received whole within {settings.body_timeout_s:g} s")
                    raise APIError(f"the request body {why} ({size} bytes came)", param=param, status=408) from None
                if message["type"] != "http.request":
                    return None
                chunks.append(message.get("body", b""))
                size += len(chunks[-1])
                if size > limit:
                    raise APIError(f"request body exceeds {limit} bytes", param=param, status=413)
                if not message.get("more_body"):
                    return b"".join(chunks)
        finally:
            self.uploads_receiving -= upload

    async def guard(self, scope, receive, send, context: RequestContext, headers: dict[bytes, bytes]):
        if self.expected is not None and scope["path"] not in self.settings.public_paths:
            scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.expected):
                body = error_body("missing or invalid API key: send 'Authorization: Bearer <key>'", 401,
                                  code="invalid_api_key")
                return await send_json(send, 401, body, [(b"www-authenticate", b"Bearer")])
        if scope["method"] not in SAFE_METHODS and headers.get(b"sec-fetch-site") == b"cross-site":
            return await send_json(send, 403, error_body(
                "a request from a page of another site is refused: call this API from a program, or from a page this "
                "server serves (/ui)", 403, code="cross_site_request"))
        if sum(name == b"content-type" for name, _ in scope["headers"]) > 1:
            # The checks below read the last one, Starlette and BentoML the first: a form could pass as JSON.
            return await send_json(send, 400, error_body("send one Content-Type header, not several", 400))
        upload = scope["path"] in UPLOAD_PATHS
        try:
            received = await self.receive_body(receive, upload)
        except APIError as refusal:
            headers = [(name.lower().encode(), value.encode()) for name, value in error_headers(refusal).items()]
            return await send_json(send, refusal.status, refusal.body(), headers)
        if received is None:  # the client went away
            return
        replayed = False
        media_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if upload:
            file_field = UPLOAD_PATHS[scope["path"]]
            if media_type != b"multipart/form-data":
                content_type = headers.get(b"content-type", b"no Content-Type").decode("latin-1")
                body = error_body(f"send the request as multipart form data with the file as {file_field} (curl -F "
                                  f"{file_field}=@FILE -F input=...), not as {shown(content_type, 40)}", 415,
                                  param=file_field)
                return await send_json(send, 415, body)
            try:
                fields = await read_upload_form(scope, received, file_field, self.settings.max_body_bytes)
            except APIError as refusal:
                return await send_json(send, refusal.status, refusal.body())
            if (wanted := scope.get(UPLOAD_FORM_SCOPE_KEY)) is not None:
                wanted["fields"] = fields
        if scope["method"] == "POST" and scope["path"] in JSON_BODY_PATHS:
            if media_type.startswith(b"multipart/"):
                body = error_body("send the request body as JSON (Content-Type: application/json), "
                                  "not multipart form data", 415)
                return await send_json(send, 415, body)
            if (refusal := unreadable_json_text(received)) is not None:
                return await send_json(send, 400, error_body(refusal, 400))
            if media_type != b"application/json":  # curl -d without -H says form-urlencoded: read it as JSON
                scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k.lower() != b"content-type"]
                         + [(b"content-type", b"application/json")]}

        async def replay():
            nonlocal received, replayed
            if replayed:
                await context.disconnected.wait()
                return {"type": "http.disconnect"}
            message, received, replayed = {"type": "http.request", "body": received, "more_body": False}, b"", True
            return message  # and the body is not kept for the request's minutes: an upload's is up to 128 MiB

        async def watch_connection():
            while (await receive())["type"] != "http.disconnect":
                pass
            context.disconnected.set()

        watcher = asyncio.ensure_future(watch_connection())
        try:
            await self.app(scope, replay, send)
        finally:
            watcher.cancel()
