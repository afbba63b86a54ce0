"""The feature cache is never trusted blindly: damaged entries are found and recomputed."""

from __future__ import annotations

import json
import random
from pathlib import Path

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
    (found,) = (cache / "features").glob("*/entry")
    return found


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


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_flipped_bytes_are_recomputed(primed: tuple[Path, Path, torch.Tensor], tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    data, cache, head = primed
    _damage_bytes(entry(cache) / "model.safetensors", seed)
    seen = count_backbone_images(monkeypatch)
    with pytest.warns(UserWarning, match="damaged .*checksum mismatch"):
        again = run(data, tmp_path / "again", cache)
    assert sum(seen) == 18  # every image again: the damaged entry was not used
    assert torch.equal(again, head)


@pytest.mark.parametrize(("change", "why"), [
    (lambda s: s.update(index={p: [e[0], e[1], e[2] + 1000] for p, e in s["index"].items()}),
     "index does not match"),
    (lambda s: s.update(shape=[1, 1]), "shape"),
    (lambda s: s.pop("sha256"), "no checksum"),
])
def test_a_damaged_index_is_recomputed(primed: tuple[Path, Path, torch.Tensor], tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch, change, why) -> None:
    data, cache, head = primed
    state_path = entry(cache) / "state.json"
    state = json.loads(state_path.read_text())
    change(state.get("state", state))
    state_path.write_text(json.dumps(state))
    seen = count_backbone_images(monkeypatch)
    with pytest.warns(UserWarning, match=why):
        again = run(data, tmp_path / "again", cache)
    assert sum(seen) == 18
    assert torch.equal(again, head)


def test_non_finite_features_are_not_trusted(primed: tuple[Path, Path, torch.Tensor],
                                             tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from tlreg.data.features import _digest

    data, cache, head = primed
    path = entry(cache) / "model.safetensors"
    tensors = load_file(path)
    tensors["features"][0, 0] = float("nan")
    save_file(tensors, path)
    state_path = entry(cache) / "state.json"
    state = json.loads(state_path.read_text())
    inner = state.get("state", state)
    inner["sha256"] = _digest(tensors["features"])  # a matching checksum: NaN is still refused
    state_path.write_text(json.dumps(state))
    with pytest.warns(UserWarning, match="non-finite"):
        assert torch.equal(run(data, tmp_path / "again", cache), head)


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
    entries = sorted((cache / "decoded").glob("*/data.npy"))
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
    before = (folder / "entry" / "model.safetensors").read_bytes()
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
        assert (folder / "entry" / "model.safetensors").read_bytes() == before
    finally:
        holder.communicate("")
    run(data, tmp_path / "third", cache)  # free again: the new image is written
    assert (folder / "entry" / "model.safetensors").read_bytes() != before
