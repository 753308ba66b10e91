"""Settings: what the engine loads (environment) and how the services are sized (configuration.yaml)."""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .compilation import CUDA_GRAPHS
from .env_values import env_choice, env_integer, env_seconds, env_text
from .pipeline import SamplingOptions
from .step_loop import BATCHING_MODES, BatchingMode

DEFAULT_MODEL = "stabilityai/stable-audio-open-1.0"
FRONT_SERVICE = "StableAudio"
ENGINE_SERVICE = "StableAudioEngine"
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class EngineConfig:
    """What the GPU service loads and how it runs it (environment variables in brackets).

    model [STABLE_AUDIO_MODEL]: a hub id, a local diffusers-format folder, or ``tiny`` (a small random model).
    weights, model_tag: the model store's copy of ``model`` (a diffusers-format folder) and its tag, when the service
        serves the stored model (see model_store); None: the weights come from ``model`` itself.
    load_format [STABLE_AUDIO_LOAD_FORMAT]: ``auto`` reads weights; ``dummy`` builds the full-size architecture
        with random weights.
    device, dtype, vae_dtype [STABLE_AUDIO_DEVICE, _DTYPE, _VAE_DTYPE]: ``auto`` picks CUDA with fp16 for the DiT
        and T5 when available, else CPU fp32; the VAE stays fp32 unless set.
    sampling [STABLE_AUDIO_DECODE_MARGIN (``full`` or N), _SDE_NOISE, _DENOISE_WINDOW, _MAX_ROWS (``auto`` or N)]:
        see SamplingOptions.
    compile [STABLE_AUDIO_COMPILE]: None (``0``, the default) runs the DiT forward eagerly; ``cuda-graphs`` replays
        the eager forward from CUDA graphs (a GPU only); else torch.compile's mode for it (``1`` is ``default``;
        ``reduce-overhead`` adds CUDA graphs), compiled and warmed up before serving.
    sa3_conditioning [STABLE_AUDIO_SA3_CONDITIONING]: ``diffusers`` (StableAudio3Pipeline's text-to-audio, bit for
        bit) or ``reference`` (Stability's: the all-zero inpainting conditioning, see SA3Options).
    """

    model: str = DEFAULT_MODEL
    weights: str | None = None
    model_tag: str | None = None
    load_format: str = "auto"
    device: str = "auto"
    dtype: str = "auto"
    vae_dtype: str = "float32"
    default_inference_steps: int | None = None  # None: the model's (100 for stable-audio-open, 8 distilled SA3)
    max_inference_steps: int = 500
    sampling: SamplingOptions = SamplingOptions()
    auto_max_rows: bool = True
    compile: str | None = None
    sa3_conditioning: str = "diffusers"

    @classmethod
    def from_env(cls) -> "EngineConfig":
        env = os.environ
        max_rows = env_text(env, "STABLE_AUDIO_MAX_ROWS") or "auto"
        margin = env_text(env, "STABLE_AUDIO_DECODE_MARGIN")
        config = cls(
            model=env_text(env, "STABLE_AUDIO_MODEL") or cls.model,
            load_format=env_text(env, "STABLE_AUDIO_LOAD_FORMAT") or cls.load_format,
            device=env_text(env, "STABLE_AUDIO_DEVICE") or cls.device,
            dtype=env_text(env, "STABLE_AUDIO_DTYPE") or cls.dtype,
            vae_dtype=env_text(env, "STABLE_AUDIO_VAE_DTYPE") or cls.vae_dtype,
            default_inference_steps=env_integer(env, "STABLE_AUDIO_DEFAULT_STEPS", None, minimum=1),
            max_inference_steps=env_integer(env, "STABLE_AUDIO_MAX_STEPS", cls.max_inference_steps, minimum=1),
            sampling=SamplingOptions(
                decode_margin_frames=None if margin == "full" else env_integer(
                    env, "STABLE_AUDIO_DECODE_MARGIN", SamplingOptions.decode_margin_frames, minimum=0,
                    or_word="full"),
                sde_noise=env_choice(env, "STABLE_AUDIO_SDE_NOISE", ("auto", "exact", "vectorized")),
                denoise_window=env_choice(env, "STABLE_AUDIO_DENOISE_WINDOW", ("full", "short")),
                max_rows=None if max_rows == "auto" else env_integer(env, "STABLE_AUDIO_MAX_ROWS", None, minimum=1,
                                                                     or_word="auto"),
            ),
            auto_max_rows=max_rows == "auto",
            compile=parse_compile_mode(env_text(env, "STABLE_AUDIO_COMPILE") or "0"),
            sa3_conditioning=env_choice(env, "STABLE_AUDIO_SA3_CONDITIONING", ("diffusers", "reference")),
        )
        if (config.default_inference_steps or 0) > config.max_inference_steps:  # every request without steps: 400
            raise ValueError(f"STABLE_AUDIO_DEFAULT_STEPS={config.default_inference_steps} is above "
                             f"STABLE_AUDIO_MAX_STEPS={config.max_inference_steps}")
        return config


def parse_compile_mode(value: str) -> str | None:
    """A ``STABLE_AUDIO_COMPILE`` value as EngineConfig.compile: None for eager, ``cuda-graphs`` or a torch.compile
    mode."""
    if value in ("", "0"):
        return None
    if value == CUDA_GRAPHS:
        return value
    from torch._inductor import list_mode_options  # imported only when asked: it is slow to import

    mode = "default" if value == "1" else value
    modes = list(list_mode_options())
    if mode not in modes:
        raise ValueError(f"STABLE_AUDIO_COMPILE={value!r}: use 0, 1, {CUDA_GRAPHS} or one of torch.compile's "
                         "modes: " + ", ".join(modes))
    return mode


@dataclass(frozen=True)
class FrontConfig:
    """How the HTTP front admits work and keeps jobs (environment variables in brackets).

    max_pending [STABLE_AUDIO_MAX_PENDING]: generations queued or running (requests and jobs together, on all
        engines) before new ones get 429; default 4 times ``capacity``, the requests all engines run at once.
    job_ttl_s [STABLE_AUDIO_JOB_TTL_S]: seconds a finished job's result is kept.
    max_finished_jobs [STABLE_AUDIO_MAX_FINISHED_JOBS]: finished jobs kept at most (oldest dropped first).
    max_finished_bytes [STABLE_AUDIO_MAX_FINISHED_BYTES]: the most audio they hold in this process (oldest dropped
        first; the newest is kept whatever its size): 256 WAVs of Stable Audio 3's 380 s would be 17 GB.
    """

    max_pending: int = 32
    job_ttl_s: float = 3600.0
    max_finished_jobs: int = 256
    max_finished_bytes: int = 2 << 30

    @classmethod
    def from_env(cls, capacity: int) -> "FrontConfig":
        env = os.environ
        return cls(
            max_pending=env_integer(env, "STABLE_AUDIO_MAX_PENDING", 4 * capacity, minimum=1),
            job_ttl_s=env_seconds(env, "STABLE_AUDIO_JOB_TTL_S", cls.job_ttl_s),
            max_finished_jobs=env_integer(env, "STABLE_AUDIO_MAX_FINISHED_JOBS", cls.max_finished_jobs, minimum=1),
            max_finished_bytes=env_integer(env, "STABLE_AUDIO_MAX_FINISHED_BYTES", cls.max_finished_bytes,
                                           minimum=1),
        )


@dataclass(frozen=True)
class ServiceSettings:
    """Decorator arguments for both BentoML services, read from configuration.yaml.

    The file is also a valid BentoML configuration (``BENTOML_CONFIG=configuration.yaml``); BentoML's new
    service SDK takes batching limits only from the decorator, so they are read here and passed on.

    batching [``batching.mode``, overridden by STABLE_AUDIO_BATCHING]: ``continuous`` admits requests into the
        running denoising loop at every step; ``whole`` runs each batch to its end before the next (see step_loop).
    stall_timeout_s [STABLE_AUDIO_STALL_TIMEOUT_S]: how long one piece of an engine's work (a prepare, a batched
        step, a decode) may run, and an engine may not answer, before it counts as hung (see health).
    """

    port: int = 8091
    request_timeout_s: float = 900.0
    max_batch_size: int = 8
    max_latency_ms: int = 600_000
    batching: BatchingMode = "continuous"
    stall_timeout_s: float = 600.0

    @property
    def arrivals_per_call(self) -> int:
        """The engine's ``max_batch_size`` for BentoML, which refuses 1 on a batchable API; one more arrival than
        the step loop takes just waits in its queue."""
        return max(2, self.max_batch_size)

    @property
    def result_wait_s(self) -> float:
        """How long one ``result`` call to an engine waits before it answers "not yet" and the front asks again:
        well inside the engine's traffic timeout, so that no generation, however long, meets that timeout; and
        short, since a call to an engine that has died is given up on only this long and a margin after it."""
        return min(20.0, self.request_timeout_s / 2)

    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> "ServiceSettings":
        """From the configuration file (``BENTOML_CONFIG``, else the repository's configuration.yaml) with
        BentoML's overrides on top (``BENTOML_CONFIG_OPTIONS``, ``BENTOML_CONFIG_OVERRIDES``), merged by BentoML
        as it merges them for itself: a traffic.timeout changed there changes what is derived from it here too."""
        path = Path(path or os.environ.get("BENTOML_CONFIG") or REPO_ROOT / "configuration.yaml")
        overrides = [variable for variable in BENTOML_OVERRIDE_VARIABLES if os.environ.get(variable)]
        source = f"{path}" + (f" with {' and '.join(overrides)}" if overrides else "")  # where a value came from
        services = _section(_bentoml_configuration(path, source), source, "services")
        front = _section(services, source, "services", FRONT_SERVICE)
        engine = _section(services, source, "services", ENGINE_SERVICE)
        batching = _section(engine, source, "services", ENGINE_SERVICE, "batching")
        for name in ("max_batch_size", "max_latency_ms"):
            value = batching.get(name, 1)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{source}: services.{ENGINE_SERVICE}.batching.{name} must be a whole number of at "
                                 f"least 1 (got {value!r})")
        mode = batching.get("mode", cls.batching)
        if mode not in BATCHING_MODES:
            raise ValueError(f"{source}: services.{ENGINE_SERVICE}.batching.mode={mode!r}: use one of "
                             + ", ".join(BATCHING_MODES))
        timeout = _timeout(front, source, FRONT_SERVICE, cls.request_timeout_s)
        # An engine's own timeout would cut the front's result calls, each up to result_wait_s, and the engine
        # services named StableAudioEngine1... would keep the front's: the engines take the front's.
        if _timeout(engine, source, ENGINE_SERVICE, timeout) < timeout:
            raise ValueError(f"{source}: services.{ENGINE_SERVICE}.traffic.timeout is below "
                             f"services.{FRONT_SERVICE}.traffic.timeout ({timeout:g}): leave it out, the engines "
                             "take the front's")
        return cls(
            port=_section(front, source, "services", FRONT_SERVICE, "http").get("port", cls.port),
            request_timeout_s=timeout,
            max_batch_size=batching.get("max_batch_size", cls.max_batch_size),
            max_latency_ms=batching.get("max_latency_ms", cls.max_latency_ms),
            batching=env_choice(os.environ, "STABLE_AUDIO_BATCHING", BATCHING_MODES, default=mode),
            stall_timeout_s=env_seconds(os.environ, "STABLE_AUDIO_STALL_TIMEOUT_S", cls.stall_timeout_s),
        )


BENTOML_OVERRIDE_VARIABLES = ("BENTOML_CONFIG_OPTIONS", "BENTOML_CONFIG_OVERRIDES")


def _bentoml_configuration(path: Path, source: str) -> dict[str, Any]:
    """The file with BentoML's override variables on top, merged by BentoML. An empty file (every line commented
    out) is as if absent; BentoML's merge fails on one, and on a file that is not a mapping, with no message."""
    from bentoml._internal.configuration import (
        get_bentoml_override_config_from_env, get_bentoml_override_config_json_from_env,
    )
    from bentoml._internal.configuration.containers import BentoMLConfiguration
    from bentoml.exceptions import BentoMLConfigException

    try:
        written = yaml.safe_load(path.read_text()) if path.is_file() else None
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not YAML: {_one_line(error)}") from None
    if written is not None and not isinstance(written, dict):
        raise ValueError(f"{path}: must be a mapping of settings (got {type(written).__name__})")
    # BentoML logs each override it applies, and warns that BENTOML_CONFIG_OPTIONS is deprecated: it does both
    # itself when it loads its configuration, once.
    bentoml_says = logging.getLogger(BentoMLConfiguration.__module__)
    was_disabled, bentoml_says.disabled = bentoml_says.disabled, True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return BentoMLConfiguration(override_config_file=str(path) if written else None,
                                        override_config_values=get_bentoml_override_config_from_env(),
                                        override_config_json=get_bentoml_override_config_json_from_env()).to_dict()
    except (BentoMLConfigException, ValueError) as error:
        raise ValueError(f"{source}: {_one_line(error)}") from None
    finally:
        bentoml_says.disabled = was_disabled


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def _section(parent: dict[str, Any], source: str, *keys: str) -> dict[str, Any]:
    """``parent[keys[-1]]``: a mapping, or {} when absent or left empty (its entries commented out)."""
    value = parent.get(keys[-1]) or {}
    if not isinstance(value, dict):
        raise ValueError(f"{source}: {'.'.join(keys)} must be a mapping of settings (got {value!r})")
    return value


def _timeout(service: dict[str, Any], source: str, name: str, default: float) -> float:
    timeout = _section(service, source, "services", name, "traffic").get("timeout", default)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < float("inf"):
        raise ValueError(f"{source}: services.{name}.traffic.timeout must be a number of seconds above 0 "
                         f"(got {timeout!r})")
    return float(timeout)
