"""The decoded-image cache: exact eval inputs, seeded augmentation, disk reuse, budget."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from images import HYMENOPTERA, colour_folder, hymenoptera_subset

from tlreg.data.batched import BatchAugment, BatchEval
from tlreg.data.decoded import decode_all, short_side_for
from tlreg.data.images import build_transform, load_rgb
from tlreg.data.sources import Sample
from tlreg.engine.config import TrainConfig
from tlreg.engine.trainer import fit

CFG = {"input_size": (3, 56, 56), "interpolation": "bicubic", "mean": (0.5, 0.4, 0.3),
       "std": (0.2, 0.25, 0.3), "crop_pct": 0.875, "crop_mode": "center"}


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not HYMENOPTERA.is_dir():
        pytest.skip(f"real photos not found at {HYMENOPTERA}")
    return hymenoptera_subset(tmp_path_factory.mktemp("photos"), per_class=4, val_per_class=2)


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TLREG_CACHE_DIR", str(tmp_path / "cache"))


def _samples(root: Path) -> list[Sample]:
    return [Sample(str(p), 0) for p in sorted(root.rglob("*.jpg"))]


def test_eval_from_cache_equals_timm_pil_pipeline(photos: Path) -> None:
    samples = _samples(photos)
    decoded = decode_all(samples, CFG, mode="memory", workers=0, max_bytes=2**30)
    assert decoded is not None and short_side_for(CFG) == 64
    assert all(min(t.shape[1:]) == 64 and t.dtype == torch.uint8 for t in decoded.images)
    reference = torch.stack([build_transform(CFG, train=False)(load_rgb(s.path))
                             for s in samples])
    assert torch.equal(BatchEval(CFG)(decoded.images), reference)


def test_augmentation_depends_on_seed_and_index_only(photos: Path) -> None:
    decoded = decode_all(_samples(photos), CFG, mode="memory", workers=0, max_bytes=2**30)
    assert decoded is not None
    aug = BatchAugment(CFG)
    imgs = decoded.images
    whole = aug(imgs, list(range(len(imgs))), seed=5)
    one = aug([imgs[3]], [3], seed=5)
    assert whole.shape == (len(imgs), 3, 56, 56)
    assert torch.equal(whole[3], one[0]), "batch composition changed a sample's augmentation"
    assert not torch.equal(aug([imgs[3]], [3], seed=6), one)
    assert torch.isfinite(whole).all()
    kept = whole.clone()  # reused work buffers never show through a batch already returned
    aug(imgs[::-1], list(range(len(imgs)))[::-1], seed=7)
    assert torch.equal(whole, kept)


def _augment_step_by_step(img: torch.Tensor, idx: int, seed: int) -> torch.Tensor:
    """The augmentation written plainly, one operation at a time (the folded matrix's spec)."""
    import torch.nn.functional as F

    from tlreg.data.batched import _params

    top, left, h, w, flip, jit = _params(seed, idx, img.shape[1], img.shape[2],
                                         (0.08, 1.0), (3 / 4, 4 / 3))
    x = F.interpolate(img[None, :, top:top + h, left:left + w], size=(56, 56),
                      mode="bilinear", align_corners=False, antialias=True)[0].float()
    x = x.flip(-1) if flip else x
    b, c, s = (torch.tensor(jit) * 0.8 + 0.6).tolist()
    grey_weights = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
    x = x * b
    m = (x * grey_weights).sum(0).mean()
    x = (x - m) * c + m
    g = (x * grey_weights).sum(0, keepdim=True)
    x = ((x - g) * s + g).clamp(0, 255) / 255
    return (x - torch.tensor(CFG["mean"]).view(3, 1, 1)) / torch.tensor(CFG["std"]).view(3, 1, 1)


def test_folded_colour_jitter_equals_the_operations_one_by_one(photos: Path) -> None:
    decoded = decode_all(_samples(photos), CFG, mode="memory", workers=0, max_bytes=2**30)
    assert decoded is not None
    imgs = decoded.images
    batch = BatchAugment(CFG)(imgs, list(range(len(imgs))), seed=11)
    for i, img in enumerate(imgs):
        torch.testing.assert_close(batch[i], _augment_step_by_step(img, i, 11),
                                   atol=1e-4, rtol=1e-4)
    plain = BatchAugment(CFG, jitter=0.0)(imgs[:1], [0], seed=11)
    assert plain.min() >= (0 - 0.5) / 0.2 - 1e-6 and plain.max() <= (1 - 0.3) / 0.3 + 1e-6


def test_disk_cache_is_reused_and_matches_memory(photos: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    samples = _samples(photos)
    first = decode_all(samples, CFG, mode="disk", workers=0, max_bytes=2**30)
    calls = []
    import tlreg.data.images

    monkeypatch.setattr(tlreg.data.images, "load_rgb", lambda p: calls.append(p))
    second = decode_all(samples, CFG, mode="disk", workers=0, max_bytes=2**30)
    assert first is not None and second is not None and calls == []
    for a, b in zip(first.images, second.images, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(("need", "memory", "free", "want"), [
    (10, 10, 0, "memory"), (11, 10, 22, "disk"), (11, 10, 21, "stream"), (0, 0, 0, "memory")])
def test_auto_chooses_memory_then_disk_then_stream(need: int, memory: int, free: int,
                                                want: str) -> None:
    from tlreg.data.decoded import choose_mode

    assert choose_mode(need, memory, free) == want


def test_disk_mode_streams_and_ignores_the_memory_budget(photos: Path) -> None:
    """`disk` needs disk, not memory: a 1-byte memory budget still decodes, and the result is
    the memory map (no image tensor owns its storage), equal to the in-memory decode."""
    samples = _samples(photos)
    memory = decode_all(samples, CFG, mode="memory", workers=0, max_bytes=2**30)
    disk = decode_all(samples, CFG, mode="disk", workers=0, max_bytes=1)
    assert memory is not None and disk is not None
    storages = {t.untyped_storage().data_ptr() for t in disk.images if t is not None}
    assert len(storages) == 1  # every image a view of the one mapped file
    for a, b in zip(memory.images, disk.images, strict=True):
        assert torch.equal(a, b)


def test_disk_mode_without_the_disk_space_falls_back(photos: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import tlreg.data.decoded as decoded

    monkeypatch.setattr(decoded, "free_bytes", lambda folder: 100)
    with pytest.warns(UserWarning, match="GiB of disk .* more than is free"):
        assert decode_all(_samples(photos), CFG, mode="disk", workers=0, max_bytes=1) is None


def _finetune_weights(data: Path, tmp_path: Path, name: str,
                      **kw: object) -> dict[str, torch.Tensor]:
    """One epoch of test_resnet fine-tuning on `data`, caches under tmp_path/c: its weights."""
    cfg = TrainConfig(data=str(data), out=str(tmp_path / name), backbone="timm:test_resnet",
                      pretrained=False, policy="finetune", img_size=32, epochs=1, batch_size=4,
                      workers=0, quiet=False, cache_dir=str(tmp_path / "c"),
                      **kw)  # type: ignore[arg-type]
    return fit(cfg).model.state_dict()


def test_auto_over_the_memory_budget_trains_from_disk(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    """The run says once that it went to disk, and trains the weights the memory cache gives."""
    data = colour_folder(tmp_path / "data", per_class=4, val_per_class=2)

    def run(name: str, **kw: object) -> dict[str, torch.Tensor]:
        return _finetune_weights(data, tmp_path, name, **kw)

    ram = run("ram", decoded_cache="memory")
    capsys.readouterr()
    auto = run("auto", decoded_cache="auto", decoded_cache_gb=1e-6)
    out = capsys.readouterr().out
    assert out.count("memory-mapped on disk") == 1 and "(disk)" in out
    assert len(list((tmp_path / "c" / "decoded").glob("*/data.bin"))) == 2  # train, val
    assert all(torch.equal(ram[k], auto[k]) for k in ram)


def test_auto_over_the_memory_and_disk_budgets_streams(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Too large for memory and for half the free disk: `auto` says so once, writes no cache,
    and trains the weights the memory cache gives (not timm's per-image pipeline)."""
    import tlreg.data.decoded as decoded

    data = colour_folder(tmp_path / "data", per_class=4, val_per_class=2)

    def run(name: str, **kw: object) -> dict[str, torch.Tensor]:
        return _finetune_weights(data, tmp_path, name, **kw)

    ram = run("ram", decoded_cache="memory")
    off = run("off", decoded_cache="off")
    capsys.readouterr()
    monkeypatch.setattr(decoded, "free_bytes", lambda folder: 100)
    auto = run("auto", decoded_cache="auto", decoded_cache_gb=1e-6)
    out = capsys.readouterr().out
    assert out.count("more than half the free disk") == 1 and out.count("stream (") == 1
    assert not (tmp_path / "c" / "decoded").exists()
    assert all(torch.equal(ram[k], auto[k]) for k in ram)
    assert not all(torch.equal(ram[k], off[k]) for k in ram)  # per-image: other weights


def test_over_budget_warns_and_training_falls_back(tmp_path: Path) -> None:
    data = colour_folder(tmp_path / "data", per_class=4, val_per_class=2)
    with pytest.warns(UserWarning, match="over its budget"):
        result = fit(TrainConfig(
            data=str(data), out=str(tmp_path / "run"), backbone="timm:test_resnet",
            pretrained=False, policy="finetune", img_size=32, epochs=1, workers=0, quiet=True,
            decoded_cache="memory", decoded_cache_gb=1e-6))
    assert result.summary["epochs"] == 1


def test_training_with_decoded_cache_is_deterministic(tmp_path: Path) -> None:
    data = colour_folder(tmp_path / "data", per_class=6, val_per_class=3)

    def run(name: str) -> dict[str, torch.Tensor]:
        cfg = TrainConfig(data=str(data), out=str(tmp_path / name), backbone="timm:test_resnet",
                          pretrained=False, policy="finetune", img_size=32, epochs=2,
                          batch_size=4, workers=0, quiet=True, decoded_cache="memory")
        return fit(cfg).model.state_dict()

    a, b = run("a"), run("b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_stream_batches_are_the_memory_cache_batches(photos: Path, tmp_path: Path) -> None:
    """Decoded again in a worker process, in the epoch's order, an unreadable file skipped:
    the same batches, bit for bit, as cut from the in-memory cache."""
    from tlreg.data.decoded import stream_batches

    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    samples = _samples(photos)
    samples.insert(3, Sample(str(broken), 0))
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(0)).tolist()
    tf = BatchAugment(CFG, reprob=0.25)
    memory = decode_all(samples, CFG, mode="memory", workers=0, max_bytes=2**30)
    assert memory is not None and memory.failed == [3]
    ok = [i for i in order if memory.images[i] is not None]
    want = [(tf([memory.images[j] for j in ok[k:k + 5]], ok[k:k + 5], 7), ok[k:k + 5])
            for k in range(0, len(ok), 5)]
    failed: set[int] = set()
    got = list(stream_batches(samples, order, CFG, tf, batch_size=5, seed=7, workers=1,
                              failed=failed))
    assert failed == {3} and [i for _, i in got] == [i for _, i in want]
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(got, want, strict=True))


def test_stream_mode_writes_no_cache_and_trains_what_memory_gives(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--decoded-cache stream`: said once, no cache written, and the weights the memory cache
    gives (same batches, same augmentation), an unreadable training file skipped by both."""
    data = colour_folder(tmp_path / "data", per_class=5, val_per_class=2)
    (data / "train" / "red" / "broken.png").write_bytes(b"not a png")

    def run(name: str, **kw: object) -> dict[str, torch.Tensor]:
        cfg = TrainConfig(data=str(data), out=str(tmp_path / name), backbone="timm:test_resnet",
                          pretrained=False, policy="finetune", img_size=32, epochs=2,
                          batch_size=4, workers=0, quiet=False, cache_dir=str(tmp_path / "c"),
                          **kw)
        with pytest.warns(UserWarning, match="skipped unreadable image .*broken.png"):
            return fit(cfg).model.state_dict()

    ram = run("ram", decoded_cache="memory")
    capsys.readouterr()
    streamed = run("stream", decoded_cache="stream", decoded_cache_gb=1e-6)
    out = capsys.readouterr().out
    assert out.count("decoded again every epoch") == 1
    assert not (tmp_path / "c" / "decoded").exists()
    assert all(torch.equal(ram[k], streamed[k]) for k in ram)
