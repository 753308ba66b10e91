"""BentoML's middlewares around ours, against a real server with a short traffic timeout: its request metrics are
labelled with route templates, not raw paths (metric_labels), and its traffic timeout's 504 passes through our
request id and request metrics like any answer (traffic_timeout.install)."""

from __future__ import annotations

import concurrent.futures
import re
import time
import uuid
from pathlib import Path

import httpx
import pytest
import yaml

from stable_audio_bento.local_server import local_server
from stable_audio_bento.metric_labels import FIXED_ROUTES, OTHER, TEMPLATES, endpoint_label
from stable_audio_bento.metrics import requested_format

from conftest import metric_samples, own_bentoml_home

REPO = Path(__file__).resolve().parents[1]
LOG = REPO / "artifacts" / "server-short-timeout.log"
TIMEOUT_S = 8
# 500 steps of the tiny model's longest clip take far longer than TIMEOUT_S on a CPU, and seconds on a GPU...
SLOW = {"input": "rain on a tin roof", "audio_length": 47.0, "num_inference_steps": 500, "seed": 1}


@pytest.fixture(scope="module")
def short_timeout_server(model_cache, tmp_path_factory) -> str:
    config = yaml.safe_load((REPO / "configuration.yaml").read_text())
    config["services"]["StableAudio"]["traffic"]["timeout"] = TIMEOUT_S
    path = tmp_path_factory.mktemp("config") / "configuration.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {"STABLE_AUDIO_MODEL": "tiny", "BENTOML_CONFIG": str(path), **own_bentoml_home(tmp_path_factory)}
    with local_server(env, LOG, startup_timeout_s=180) as url:
        yield url


def test_labels_are_route_templates():
    assert endpoint_label("/v1/audio/jobs/job_0123abcd") == "/v1/audio/jobs/{job_id}"
    assert endpoint_label("/v1/audio/jobs/job_0123abcd/content") == "/v1/audio/jobs/{job_id}/content"
    assert endpoint_label("/v1/models/stabilityai/stable-audio-open-1.0") == "/v1/models/{model_id}"
    for fixed in ("/v1/audio/generate", "/v1/audio/jobs", "/v1/models", "/health", "/healthz", "/readyz", "/metrics",
                  "/docs.json", "/ui", "/"):
        assert endpoint_label(fixed) == fixed
    assert endpoint_label("/describe", {"/describe"}) == "/describe"  # an engine's API route
    for unknown in ("/describe", "/wp-login.php", "/v1/audio/jobs/a/b", "/v1/audio/generate/", "/.env", ""):
        assert endpoint_label(unknown) == OTHER


def test_every_route_of_the_service_is_labelled_as_itself_or_its_template():
    import service

    def route_paths(routes):
        for route in routes:
            if hasattr(route, "original_router"):  # the routes of the service class, included by BentoML
                yield from route_paths(route.original_router.routes)
            else:
                yield re.sub(r"\{(\w+)(:\w+)?\}", r"{\1}", route.path)

    templates = {template for _, template in TEMPLATES}
    paths = set(route_paths(service.http_routes.routes))
    assert "/v1/audio/jobs/{job_id}/content" in paths
    paths |= {api.route for api in service.StableAudio.apis.values()}
    for path in paths:
        concrete = re.sub(r"\{\w+\}", "x", path)
        assert endpoint_label(concrete) in (FIXED_ROUTES | templates) and endpoint_label(concrete) != OTHER, path


def test_bentoml_request_metrics_have_bounded_endpoint_labels(short_timeout_server):
    url = short_timeout_server
    for n in range(20):
        token = uuid.uuid4().hex
        httpx.get(f"{url}/v1/audio/jobs/job_{token}", timeout=30)
        httpx.get(f"{url}/v1/audio/jobs/job_{token}/content", timeout=30)
        httpx.get(f"{url}/v1/models/owner/{token}", timeout=30)
        httpx.get(f"{url}/scan-{token}", timeout=30)
    endpoints = set()
    for sample in metric_samples(url, "bentoml_service_request_total{"):
        endpoints.add(re.search(r'endpoint="([^"]*)"', sample).group(1))
    assert {"/v1/audio/jobs/{job_id}", "/v1/audio/jobs/{job_id}/content", "/v1/models/{model_id}", OTHER} <= endpoints
    import service

    engine_routes = {api.route for engine in service.ENGINES for api in engine.apis.values()}  # /submit, ...
    allowed = FIXED_ROUTES | engine_routes | {template for _, template in TEMPLATES} | {OTHER}
    assert endpoints <= allowed, endpoints - allowed


def test_traffic_timeout_504_carries_the_request_id_and_is_counted(short_timeout_server):
    url = short_timeout_server
    key = 'stable_audio_requests_total{endpoint="/v1/audio/generate",format="wav",status="504"}'
    before = metric_samples(url, "stable_audio_requests_total{").get(key, 0)
    outcomes = metric_samples(url, "stable_audio_engine_generations_total{")

    def post(headers):
        return httpx.post(url + "/v1/audio/generate", json=SLOW, headers=headers, timeout=120)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        given, generated = pool.map(post, [{"X-Request-Id": "t504"}, {"X-Request-Id": "not valid!"}])
    assert given.status_code == generated.status_code == 504
    assert given.json()["error"]["code"] == "timeout"
    assert given.headers["x-request-id"] == "t504"
    assert re.fullmatch(r"[0-9a-f]{32}", generated.headers["x-request-id"])
    assert metric_samples(url, "stable_audio_requests_total{").get(key, 0) == before + 2
    # expired, as with a `timeout` of its own, not cancelled by a client that went away (counted at the engine's
    # next step boundary)
    expired = {'stable_audio_engine_generations_total{outcome="deadline_exceeded",worker="0"}': 2}
    deadline = time.monotonic() + 30
    while (ended := new_counts(outcomes, metric_samples(url, "stable_audio_engine_generations_total{"))) != expired \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ended == expired
    access_lines = [line for line in LOG.read_text(errors="replace").splitlines()
                    if "status=504" in line and "/v1/audio/generate" in line]
    assert any("[request_id=t504]" in line for line in access_lines), access_lines
    assert any(f"[request_id={generated.headers['x-request-id']}]" in line for line in access_lines), access_lines


def new_counts(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {name: value - before.get(name, 0) for name, value in after.items() if value != before.get(name, 0)}


@pytest.mark.parametrize(("body", "label"), [
    (b'{"input": "x"}', "wav"), (b'{"input": "x", "response_format": "mp3"}', "mp3"),
    (b'{"response_format": "flac", "response_format": "opus"}', "opus"),  # the last of a repeated key, as json.loads
    (b'{"response_format": "\\u006dp3", "extra": [NaN, Infinity, 1e400, 123456789012345678901234567890]}', "mp3"),
    (b'{"response_format": "MP3"}', "invalid"), (b'{"response_format": null}', "invalid"), (b"[1]", "invalid"),
    (b"not json", "invalid"), (b"", "invalid"), (b'{"response_format": "wav"} trailing', "invalid"),
    (b'{"a": ' + b"[" * 5000 + b"]" * 5000 + b', "response_format": "pcm"}', "invalid"),  # nested too deep
    (b'{"user": ' + b"[" * 250 + b"]" * 250 + b', "response_format": "flac"}', "flac"),  # what json.loads reads
    # refused before any parser reads them (not UTF-8, or with a byte order mark), though json.loads would read them
    (b'\xef\xbb\xbf{"response_format": "flac"}', "invalid"), ('{"response_format": "mp3"}'.encode("utf-16"), "invalid"),
])
def test_the_requested_format_is_read_from_the_json_body_alone(body, label):
    assert requested_format(body) == label
