"""End to end, in subprocesses with a fresh HF_HOME: train -> push -> delete -> pull -> predict.

The pulled model must give the original logits (to 1e-6) and the local Hub's log must show the
files were downloaded.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hub_server import TEST_TOKEN, LocalHub
from images import colour_folder


def tlreg(args: list[str], env: dict[str, str]) -> str:
    proc = subprocess.run([sys.executable, "-m", "tlreg", *args], capture_output=True, text=True,
                          env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


# The fine-tuned variant (40 s of subprocesses) runs with the slow end-to-end tests.
@pytest.mark.parametrize("policy", ["feature-extract",
                                    pytest.param("finetune", marks=pytest.mark.slow)])
def test_train_push_delete_pull_predict(tmp_path: Path, policy: str) -> None:
    data = colour_folder(tmp_path / "data", per_class=6, val_per_class=3)
    images = str(data / "val")
    with LocalHub() as hub:
        env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": hub.endpoint,
               "HF_TOKEN": TEST_TOKEN, "HF_HUB_DISABLE_XET": "1",
               "TLREG_CACHE_DIR": str(tmp_path / "cache")}
        env.pop("HF_HUB_OFFLINE", None)
        run = tmp_path / "run"
        tlreg(["train", str(data), "--out", str(run), "--backbone", "timm:test_resnet",
               "--no-pretrained", "--policy", policy, "--epochs", "2", "--img-size", "32",
               "--workers", "0", "--quiet"], env)
        before = json.loads(tlreg(["predict", str(run), images, "--json"], env))
        tlreg(["push", str(run), "alice/shapes"], env)
        shutil.rmtree(run)
        hub.clear_log()
        env["HF_HOME"] = str(tmp_path / "hf-fresh")
        after = json.loads(tlreg(["predict", "alice/shapes", images, "--json"], env))
        downloaded = {p.rsplit("/", 1)[-1] for p in hub.downloads()}
        assert {"config.json", "head.safetensors", "backbone.safetensors"} <= downloaded
        files = set(hub.files("alice/shapes"))
        assert not any(f.endswith((".pt", ".bin", ".pkl", ".ckpt")) for f in files)
        assert hub.errors == []
    assert [r["file"] for r in after] == [r["file"] for r in before]
    for a, b in zip(after, before, strict=True):
        assert max(abs(x - y) for x, y in zip(a["logits"], b["logits"], strict=True)) < 1e-6
