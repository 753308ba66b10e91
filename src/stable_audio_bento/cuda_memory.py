"""GPU memory, the same for every model family: how many DiT rows fit, and giving back what a failed forward left
in CUDA's cache."""

from __future__ import annotations

from collections.abc import Callable

import torch


def rows_that_fit(device: torch.device, forward: Callable[[], object], rows: int, headroom: float = 0.8) -> int:
    """DiT rows per forward that fit in ``headroom`` of free CUDA memory, from the peak memory of one probe
    ``forward`` over ``rows`` rows."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device)
    forward()
    torch.cuda.synchronize(device)
    per_row = (torch.cuda.max_memory_allocated(device) - baseline) / rows
    free, _ = torch.cuda.mem_get_info(device)
    return max(2, int(headroom * free / per_row))


def release_cached_memory(device: torch.device) -> None:
    """After a failed forward: an out-of-memory error leaves the cache full, and the retry over fewer rows must be
    able to allocate."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
