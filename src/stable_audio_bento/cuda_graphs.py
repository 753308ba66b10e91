"""``STABLE_AUDIO_COMPILE=cuda-graphs``: a family's eager DiT forward replayed from CUDA graphs, one per input shape.

On an H200 the full-size stable-audio-open forward launches ~3,700 kernels and takes 41 ms on the host for ~6 ms of
GPU work (benchmarks/RESULTS.md): the host is the bottleneck. A CUDA graph records those launches once and replays
them with one. The kernels are the eager forward's own, so the audio is what the eager forward gives on that card,
and recording costs about one forward's host time, not a compilation (torch.compile's reduce-overhead gets graphs
too, after an Inductor build per shape).

A graph holds fixed input and output buffers: each call copies its inputs in, replays, and copies the output out
before the next replay can overwrite it. Every graph records into one shared memory pool, which is safe because
replays never overlap (one lock) and no output is read from the pool after the next replay.

Which shapes: the rows vary with the batch and, in the short window and for Stable Audio 3, the frames with the clip.
A shape's first call runs eagerly and is its warm-up (kernels chosen, cuDNN plans built, outside any graph); its
second call records it. So a shape seen once costs nothing, and a stable-audio-open request (100 steps) replays from
its second step. At most ``max_graphs`` are kept, the least recently used dropped first (its buffers freed; a
recording reuses the pool). A shape whose recording fails (an operation a graph cannot hold) runs eagerly from then
on, with one warning; one whose recording runs out of memory runs that call eagerly, and after three such tries for
good.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch

from .step_loop import drop_tracebacks

logger = logging.getLogger(__name__)

MAX_GRAPHS = 32
MAX_OOM_RECORDINGS = 3

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


def require_cuda(device: torch.device) -> None:
    if device.type != "cuda":
        raise ValueError(f"STABLE_AUDIO_COMPILE=cuda-graphs needs a CUDA device; the engine runs on {device}")


class GraphedForward:
    """``forward`` (a DiT forward of tensors, tuples of tensors and Nones) replayed from CUDA graphs on ``device``."""

    def __init__(self, forward: Callable[..., torch.Tensor], device: torch.device, max_graphs: int = MAX_GRAPHS):
        require_cuda(device)
        self.forward, self.device, self.max_graphs = forward, device, max_graphs
        self.recorded: OrderedDict[Hashable, _RecordedForward] = OrderedDict()  # least recently used first
        self.seen: set[Hashable] = set()
        self.eager_shapes: set[Hashable] = set()  # their recording failed
        self.oom_recordings: dict[Hashable, int] = {}  # shape -> recordings that ran out of memory
        self._pool = torch.cuda.graph_pool_handle()  # shared by all graphs
        self._capture_stream: torch.cuda.Stream | None = None
        self._lock = threading.Lock()

    def __call__(self, *args: Argument) -> torch.Tensor:
        key = _shape_key(args)
        # The engine's GPU as the current one: a thread starts on GPU 0, and a graph records and replays on the
        # current device's streams.
        with self._lock, torch.cuda.device(self.device):
            recorded = self.recorded.get(key)
            if recorded is None:
                if key not in self.seen or key in self.eager_shapes:
                    self.seen.add(key)
                    return self.forward(*args)
                recorded = self._record(key, args)
                if recorded is None:
                    return self.forward(*args)
            self.recorded.move_to_end(key)
            return recorded.replay(args)

    def _record(self, key: Hashable, args: tuple[Argument, ...]) -> _RecordedForward | None:
        inputs = [None if leaf is None else leaf.clone() for leaf in _leaves(args)]  # keeps a dense layout
        static_args = _rebuilt(args, inputs)
        if self._capture_stream is None:
            # Once: whatever a stream sets up on its first use (cuBLAS's workspace for it) happens outside a graph.
            self._capture_stream = torch.cuda.Stream(self.device)
            self._capture_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._capture_stream):
                self.forward(*static_args)
            torch.cuda.current_stream(self.device).wait_stream(self._capture_stream)
        if len(self.recorded) >= self.max_graphs:
            dropped, _ = self.recorded.popitem(last=False)
            logger.info("CUDA graphs: dropped the least recently used graph, for %s", _described(dropped))
        graph = torch.cuda.CUDAGraph()
        previous_stream = torch.cuda.current_stream(self.device)
        failure = None
        try:
            # thread_local: the engine's other threads (a decode, a host-to-GPU copy) may use CUDA meanwhile.
            with torch.cuda.graph(graph, pool=self._pool, stream=self._capture_stream,
                                  capture_error_mode="thread_local"):
                output = self.forward(*static_args)
        except RuntimeError as error:  # out of memory among them
            failure = error
            drop_tracebacks(error)  # their frames would hold what the capture allocated
        finally:
            # torch.cuda.graph's exit ends the capture before it restores the stream: when ending it raises (a
            # capture the forward invalidated), this thread would stay on the capture stream for good.
            torch.cuda.set_stream(previous_stream)
        if failure is None:
            self.recorded[key] = recorded = _RecordedForward(graph, inputs, output)
            logger.info("CUDA graphs: recorded the forward for %s (%d kept)", _described(key), len(self.recorded))
            return recorded
        del graph, inputs, static_args  # the failed capture's memory, given back before the eager call
        torch.cuda.synchronize(self.device)
        if isinstance(failure, torch.OutOfMemoryError):
            # A graph's pool cannot reuse the eager forward's cached blocks: this call runs eagerly in them (what
            # does not fit that way goes to the step loop's retry over fewer rows). The shape is tried again later,
            # when memory may have freed, up to MAX_OOM_RECORDINGS times.
            torch.cuda.empty_cache()
            self.oom_recordings[key] = failures = self.oom_recordings.get(key, 0) + 1
            logger.warning("CUDA graphs: out of memory recording %s (%d of %d tries); this call runs eagerly",
                           _described(key), failures, MAX_OOM_RECORDINGS)
            if failures >= MAX_OOM_RECORDINGS:
                self.eager_shapes.add(key)
        else:
            logger.warning("CUDA graphs: recording failed for %s; that shape runs eagerly: %s", _described(key),
                           failure)
            self.eager_shapes.add(key)
        return None
