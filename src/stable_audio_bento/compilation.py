"""``STABLE_AUDIO_COMPILE``: how a family's DiT forward runs when not eagerly, the same way for both families:
torch.compile'd in one of its modes, or the eager forward replayed from CUDA graphs (``cuda_graphs``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from .cuda_graphs import GraphedForward

CUDA_GRAPHS = "cuda-graphs"


def prepared_forward(forward: Callable[..., torch.Tensor], mode: str, device: torch.device
                     ) -> Callable[..., torch.Tensor]:
    """``forward`` in ``mode``: ``cuda-graphs``, or torch.compile's mode, compiled as dynamic: the rows vary with
    the batch, and the frames with the clip in the short window and for Stable Audio 3."""
    if mode == CUDA_GRAPHS:
        return GraphedForward(forward, device)
    compiled = torch.compile(forward, dynamic=True, mode=mode)

    def run(*args: torch.Tensor | None) -> torch.Tensor:
        # The CUDA-graph modes (reduce-overhead, max-autotune) return their output in memory that the next replay
        # overwrites (reading it afterwards raises). The step loop consumes it before its next forward today; the
        # copy, small beside the forward, keeps any reference a caller holds valid past that.
        return compiled(*args).clone()

    return run


@contextmanager
def eager_forward(family: Any) -> Iterator[None]:
    """Inside, ``family`` (either family: its ``transformer_forward`` and the ``_transformer_forward`` it runs) runs
    its DiT forward eagerly. For memory probes: a CUDA-graph replay allocates nothing, its memory was set aside when
    it was recorded, so only the eager forward shows what a batch of rows needs."""
    prepared, family._transformer_forward = family._transformer_forward, family.transformer_forward
    try:
        yield
    finally:
        family._transformer_forward = prepared
