"""One engine per GPU: how many engines run, the BentoML service each one is, and the device each one takes.

Why not ``workers=N`` on one engine service: BentoML 1.4.40 (``_bentoml_impl/server/serving.py`` and
``allocator.py``) starts the N workers of a service as N processes that accept on **one** shared Unix socket, and
gives them all the same ``CUDA_VISIBLE_DEVICES`` (the service's whole GPU allocation); ``server_context.worker_index``
is circus' worker id, 1 to N. A call from the front lands on whichever worker accepted the pooled connection it
travels on, so the front could not send a request's ``result``, ``cancel`` and ``progress`` calls to the worker
that holds the request. Each engine is therefore a service of its own with one worker: BentoML gives each one
its own socket (the front addresses it by name, see engine_pool) and, since each asks for ``{"gpu": 1}``, a GPU of
its own through ``CUDA_VISIBLE_DEVICES``.
"""

from __future__ import annotations

import copy
import os
from dataclasses import replace
from typing import Any

import bentoml
import torch

from .config import ENGINE_SERVICE, EngineConfig
from .env_values import env_integer, env_text

ENGINE_WORKERS_VARIABLE = "STABLE_AUDIO_ENGINE_WORKERS"


def engine_worker_count() -> int:
    """``STABLE_AUDIO_ENGINE_WORKERS``; by default the GPUs this process sees, 1 without any.

    The default is written back into the environment: service.py is imported first by ``bentoml serve``'s own
    process, whose children (the front, and engines that see one GPU each) inherit the variable and so agree on
    how many engine services there are."""
    value = env_text(os.environ, ENGINE_WORKERS_VARIABLE)
    gpus = torch.cuda.device_count()
    if value is None:
        count = max(1, gpus)
        os.environ[ENGINE_WORKERS_VARIABLE] = str(count)
        return count
    count = env_integer(os.environ, ENGINE_WORKERS_VARIABLE, None, minimum=1)
    # Checked where every GPU is visible (the server's own process: no worker index yet). BentoML would hand the
    # engines past the last GPU made-up GPU numbers, and they would quietly run on the CPU.
    if bentoml.server_context.worker_index is None and 0 < gpus < count and not _gpu_allocation_disabled():
        raise ValueError(f"{ENGINE_WORKERS_VARIABLE}={count} but {gpus} GPUs are visible: run at most one engine "
                         "per GPU, or set BENTOML_DISABLE_GPU_ALLOCATION=1 to let engines share GPUs in turn")
    return count


def _gpu_allocation_disabled() -> bool:
    """BentoML's own rule (``ResourceAllocator.gpu_allocation_disabled``): then every engine sees every GPU."""
    return "BENTOML_DISABLE_GPU_ALLOCATION" in os.environ or "CUDA_VISIBLE_DEVICES" in os.environ


def engine_service_name(index: int) -> str:
    """The first engine keeps the name configuration.yaml and older deployments know; the others are numbered."""
    return ENGINE_SERVICE if index == 0 else f"{ENGINE_SERVICE}{index}"


def engine_services(engine_class: type, count: int, **service_config: Any) -> list[Any]:
    """``count`` BentoML services running ``engine_class``, each a subclass whose ``index`` says which engine it
    is (its device, its metrics' ``worker`` label). Each gets its own copy of the configuration, which BentoML
    may complete in place."""
    return [bentoml.service(name=engine_service_name(index), **copy.deepcopy(service_config))(
                type(engine_service_name(index), (engine_class,), {"index": index}))
            for index in range(count)]


def _dependency_attribute(index: int) -> str:
    return f"engine_{index}"


def depends_on_engines(engines: list[Any]):
    """A class decorator for the front, under ``@bentoml.service``: one dependency per engine, as class
    attributes, which is where BentoML looks for them when the service is declared."""
    def add_dependencies(front_class: type) -> type:
        for index, engine in enumerate(engines):
            setattr(front_class, _dependency_attribute(index), bentoml.depends(engine))
        front_class.engine_count = len(engines)
        return front_class
    return add_dependencies


def engine_clients(front: Any) -> list[Any]:
    """The front's clients of its engines, in engine order."""
    return [getattr(front, _dependency_attribute(index)) for index in range(front.engine_count)]


def own_device(config: EngineConfig, index: int) -> EngineConfig:
    """Engine ``index``'s configuration: with ``STABLE_AUDIO_DEVICE`` ``auto`` or ``cuda`` on a machine with GPUs,
    the GPU ``index`` modulo those it sees. That is its own GPU when BentoML allocated one to it (it sees only that
    one), and GPU ``index`` when allocation is off (``CUDA_VISIBLE_DEVICES`` or ``BENTOML_DISABLE_GPU_ALLOCATION``
    set for the server: every engine sees every GPU). An explicit device (``cuda:1``, ``cpu``) is kept as given.
    The chosen GPU also becomes the process's current one, for code that says just ``cuda``."""
    if config.device not in ("auto", "cuda") or not torch.cuda.is_available():
        return config
    gpu = index % torch.cuda.device_count()
    torch.cuda.set_device(gpu)
    return replace(config, device=f"cuda:{gpu}")
