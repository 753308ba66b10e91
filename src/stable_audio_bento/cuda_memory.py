"""GPU memory, the same for every model family: how many DiT rows fit, giving back what a failed forward left in
CUDA's cache, noise drawn on the host reaching the GPU without a wait, and waiting for the work queued."""

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
    torch.cuda.empty_cache()  # the probe's blocks, still cached, would count as used
    free, _ = torch.cuda.mem_get_info(device)
    return max(2, int(headroom * free / per_row))


def wait_for_queued_work(device: torch.device) -> None:
    """The host runs ahead of a GPU, so a time read before this would leave out the kernels still queued."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release_cached_memory(device: torch.device) -> None:
    """After a failed forward: an out-of-memory error leaves the cache full, and the retry over fewer rows must be
    able to allocate."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def host_drawn_noise(shape: tuple[int, ...] | torch.Size, generator: torch.Generator, device: torch.device,
                     dtype: torch.dtype) -> torch.Tensor:
    """Standard normal noise from a request's CPU ``generator``: the values diffusers' ``randn_tensor`` draws for a
    CPU generator, so a seed means the same noise on any device. A plain copy to the GPU would wait for the GPU to
    finish the step's forward (every step, every request); from pinned memory the copy is queued behind it and the
    host goes on (PyTorch does not reuse the pinned block before the copy is done)."""
    on_gpu = device.type == "cuda"
    noise = torch.randn(shape, generator=generator, dtype=dtype, pin_memory=on_gpu)
    return noise.to(device, non_blocking=on_gpu)
