"""The feature cache's chunked store at 2,000 to 50,000 images, against one whole-tensor file.

Issue 19: a 50,000-image cache must neither load whole into RAM nor rewrite itself to add one
image. Each job runs in a fresh process (its peak RSS is its own) on synthetic 1,280-wide
features of in-memory samples (no backbone: this measures the store alone): a cold write of
every row, a warm read of every row, and one new image added to a full entry. The baseline, in
the same run, is the single-file form tlreg 0.1 used (one safetensors file of every row,
checksummed, rewritten whole on every update, read whole).

    python -m bench.feature_store [--quick]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench._report import machine, write_section

DIM = 1280
JOB = r"""
import hashlib, json, resource, sys, time
from pathlib import Path
import torch
from tlreg.data.features import FeatureCache, FeatureKey, cached_features
from tlreg.data.sources import Sample

store, n, root, job = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
dim = int(sys.argv[5])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
count = n + (job == "append")
samples = [Sample(f"img{i}", 0, data=i.to_bytes(4, "little")) for i in range(count)]
g = torch.Generator().manual_seed(0)

def compute(pos):
    return torch.randn(len(pos), dim, generator=g), []

def written():
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())

before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
t0 = time.perf_counter()
if store == "chunks":
    out, _ = cached_features(samples, compute, FeatureCache(root, FeatureKey.of("b", "w", {}, "t")))
else:  # one file, rewritten whole: load, verify, append, checksum, save
    from safetensors.torch import load_file, save_file
    path = root / "features.safetensors"
    rows = load_file(path)["features"] if path.exists() else torch.empty(0, dim)
    if path.exists():
        meta = json.loads((root / "sha256.json").read_text())
        assert hashlib.sha256(rows.numpy().tobytes()).hexdigest() == meta["sha256"]
    if rows.shape[0] < count:
        rows = torch.cat([rows, compute(range(rows.shape[0], count))[0]])
        root.mkdir(parents=True, exist_ok=True)
        save_file({"features": rows}, str(path))
        (root / "sha256.json").write_text(json.dumps(
            {"sha256": hashlib.sha256(rows.numpy().tobytes()).hexdigest()}))
    out = rows
seconds = time.perf_counter() - t0
assert out.shape == (count, dim)
changed = sum(p.stat().st_size for p in root.rglob("*") if p.is_file()
              and before.get(p) != p.stat().st_mtime_ns)
print(json.dumps({"seconds": seconds, "written_bytes": changed, "disk_bytes": written(),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "import_rss_mb": base / 1024}))
"""


def measure(store: str, n: int, root: Path, job: str) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-c", JOB, store, str(n), str(root), job, str(DIM)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{store} {job} at {n}: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.splitlines()[-1])


def run(quick: bool = False) -> None:
    sizes = (200, 1000) if quick else (2000, 20000, 50000)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            for store in ("chunks", "one-file"):
                root = Path(tmp) / f"{store}-{n}"
                for job in ("cold", "warm", "append"):
                    r = measure(store, n, root, job)
                    rows.append({"store": store, "images": n, "job": job, **r})
                    print(f"{store:8s} {n:6d} {job:6s} {r['seconds']:6.2f} s "
                          f"wrote {r['written_bytes'] / 2**20:8.2f} MB "
                          f"peak {r['peak_rss_mb']:6.0f} MB", flush=True)
    if quick:
        return
    by = {(r["store"], r["images"], r["job"]): r for r in rows}
    body = [
        "## Feature cache store: chunks vs one file (issue 19)",
        "",
        f"`python -m bench.feature_store` on {machine()}. Synthetic {DIM}-wide float32 "
        "features of in-memory samples (no backbone: the store alone), each job a fresh "
        "process. *chunks*: tlreg's store (safetensors chunks of at most 4,096 rows, each with "
        "its images and checksum); *one file*: the whole tensor in one checksummed file, "
        "rewritten on every update (tlreg 0.1's form). *append* adds one image to the full "
        "entry. Peak RSS includes about "
        f"{rows[0]['import_rss_mb']:.0f} MB of `import torch`.",
        "",
        "| images | job | chunks s | one file s | chunks writes | one file writes | "
        "chunks peak RSS | one file peak RSS |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for n in sizes:
        for job in ("cold", "warm", "append"):
            c, o = by[("chunks", n, job)], by[("one-file", n, job)]
            body.append(
                f"| {n:,} | {job} | {c['seconds']:.2f} | {o['seconds']:.2f} | "
                f"{_mb(c['written_bytes'])} | {_mb(o['written_bytes'])} | "
                f"{c['peak_rss_mb']:.0f} MB | {o['peak_rss_mb']:.0f} MB |")
    write_section("feature-store", "\n".join(body))
    print("\n".join(body))


def _mb(n: int) -> str:
    return f"{n / 2**20:.3f} MB" if n < 2**20 else f"{n / 2**20:.0f} MB"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    run(parser.parse_args().quick)
