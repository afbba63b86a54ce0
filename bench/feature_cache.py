"""Feature-extract for 10 epochs: tlreg's feature cache vs recomputing the frozen backbone.

The baseline is what the classic tutorial code does in fixed-feature-extractor mode: the same
model and data, the backbone run on every step of every epoch (under no_grad, frozen). tlreg
computes each image's pooled features once, then trains the head on them; a second run reads
the disk cache and runs no backbone forward at all. All three are timed in one process.

    python -m bench.feature_cache [--quick]
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._report import HYMENOPTERA, machine, write_section


def recompute_loop(data: Path, backbone: str, epochs: int, batch_size: int, img_size: int | None,
                   workers: int) -> dict[str, Any]:
    """Frozen backbone forward on every step (the classic feature-extractor loop)."""
    import torch

    import tlreg
    from tlreg.data.images import build_transform, data_config_for, make_loader
    from tlreg.data.sources import open_source

    split = open_source(data, None, 0)
    torch.manual_seed(0)
    model = tlreg.create_model(backbone, len(split.classes), pretrained=False,
                               policy="feature-extract")
    cfg = data_config_for(model.data_config, img_size)
    tf = build_transform(cfg, train=False)
    opt = torch.optim.AdamW(model.head.parameters(), lr=1e-3, weight_decay=0.01)
    loss_fn = torch.nn.CrossEntropyLoss()
    t0 = time.perf_counter()
    acc = 0.0
    for epoch in range(epochs):
        model.train()
        for batch in make_loader(split.train, tf, batch_size=batch_size, shuffle=True,
                                 seed=epoch, workers=workers):
            if not len(batch.labels):
                continue
            logits = model(batch.images)
            loss = loss_fn(logits, batch.labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        correct = total = 0
        with torch.no_grad():
            for batch in make_loader(split.val, tf, batch_size=batch_size, shuffle=False,
                                     seed=0, workers=workers):
                correct += (model(batch.images).argmax(1) == batch.labels).sum().item()
                total += len(batch.labels)
        acc = correct / max(1, total)
    return {"seconds": time.perf_counter() - t0, "val_accuracy": acc}


def tlreg_run(data: Path, backbone: str, epochs: int, batch_size: int, img_size: int | None,
              workers: int, out: Path, cache_dir: Path) -> dict[str, Any]:
    from tlreg.engine.trainer import fit

    t0 = time.perf_counter()
    result = fit(data=str(data), out=str(out), backbone=backbone, pretrained=False,
                 policy="feature-extract", epochs=epochs, batch_size=batch_size,
                 img_size=img_size, workers=workers, quiet=True, cache_dir=str(cache_dir))
    return {"seconds": time.perf_counter() - t0,
            "val_accuracy": result.summary["val_accuracy"],
            "feature_seconds": result.summary["feature_seconds"]}


def run(quick: bool = False) -> None:
    data = HYMENOPTERA
    backbone, img_size, epochs = ("timm:resnet18", None, 10)
    if quick:
        backbone, img_size, epochs = ("timm:test_resnet", 32, 2)
    workers = min(2, os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        cold = tlreg_run(data, backbone, epochs, 32, img_size, workers, t / "a", t / "cache")
        warm = tlreg_run(data, backbone, epochs, 32, img_size, workers, t / "b", t / "cache")
        base = recompute_loop(data, backbone, epochs, 32, img_size, workers)
    rows = [
        ("recompute the backbone every step (classic)", base),
        ("tlreg, feature cache cold (one backbone pass)", cold),
        ("tlreg, feature cache warm (no backbone pass)", warm),
    ]
    body = [
        "## Feature caching: 10 feature-extract epochs",
        "",
        f"`python -m bench.feature_cache` on {machine()}.",
        f"Data: hymenoptera (245 train, 153 val), backbone `{backbone}` (random init: the "
        f"speed is the same as pretrained), batch 32, {epochs} epochs, {workers} workers; all "
        "three in one process, so the baseline gets the thread placement tlreg sets (1 "
        "intra-op thread beside 2 workers, the faster setting on 2 cores).",
        "",
        "| run | seconds | speed-up vs recompute | val accuracy |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, r in rows:
        ratio = base["seconds"] / r["seconds"] if r["seconds"] else math.inf
        body.append(f"| {name} | {r['seconds']:.1f} | {ratio:.1f}x | {r['val_accuracy']:.3f} |")
    if quick:
        print("\n".join(body))
        return
    write_section("feature-cache", "\n".join(body))
    print("\n".join(body))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    run(parser.parse_args().quick)
