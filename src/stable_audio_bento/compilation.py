"""``STABLE_AUDIO_COMPILE``: torch.compile of a family's DiT forward, the same way for both families."""

from __future__ import annotations

from collections.abc import Callable

import torch


def compiled_forward(forward: Callable[..., torch.Tensor], mode: str) -> Callable[..., torch.Tensor]:
    """``forward`` compiled in torch.compile's ``mode``, as dynamic: the rows vary with the batch, and the frames
    with the clip in the short window and for Stable Audio 3."""
    compiled = torch.compile(forward, dynamic=True, mode=mode)

    def run(*args: torch.Tensor | None) -> torch.Tensor:
        # The CUDA-graph modes (reduce-overhead, max-autotune) return their output in memory that the next replay
        # overwrites, and a step may run a forward per window length before it reads the first one's output.
        return compiled(*args).clone()

    return run
