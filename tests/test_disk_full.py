"""File-system faults: a full disk under the cache degrades it, under --out is one line."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from images import colour_folder


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 96 KiB tmpfs (root and a mount namespace that allows it; skipped elsewhere)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mount)],
            capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_cache_disk_turns_the_cache_off(tmp_path: Path, small_disk: Path) -> None:
    from tlreg.engine.trainer import fit

    data = colour_folder(tmp_path / "data", per_class=250, val_per_class=4)  # 500 x 48 floats
    with pytest.warns(UserWarning, match="feature cache off: cannot write .*No space left"):
        result = fit(data=str(data), out=str(tmp_path / "run"), backbone="timm:test_resnet",
                     pretrained=False, img_size=32, workers=0, quiet=True, device="cpu",
                     policy="feature-extract", cache_dir=str(small_disk / "cache"))
    assert result.summary["status"] == "completed" and result.summary["val_accuracy"] == 1.0


def test_a_full_output_disk_is_one_line(tmp_path: Path, small_disk: Path) -> None:
    data = colour_folder(tmp_path / "data", per_class=4, val_per_class=2)
    proc = subprocess.run(
        [sys.executable, "-m", "tlreg", "train", str(data), "--out", str(small_disk / "run"),
         "--backbone", "timm:test_resnet", "--no-pretrained", "--img-size", "32",
         "--device", "cpu", "--quiet", "--policy", "finetune", "--epochs", "1",
         "--cache-dir", str(tmp_path / "cache")],
        capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot write ") and "No space left on device" in last
    assert "Traceback" not in proc.stderr


def test_a_read_only_output_folder_is_one_line(tmp_path: Path, small_disk: Path) -> None:
    (small_disk / "runs").mkdir()
    if subprocess.run(["mount", "-o", "remount,ro", str(small_disk)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot remount the tmpfs read-only here")
    data = colour_folder(tmp_path / "data", per_class=4, val_per_class=2)
    proc = subprocess.run(
        [sys.executable, "-m", "tlreg", "train", str(data), "--out",
         str(small_disk / "runs" / "a"), "--backbone", "timm:test_resnet", "--no-pretrained",
         "--img-size", "32", "--device", "cpu", "--quiet"], capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot write ") and "Read-only file system" in last, last
