"""SIGKILL at every visible step of an export: the old or the new artifact, never neither.

Export, `export --format timm` and `pull --dir` all write through
`tlreg.sharing.save.write_folder_atomically`; the child process below counts that function's
file-system steps (renames, replaces, removals) and kills itself at step N, for every N.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
from images import colour_folder

from tlreg.engine.trainer import fit
from tlreg.sharing.api import load_artifact
from tlreg.sharing.exporters import export_run

# Counts the visible file-system steps (renames, replaces, removals, links) and SIGKILLs the
# process at step argv[1]; then runs the code that follows it.
KILLER = r"""
import os, shutil, signal, sys
kill_at, steps = int(sys.argv[1]), [0]
def step(fn):
    def wrapped(*a, **k):
        steps[0] += 1
        if steps[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return fn(*a, **k)
    return wrapped
os.replace, os.rename, shutil.rmtree, os.unlink, os.link = (
    step(os.replace), step(os.rename), step(shutil.rmtree), step(os.unlink), step(os.link))
"""
CHILD = KILLER + r"""
from tlreg.sharing.exporters import export_run
export_run(sys.argv[2], sys.argv[3])
print("steps", steps[0])
"""


def _head_digest(folder: Path) -> str:
    return hashlib.sha256((folder / "head.safetensors").read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("kill")
    data = colour_folder(root / "data", per_class=3, val_per_class=2)
    out = []
    for seed in (0, 1):
        fit(data=str(data), out=str(root / f"run{seed}"), backbone="timm:test_resnet",
            pretrained=False, img_size=32, workers=0, quiet=True, device="cpu",
            policy="feature-extract", epochs=1, seed=seed, cache_dir=str(root / "cache"))
        out.append(root / f"run{seed}")
    return out[0], out[1]


@pytest.mark.slow
def test_sigkill_at_every_step_of_an_export(runs: tuple[Path, Path], tmp_path: Path) -> None:
    old_run, new_run = runs
    probe = export_run(new_run, tmp_path / "probe")
    new = _head_digest(probe)
    export_run(old_run, tmp_path / "dry")  # count the steps of an export over an export
    dry = subprocess.run([sys.executable, "-c", CHILD, "0", str(new_run), str(tmp_path / "dry")],
                         capture_output=True, text=True, check=True)
    total = int(dry.stdout.split()[-1])
    assert total >= 3  # the swap: old aside, new in, old removed
    for kill_at in range(1, total + 1):
        target = tmp_path / f"art{kill_at}"
        old = _head_digest(export_run(old_run, target))
        proc = subprocess.run([sys.executable, "-c", CHILD, str(kill_at), str(new_run),
                               str(target)], capture_output=True, text=True)
        assert proc.returncode == -9, (kill_at, proc.stderr)
        # What the next reader finds is complete: the old artifact or the new one.
        found = load_artifact(target)
        assert found.info.num_classes == 2
        seen = target if target.is_dir() else target.with_name(f".{target.name}.old")
        assert _head_digest(seen) in (old, new), kill_at
        # And the next writer completes and leaves nothing behind.
        export_run(new_run, target)
        assert _head_digest(target) == new
        # (a killed writer's own .tmp- folder stays: another exporter may be writing one)
        leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(f".{target.name}.")
                     and not p.name.startswith(f".{target.name}.tmp-")]
        assert leftovers == [], (kill_at, leftovers)


RUN_CHILD = KILLER + r"""
from tlreg.engine.trainer import fit
fit(data=sys.argv[2], out=sys.argv[3], backbone="timm:test_resnet", pretrained=False,
    img_size=32, workers=0, quiet=True, device="cpu", policy="feature-extract", epochs=1,
    cache_dir=sys.argv[4])
print("steps", steps[0])
"""


@pytest.mark.slow
def test_sigkill_at_every_write_step_of_a_run(tmp_path: Path) -> None:
    """Killed at any rename or removal, a run resumes (or, before its first epoch, starts
    again under the same --out) and ends with the uninterrupted run's weights."""
    import torch

    from tlreg._io import read_checkpoint
    from tlreg.errors import UsageError

    data = colour_folder(tmp_path / "data", per_class=3, val_per_class=2)
    ref = subprocess.run([sys.executable, "-c", RUN_CHILD, "0", str(data), str(tmp_path / "ref"),
                          str(tmp_path / "cache-ref")], capture_output=True, text=True, check=True)
    total = int(ref.stdout.split()[-1])
    want, _, _ = read_checkpoint(tmp_path / "ref" / "checkpoints" / "last")
    for kill_at in range(1, total + 1):
        out = tmp_path / f"run{kill_at}"
        cache = str(tmp_path / f"cache{kill_at}")  # cold, as the reference's was: same steps
        proc = subprocess.run([sys.executable, "-c", RUN_CHILD, str(kill_at), str(data),
                               str(out), cache], capture_output=True, text=True)
        if proc.returncode == 0:  # the last step or two (clean-ups) vary from run to run
            assert kill_at > total - 3, (kill_at, total)
            continue
        assert proc.returncode == -9, (kill_at, proc.stderr)
        try:
            fit(resume=out)
        except UsageError as exc:
            assert ("no completed epoch was saved" in str(exc)
                    or "is not a tlreg run (no config.yaml)" in str(exc)), (kill_at, exc)
            fit(data=str(data), out=str(out), backbone="timm:test_resnet", pretrained=False,
                img_size=32, workers=0, quiet=True, device="cpu", policy="feature-extract",
                epochs=1, cache_dir=cache)
        got, _, _ = read_checkpoint(out / "checkpoints" / "last")
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), (kill_at, k)
