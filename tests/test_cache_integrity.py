"""The feature cache is never trusted blindly: damaged entries are found and recomputed."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from images import colour_folder, count_backbone_images

from tlreg.engine.trainer import fit


def run(data: Path, out: Path, cache: Path) -> torch.Tensor:
    result = fit(data=str(data), out=str(out), backbone="timm:test_resnet", pretrained=False,
                 img_size=32, workers=0, quiet=True, device="cpu", policy="feature-extract",
                 cache_dir=str(cache))
    return result.model.head[0].weight.detach().clone()


def entry(cache: Path) -> Path:
    """The chunk of the 12 training images (the 6 val images are written as a second chunk)."""
    train, _val = sorted((cache / "features").glob("*/chunk-*.safetensors"))
    return train


@pytest.fixture
def primed(tmp_path: Path) -> tuple[Path, Path, torch.Tensor]:
    data = colour_folder(tmp_path / "data", per_class=6, val_per_class=3)
    cache = tmp_path / "cache"
    return data, cache, run(data, tmp_path / "first", cache)


def _damage_bytes(path: Path, seed: int) -> None:
    """Flip bytes in the tensor data (past the safetensors header), at seeded offsets."""
    raw = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(raw[:8], "little")
    rng = random.Random(seed)
    for _ in range(4):
        i = rng.randrange(header, len(raw))
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


def _rewrite(path: Path, change: Callable[[dict[str, str], torch.Tensor], Any]) -> None:
    """Rewrite a chunk with changed metadata (or features), as a damaged or foreign writer would."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta, features = dict(f.metadata()), f.get_tensor("features")
    changed = change(meta, features)
    features = changed if isinstance(changed, torch.Tensor) else features
    save_file({"features": features}, str(path), metadata=meta)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_flipped_bytes_are_recomputed(primed: tuple[Path, Path, torch.Tensor], tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    data, cache, head = primed
    _damage_bytes(entry(cache), seed)
    seen = count_backbone_images(monkeypatch)
    with pytest.warns(UserWarning, match="damaged .*checksum mismatch"):
        again = run(data, tmp_path / "again", cache)
    assert sum(seen) == 12  # every image of the damaged chunk again, and no other
    assert torch.equal(again, head)
    seen.clear()
    assert torch.equal(run(data, tmp_path / "third", cache), head)
    assert sum(seen) == 0  # the recomputed rows replaced the damaged chunk


@pytest.mark.parametrize(("change", "why"), [
    (lambda m, f: m.update(names=json.dumps(json.loads(m["names"])[:-1])), "shape"),
    (lambda m, f: m.update(stamps="[[1, 2, 3]]"), "image list does not match"),
    (lambda m, f: m.pop("sha256"), "checksum mismatch"),
    (lambda m, f: m.update(format="tlreg-features/9"), "not a tlreg-features/2 chunk"),
    (lambda m, f: f.double(), "shape"),
])
def test_a_damaged_chunk_header_is_recomputed(primed: tuple[Path, Path, torch.Tensor],
                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              change, why) -> None:
    data, cache, head = primed
    _rewrite(entry(cache), change)
    seen = count_backbone_images(monkeypatch)
    with pytest.warns(UserWarning, match=why):
        again = run(data, tmp_path / "again", cache)
    assert sum(seen) == 12
    assert torch.equal(again, head)


def test_non_finite_features_are_not_trusted(primed: tuple[Path, Path, torch.Tensor],
                                             tmp_path: Path) -> None:
    from tlreg.data.features import _digest

    data, cache, head = primed

    def nan(meta: dict[str, str], features: torch.Tensor) -> torch.Tensor:
        features[0, 0] = float("nan")
        meta["sha256"] = _digest(features)  # a matching checksum: NaN is still refused
        return features

    _rewrite(entry(cache), nan)
    with pytest.warns(UserWarning, match="non-finite"):
        assert torch.equal(run(data, tmp_path / "again", cache), head)


def test_one_new_image_appends_one_chunk_and_rewrites_nothing(
        primed: tuple[Path, Path, torch.Tensor], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    data, cache, _ = primed
    old = entry(cache)
    before = (old.stat().st_ino, old.stat().st_mtime_ns, old.read_bytes())
    src = next((data / "train" / "red").iterdir())
    shutil.copy(src, src.with_name("extra.png"))
    seen = count_backbone_images(monkeypatch)
    run(data, tmp_path / "again", cache)
    assert sum(seen) == 1  # the new image alone
    assert (old.stat().st_ino, old.stat().st_mtime_ns, old.read_bytes()) == before
    chunks = sorted(old.parent.glob("chunk-*.safetensors"))
    assert len(chunks) == 3 and chunks[0] == old
    from tlreg.data.features import chunk_entries

    assert len(chunk_entries(old.parent)) == 19


@pytest.mark.parametrize("cut", [1, 100, 1000])
def test_a_truncated_chunk_is_found_and_only_its_rows_recomputed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cut: int) -> None:
    """12 training rows span three chunks (CHUNK_ROWS = 4 here; val is a fourth); cutting the
    tail off one of them costs exactly its 4 images, and the others are read as they were."""
    import tlreg.data.features as features

    monkeypatch.setattr(features, "CHUNK_ROWS", 4)
    data = colour_folder(tmp_path / "data", per_class=6, val_per_class=2)
    cache = tmp_path / "cache"
    head = run(data, tmp_path / "first", cache)
    chunks = sorted((cache / "features").glob("*/chunk-*.safetensors"))
    assert len(chunks) == 4
    victim = chunks[1]  # the second of train's
    victim.write_bytes(victim.read_bytes()[:-cut])
    seen = count_backbone_images(monkeypatch)
    with pytest.warns(UserWarning, match=f"{victim.name} is damaged .*truncated"):
        again = run(data, tmp_path / "again", cache)
    assert sum(seen) == 4
    assert torch.equal(again, head)


def test_replaced_images_are_compacted_away(tmp_path: Path) -> None:
    """Touching every image again and again leaves one live row per image on disk, not one
    per write: stale chunks are merged or removed."""
    import os

    from tlreg.data.features import FeatureCache, FeatureKey, cached_features
    from tlreg.data.sources import Sample

    files = []
    for i in range(6):
        f = tmp_path / f"img{i}.bin"
        f.write_bytes(bytes([i]) * 10)
        files.append(Sample(str(f), i % 2))
    key = FeatureKey.of("b", "w", {}, "t")
    calls: list[list[int]] = []

    def compute(pos: list[int]) -> tuple[torch.Tensor, list[int]]:
        calls.append(pos)
        return torch.tensor([[float(i), os.stat(files[i].path).st_mtime_ns % 997]
                             for i in pos]), []

    for round_ in range(5):
        for s in files:
            os.utime(s.path, ns=(10**9 * (round_ + 1), 10**9 * (round_ + 1)))
        out, failed = cached_features(files, compute, FeatureCache(tmp_path / "c", key))
        assert failed == [] and out[:, 0].tolist() == [0, 1, 2, 3, 4, 5]
    store = FeatureCache(tmp_path / "c", key)
    assert sum(store.chunks.values()) <= 2 * len(files)
    out, _ = cached_features(files, compute, store)
    assert len(calls) == 5  # the sixth pass was served by the cache
    assert out[:, 1].tolist() == [(5 * 10**9) % 997] * 6


def test_cache_commands_cover_both_caches(tmp_path: Path) -> None:
    import subprocess
    import sys

    data = colour_folder(tmp_path / "data", per_class=3, val_per_class=2)
    cache = tmp_path / "cache"
    run(data, tmp_path / "fe", cache)  # a feature entry
    fit(data=str(data), out=str(tmp_path / "ft"), backbone="timm:test_resnet", pretrained=False,
        img_size=32, workers=0, quiet=True, device="cpu", policy="finetune", epochs=1,
        decoded_cache="disk", cache_dir=str(cache), lp_ft=False)
    env = {**__import__("os").environ, "TLREG_CACHE_DIR": str(cache)}
    ls = subprocess.run([sys.executable, "-m", "tlreg", "cache", "ls", "--json"],
                        capture_output=True, text=True, env=env, check=True)
    rows = json.loads(ls.stdout)
    assert sorted(r["kind"] for r in rows) == ["decoded", "decoded", "features"]  # train, val
    assert all(r["bytes"] > 0 for r in rows)
    assert {r["entries"] for r in rows if r["kind"] == "decoded"} == {6, 4}
    out = subprocess.run([sys.executable, "-m", "tlreg", "cache", "clear"], capture_output=True,
                         text=True, env=env, check=True)
    assert "removed 3 cache entries" in out.stdout
    assert not (cache / "features").exists() and not (cache / "decoded").exists()


def test_a_damaged_decoded_image_entry_is_decoded_again(tmp_path: Path) -> None:
    data = colour_folder(tmp_path / "data", per_class=3, val_per_class=2)
    cache = tmp_path / "cache"

    def train(out: str) -> torch.Tensor:
        r = fit(data=str(data), out=str(tmp_path / out), backbone="timm:test_resnet",
                pretrained=False, img_size=32, workers=0, quiet=True, device="cpu",
                policy="finetune", epochs=1, decoded_cache="disk", cache_dir=str(cache),
                lp_ft=False)
        return r.model.head[0].weight.detach().clone()

    first = train("a")
    entries = sorted((cache / "decoded").glob("*/data.bin"))
    assert len(entries) == 2
    raw = bytearray(entries[0].read_bytes())
    raw[-1] ^= 0xFF  # one pixel of the last image
    entries[0].write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match="decoded-image cache entry .* damaged .*checksum"):
        again = train("b")
    assert torch.equal(first, again)


def test_an_entry_being_written_by_another_process_is_left_to_it(tmp_path: Path) -> None:
    import subprocess
    import sys

    data = colour_folder(tmp_path / "data", per_class=3, val_per_class=2)
    cache = tmp_path / "cache"
    run(data, tmp_path / "first", cache)
    folder = entry(cache).parent

    def files() -> list[tuple[str, bytes]]:
        return [(f.name, f.read_bytes()) for f in sorted(folder.glob("chunk-*"))]

    before = files()
    (data / "train" / "red" / "new.png").write_bytes(
        (data / "train" / "red" / "red_000.png").read_bytes())  # one image to add
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; from tlreg.lock import "
         "exclusive\nwith exclusive(Path(sys.argv[1])):\n    print('locked', flush=True); "
         "sys.stdin.read()", str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        run(data, tmp_path / "second", cache)  # trains; does not touch the locked entry
        assert files() == before
    finally:
        holder.communicate("")
    run(data, tmp_path / "third", cache)  # free again: the new image is written
    after = files()
    assert after[:len(before)] == before and len(after) == len(before) + 1  # appended


def test_load_entry_reads_every_verified_row_and_skips_a_damaged_chunk(
        primed: tuple[Path, Path, torch.Tensor]) -> None:
    from safetensors import safe_open

    from tlreg.data.features import load_entry

    _data, cache, _head = primed
    folder = entry(cache).parent
    names, rows = load_entry(folder)
    assert rows.shape[0] == len(names) == 18 and len(set(names)) == 18
    with safe_open(str(entry(cache)), framework="pt") as f:
        first = json.loads(f.metadata()["names"])[0]
        expected = f.get_tensor("features")[0]
    assert torch.equal(rows[names.index(first)], expected)
    _damage_bytes(entry(cache), 0)
    names, rows = load_entry(folder)
    assert len(names) == rows.shape[0] == 6  # only the val chunk is left
    assert first not in names
