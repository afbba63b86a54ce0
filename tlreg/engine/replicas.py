"""The model under DDP: one wrapper per trainable set, SyncBatchNorm, and a bitwise check."""

from __future__ import annotations

import gc
from typing import TYPE_CHECKING

from tlreg.engine.distributed import all_gather_object, world
from tlreg.errors import UsageError

if TYPE_CHECKING:
    import torch
    from torch import nn


def _trainable(model: nn.Module) -> tuple[str, ...]:
    return tuple(n for n, p in model.named_parameters() if p.requires_grad)


class Replicas:
    """The DistributedDataParallel wrapper of a model, for its current trainable set.

    DDP registers its gradient hooks and buckets for the parameters that require grad when it
    is constructed; a parameter unfrozen later would train on its local gradient only and the
    replicas would drift apart (Lightning #20340). So the trainer freezes first (the policy's
    plan), then asks for the wrapper; when the plan changed the trainable set, the old wrapper
    is dropped (its hooks go with it) and a new one is built, which also re-broadcasts rank 0's
    parameters and buffers.
    """

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.model = model
        self.device = device
        self.wrapped: nn.Module | None = None
        self.trainable: tuple[str, ...] | None = None
        self.builds = 0

    def stale(self) -> bool:
        return self.wrapped is None or _trainable(self.model) != self.trainable

    def release(self) -> None:
        """Free the wrapper now, before the process group is destroyed.

        A DDP reducer keeps the group alive; one that outlives `destroy_process_group` is
        freed at interpreter exit, where tearing down gloo's threads can abort the process
        (SIGABRT, "terminate called without an active exception") after a run that succeeded.
        """
        self.wrapped, self.trainable = None, None
        gc.collect()

    def module(self) -> nn.Module:
        """The module to call for training steps this epoch (rebuilt if the set changed)."""
        if not self.stale():
            assert self.wrapped is not None
            return self.wrapped
        from torch.nn.parallel import DistributedDataParallel

        self.wrapped = None
        gc.collect()  # the old reducer's autograd hooks leave with it
        self.trainable = _trainable(self.model)
        if not self.trainable:  # nothing trains: nothing to synchronise
            self.wrapped = self.model
            return self.model
        ids = [self.device.index] if self.device.type == "cuda" else None
        self.wrapped = DistributedDataParallel(self.model, device_ids=ids)
        self.builds += 1
        return self.wrapped


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> bool:
    """Swap BatchNorm for SyncBatchNorm (CUDA only); True when any layer was converted."""
    import torch

    if device.type != "cuda":
        raise UsageError("--sync-bn needs CUDA: SyncBatchNorm synchronises statistics with "
                         "NCCL and does not run on the CPU; drop --sync-bn")
    if world() < 2:
        return False
    before = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return sum(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules()) > before


def replicas_agree(model: nn.Module) -> bool:
    """True when every rank holds bitwise the same parameters and buffers."""
    if world() < 2:
        return True
    import hashlib

    import torch

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    digests = all_gather_object(h.hexdigest())
    return len(set(digests)) == 1
