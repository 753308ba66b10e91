"""The deployment files, checked offline: they parse, refer to each other and to this service consistently, and
BentoML's own parsers accept the BentoCloud one."""

from __future__ import annotations

import importlib
import re
import shlex
import types
import typing
from pathlib import Path, PurePosixPath

import attr
import pytest
import typing_extensions
import yaml

from stable_audio_bento.config import ENGINE_SERVICE, FRONT_SERVICE, FrontConfig, ServiceSettings
from stable_audio_bento.jobs import UNFETCHED_AT_STOP_S

REPO = Path(__file__).resolve().parents[1]
KUBERNETES = REPO / "deploy" / "kubernetes"
SETTINGS = ServiceSettings.load(REPO / "configuration.yaml")
KNOWN_KINDS = {("apps/v1", "Deployment"), ("v1", "Service"), ("policy/v1", "PodDisruptionBudget"),
               ("autoscaling/v2", "HorizontalPodAutoscaler")}


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict]:
    documents = [doc for path in sorted(KUBERNETES.glob("*.yaml")) if path.name != "prometheus-adapter-values.yaml"
                 for doc in yaml.safe_load_all(path.read_text()) if doc]
    for doc in documents:
        assert (doc["apiVersion"], doc["kind"]) in KNOWN_KINDS, doc["kind"]
        assert doc["metadata"]["name"]
    by_kind = {doc["kind"]: doc for doc in documents}
    assert len(by_kind) == len(documents) == len(KNOWN_KINDS)
    return by_kind


def pending_metric_name() -> str:
    from stable_audio_bento.metrics import FrontMetrics

    return FrontMetrics.get().pending._name


def served_paths() -> set[str]:
    """BentoML's system routes on every service, and our own routes."""
    from bentoml._internal.server.base_app import BaseAppFactory

    class App(BaseAppFactory):
        name = "app"

    service = importlib.import_module("service")
    ours = {route.path for route in service.http_routes.routes if hasattr(route, "path")}
    return {route.path for route in App().get_system_routes()} | ours


def test_selectors_labels_and_ports_match(manifests):
    deployment, service = manifests["Deployment"], manifests["Service"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    for selector in (deployment["spec"]["selector"]["matchLabels"], service["spec"]["selector"],
                     manifests["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"]):
        assert selector and selector.items() <= pod_labels.items()
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"http": SETTINGS.port}
    assert {port["targetPort"] for port in service["spec"]["ports"]} <= set(ports)
    assert service["spec"]["sessionAffinity"] == "ClientIP"  # a job's polls reach the pod that holds it
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(SETTINGS.port) and annotations["prometheus.io/path"] == "/metrics"


def test_pod_gets_the_gpu_the_engine_asks_for(manifests):
    service = importlib.import_module("service")
    (container,) = manifests["Deployment"]["spec"]["template"]["spec"]["containers"]
    # One engine per visible GPU (STABLE_AUDIO_ENGINE_WORKERS' default), each asking for one: here, one.
    gpus = sum(engine.config["resources"]["gpu"] for engine in service.ENGINES)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == gpus
    assert container["resources"]["requests"]["nvidia.com/gpu"] == gpus


def test_gpu_deployments_refuse_to_serve_on_the_cpu(manifests):
    """With the default device (auto), a pod whose CUDA is unusable went ready on the CPU and timed out everything."""
    (container,) = manifests["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert {"name": "STABLE_AUDIO_DEVICE", "value": "cuda"} in container["env"]
    assert {"name": "STABLE_AUDIO_DEVICE", "value": "cuda"} in bentocloud()["services"][ENGINE_SERVICE]["envs"]


def test_no_deployment_overrides_the_model_baked_into_the_image(manifests):
    """A model setting overrides the stored model (model_store.serving_config): every pod would download the
    weights again, with a token, which is what baking them in avoids."""
    (container,) = manifests["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert "STABLE_AUDIO_MODEL" not in {env["name"] for env in container["env"]}
    cloud = bentocloud()
    for where in (cloud, *cloud["services"].values()):
        assert "STABLE_AUDIO_MODEL" not in {env["name"] for env in where.get("envs", [])}


def test_probes_use_paths_the_service_serves(manifests):
    (container,) = manifests["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    paths = served_paths()
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["path"] in paths
        assert container[probe]["httpGet"]["port"] == "http"


def test_termination_grace_covers_the_drain(manifests):
    """SIGTERM drains: the generations in flight may take up to traffic.timeout, after the preStop pause; then a job
    that succeeded has UNFETCHED_AT_STOP_S to be fetched."""
    spec = manifests["Deployment"]["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    pre_stop_s = float(command[1]) if command[0] == "sleep" else 0.0
    assert spec["terminationGracePeriodSeconds"] >= pre_stop_s + SETTINGS.request_timeout_s + UNFETCHED_AT_STOP_S


def test_autoscaler_targets_the_deployment_on_our_pending_metric(manifests):
    hpa, deployment = manifests["HorizontalPodAutoscaler"], manifests["Deployment"]
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment",
                                                                     deployment["metadata"]["name"])
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == pending_metric_name()
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    per_pod = float(metric["pods"]["target"]["averageValue"])
    assert 0 < per_pod < FrontConfig.from_env(SETTINGS.max_batch_size).max_pending  # scales before pods refuse


def test_metrics_adapter_serves_the_metric_the_autoscaler_reads():
    values = yaml.safe_load((KUBERNETES / "prometheus-adapter-values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    name = pending_metric_name()
    assert rule["seriesQuery"].startswith(name + "{") and rule["name"]["as"] == name
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}  # per pod, as a Pods metric needs


# Where the server writes, by the variable that moves it, and where it writes when the pod leaves that unset (~ is
# HOME). The image's BENTOML_HOME and HOME are /home/bentoml, which a read-only root filesystem makes unwritable.
WRITTEN_PATHS = {
    "BENTOML_HOME": "/home/bentoml",  # its store folders and the Prometheus multiprocess folder, made at start
    "HOME": "/home/bentoml",  # Triton's ~/.triton, CUDA's ~/.nv, ~/.cache
    "TMPDIR": "/tmp",  # the front-engine socket, request folders, torch.compile's inductor cache
    "HF_HOME": "~/.cache/huggingface",
    "STABLE_AUDIO_CACHE": "~/.cache/stable-audio-bento",
    "TRITON_CACHE_DIR": "~/.triton/cache",
    "CUDA_CACHE_PATH": "~/.nv/ComputeCache",
}
CACHE_VARIABLE = re.compile(r"(HOME|CACHE|CACHE_DIR|CACHE_PATH|TMPDIR)$")


def written_paths(env: dict[str, str]) -> dict[str, str]:
    """WRITTEN_PATHS as ``env`` sets them, with any other cache-like variable it sets."""
    home = env.get("HOME", WRITTEN_PATHS["HOME"])
    paths = {name: env.get(name, default) for name, default in WRITTEN_PATHS.items()}
    paths |= {name: value for name, value in env.items() if CACHE_VARIABLE.search(name)}
    return {name: home + path[1:] if path.startswith("~") else path for name, path in paths.items()}


def test_pod_runs_non_root_on_a_read_only_root_writing_only_to_volumes(manifests):
    """As a hardened cluster runs it (readOnlyRootFilesystem): BentoML could not even start with its home on the
    image's root filesystem."""
    spec = manifests["Deployment"]["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    security = spec.get("securityContext", {}) | container.get("securityContext", {})
    assert security.get("readOnlyRootFilesystem") is True
    # The image names its user (bentoml): runAsNonRoot can only verify a number.
    assert security.get("runAsNonRoot") is True and security.get("runAsUser", 0) > 0
    assert security.get("allowPrivilegeEscalation") is False
    assert security.get("capabilities", {}).get("drop") == ["ALL"]
    assert security.get("seccompProfile", {}).get("type") == "RuntimeDefault"
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    mounts = [PurePosixPath(mount["mountPath"]) for mount in container["volumeMounts"]
              if not mount.get("readOnly") and "emptyDir" in volumes[mount["name"]]]
    env = {item["name"]: item["value"] for item in container["env"] if "value" in item}
    for name, path in written_paths(env).items():
        assert PurePosixPath(path).is_absolute(), f"{name}={path}"
        assert any(PurePosixPath(path).is_relative_to(mount) for mount in mounts), \
            f"{name}: {path} is on the read-only root filesystem, under no writable volume"


def test_container_check_runs_the_image_as_the_deployment_does(manifests):
    """check.sh's read-only run (the API-key container) has the manifest's user, env paths and writable mounts."""
    spec = manifests["Deployment"]["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    script = (REPO / "deploy" / "container" / "check.sh").read_text()
    array = re.search(r"^READ_ONLY=\((.*?)\)$", script, re.MULTILINE | re.DOTALL)
    assert array and 'start sab-check-key "${READ_ONLY[@]}"' in script
    options = shlex.split(array.group(1))
    pairs = dict(zip(options, options[1:]))
    assert {"--read-only", "--read-only-tmpfs=false", "--cap-drop=ALL"} <= set(options)
    assert pairs["--security-opt"] == "no-new-privileges"
    security = spec["securityContext"] | container["securityContext"]
    assert pairs["--user"] == f"{security['runAsUser']}:{security['runAsGroup']}"
    tmpfs = {options[i + 1].split(":")[0] for i, option in enumerate(options) if option == "--tmpfs"}
    assert tmpfs == {mount["mountPath"] for mount in container["volumeMounts"]}
    env = dict(options[i + 1].split("=", 1) for i, option in enumerate(options) if option == "-e")
    manifest_env = {item["name"]: item["value"] for item in container["env"] if "value" in item}
    assert env == {name: value for name, value in manifest_env.items() if name in written_paths(manifest_env)}


# ------------------------------------------------------------------------------------------------- BentoCloud
def bentocloud() -> dict:
    return yaml.safe_load((REPO / "deploy" / "bentocloud.yaml").read_text())


def unknown_keys(data, schema, where: str = "") -> list[str]:
    """Keys BentoML's schema classes (attrs) and service configuration (TypedDict) do not define: both ignore extra
    keys, so a typo would pass silently."""
    origin, args = typing.get_origin(schema), typing.get_args(schema)
    if origin in (typing.Union, types.UnionType):
        return [problem for arg in args if arg is not type(None) for problem in unknown_keys(data, arg, where)]
    if origin is dict and isinstance(data, dict):
        return [problem for key, item in data.items() for problem in unknown_keys(item, args[1], f"{where}{key}.")]
    if origin is list and isinstance(data, list):
        return [problem for item in data for problem in unknown_keys(item, args[0], f"{where}[].")]
    if not isinstance(data, dict):
        return []
    if typing_extensions.is_typeddict(schema):
        fields = typing.get_type_hints(schema)
    elif attr.has(schema):
        fields = {name: field.type for name, field in attr.fields_dict(attr.resolve_types(schema)).items()}
    else:
        return []
    return [f"{where}{key}" for key in data if key not in fields] + [
        problem for key, value in data.items() if key in fields
        for problem in unknown_keys(value, fields[key], f"{where}{key}.")]


def test_bentocloud_config_passes_bentoml_parsing():
    from bentoml._internal.cloud.deployment import DeploymentAPI
    from bentoml._internal.cloud.schemas.modelschemas import DeploymentStrategy
    from bentoml._internal.cloud.schemas.schemasv2 import CreateDeploymentSchema
    from bentoml._internal.utils.cattr import bentoml_cattr
    from _bentoml_sdk.service.config import ServiceConfig, validate

    config = bentocloud()
    assert unknown_keys(config, CreateDeploymentSchema) == []
    parsed = bentoml_cattr.structure(config, CreateDeploymentSchema)  # what `bentoml deploy -f` does
    DeploymentAPI._fix_and_validate_schema(parsed)  # its replica checks
    for name, service in parsed.services.items():
        validate(service.config_overrides)  # the service configuration schema
        assert unknown_keys(service.config_overrides, ServiceConfig, f"{name}.config_overrides.") == []
        if service.deployment_strategy is not None:
            DeploymentStrategy(service.deployment_strategy)


def test_bentocloud_services_match_the_served_ones():
    services = bentocloud()["services"]
    assert set(services) == {FRONT_SERVICE, ENGINE_SERVICE}
    front, engine = services[FRONT_SERVICE], services[ENGINE_SERVICE]
    assert engine["instance_type"].startswith("gpu.") and front["instance_type"].startswith("cpu.")
    for service in (front, engine):
        assert service["config_overrides"]["traffic"]["timeout"] == SETTINGS.request_timeout_s
    assert engine["config_overrides"]["traffic"]["concurrency"] == SETTINGS.max_batch_size
    max_pending = {env["name"]: env["value"] for env in front["envs"]}["STABLE_AUDIO_MAX_PENDING"]
    assert front["config_overrides"]["traffic"]["concurrency"] == int(max_pending)
    # A generation's calls must reach the engine replica that holds it: one replica, never two during updates.
    assert engine["scaling"]["max_replicas"] == 1 and engine["deployment_strategy"] == "Recreate"
    # A job's polls must reach the front that holds it.
    assert front["scaling"]["max_replicas"] == 1
