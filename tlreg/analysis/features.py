"""One backbone's frozen features of a data set, through the run's own feature cache.

`rank` and `audit` look at a data set through a backbone's features without training
anything. They compute them exactly as `tlreg train --policy feature-extract` does (the same
cache key: backbone name, weights hash, eval transform), so whichever of the three runs first
pays for the feature pass and the others read the cache.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from tlreg.data.sources import DataSplit, Sample
    from tlreg.models.transfer import TransferModel


@dataclass(frozen=True)
class DatasetFeatures:
    """Features and labels of a split's decodable images, and what the pass cost.

    `train_samples` / `val_samples` are the samples the rows belong to, in order (images that
    could not be decoded are left out and listed in `skipped`).
    """

    backbone: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    train_samples: tuple[Sample, ...]
    val_samples: tuple[Sample, ...]
    classes: tuple[str, ...]
    seconds: float  # the feature pass (0 where every image came from the cache)
    params: int  # the backbone's parameters
    feature_dim: int
    cached: bool  # whether a feature cache was used (read or written)
    skipped: tuple[str, ...] = ()
    data_config: dict[str, Any] = field(default_factory=dict)


def dataset_features(data: DataSplit, backbone: str, *, pretrained: bool = True,
                     weights: str | None = None, img_size: int | None = None,
                     cache: bool = True, cache_dir: str | None = None,
                     feature_dtype: str = "float32", device: str = "auto",
                     batch_size: int = 64, workers: int = 2,
                     say: Callable[[str], None] = lambda _: None,
                     model: TransferModel | None = None) -> DatasetFeatures:
    """`backbone`'s features of `data.train` and `data.val` (cached as training caches them).

    `model` reuses an already built model of that backbone (its head is ignored);
    `feature_dtype`: how the cache stores them (tlreg.data.features.FEATURE_DTYPES).
    """
    import torch

    from tlreg.data.features import FeatureCache, FeatureKey, cache_root
    from tlreg.data.images import build_transform, data_config_for
    from tlreg.engine.config import TrainConfig
    from tlreg.engine.inputs import Inputs
    from tlreg.engine.runtime import Runtime, autocast_dtype, resolve_device, reuse_freed_memory
    from tlreg.models.backbones import weights_sha256
    from tlreg.models.transfer import create_model

    config = TrainConfig(data=str(data.info.get("location", "")), out="", backbone=backbone,
                         pretrained=pretrained, weights=weights, batch_size=batch_size,
                         workers=workers, device=device, img_size=img_size, cache=cache,
                         cache_dir=cache_dir, feature_dtype=feature_dtype,
                         policy="feature-extract")
    if model is None:
        # the head goes unused; create_model wants 2 classes or more
        model = create_model(backbone, max(2, len(data.classes)), policy="feature-extract",
                             pretrained=pretrained, weights=weights,
                             label_names=tuple(data.classes))
    data_config = data_config_for(model.data_config, img_size)
    dev = resolve_device(device)
    runtime = Runtime(dev, autocast_dtype(config.precision, dev), config.channels_last)
    runtime.set_threads(loader_workers=workers)
    model = model.to(dev)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    store = None
    if cache:
        key = FeatureKey.of(backbone, weights_sha256(model.backbone.state_dict()), data_config,
                            build_transform(data_config, train=False))
        store = FeatureCache(cache_root(cache_dir), key, config.feature_dtype)
    inputs = Inputs(config, data_config, runtime, say)
    t0 = time.perf_counter()
    with reuse_freed_memory(dev):
        x_train, y_train = inputs.features(model, list(data.train), store)
        x_val, y_val = (inputs.features(model, list(data.val), store) if data.val
                        else (torch.empty(0, model.feature_dim),
                              torch.empty(0, dtype=torch.long)))
    seconds = time.perf_counter() - t0
    skipped = set(inputs.skipped)
    return DatasetFeatures(
        backbone=backbone, x_train=x_train, y_train=y_train, x_val=x_val, y_val=y_val,
        train_samples=tuple(s for s in data.train if s.path not in skipped),
        val_samples=tuple(s for s in data.val if s.path not in skipped),
        classes=tuple(data.classes), seconds=seconds,
        params=sum(p.numel() for p in model.backbone.parameters()),
        feature_dim=model.feature_dim, cached=store is not None,
        skipped=tuple(sorted(skipped)), data_config=_plain(data_config))


def _plain(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}
