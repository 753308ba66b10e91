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
        # overwrites (reading it afterwards raises). The step loop consumes it before its next forward today; the
        # copy, small beside the forward, keeps any reference a caller holds valid past that.
        return compiled(*args).clone()

    return run
