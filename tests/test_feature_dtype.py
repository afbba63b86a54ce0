"""--feature-dtype float16: half the bytes, its own cache entry, the same run warm or cold."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from images import colour_folder, count_backbone_images

from tlreg.data.features import FeatureCache, FeatureKey, cached_features, load_entry
from tlreg.data.sources import Sample
from tlreg.engine.trainer import fit
from tlreg.errors import UsageError


def run(data: Path, out: Path, cache: Path, dtype: str) -> torch.Tensor:
    result = fit(data=str(data), out=str(out), backbone="timm:test_resnet", pretrained=False,
                 img_size=32, workers=0, quiet=True, device="cpu", policy="feature-extract",
                 cache_dir=str(cache), feature_dtype=dtype)
    return result.model.head[0].weight.detach().clone()


def chunk_dtypes(folder: Path) -> set[str]:
    import json

    out = set()
    for path in folder.glob("chunk-*.safetensors"):
        raw = path.read_bytes()
        header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
        out.add(header["features"]["dtype"])
    return out


def test_float16_entry_is_half_the_bytes_its_own_entry_and_the_same_warm_as_cold(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = colour_folder(tmp_path / "data", per_class=6, val_per_class=3)
    cache = tmp_path / "cache"
    head32 = run(data, tmp_path / "a", cache, "float32")
    seen = count_backbone_images(monkeypatch)
    head16 = run(data, tmp_path / "b", cache, "float16")
    assert sum(seen) == 18  # a float32 entry is never read as float16 (nor the reverse)
    entries = {d.name: d for d in (cache / "features").iterdir()}
    assert len(entries) == 2
    f16 = next(d for n, d in entries.items() if n.endswith("-f16"))
    f32 = next(d for n, d in entries.items() if not n.endswith("-f16"))
    assert chunk_dtypes(f16) == {"F16"} and chunk_dtypes(f32) == {"F32"}
    names32, rows32 = load_entry(f32)
    names16, rows16 = load_entry(f16)
    order = [names16.index(n) for n in names32]
    assert rows16.dtype == torch.float32  # read back as float32, rounded once
    assert torch.equal(rows16[order], rows32.half().float())
    tensor_bytes = [sum(p.stat().st_size for p in d.glob("chunk-*")) for d in (f32, f16)]
    assert tensor_bytes[1] < 0.75 * tensor_bytes[0]

    # the cold float16 run trained on what the cache now serves: warm gives the same head
    seen.clear()
    assert torch.equal(run(data, tmp_path / "c", cache, "float16"), head16)
    assert sum(seen) == 0
    assert torch.equal(run(data, tmp_path / "d", cache, "float32"), head32)
    assert sum(seen) == 0


def test_a_truncated_float16_chunk_is_recomputed(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    data = colour_folder(tmp_path / "data", per_class=4, val_per_class=2)
    cache = tmp_path / "cache"
    head = run(data, tmp_path / "a", cache, "float16")
    victim = sorted((cache / "features").glob("*-f16/chunk-*.safetensors"))[0]
    victim.write_bytes(victim.read_bytes()[:-2])  # one float16 value short
    seen = count_backbone_images(monkeypatch)
    with pytest.warns(UserWarning, match="truncated"):
        assert torch.equal(run(data, tmp_path / "b", cache, "float16"), head)
    assert sum(seen) == 8


def test_rows_beyond_float16_range_are_kept_exact_in_float32(tmp_path: Path) -> None:
    """float16 tops out at 65504: such rows stay float32 rather than become inf (which the
    cache would reject, and recompute, on every run)."""
    samples = []
    for i in range(4):
        f = tmp_path / f"img{i}.bin"
        f.write_bytes(bytes([i]) * 8)
        samples.append(Sample(str(f), i % 2))
    rows = torch.tensor([[0.1, 1.0], [0.2, 2.0], [0.3, 3.0], [0.4, 4.0]])
    big = torch.tensor([[1.0e6, 0.1], [2.0, 0.2]])
    key = FeatureKey.of("b", "w", {}, "t")
    store = FeatureCache(tmp_path / "c", key, "float16")
    out, _ = cached_features(samples, lambda pos: (rows[pos], []), store)
    assert torch.equal(out, rows.half().float())
    store = FeatureCache(tmp_path / "c2", key, "float16")
    out, _ = cached_features(samples[:2], lambda pos: (big[pos], []), store)
    assert torch.equal(out, big)  # exact: this batch was stored as float32
    assert chunk_dtypes(store.dir) == {"F32"}
    again, _ = cached_features(samples[:2], lambda pos: pytest.fail("recomputed"),
                               FeatureCache(tmp_path / "c2", key, "float16"))
    assert torch.equal(again, big)


def test_an_unknown_feature_dtype_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="feature_dtype must be one of float32, float16"):
        fit(data=str(tmp_path), out=str(tmp_path / "o"), backbone="timm:test_resnet",
            feature_dtype="bfloat16")
    with pytest.raises(UsageError, match="--feature-dtype 'int8'"):
        FeatureCache(tmp_path, FeatureKey.of("b", "w", {}, "t"), "int8")
