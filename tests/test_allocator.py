"""`reuse_freed_memory`: CPU runs keep freed blocks for reuse instead of faulting them in again.

Measured by the page faults (`ru_minflt`) of re-allocating a 64 MB tensor 20 times, in a fresh
process (the heap's earlier history changes what glibc does): glibc maps and unmaps a block
that large on every allocation, unless tlreg has turned that off for the run; and what the run
kept is handed back when it ends (resident memory, MB).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tlreg.engine.runtime import _glibc

pytestmark = pytest.mark.skipif(_glibc() is None, reason="glibc's mallopt (Linux)")

ROUNDS = 20
PAGES = 64 * 1024 * 1024 // 4096  # faulted in by one round outside

SCRIPT = f"""
import json, resource, sys, torch
from tlreg.engine.runtime import reuse_freed_memory

def faults():
    for _ in range(5):  # warm: the heap grows to hold the block in the first rounds
        torch.empty(16 * 1024 * 1024).fill_(1.0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range({ROUNDS}):
        torch.empty(16 * 1024 * 1024).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) // 1024

outside = faults()
with reuse_freed_memory(sys.argv[1]):
    with reuse_freed_memory(sys.argv[1]):  # an inner use (a report's predict) ending early
        pass
    inside = faults()
    torch.empty(64 * 1024 * 1024).fill_(1.0)  # 256 MB, freed at once
    kept = rss_mb()
print(json.dumps({{"outside": outside, "inside": inside, "kept": kept, "after": rss_mb()}}))
"""


def measure(device: str, **env: str) -> dict[str, int]:
    import os

    environ = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_MAX_"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, device], capture_output=True,
                         text=True, check=True, env={**environ, **env})
    return json.loads(out.stdout)


def test_freed_memory_is_reused_inside_and_handed_back_after() -> None:
    """Inside stays fast after a nested use ends; the outermost end hands memory back."""
    got = measure("cpu")
    assert got["outside"] >= ROUNDS * PAGES * 0.9, got  # every round faults its pages in
    assert got["inside"] < got["outside"] / 4, got  # measured: 0-4 rounds' worth
    assert got["after"] < got["kept"] - 128, got  # the heap is trimmed: the 256 MB go back


def test_left_alone_off_the_cpu_and_where_the_user_tuned_glibc() -> None:
    for got in (measure("cuda:0"), measure("cpu", MALLOC_MMAP_MAX_="65536")):
        assert got["inside"] >= ROUNDS * PAGES * 0.9, got
