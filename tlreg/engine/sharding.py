"""Sharding a pass over the data across processes, and gathering it back exactly.

Every helper is a no-op for one process (the same code path); see tlreg.engine.distributed
for the rules that keep N processes equal to one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from tlreg.engine.distributed import (
    all_gather_object,
    all_gather_tensors,
    broadcast_object,
    broadcast_tensor,
    is_main,
    planned_world,
    rank,
    world,
)

if TYPE_CHECKING:
    import torch

    from tlreg.data.features import FeatureCache
    from tlreg.data.sources import Sample


def sampler(n: int, *, shuffle: bool, seed: int, epoch: int = 0,
            weights: Sequence[float] | None = None) -> Any:
    """This rank's DistributedSampler over `n` samples (also for one process: same order).

    Training (`shuffle`): one permutation per (seed, epoch), identical on every rank; rank r
    takes positions r, r + N, ..., padded to a multiple of N by repeating the first indices.
    Evaluation: the indices in order, sharded the same way; the padded duplicates are dropped
    again by `gather_by_index`. With `weights` (`--sampler balanced`): `WeightedShard`.
    """
    if weights is not None:
        return WeightedShard(weights, seed=seed, epoch=epoch, replicas=world(), rank=rank())
    from torch.utils.data.distributed import DistributedSampler

    indices: Any = range(n)  # DistributedSampler only takes len() of its data set
    s = DistributedSampler(indices, num_replicas=world(), rank=rank(), shuffle=shuffle,
                           seed=seed, drop_last=False)
    s.set_epoch(epoch)
    return s


class WeightedShard:
    """n draws with replacement, each index with probability proportional to its weight.

    The draw depends on (seed, epoch) alone, so every rank draws the same global list and
    keeps DistributedSampler's shard of it (positions rank, rank + N, ..., padded to a multiple
    of N by repeating the first draws): N processes see the multiset one process sees, and each
    global batch the same images. torch's WeightedRandomSampler has no shards, and
    DistributedSampler no weights, hence this small class.
    """

    def __init__(self, weights: Sequence[float], *, seed: int, epoch: int, replicas: int,
                 rank: int) -> None:
        self.weights, self.seed, self.epoch = list(weights), seed, epoch
        self.replicas, self.rank = replicas, rank
        self.total = math.ceil(len(self.weights) / replicas) * replicas

    def draws(self) -> list[int]:
        """The global list, the same on every rank."""
        import torch

        n = len(self.weights)
        gen = torch.Generator().manual_seed(self.seed + self.epoch)  # as DistributedSampler
        drawn = torch.multinomial(torch.tensor(self.weights, dtype=torch.float64), n,
                                  replacement=True, generator=gen).tolist()
        return drawn + drawn[:self.total - n]

    def __iter__(self) -> Iterator[int]:
        return iter(self.draws()[self.rank::self.replicas])

    def __len__(self) -> int:
        return self.total // self.replicas


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
        missing = cache.lookup(samples)[1] if cache is not None else list(
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



def steps_per_epoch(n: int, batch_size: int, *, features: bool) -> int:
    """Optimizer steps per epoch: per-rank batches of a shard, or global batches of features."""
    w = planned_world()
    if features:
        return max(1, math.ceil(n / (batch_size * w)))
    return max(1, math.ceil(math.ceil(n / w) / batch_size))
