"""Cost per image from 2,000 to 50,000 images: is every job flat as the data set grows?

Issue 19. Image folders of N JPEGs are generated from seeded random crops and flips of the
hymenoptera photos (long side 400-640 px, 4:3 and 3:4, like the photos users bring), outside
the repo (`--root`, default `$TLREG_BENCH_ROOT` or ~/.cache/tlreg-bench/scale) and reused while
their manifest matches. Each job is the real `tlreg` CLI in a fresh process, timed from the
outside; peak RSS is the largest single process of its tree (`RUSAGE_CHILDREN` of a wrapper
that runs only that job). Jobs: the feature pass with a cold and a warm cache, one fine-tuning
epoch, `rank` of two backbones, `audit`, batched `predict` of the val folder.

    python -m bench.scale                          # 2,000 / 20,000 / 50,000 (hours on 2 cores)
    python -m bench.scale --sizes 2000,20000 --jobs features,predict
    python -m bench.scale --quick                  # tiny sizes, for CI; touches nothing in the repo
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench._report import HYMENOPTERA, environment, machine, write_section

RESULTS = Path(__file__).resolve().parent / "results"
JOBS = ("features-cold", "features-warm", "finetune", "rank", "audit", "predict")
SEED = 0
VAL_SHARE = 0.2
# Runs one command and prints its tree's largest RSS (KiB): the job's own, not the bench's.
WRAPPER = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
           "sys.exit(r.returncode)")


def _photos() -> list[tuple[str, Path]]:
    return [(p.parent.name, p) for split in ("train", "val")
            for p in sorted((HYMENOPTERA / split).glob("*/*.jpg"))]


def _make(args: tuple[int, str, str, str]) -> None:
    """One generated JPEG: a random crop of a photo, maybe mirrored, resized like a photo."""
    from PIL import Image, ImageOps

    i, src, dst, _ = args
    rng = random.Random(f"{SEED}-{i}")
    with Image.open(src) as im:
        im = im.convert("RGB")
        w, h = im.size
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        im = im.crop((x, y, x + cw, y + ch))
        if rng.random() < 0.5:
            im = ImageOps.mirror(im)
        long = rng.randint(400, 640)
        size = (long, long * 3 // 4) if rng.random() < 0.7 else (long * 3 // 4, long)
        im.resize(size, Image.Resampling.BILINEAR).save(dst, quality=85)


def generate(root: Path, n: int) -> Path:
    """DATA/{train,val}/{ants,bees}/*.jpg with `n` images in all; reused when it matches."""
    folder = root / f"scale-{n}"
    manifest = {"seed": SEED, "images": n, "val_share": VAL_SHARE, "version": 1}
    if (folder / "manifest.json").is_file() and json.loads(
            (folder / "manifest.json").read_text()) == manifest:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    photos = _photos()
    if not photos:
        raise SystemExit(f"no photos under {HYMENOPTERA}")
    rng = random.Random(SEED)
    tasks = []
    for i in range(n):
        label, src = photos[rng.randrange(len(photos))]
        split = "val" if rng.random() < VAL_SHARE else "train"
        dst = folder / split / label / f"{i:06d}.jpg"
        dst.parent.mkdir(parents=True, exist_ok=True)
        tasks.append((i, str(src), str(dst), label))
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(_make, tasks, chunksize=64))
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def measure(args: list[str], cwd: Path) -> dict[str, Any]:
    """Wall seconds and peak RSS of `tlreg ARGS` in a fresh process; raises if it fails."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", WRAPPER, sys.executable, "-m", "tlreg", *args],
                          capture_output=True, text=True, cwd=cwd)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"tlreg {' '.join(args)} failed ({proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    rss_kib = int(proc.stderr.strip().splitlines()[-1])
    return {"seconds": seconds, "peak_rss_mb": rss_kib / 1024}


def run_size(data: Path, work: Path, *, jobs: list[str], backbones: tuple[str, str],
             img_size: int, workers: int) -> list[dict[str, Any]]:
    """Every job on one data set, in order (the warm feature pass and predict need the cold
    run), each from a clean cache folder of its own."""
    n = sum(1 for _ in data.glob("*/*/*.jpg"))
    val = sum(1 for _ in (data / "val").glob("*/*.jpg"))
    model = ["--backbone", backbones[0], "--no-pretrained", "--img-size", str(img_size)]
    common = ["--workers", str(workers), "--quiet"]
    cache = {k: work / f"cache-{k}" for k in ("fe", "ft", "rank")}
    fe = ["train", str(data), *model, *common, "--policy", "feature-extract", "--epochs", "1",
          "--no-report", "--cache-dir", str(cache["fe"])]
    plans: dict[str, tuple[list[str], Path | None, int]] = {
        "features-cold": ([*fe, "--out", str(work / "fe-cold")], cache["fe"], n),
        "features-warm": ([*fe, "--out", str(work / "fe-warm")], cache["fe"], n),
        "finetune": (["train", str(data), *model, *common, "--policy", "finetune", "--epochs",
                      "1", "--no-lp-ft", "--no-report", "--cache-dir", str(cache["ft"]),
                      "--out", str(work / "ft")], cache["ft"], n),
        "rank": (["rank", str(data), "--backbones", ",".join(backbones), "--no-pretrained",
                  "--img-size", str(img_size), "--workers", str(workers), "--quiet", "--json",
                  "--cache-dir", str(cache["rank"])], cache["rank"], n),
        "audit": (["audit", str(data), *model, "--workers", str(workers), "--json",
                   "--cache-dir", str(cache["rank"]),
                   *([] if _has("cleanlab") else ["--no-label-issues"])], cache["rank"], n),
        "predict": (["predict", str(work / "fe-cold"), str(data / "val"), "--batch-size", "64",
                     "--json"], None, val),
    }
    if "predict" in jobs and "features-cold" not in jobs:
        jobs = ["features-cold", *jobs]
    rows = []
    for job in [j for j in JOBS if j in jobs]:
        args, folder, images = plans[job]
        r = measure(args, work)
        rows.append({"job": job, "images": images, "dataset_images": n, **r,
                     "ms_per_image": 1000 * r["seconds"] / max(1, images),
                     "cache_bytes": _du(folder) if folder is not None else None,
                     "cache_parts": {k: _du(folder / k) for k in ("features", "decoded")}
                     if folder is not None else None})
        print(f"{n:7d} {job:14s} {r['seconds']:8.1f} s {rows[-1]['ms_per_image']:7.1f} ms/img "
              f"peak {r['peak_rss_mb']:6.0f} MB", flush=True)
    return rows


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def table(rows: list[dict[str, Any]]) -> str:
    base = {r["job"]: r for r in rows if r["dataset_images"] == min(
        x["dataset_images"] for x in rows)}
    out = ["| job | images | wall s | ms / image | vs smallest | peak RSS | cache on disk |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in sorted(rows, key=lambda r: (JOBS.index(r["job"]), r["dataset_images"])):
        ratio = r["ms_per_image"] / base[r["job"]]["ms_per_image"] if r["job"] in base else None
        cache = "-" if r["cache_bytes"] is None else _size(r["cache_bytes"])
        out.append(f"| {r['job']} | {r['images']:,} | {r['seconds']:.1f} | "
                   f"{r['ms_per_image']:.1f} | {'-' if ratio is None else f'{ratio:.2f}x'} | "
                   f"{r['peak_rss_mb']:.0f} MB | {cache} |")
    return "\n".join(out)


def _size(n: int) -> str:
    return f"{n / 2**20:.0f} MB" if n >= 2**20 else f"{n / 1024:.0f} KB"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="2000,20000,50000")
    p.add_argument("--jobs", default=",".join(JOBS))
    p.add_argument("--backbones", default="timm:test_efficientnet,timm:test_resnet",
                   help="the first is every job's model; rank scores both")
    p.add_argument("--img-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--root", type=Path, default=Path(os.environ.get(
        "TLREG_BENCH_ROOT", "~/.cache/tlreg-bench/scale")).expanduser())
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-doc", action="store_true", help="print the table only")
    a = p.parse_args(argv)
    jobs = [j.strip() for j in a.jobs.split(",")]
    unknown = sorted(set(jobs) - set(JOBS))
    if unknown:
        p.error(f"unknown job(s) {', '.join(unknown)}; known: {', '.join(JOBS)}")
    sizes = [32, 96] if a.quick else [int(s) for s in a.sizes.split(",")]
    img = 64 if a.quick else a.img_size
    backbones = tuple(a.backbones.split(","))[:2]
    if len(backbones) != 2:
        p.error("--backbones takes two names")
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) if a.quick else a.root
        for n in sizes:
            data = generate(root, n)
            work = Path(tmp) / f"work-{n}"
            work.mkdir()
            # --quick: every job once, then one more size for the cost-per-image column
            todo = ["features-cold", "predict"] if a.quick and n != sizes[0] else jobs
            rows += run_size(data, work, jobs=todo, backbones=backbones,  # type: ignore[arg-type]
                             img_size=img, workers=a.workers)
    print(table(rows))
    print(f"bench.scale: {time.perf_counter() - t0:.0f} s")
    if a.quick or a.no_doc:
        return
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"scale-{stamp}.json").write_text(json.dumps(
        {"environment": environment(), "backbones": backbones, "img_size": img,
         "rows": rows}, indent=1))
    write_section("scale", "\n".join([
        "## Scale: cost per image as the data set grows (issue 19)", "",
        f"`python -m bench.scale --sizes {','.join(map(str, sizes))}` on {machine()}. "
        f"Generated JPEG folders (crops and flips of the hymenoptera photos, 400-640 px, "
        f"{int(VAL_SHARE * 100)}% val), `{backbones[0]}` at {img} px (random init: the speed "
        f"is the pretrained one's), `rank` of {' and '.join(backbones)}; every job the `tlreg` "
        "CLI in a fresh process (start-up included), peak RSS of its largest process, "
        "ms / image over the images the job reads (predict: the val folder). *vs smallest*: "
        "cost per image against the smallest size (the target: within 1.25x).", "",
        table(rows)]))


def run(quick: bool = False) -> None:
    main(["--quick"] if quick else [])


if __name__ == "__main__":
    main()
