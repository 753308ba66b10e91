"""``STABLE_AUDIO_COMPILE=cuda-graphs``: a family's eager DiT forward replayed from CUDA graphs, one per input shape.

On an H200 the full-size stable-audio-open forward launches ~3,700 kernels and takes 41 ms on the host for ~6 ms of
GPU work (benchmarks/RESULTS.md): the host is the bottleneck. A CUDA graph records those launches once and replays
them with one. The kernels are the eager forward's own, so the audio is what the eager forward gives on that card,
and recording takes a few forwards, not a compilation (torch.compile's reduce-overhead gets graphs too, after an
Inductor build per shape).

A graph holds fixed input and output buffers: each call copies its inputs in, replays, and copies the output out
before the next replay can overwrite it. Every graph records into one shared memory pool, which is safe because
replays never overlap (one lock) and no output is read from the pool after the next replay. The rows vary with the
batch and, in the short window and for Stable Audio 3, the frames with the clip: each new shape is recorded on its
first call, up to ``max_graphs``; later new shapes run eagerly. A shape whose recording fails (an operation a graph
cannot hold) runs eagerly too, with one warning.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

# Eager runs on a side stream before recording, as PyTorch's CUDA-graph notes ask: lazy initialisation (cuBLAS
# workspaces, cuDNN plans) must happen outside the graph.
WARM_UP_RUNS = 2
MAX_GRAPHS = 32

Argument = torch.Tensor | tuple[torch.Tensor, ...] | None


def _leaves(args: tuple[Argument, ...]) -> list[torch.Tensor | None]:
    """The tensors of a forward's arguments in order; a tuple argument (a rotary embedding's cos and sin) is opened."""
    return [leaf for arg in args for leaf in (arg if isinstance(arg, tuple) else (arg,))]


def _shape_key(args: tuple[Argument, ...]) -> Hashable:
    """Shapes, and the strides too: a kernel may be chosen by layout (a transposed view takes another matrix
    product than a contiguous tensor), and each input buffer keeps the layout of the call that recorded it."""
    return tuple(None if leaf is None else (tuple(leaf.shape), leaf.stride(), leaf.dtype, str(leaf.device))
                 for leaf in _leaves(args))


def _described(key: Hashable) -> str:
    return ", ".join("none" if leaf is None else "x".join(map(str, leaf[0])) for leaf in key)


def _rebuilt(args: tuple[Argument, ...], leaves: list[torch.Tensor | None]) -> tuple[Argument, ...]:
    """``args`` with its tensors replaced, in order, by ``leaves``."""
    remaining = iter(leaves)
    return tuple(tuple(next(remaining) for _ in arg) if isinstance(arg, tuple) else next(remaining) for arg in args)


@dataclass
class _RecordedForward:
    graph: torch.cuda.CUDAGraph
    inputs: list[torch.Tensor | None]
    output: torch.Tensor

    def replay(self, args: tuple[Argument, ...]) -> torch.Tensor:
        for buffer, value in zip(self.inputs, _leaves(args)):
            if buffer is not None:
                buffer.copy_(value)
        self.graph.replay()
        return self.output.clone()


class GraphedForward:
    """``forward`` (a DiT forward of tensors, tuples of tensors and Nones) replayed from CUDA graphs on ``device``."""

    def __init__(self, forward: Callable[..., torch.Tensor], device: torch.device, max_graphs: int = MAX_GRAPHS):
        if device.type != "cuda":
            raise ValueError(f"STABLE_AUDIO_COMPILE=cuda-graphs needs a CUDA device; the engine runs on {device}")
        self.forward, self.device, self.max_graphs = forward, device, max_graphs
        self.recorded: dict[Hashable, _RecordedForward] = {}
        self.eager_shapes: set[Hashable] = set()
        self._pool = None  # the first graph's, shared by all
        self._lock = threading.Lock()

    def __call__(self, *args: Argument) -> torch.Tensor:
        key = _shape_key(args)
        with self._lock:
            recorded = self.recorded.get(key)
            if recorded is None and key not in self.eager_shapes:
                recorded = self._record(key, args)
            if recorded is None:
                return self.forward(*args)
            return recorded.replay(args)

    def _record(self, key: Hashable, args: tuple[Argument, ...]) -> _RecordedForward | None:
        if len(self.recorded) >= self.max_graphs:
            logger.warning("CUDA graphs: %d shapes recorded, the most kept; this one runs eagerly: %s",
                           self.max_graphs, _described(key))
            self.eager_shapes.add(key)
            return None
        inputs = [None if leaf is None else leaf.clone() for leaf in _leaves(args)]  # keeps a dense layout
        static_args = _rebuilt(args, inputs)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(WARM_UP_RUNS):
                self.forward(*static_args)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: the engine's other threads (a decode, a host-to-GPU copy) may use CUDA meanwhile.
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                output = self.forward(*static_args)
        except torch.OutOfMemoryError:
            raise  # not the shape's fault: the step loop frees the cache and retries over fewer rows
        except RuntimeError as error:
            torch.cuda.synchronize(self.device)
            logger.warning("CUDA graphs: recording failed for %s; that shape runs eagerly: %s", _described(key), error)
            self.eager_shapes.add(key)
            return None
        if self._pool is None:
            self._pool = graph.pool()
        self.recorded[key] = recorded = _RecordedForward(graph, inputs, output)
        logger.info("CUDA graphs: recorded the forward for %s (%d shapes)", _described(key), len(self.recorded))
        return recorded
