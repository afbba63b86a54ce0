"""Several processes, one run: torchrun detection, the process group and its primitives.

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
  wrapper is rebuilt whenever a freezing policy changes the trainable set
  (`tlreg.engine.replicas.Replicas`).

Sharding a pass over the data is tlreg.engine.sharding's.

torch is imported inside functions: the CLI imports this module at start-up.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tlreg.errors import TlregError, UsageError

if TYPE_CHECKING:
    import torch

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
