"""Several processes, one run: torchrun detection, the process group, sharding and gathering.

`torchrun --nproc_per_node N -m tlreg train ...` starts N copies of the same command; each finds
RANK, WORLD_SIZE and LOCAL_RANK in its environment, joins one process group (NCCL on GPUs, gloo
on the CPU) and trains on its shard of every epoch. Outside torchrun every helper here is a
cheap no-op for one process, so the trainer has a single code path.

Three rules keep N processes equal to one process with the same global batch:

* Every rank draws the same per-epoch permutation (DistributedSampler, seeded from the run's
  (seed, epoch)); rank r takes every N-th index, so the ranks' k-th batches together are the
  one-process k-th global batch, and DDP's gradient average is its gradient.
* Augmentation is seeded per sample from (epoch seed, sample index), never from the rank,
  worker or batch that happens to load it (`tlreg.data.images.ImageDataset(per_sample_seed=)`).
* DDP only syncs the gradients of parameters that required grad when it was built, so the
  wrapper is rebuilt whenever a freezing policy changes the trainable set (`Replicas`).

torch is imported inside functions: the CLI imports this module at start-up.
"""

from __future__ import annotations

import gc
import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tlreg.errors import TlregError, UsageError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from tlreg.data.features import FeatureCache
    from tlreg.data.images import Sample

TIMEOUT_ENV = "TLREG_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0  # torch's gloo default; a rank that never arrives fails the job then


class DistributedError(TlregError):
    """A rank of a distributed run failed; the job stops (the last checkpoint is kept)."""


@dataclass(frozen=True)
class Launch:
    """What torchrun (or any launcher using its variables) told this process."""

    rank: int
    world_size: int
    local_rank: int


def launched() -> Launch | None:
    """RANK / WORLD_SIZE / LOCAL_RANK from the environment, or None outside torchrun."""
    if "WORLD_SIZE" not in os.environ:
        return None
    try:
        world = int(os.environ["WORLD_SIZE"])
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise UsageError("WORLD_SIZE, RANK and LOCAL_RANK must be integers (as torchrun sets "
                         f"them); got {os.environ.get('WORLD_SIZE')!r}, "
                         f"{os.environ.get('RANK')!r}, {os.environ.get('LOCAL_RANK')!r}") from None
    if not 0 <= rank < world:
        raise UsageError(f"RANK {rank} is outside WORLD_SIZE {world}")
    return Launch(rank, world, local)


def _dist() -> Any:
    import torch.distributed as dist

    return dist


def is_initialized() -> bool:
    dist = _dist()
    return bool(dist.is_available() and dist.is_initialized())


def rank() -> int:
    """This process's rank (0 outside a process group; torchrun's RANK before joining)."""
    if is_initialized():
        return int(_dist().get_rank())
    env = launched()
    return env.rank if env else 0


def world() -> int:
    """Number of processes training together (1 outside a process group)."""
    return int(_dist().get_world_size()) if is_initialized() else 1


def planned_world() -> int:
    """The world size this process will train in: the process group's, else torchrun's."""
    if is_initialized():
        return world()
    env = launched()
    return env.world_size if env else 1


def local_rank() -> int:
    env = launched()
    return env.local_rank if env else 0


def is_main() -> bool:
    """True on the one process that writes files and prints (rank 0)."""
    return rank() == 0


def timeout_seconds() -> float:
    value = os.environ.get(TIMEOUT_ENV)
    if not value:
        return DEFAULT_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        raise UsageError(f"{TIMEOUT_ENV} must be a number of seconds, got {value!r}") from None
    if seconds <= 0:
        raise UsageError(f"{TIMEOUT_ENV} must be > 0, got {value!r}")
    return seconds


def _wants_cuda(device: str) -> bool:
    import torch

    if device == "auto":
        return torch.cuda.is_available()
    return device.startswith("cuda")


def init(device: str = "auto", timeout_s: float | None = None) -> Launch:
    """Join the torchrun process group: NCCL and `cuda:LOCAL_RANK` on GPUs, gloo on the CPU.

    The group's timeout bounds how long a collective waits for a rank that died or hangs: the
    survivors then raise and exit non-zero (under torchrun the agent stops them sooner).
    """
    from datetime import timedelta

    import torch

    env = launched()
    if env is None:
        raise UsageError("not launched by torchrun (no WORLD_SIZE / RANK in the environment)")
    dist = _dist()
    if not dist.is_available():
        raise UsageError("this torch build has no torch.distributed")
    cuda = _wants_cuda(device)
    if cuda:
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device} was asked for, but CUDA is not available here")
        if env.local_rank >= torch.cuda.device_count():
            raise UsageError(f"LOCAL_RANK {env.local_rank} has no GPU: this node has "
                             f"{torch.cuda.device_count()}; start at most that many processes "
                             "per node")
        torch.cuda.set_device(env.local_rank)
    # Import DDP before the group exists: torch.distributed.nn.functional binds `group.WORLD`
    # as a default argument at import time, and a group kept alive by those defaults is torn
    # down during interpreter finalisation, which can abort gloo's threads (SIGABRT at exit).
    import torch.distributed.nn.functional
    import torch.nn.parallel

    timeout = timedelta(seconds=timeout_s if timeout_s is not None else timeout_seconds())
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    return env


def cleanup() -> None:
    """Leave the process group (no-op when none was joined)."""
    if is_initialized():
        _dist().destroy_process_group()


@contextmanager
def session(device: str = "auto") -> Iterator[None]:
    """Join the process group for one run when torchrun started several processes.

    A no-op for one process, or when the caller already joined a group (then it is left to
    the caller to destroy).
    """
    env = launched()
    if env is None or env.world_size < 2 or is_initialized():
        yield
        return
    init(device)
    try:
        yield
    finally:
        cleanup()


def device_for(device: torch.device) -> torch.device:
    """Under DDP a CUDA run uses `cuda:LOCAL_RANK`; an explicit other index is an error."""
    import torch

    if world() < 2 or device.type != "cuda":
        return device
    local = local_rank()
    if device.index is not None and device.index != local:
        raise UsageError(f"--device {device} under torchrun: each process uses the GPU of its "
                         f"LOCAL_RANK (cuda:{local}); pass --device cuda (or auto)")
    return torch.device("cuda", local)


def backend() -> str | None:
    return str(_dist().get_backend()) if is_initialized() else None


# -- collectives (identity for one process) ---------------------------------------------------


def _comm_device() -> torch.device:
    import torch

    if backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait for every rank (no-op for one process)."""
    if world() < 2:
        return
    dist = _dist()
    if backend() == "nccl":
        dist.barrier(device_ids=[_comm_device().index])
    else:
        dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj` (small, picklable metadata between our own ranks), in rank order."""
    if world() < 2:
        return [obj]
    out: list[Any] = [None] * world()
    _dist().all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank."""
    if world() < 2:
        return obj
    box = [obj]
    _dist().broadcast_object_list(box, src=src)
    return box[0]


def all_gather_tensors(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's tensor, in rank order; the first dimension may differ between ranks."""
    import torch

    if world() < 2:
        return [tensor]
    dist, dev = _dist(), _comm_device()
    local = tensor.detach().to(dev).contiguous()
    sizes = [torch.zeros(1, dtype=torch.long, device=dev) for _ in range(world())]
    dist.all_gather(sizes, torch.tensor([local.shape[0]], dtype=torch.long, device=dev))
    counts = [int(s.item()) for s in sizes]
    longest = max(counts)
    padded = local.new_zeros((longest, *local.shape[1:]))
    padded[:local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(world())]
    dist.all_gather(parts, padded)
    return [p[:n].to(tensor.device) for p, n in zip(parts, counts, strict=True)]


def broadcast_tensor(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Rank `src`'s tensor (same shape and dtype on every rank) on every rank."""
    if world() < 2:
        return tensor
    buf = tensor.detach().to(_comm_device()).contiguous()
    _dist().broadcast(buf, src=src)
    return buf.to(tensor.device)


def sum_all(*values: float) -> tuple[float, ...]:
    """Each value summed over the ranks (float64, so counts stay exact)."""
    import torch

    if world() < 2:
        return tuple(float(v) for v in values)
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    _dist().all_reduce(t)
    return tuple(t.cpu().tolist())


# -- sharding -----------------------------------------------------------------------------------


def sampler(n: int, *, shuffle: bool, seed: int, epoch: int = 0) -> Any:
    """This rank's DistributedSampler over `n` samples (also for one process: same order).

    Training (`shuffle`): one permutation per (seed, epoch), identical on every rank; rank r
    takes positions r, r + N, ..., padded to a multiple of N by repeating the first indices.
    Evaluation: the indices in order, sharded the same way; the padded duplicates are dropped
    again by `gather_by_index`.
    """
    from torch.utils.data.distributed import DistributedSampler

    indices: Any = range(n)  # DistributedSampler only takes len() of its data set
    s = DistributedSampler(indices, num_replicas=world(), rank=rank(), shuffle=shuffle,
                           seed=seed, drop_last=False)
    s.set_epoch(epoch)
    return s


def gather_by_index(indices: torch.Tensor, *columns: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Gather per-sample rows from every rank, one row per sample index, sorted by index.

    DistributedSampler pads each shard with repeats of the first samples; keeping the first
    row per index means no padded duplicate is ever counted (metrics are exact).
    """
    import torch

    idx = torch.cat(all_gather_tensors(indices.reshape(-1)))
    cols = [torch.cat(all_gather_tensors(c)) for c in columns]
    order = torch.argsort(idx, stable=True)
    ordered = idx[order]
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[1:] = ordered[1:] != ordered[:-1]
    keep = order[first]
    return (idx[keep], *(c[keep] for c in cols))


def shard_features(samples: Sequence[Sample],
                   compute: Callable[[list[int]], tuple[torch.Tensor, list[int]]],
                   cache: FeatureCache | None, width: int) -> tuple[torch.Tensor, list[int]]:
    """`tlreg.data.features.cached_features` for N processes: each rank computes 1/N of the misses.

    Rank 0 looks the samples up in the cache and names the missing ones; every rank runs the
    backbone on its share; the shares are gathered; rank 0 alone writes the new rows to the
    cache (one writer, so ranks cannot race on the entry) and sends every rank the full,
    identical feature matrix. Rows follow `samples`, undecodable ones left out.
    """
    import torch

    from tlreg.data.features import cached_features

    n_world, me = world(), rank()
    missing: list[int] | None = None
    if is_main():
        missing = cache.lookup([s.path for s in samples])[1] if cache is not None else list(
            range(len(samples)))
    missing = broadcast_object(missing)
    assert missing is not None
    mine = missing[me::n_world]
    feats, failed = compute(mine) if mine else (torch.empty(0, width), [])
    parts = all_gather_tensors(feats.float().cpu())
    fails = all_gather_object(list(failed))
    bad = {p for f in fails for p in f}
    rows: dict[int, torch.Tensor] = {}
    for r, part in enumerate(parts):
        failed_r = set(fails[r])
        ok = [p for p in missing[r::n_world] if p not in failed_r]
        rows.update(zip(ok, part, strict=True))
    new_ok = [p for p in missing if p not in bad]
    new = torch.stack([rows[p] for p in new_ok]) if new_ok else torch.empty(0, width)
    all_failed = [p for p in missing if p in bad]
    if cache is None:  # every sample was computed: rows are already in sample order
        return new, all_failed
    if is_main():
        def precomputed(positions: list[int]) -> tuple[torch.Tensor, list[int]]:
            extra = sorted(set(positions) - set(missing))
            if extra:  # another job changed the cache between two lookups: compute those too
                more, more_failed = compute(extra)
                rows.update(zip([p for p in extra if p not in set(more_failed)], more,
                                strict=True))
                bad.update(more_failed)
            keep = [p for p in positions if p not in bad]
            return (torch.stack([rows[p] for p in keep]) if keep else torch.empty(0, width),
                    [p for p in positions if p in bad])

        full, all_failed = cached_features(samples, precomputed, cache)
        shape = (tuple(full.shape), all_failed)
    else:
        full, shape = None, None
    shape = broadcast_object(shape)
    assert shape is not None
    dims, all_failed = shape
    buf = full if full is not None else torch.empty(dims, dtype=torch.float32)
    return broadcast_tensor(buf.float().contiguous()), list(all_failed)


# -- the model ----------------------------------------------------------------------------------


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


# -- launching ----------------------------------------------------------------------------------


def launch(argv: Sequence[str], nproc: int) -> None:
    """`tlreg ARGV --devices N`: start torchrun's elastic agent here for `python -m tlreg ARGV`.

    The agent watches the N workers; when one fails (an exception or a signal) it stops the
    others and this raises DistributedError, so the command exits non-zero.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    if launched() is not None:
        raise UsageError("--devices starts torchrun itself; under torchrun leave it out")
    # torchrun would default every worker to 1 thread; share this machine's cores instead.
    # The workers inherit it; the caller's environment is restored afterwards (this also runs
    # inside notebooks and test processes).
    threads_before = os.environ.get("OMP_NUM_THREADS")
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    args = get_args_parser().parse_args(
        ["--standalone", f"--nproc-per-node={nproc}", "--module", "tlreg", *argv])
    try:
        run(args)
    except ChildFailedError as exc:
        first_rank, failure = exc.get_first_failure()
        how = (f"was killed by {failure.signal_name()}" if failure.exitcode < 0
               else f"exited with code {failure.exitcode}")
        err = DistributedError(f"rank {first_rank} of {nproc} {how}; the other ranks were "
                               "stopped (the last checkpoint is kept: continue with --resume)")
        err.exit_code = failure.exitcode if failure.exitcode > 0 else 1
        raise err from None
    finally:
        if threads_before is None:
            os.environ.pop("OMP_NUM_THREADS", None)


def steps_per_epoch(n: int, batch_size: int, *, features: bool) -> int:
    """Optimizer steps per epoch: per-rank batches of a shard, or global batches of features."""
    w = planned_world()
    if features:
        return max(1, math.ceil(n / (batch_size * w)))
    return max(1, math.ceil(math.ceil(n / w) / batch_size))
