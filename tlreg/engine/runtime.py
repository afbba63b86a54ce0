"""Where a run computes: device, mixed precision, memory format, CPU threads and seeds."""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tlreg.errors import UsageError

if TYPE_CHECKING:
    import torch


def resolve_device(name: str) -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but CUDA is not available here")
    return device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """None for fp32. `auto` is bf16 on CUDA that supports it, fp32 on CPU (slower there)."""
    import torch

    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    if precision == "fp16" and device.type != "cuda":
        raise UsageError("fp16 autocast needs CUDA; use --precision bf16 or fp32 on the CPU")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


#: glibc's mallopt parameters (malloc.h) and their defaults
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536
#: how many `reuse_freed_memory` blocks are open (a run's report may predict inside a train)
_reuse_depth = 0


def _glibc() -> Any:
    """The process's C library where it is glibc (mallopt and malloc_trim), else None."""
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        return libc if all(hasattr(libc, f) for f in
                           ("gnu_get_libc_version", "mallopt", "malloc_trim")) else None
    except (OSError, AttributeError):
        return None


@contextlib.contextmanager
def reuse_freed_memory(device: torch.device | str) -> Iterator[None]:
    """On the CPU with glibc, keep freed memory in the process for reuse while this runs.

    glibc serves each allocation over its mmap threshold (at most 32 MB) with a fresh mmap and
    unmaps it when freed, so every forward pass of a CNN page-faults its large activations in
    again (batch 32 at 224 px: 2.5M page faults in 9 forward passes of efficientnet_lite0).
    With mmap off and the heap never trimmed, freed blocks are reused: on 2 cores a frozen
    forward pass ran 2.5x (ResNet-18: 1.3x) and a training step 2.1x (1.03x) faster, for up
    to 22% more peak memory (`python -m bench.allocator`). torch has no caching allocator on
    the CPU; jemalloc or tcmalloc (LD_PRELOAD) do this job where a user has one, and this
    needs neither. Left alone where MALLOC_MMAP_MAX_ is set (the user's own glibc tuning wins)
    and off glibc; restored, and the heap trimmed, at the end, so a notebook or a test process
    gets its memory back. Nested uses leave it to the outermost, so an inner one ending does
    not hand the outer run's memory back mid-way.
    """
    global _reuse_depth
    libc = _glibc() if str(device).split(":")[0] == "cpu" else None
    if libc is None or "MALLOC_MMAP_MAX_" in os.environ:
        yield
        return
    import ctypes

    if _reuse_depth == 0:
        libc.mallopt(_M_MMAP_MAX, 0)
        libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(2**31 - 1))
    _reuse_depth += 1
    try:
        yield
    finally:
        _reuse_depth -= 1
        if _reuse_depth == 0:
            libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
            libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
            libc.malloc_trim(0)


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    """Each epoch's randomness depends only on (seed, epoch): a resumed run replays it exactly."""
    return (seed * 1_000_003 + epoch * 7919 + 17) % 2**63


def compile_seconds() -> float:
    """Seconds torch.compile has spent compiling in this process (forward and backward graphs).

    torch has no public counter for it; this is the total dynamo's own timing report prints.
    """
    from torch._dynamo.utils import calculate_time_spent

    return float(calculate_time_spent().get("total_wall_time", 0.0))


@dataclass(frozen=True)
class Runtime:
    """The device a run computes on, its autocast dtype (None: fp32) and memory format."""

    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool

    def autocast(self) -> Any:
        import torch

        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def to_device(self, images: torch.Tensor) -> torch.Tensor:
        import torch

        images = images.to(self.device, non_blocking=True)
        if self.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def set_threads(self, loader_workers: int) -> None:
        """On the CPU, leave a core to each DataLoader worker.

        OpenMP threads spin-wait for each other; when a worker holds one of their cores, every
        op waits for it (on 2 cores, 2 threads + 1 worker ran a feature pass 2.6x slower than
        1 thread + 1 worker). An explicit OMP_NUM_THREADS (torchrun sets one) wins.
        """
        import torch

        if self.device.type != "cpu" or "OMP_NUM_THREADS" in os.environ:
            return
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
            os.cpu_count() or 1)
        torch.set_num_threads(max(1, cores - loader_workers))
