"""HTTP-side glue that BentoML does not provide: the model card exchanged between services, and one
middleware that gives every error response the OpenAI shape ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import json
import logging
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
