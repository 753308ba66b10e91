"""BentoML's request metrics with a bounded ``endpoint`` label.

BentoML 1.4's ``RunnerTrafficMetricsMiddleware`` labels ``bentoml_service_request_total``, ``..._in_progress`` and
``..._duration_seconds`` with the raw request path. Every job id (``/v1/audio/jobs/job_<hex>``, its ``/content``),
every ``/v1/models/<anything>`` and every random path a scanner tries (answered 404, or 401 with an API key: the
middleware sits outside ours) then adds about 20 Prometheus series for good: 300 random paths grew /metrics from
81 KB to 1.24 MB. ``BoundedTrafficMetricsMiddleware`` labels a request with its route's template instead
(``endpoint_label``): the fixed routes as they are, ``/v1/audio/jobs/{job_id}``, ``/v1/audio/jobs/{job_id}/content``,
``/v1/models/{model_id}``, anything else ``other``. ``install`` puts it where BentoML's service app factory imports
the class from when it builds each worker's middleware stack (after importing service.py).
"""

from __future__ import annotations

import re

from bentoml._internal.context import server_context
from bentoml._internal.server.http.instruments import RunnerTrafficMetricsMiddleware

# Our routes (service.py) and BentoML's own (its system routes, index, docs; FastAPI's docs of the mounted app).
FIXED_ROUTES = frozenset({
    "/health", "/ui", "/v1/models", "/v1/audio/generate", "/v1/audio/edits", "/v1/audio/edits/jobs",
    "/v1/audio/speech", "/v1/audio/jobs",
    "/", "/healthz", "/livez", "/readyz", "/metrics", "/docs", "/docs.json", "/schema.json", "/redoc",
    "/openapi.json", "/docs/oauth2-redirect",
})
TEMPLATES = (
    (re.compile(r"/v1/audio/jobs/[^/]+"), "/v1/audio/jobs/{job_id}"),
    (re.compile(r"/v1/audio/jobs/[^/]+/content"), "/v1/audio/jobs/{job_id}/content"),
    (re.compile(r"/v1/models/.+"), "/v1/models/{model_id}"),  # hub ids have a slash: owner/name
    (re.compile(r"/static_content/.+"), "/static_content/{file}"),  # BentoML's index page assets
    (re.compile(r"/assets/.+"), "/assets/{file}"),
)
OTHER = "other"


def endpoint_label(path: str, service_routes: frozenset[str] | set[str] = frozenset()) -> str:
    """The label of a request for ``path``: a known route, a route template, or ``other``. ``service_routes``: the
    routes of the service this worker serves (an engine's API methods)."""
    if path in FIXED_ROUTES or path in service_routes:
        return path
    for pattern, template in TEMPLATES:
        if pattern.fullmatch(path):
            return template
    return OTHER


ORIGINAL_SCOPE = "stable_audio_bento.original_scope"


class BoundedTrafficMetricsMiddleware(RunnerTrafficMetricsMiddleware):
    """BentoML's middleware, handed a copy of the scope whose ``path`` is the label; the application inside it gets
    the original scope back. BentoML's own code stays as it is."""

    def __init__(self, app, **options) -> None:
        async def with_original_scope(scope, receive, send):
            await app(scope.get(ORIGINAL_SCOPE, scope), receive, send)

        super().__init__(with_original_scope, **options)
        self.service_routes: frozenset[str] | None = None

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await super().__call__(scope, receive, send)
        if self.service_routes is None:  # set by BentoML's worker before it serves
            self.service_routes = frozenset(server_context.service_routes)
        labelled = {**scope, "path": endpoint_label(scope["path"], self.service_routes), ORIGINAL_SCOPE: scope}
        await super().__call__(labelled, receive, send)


def install() -> None:
    """Replaces BentoML's RunnerTrafficMetricsMiddleware, which its service app factory imports by name when it
    builds the stack."""
    from bentoml._internal.server.http import instruments

    instruments.RunnerTrafficMetricsMiddleware = BoundedTrafficMetricsMiddleware
