"""What the model is fed: image batches (decoded once, or from files) and frozen features.

Either way a pass is batches of (inputs, labels) on the device, in an order and with an
augmentation that depend only on the seed; under DDP each rank gets its shard.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from tlreg.engine import distributed, objective, sharding
from tlreg.errors import UsageError

if TYPE_CHECKING:
    import torch

    from tlreg.data.augment import Augment
    from tlreg.data.decoded import DecodedImages
    from tlreg.data.sources import DataSplit, Sample
    from tlreg.engine.config import TrainConfig
    from tlreg.engine.objective import Evaluation
    from tlreg.engine.runtime import Runtime
    from tlreg.models.transfer import TransferModel

_DECODE_CHUNK = 1024  # images decoded at a time by the CPU feature pass

Batches = Iterator[tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]]


def require_readable(samples: Sequence[Sample], failed: int) -> None:
    """A split none of whose images decodes is an error, not a run that 'trains' on nothing."""
    if samples and failed >= len(samples):
        try:
            folder = os.path.commonpath([s.path for s in samples])
        except ValueError:  # paths on different drives, or relative and absolute mixed
            folder = os.path.dirname(samples[0].path)
        raise UsageError(f"none of the {len(samples)} images under {folder} could be read "
                         f"(first: {samples[0].path}); nothing to train or evaluate on")


class Inputs:
    """A run's images as model inputs; remembers the files it could not read."""

    def __init__(self, config: TrainConfig, data_config: dict[str, Any], runtime: Runtime,
                 say: Callable[[str], None]) -> None:
        self.config, self.data_config, self.runtime, self.say = config, data_config, runtime, say
        self.skipped: set[str] = set()
        self.decoded_train: DecodedImages | None = None
        self.decoded_val: DecodedImages | None = None
        self.streamed = False  # `stream` mode: decoded every epoch, batches augmented as cached
        self._unreadable: dict[bool, set[int]] = {True: set(), False: set()}  # met by streaming
        self._extract: torch.nn.Module | None = None  # the feature pass's folded backbone
        self._said_off = False  # an explicit --decoded-cache that cannot apply, said once
        self._labels_of: dict[tuple[int, int, bool], tuple[torch.Tensor, list[float] | None]] = {}

    def note_skipped(self, paths: list[str]) -> None:
        for path in paths:
            if path not in self.skipped:
                self.skipped.add(path)
                warnings.warn(f"skipped unreadable image {path}", stacklevel=2)

    def gather_skipped(self) -> None:
        """Under DDP each rank met the unreadable files of its own shard: every rank gets all."""
        if distributed.world() > 1:
            self.skipped = set().union(*distributed.all_gather_object(sorted(self.skipped)))

    # -- decoding once -----------------------------------------------------------------------

    def decoded_mode(self) -> str:
        """`--decoded-cache`, off when the cache cannot give exact eval inputs (`auto` is
        resolved per use: `prepare` sizes the data set, the feature pass's chunks are memory)."""
        from tlreg.data.decoded import unsupported

        cfg = self.config
        mode = cfg.decoded_cache
        why = unsupported(self.data_config) if mode != "off" else None
        if why is not None:
            if cfg.decoded_cache != "auto" and not self._said_off:
                self.say(f"note: --decoded-cache {mode} is off for {why}")
                self._said_off = True
            return "off"
        return mode

    def decode_images(self, samples: Sequence[Sample], mode: str,
                      need: int | None = None) -> DecodedImages | None:
        """`decode_all` with this run's budget, workers and cache folder; None over budget."""
        from tlreg.data.decoded import decode_all

        cfg = self.config
        mode = "memory" if mode in ("auto", "stream") else mode  # a chunk of a feature pass
        return decode_all(samples, self.data_config, mode=mode,
                          workers=cfg.workers, max_bytes=int(cfg.decoded_cache_gb * 2**30),
                          cache_dir=cfg.cache_dir, need=need)

    def choose_decoded_mode(self, data: DataSplit) -> tuple[str, list[int]]:
        """`auto` for the whole run, decided before any decoding from the image headers, and
        said in one line when it is not `memory`; returns (mode, decoded bytes of train, val)."""
        from tlreg.data.decoded import (
            choose_mode,
            disk_folder,
            estimate_bytes,
            free_bytes,
            short_side_for,
        )

        cfg = self.config
        short = short_side_for(self.data_config)
        need = [estimate_bytes(data.train, short), estimate_bytes(data.val, short)]
        folder = disk_folder(data.train, self.data_config, cfg.cache_dir)
        budget = int(cfg.decoded_cache_gb * 2**30)
        mode = choose_mode(sum(need), budget, free_bytes(folder))
        gib = f"{sum(need) / 2**30:.2f} GiB decoded, over the {budget / 2**30:.2f} GiB memory " \
              "budget (--decoded-cache-gb)"
        if mode == "disk":
            self.say(f"decoded-image cache: {gib}: memory-mapped on disk under "
                     f"{folder.parent}")
        elif mode == "stream":
            self.say(f"decoded-image cache: {gib} and more than half the free disk under "
                     f"{folder.parent}: stream (decoded again every epoch, augmented in "
                     "batches)")
        return mode, need

    def prepare(self, data: DataSplit, augment: Augment) -> None:
        """Transforms for the image passes, and the decoded-image caches when they apply."""
        from tlreg.data.batched import BatchAugment, BatchEval, batch_unsupported
        from tlreg.data.images import build_transform

        cfg = self.config
        self.train_tf = build_transform(self.data_config, train=bool(cfg.augment),
                                        augment=augment)
        self.val_tf = build_transform(self.data_config, train=False)
        self.decoded_train = self.decoded_val = None
        # Only the image path gets here: the backbone trains (or --augment is on), so decoding
        # every epoch is the cost to avoid; `auto` (the default) keeps it in memory.
        mode = self.decoded_mode()
        if mode == "off":
            return
        knob = batch_unsupported(augment) if cfg.augment else None
        if knob is not None:  # said once: prepare runs once per run
            self.say(f"note: the decoded-image cache's batched augmentation cannot apply {knob}; "
                     "training images are decoded and augmented one at a time by timm's "
                     "transform")
            return
        need: list[int | None] = [None, None]
        chosen = mode == "auto"
        if chosen:
            mode, sizes = self.choose_decoded_mode(data)  # says why when not `memory`
            need = [*sizes]
        self.train_batch_tf = BatchAugment(
            self.data_config, scale=(augment.crop_scale, 1.0) if augment.crop_scale else None,
            hflip=augment.hflip, jitter=augment.color_jitter, reprob=augment.reprob,
        ) if cfg.augment else BatchEval(self.data_config)
        self.eval_batch_tf = BatchEval(self.data_config)
        t0 = time.perf_counter()
        train = val = None
        if mode != "stream":
            train = self.decode_images(data.train, mode, need[0])
            val = self.decode_images(data.val, mode, need[1]) if train is not None else None
        if mode == "stream":
            self.streamed = True
            if not chosen:
                self.say("decoded-image cache: stream (decoded again every epoch, augmented "
                         "in batches)")
            return
        if train is None or val is None:  # over budget or unwritable (said): the per-image path
            return
        self.decoded_train, self.decoded_val = train, val
        self.runtime.set_threads(loader_workers=0)  # from here on no worker process decodes
        self.note_skipped([data.train[i].path for i in train.failed]
                          + [data.val[i].path for i in val.failed])
        self.say(f"decoded {len(data.train) + len(data.val)} images once "
                 f"in {time.perf_counter() - t0:.1f}s ({mode})")

    # -- image passes ------------------------------------------------------------------------

    def _labels(self, samples: Sequence[Sample], *, balanced: bool
                ) -> tuple[torch.Tensor, list[float] | None]:
        """The samples' labels as a tensor and, for `--sampler balanced`, their draw weights:
        computed on a split's first pass and reused by every later epoch."""
        import torch

        from tlreg.engine.objective import balanced_sample_weights

        # Keyed by the split's identity: the run's train and val lists live as long as it does.
        key = (id(samples), len(samples), balanced)
        if key not in self._labels_of:
            ints = [s.label for s in samples]
            weights = balanced_sample_weights(ints, max(ints) + 1) if balanced and ints else None
            self._labels_of[key] = (torch.tensor(ints), weights)
        return self._labels_of[key]

    def batches(self, samples: Sequence[Sample], *, train: bool, seed: int,
                epoch: int = 0) -> tuple[int, Batches]:
        """(number of batches, iterator of CPU (images, labels, sample indices)) for one pass.

        From the decoded cache when there is one (batched tensor transforms), else from a
        DataLoader over the files. Either way the order and augmentation depend only on seed.
        Under DDP this rank's shard only: the DistributedSampler's order, the same on every
        rank, with each sample's augmentation seeded from (seed, its index).
        """
        import torch

        from tlreg.data.images import make_loader

        cfg = self.config
        labels, weights = self._labels(samples, balanced=train and cfg.sampler == "balanced")
        sampler = sharding.sampler(len(samples), shuffle=train, seed=seed, epoch=epoch,
                                   weights=weights)
        decoded = self.decoded_train if train else self.decoded_val
        if decoded is not None:
            order = [i for i in sampler if decoded.images[i] is not None]
            transform = self.train_batch_tf if train else self.eval_batch_tf

            def from_cache() -> Batches:
                for i in range(0, len(order), cfg.batch_size):
                    idx = order[i:i + cfg.batch_size]
                    yield (transform([decoded.images[j] for j in idx], idx, seed), labels[idx],
                           torch.tensor(idx))

            return math.ceil(len(order) / cfg.batch_size), from_cache()
        if self.streamed:
            return self._streamed_batches(samples, sampler, labels, train=train, seed=seed)
        tf = self.train_tf if train else self.val_tf
        loader = make_loader(samples, tf, batch_size=cfg.batch_size, shuffle=train, seed=seed,
                             workers=cfg.workers,
                             pin_memory=self.runtime.device.type == "cuda",
                             sampler=sampler, per_sample_seed=seed if train else None)

        def from_files() -> Batches:
            for batch in loader:
                self.note_skipped([samples[i].path for i in batch.bad])
                if len(batch.labels):
                    yield batch.images, batch.labels, batch.indices

        return len(loader), from_files()

    def _streamed_batches(self, samples: Sequence[Sample], sampler: Any, labels: torch.Tensor,
                          *, train: bool, seed: int) -> tuple[int, Batches]:
        """`stream` mode: the cache's batches, decoded again in the workers for this pass."""
        import torch

        from tlreg.data.decoded import stream_batches

        unreadable = self._unreadable[train]
        order = [i for i in sampler if i not in unreadable]
        transform = self.train_batch_tf if train else self.eval_batch_tf

        def streamed() -> Batches:
            for images, idx in stream_batches(samples, order, self.data_config, transform,
                                              batch_size=self.config.batch_size, seed=seed,
                                              workers=self.config.workers, failed=unreadable):
                yield images, labels[idx], torch.tensor(idx)
            self.note_skipped([samples[i].path for i in sorted(unreadable)])

        return math.ceil(len(order) / self.config.batch_size), streamed()

    def evaluate(self, model: TransferModel, samples: Sequence[Sample],
                 smoothing: float) -> Evaluation:
        """(mean loss, labels, outputs) over every sample, gathered from all ranks."""
        import torch

        rt = self.runtime
        model.eval()
        rows: list[torch.Tensor] = []  # (sample index, label(s), output(s))
        losses: list[torch.Tensor] = []
        scores: list[torch.Tensor] = []  # the logits, kept for temperature scaling
        _, batches = self.batches(samples, train=False, seed=self.config.seed)
        with torch.inference_mode(), rt.autocast():
            for images, y_cpu, idx in batches:
                y = y_cpu.to(rt.device)
                logits = model(rt.to_device(images)).float()
                scores.append(logits)
                losses.append(objective.loss(logits, y, smoothing, reduction="none"))
                out = objective.outputs(logits, y)
                # One row per sample; multi-label rows are float (indices below 2**24 are exact).
                rows.append(torch.cat([idx.to(rt.device)[:, None].to(out.dtype),
                                       y.reshape(len(y), -1).to(out.dtype),
                                       out.reshape(len(y), -1)], 1))
        table = torch.cat(rows) if rows else torch.empty(0, 3, dtype=torch.long,
                                                         device=rt.device)
        loss = torch.cat(losses) if losses else torch.empty(0, device=rt.device)
        logits = (torch.cat(scores) if scores else
                  torch.empty(0, model.info.num_classes, device=rt.device))
        # Under DDP each rank saw its padded shard: one row per sample index, from all ranks.
        _, table, loss, logits = sharding.gather_by_index(table[:, 0], table, loss, logits)
        if len(table) == 0:
            require_readable(samples, len(samples))
        width = (table.shape[1] - 1) // 2
        labels, outs = table[:, 1:1 + width], table[:, 1 + width:]
        mean = loss.sum().item() / max(1, len(loss))
        if not table.is_floating_point():  # single-label: one column each
            return objective.Evaluation(mean, labels[:, 0].tolist(), outs[:, 0].tolist(),
                                        logits.cpu())
        return objective.Evaluation(mean, labels.long().tolist(), outs.tolist())

    # -- the frozen feature pass -------------------------------------------------------------

    def extractor(self, model: TransferModel) -> torch.nn.Module:
        """The frozen backbone with BatchNorm folded in, built once per run."""
        import torch

        if self._extract is None:
            self._extract = model.inference_features()
            if self.config.channels_last:
                self._extract.to(memory_format=torch.channels_last)
        return self._extract

    def features(self, model: TransferModel, samples: list[Sample],
                 cache: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Features and labels of the decodable samples (cache hits cost no forward pass)."""
        import torch

        from tlreg.data.batched import BatchEval
        from tlreg.data.features import cached_features
        from tlreg.data.images import build_transform, make_loader

        transform = build_transform(self.data_config, train=False)
        to_tensor = BatchEval(self.data_config)
        cfg, rt = self.config, self.runtime

        # CPU: decode a chunk in the workers, then run the backbone over it on every core.
        # Decoding while the forward pass runs would leave it fewer threads (OpenMP threads
        # spin-wait against busy workers); two phases that each use the whole machine made a
        # 2-core ResNet-18 feature pass 1.5x faster. Chunks bound memory (about 270 MB of uint8
        # at 256 px); the decoded tensors are the eval transform's exact input, so features and
        # their cache key are unchanged. On a GPU the loader's overlap with the device wins.
        mode = self.decoded_mode() if rt.device.type == "cpu" else "off"
        chunk = _DECODE_CHUNK if mode != "off" else None

        def batches(subset: list[Sample]) -> Iterator[tuple[torch.Tensor | None, list[int]]]:
            """(eval-transformed images or None, positions in `subset` that failed to decode)."""
            step = chunk or max(1, len(subset))
            decode = chunk is not None
            for start in range(0, len(subset), step):
                part = subset[start:start + step]
                decoded = self.decode_images(part, mode) if decode else None
                decode = decoded is not None  # over the budget once (said): not every chunk
                if decoded is None:
                    rt.set_threads(loader_workers=cfg.workers)
                    loader = make_loader(part, transform, batch_size=cfg.batch_size,
                                         shuffle=False, seed=cfg.seed, workers=cfg.workers,
                                         pin_memory=rt.device.type == "cuda")
                    for batch in loader:
                        yield ((batch.images if len(batch.labels) else None),
                               [start + i for i in batch.bad])
                    continue
                rt.set_threads(loader_workers=0)  # no worker decodes beside the backbone
                yield None, [start + i for i in decoded.failed]
                ok = [i for i, t in enumerate(decoded.images) if t is not None]
                for i in range(0, len(ok), cfg.batch_size):
                    yield to_tensor([decoded.images[j] for j in ok[i:i + cfg.batch_size]]), []

        def compute(positions: list[int]) -> tuple[torch.Tensor, list[int]]:
            out, failed = [], []
            model.eval()
            extract = self.extractor(model)
            with torch.inference_mode(), rt.autocast():
                for images, bad in batches([samples[i] for i in positions]):
                    failed += [positions[i] for i in bad]
                    if images is not None:
                        out.append(extract(rt.to_device(images)).float())
            feats = torch.cat(out) if out else torch.empty(0, model.feature_dim)
            return feats.cpu(), failed

        if distributed.world() > 1:  # each rank computes its shard; every rank gets all
            feats, failed = sharding.shard_features(samples, compute, cache,
                                                       model.feature_dim)
        else:
            feats, failed = cached_features(samples, compute, cache)
        self.note_skipped([samples[i].path for i in failed])
        require_readable(samples, len(failed))
        bad = set(failed)
        labels = torch.tensor([s.label for i, s in enumerate(samples) if i not in bad])
        return feats.to(rt.device), labels.to(rt.device)
