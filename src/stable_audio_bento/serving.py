"""HTTP-side glue that BentoML does not provide: the model card exchanged between services, and one
middleware that gives every error response the OpenAI shape ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import hmac
import json
import logging
import os
from dataclasses import asdict, dataclass
from typing import Any

from .pipeline import ModelLimits
from .protocol import describe_validation_error, error_body

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 5


@dataclass(frozen=True)
class ModelCard:
    """What the engine serves; the front validates requests against it."""

    model: str
    limits: ModelLimits
    default_steps: int
    max_steps: int

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "max_seconds": self.limits.max_seconds}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelCard":
        return cls(data["model"], ModelLimits(**data["limits"]), data["default_steps"], data["max_steps"])


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
        if isinstance(data, dict) and "detail" in data and status == 400:
            message, param = describe_validation_error(data["detail"])
        elif isinstance(data, dict) and isinstance(data.get("error"), str):
            message = data["error"]
        elif isinstance(data, list) and data and isinstance(data[0], dict):
            message = str(data[0].get("error", data[0]))
        else:
            message = str(data) or f"HTTP {status}"
        return json.dumps(error_body(message, status, param)).encode()


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
    public_paths [STABLE_AUDIO_PUBLIC_PATHS, comma-separated]: open without a key; add /docs or /metrics here.
    max_body_bytes [STABLE_AUDIO_MAX_BODY_BYTES]: larger request bodies get 413.
    """

    api_key: str | None = None
    public_paths: tuple[str, ...] = ("/health", "/healthz", "/livez", "/readyz")
    max_body_bytes: int = 1 << 20

    @classmethod
    def from_env(cls) -> "GuardSettings":
        env = os.environ
        key = env.get("STABLE_AUDIO_API_KEY") or None
        if key is None and env.get("STABLE_AUDIO_API_KEY_FILE"):
            with open(env["STABLE_AUDIO_API_KEY_FILE"]) as file:
                key = file.readline().strip() or None
        paths = env.get("STABLE_AUDIO_PUBLIC_PATHS")
        return cls(
            api_key=key,
            public_paths=tuple(p.strip() for p in paths.split(",") if p.strip()) if paths else cls.public_paths,
            max_body_bytes=int(env.get("STABLE_AUDIO_MAX_BODY_BYTES", cls.max_body_bytes)),
        )


class RequestGuardMiddleware:
    """Checks the API key (constant-time) and caps the body size before a request reaches BentoML."""

    def __init__(self, app, settings: GuardSettings | None = None):
        self.app = app
        self.settings = settings or GuardSettings.from_env()
        self.expected = f"Bearer {self.settings.api_key}".encode() if self.settings.api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.expected is not None and scope["path"] not in self.settings.public_paths:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                body = error_body("missing or invalid API key: send 'Authorization: Bearer <key>'", 401,
                                  code="invalid_api_key")
                return await send_json(send, 401, body, [(b"www-authenticate", b"Bearer")])
        chunks, size = [], 0
        while True:  # read the whole body (bounded), then replay it
            message = await receive()
            if message["type"] != "http.request":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.settings.max_body_bytes:
                body = error_body(f"request body exceeds {self.settings.max_body_bytes} bytes", 413)
                return await send_json(send, 413, body)
            if not message.get("more_body"):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)
