"""`tlreg audit` (tlreg.analysis.audit, tlreg.analysis.duplicates, tlreg.cli.audit).

Fast: the neighbour searches, the out-of-fold probe and every kind of finding on synthetic
feature matrices over small generated files; the command on a tiny random-init timm model.
Slow (`-m slow`): the issue's acceptance check on hymenoptera with the real EfficientNet-Lite0.
"""

from __future__ import annotations

import csv
import io
import json
import random
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
import typer
from images import colour_folder
from PIL import Image
from typer.testing import CliRunner

from tlreg.analysis.audit import (
    CSV_COLUMNS,
    INSTALL,
    KINDS,
    AuditReport,
    audit,
    audit_features,
    balance,
    out_of_fold_probs,
    write_audit,
    write_csv,
)
from tlreg.analysis.duplicates import (
    duplicates_across,
    duplicates_within,
    identical_files,
    nearest,
    normalise,
    outliers,
    robust_z,
    typicality,
)
from tlreg.analysis.features import DatasetFeatures
from tlreg.data.sources import DataSplit, Sample
from tlreg.errors import UsageError

# -- neighbour searches on matrices -------------------------------------------------------------


def _unit(n: int, d: int, seed: int = 0) -> torch.Tensor:
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return x / x.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("block", [3, 1024])
def test_nearest_matches_brute_force_in_any_block_size(block: int) -> None:
    q, keys = _unit(10, 8, 1), _unit(7, 8, 2)
    sims, idx = nearest(q, keys, 3, block=block)
    full = q @ keys.T
    top = full.topk(3, dim=1)
    assert torch.allclose(sims, top.values) and torch.equal(idx, top.indices)
    x = _unit(9, 8, 3)
    sims, idx = nearest(x, x, 2, same=True, block=block)
    assert not (idx == torch.arange(9)[:, None]).any()  # never its own neighbour
    brute = (x @ x.T).fill_diagonal_(-torch.inf).topk(2, dim=1)
    assert torch.allclose(sims, brute.values)


def test_nearest_earlier_only_looks_back_and_pads() -> None:
    x = _unit(5, 4)
    sims, idx = nearest(x, x, 2, same=True, earlier=True, block=2)
    assert idx[0].tolist() == [-1, -1] and sims[0].isinf().all()  # nothing before row 0
    assert idx[1].tolist() == [0, -1]
    assert (idx[2:] < torch.arange(2, 5)[:, None]).all()
    empty_sims, empty_idx = nearest(x[:0], x, 1)
    assert empty_sims.shape == (0, 1) and empty_idx.shape == (0, 1)


def test_copies_are_found_within_and_across_and_distinct_rows_are_not() -> None:
    x = _unit(40, 64, 4)  # random directions in 64-d: pairwise cosine near 0
    copies = x.clone()
    copies[30] = x[3] + 0.01 * _unit(1, 64, 5)[0]
    copies[35] = x[30 - 20] * 1.0
    xn = normalise(copies, mean=torch.zeros(64))
    found = duplicates_within(xn, 0.9)
    assert [(m.index, m.other) for m in found] == [(30, 3), (35, 10)]
    assert all(m.similarity > 0.99 for m in found)
    assert duplicates_within(normalise(x, torch.zeros(64)), 0.9) == []
    val = normalise(torch.stack([x[7] + 0.02 * _unit(1, 64, 6)[0], _unit(1, 64, 7)[0]]),
                    torch.zeros(64))
    leaks = duplicates_across(normalise(x, torch.zeros(64)), val, 0.9)
    assert [(m.index, m.other) for m in leaks] == [(7, 0)]


def test_normalise_centres_and_scales() -> None:
    x = torch.randn(20, 6) + 5.0  # a large common component, as pooled CNN features have
    xn = normalise(x)
    assert torch.allclose(xn.norm(dim=1), torch.ones(20), atol=1e-5)
    raw = x / x.norm(dim=1, keepdim=True)
    off = ~torch.eye(20, dtype=torch.bool)
    assert (raw @ raw.T)[off].mean() > 0.9  # everything looks alike before centring
    assert (xn @ xn.T)[off].mean().abs() < 0.1  # not after


def test_outliers_are_the_rows_unlike_any_other() -> None:
    gen = torch.Generator().manual_seed(8)
    centres = 3 * torch.randn(3, 16, generator=gen)
    x = 5 + centres[torch.arange(60) % 3] + torch.randn(60, 16, generator=gen)
    x[17] = 3 * torch.randn(16, generator=gen)  # from no class, without what all others share
    found = outliers(normalise(x, centre=False))
    assert [r[0] for r in found] == [17]
    _, typ, z, median = found[0]
    assert typ < median and z > 3.5
    assert outliers(normalise(x[:5], centre=False)) == []  # too few rows to say what is typical
    assert typicality(normalise(x)).shape == (60,)


def test_robust_z_with_no_spread() -> None:
    z = robust_z(torch.tensor([1.0, 1.0, 1.0, 0.5]))
    assert z[:3].tolist() == [0, 0, 0] and z[3].isinf()
    z = robust_z(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert z[2] == 0 and z[0] > 0 > z[4]


def test_identical_files_hashes_only_size_twins(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a.bin", tmp_path / "b.bin", tmp_path / "c.bin"
    a.write_bytes(b"x" * 10)
    c.write_bytes(b"y" * 10)  # same size, other bytes
    shutil.copy(a, b)
    samples = [Sample(str(p), 0) for p in (a, c, b)]
    memory = [Sample("mem/0", 0, data=b"z" * 4), Sample("mem/1", 1, data=b"z" * 4)]
    missing = Sample(str(tmp_path / "gone.bin"), 0)
    assert identical_files([*samples, *memory, missing]) == [(2, 0), (4, 3)]


# -- the out-of-fold probe ----------------------------------------------------------------------


def test_out_of_fold_probabilities_never_see_their_own_row() -> None:
    gen = torch.Generator().manual_seed(9)
    n, d = 60, 200  # d > n: an in-sample fit at weak C memorises every label, wrong ones too
    y = torch.arange(n) % 2
    x = torch.randn(n, d, generator=gen) + 2.0 * y[:, None] * (torch.arange(d) < 20)
    noisy = y.clone()
    flipped = [0, 1, 2]
    noisy[flipped] = 1 - noisy[flipped]
    probs, info = out_of_fold_probs(x, noisy, 2, folds=5, seed=0, C=100.0)
    assert probs.shape == (n, 2) and torch.allclose(probs.sum(1), torch.ones(n, dtype=probs.dtype))
    assert info["folds"] == 5 and info["C"] == 100.0
    given = probs[torch.arange(n), noisy]
    assert (given[flipped] < 0.5).all()  # held out, the wrong label gets little probability
    from tlreg.engine.solver import fit_logistic

    w, b, _ = fit_logistic(x.double(), noisy, 2, 100.0)
    in_sample = (x.double() @ w.T + b).softmax(1)[torch.arange(n), noisy]
    assert (in_sample[flipped] > 0.5).all()  # what a fit that saw them would have said


def test_out_of_fold_needs_two_images_per_class() -> None:
    probs, info = out_of_fold_probs(torch.randn(5, 3), torch.tensor([0, 0, 0, 0, 1]), 2)
    assert probs is None and "fewer than 2" in info["reason"]


# -- every kind of finding from synthetic features over real files ---------------------------


def _png(path: Path, size: int, seed: int) -> None:
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", (size, size))
    img.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256))
                 for _ in range(size * size)])
    img.save(path)


@pytest.fixture
def planted(tmp_path: Path) -> tuple[DataSplit, DatasetFeatures, dict[str, str]]:
    """Two clean classes with one of every problem planted; returns (split, features, where)."""
    gen = torch.Generator().manual_seed(10)
    d = 32
    centres = 4 * torch.randn(2, d, generator=gen)
    classes = ("cat", "dog")
    train, val, xt, xv = [], [], [], []
    for part, n, samples, rows in (("train", 24, train, xt), ("val", 10, val, xv)):
        for i in range(n):
            label = i % 2
            p = tmp_path / part / classes[label] / f"{part}{i:02d}.png"
            _png(p, 40, seed=hash((part, i)) % 10_000)
            samples.append(Sample(str(p), label))
            # a common positive part, as pooled CNN features have (centring removes it)
            rows.append(3 + centres[label] + torch.randn(d, generator=gen))
    where = {}
    # a wrong label: features of a cat, filed under dog
    train[4] = Sample(train[4].path.replace("/cat/", "/dog/"), 1)
    Path(train[4].path).parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(tmp_path / "train" / "cat" / "train04.png"), train[4].path)
    where["label_issue"] = train[4].path
    # a leak: train 6 is val 2 again, re-encoded (features nearly equal)
    xt[6] = xv[2] + 0.05 * torch.randn(d, generator=gen)
    train[6] = Sample(train[6].path, val[2].label)
    where["leak"] = train[6].path
    # a near-duplicate inside train (8 ~ 10) and a byte-identical file (13 = 11)
    xt[10] = xt[8] + 0.05 * torch.randn(d, generator=gen)
    shutil.copy(train[11].path, train[13].path)
    xt[13] = xt[11].clone()
    train[13] = Sample(train[13].path, train[11].label)
    where["duplicate"] = train[10].path
    where["identical"] = train[13].path
    # an outlier: from neither class
    xt[15] = 4 * torch.randn(d, generator=gen)  # nor has it what all the others share
    where["outlier"] = train[15].path
    # a tiny image and an unreadable file (no features: the pass skipped it)
    _png(Path(train[17].path), 16, seed=1)
    where["tiny"] = train[17].path
    broken = tmp_path / "val" / "dog" / "broken.png"
    broken.write_bytes(b"not an image at all")
    where["unreadable"] = str(broken)
    split = DataSplit(classes, tuple(train), (*val, Sample(str(broken), 1)))
    features = DatasetFeatures(
        backbone="synthetic", x_train=torch.stack(xt), y_train=torch.tensor(
            [s.label for s in train]), x_val=torch.stack(xv), y_val=torch.tensor(
            [s.label for s in val]), train_samples=tuple(train), val_samples=tuple(val),
        classes=classes, seconds=0.0, params=0, feature_dim=d, cached=False,
        skipped=(str(broken),))
    return split, features, where


def test_every_planted_problem_is_found_and_ranked(planted, tmp_path: Path) -> None:
    pytest.importorskip("cleanlab")  # the [audit] extra; CI's audit step runs this
    split, features, where = planted
    report = audit_features(split, features, data="synthetic", folds=3,
                            duplicate_threshold=0.9)
    by_kind = {k: {f.file: f for f in report.of_kind(k)} for k in KINDS}
    li = by_kind["label_issue"][where["label_issue"]]
    assert (li.label, li.suggested, li.split) == ("dog", "cat", "train")
    assert li.reason.startswith("labelled 'dog' but the out-of-fold probe gives 'cat' 0.")
    assert li.score > 0.5
    leak = by_kind["leak"][where["leak"]]
    assert leak.other == split.val[2].path and leak.score > 0.9
    assert "val image val/cat/val02.png" in leak.reason
    assert by_kind["duplicate"][where["duplicate"]].other == split.train[8].path
    same = by_kind["duplicate"][where["identical"]]
    assert same.score == 1.0 and same.reason.startswith("byte-identical to train/")
    assert sum(f.file == where["identical"] for f in report.findings) == 1  # reported once
    assert where["outlier"] in by_kind["outlier"]
    assert by_kind["tiny"][where["tiny"]].reason.startswith("16x16 px, under 32 px")
    bad = by_kind["unreadable"][where["unreadable"]]
    assert bad.split == "val" and "cannot be decoded (UnidentifiedImageError" in bad.reason
    # Most severe kind first, then by score.
    kinds = [KINDS.index(f.kind) for f in report.findings]
    assert kinds == sorted(kinds)
    for k in KINDS:
        scores = [f.score for f in report.of_kind(k)]
        assert scores == sorted(scores, reverse=True)
    s = report.summary
    assert s["counts"]["unreadable"] == 1 and s["images"] == {
        "train": 24, "val": 11, "featurised": 34, "unreadable": 1}
    assert s["classes"]["dog"] == {"train": 13, "val": 6}
    assert s["balance"]["ratio"] == round(11 / 13, 4)
    assert s["label_issues"]["checked"] and s["label_issues"]["folds"] == 3
    # The file forms: JSON (audit.json) and CSV.
    doc = json.loads(write_audit(report, tmp_path / "out").read_text())
    assert set(doc) == {"data", "backbone", "summary", "findings"}
    assert doc["findings"][0]["kind"] == "unreadable"
    for f in doc["findings"]:
        assert {"file", "kind", "score", "reason", "label", "split"} <= set(f)
        assert ("suggested" in f) == (f["kind"] == "label_issue")
        assert ("other" in f) == (f["kind"] in ("duplicate", "leak"))
    rows = list(csv.DictReader(io.StringIO(write_csv(report, tmp_path / "a.csv").read_text())))
    assert tuple(rows[0]) == CSV_COLUMNS and len(rows) == len(report.findings)
    assert [r["file"] for r in rows] == [f.file for f in report.findings]


def test_without_cleanlab_the_other_checks_still_run(planted, monkeypatch) -> None:
    split, features, _ = planted
    monkeypatch.setitem(sys.modules, "cleanlab", None)  # import cleanlab -> ImportError
    report = audit_features(split, features, folds=3, duplicate_threshold=0.9)
    assert not report.of_kind("label_issue") and report.of_kind("leak")
    probe = report.summary["label_issues"]
    assert not probe["checked"] and INSTALL in probe["reason"]
    with pytest.raises(UsageError, match=r"pip install 'tlreg\[audit\]'"):
        audit_features(split, features, folds=3, label_issues=True)
    skipped = audit_features(split, features, folds=3, label_issues=False)
    assert "not asked for" in skipped.summary["label_issues"]["reason"]


def test_multi_label_data_skips_only_the_label_check(planted) -> None:
    split, features, _ = planted
    hot = {0: (1, 0), 1: (0, 1)}
    multi = DataSplit(split.classes, tuple(Sample(s.path, hot[s.label]) for s in split.train),
                      tuple(Sample(s.path, hot[s.label]) for s in split.val))
    report = audit_features(multi, features, folds=3, duplicate_threshold=0.9)
    assert "multi-label" in report.summary["label_issues"]["reason"]
    assert report.of_kind("leak") and report.summary["classes"]["cat"]["train"] == 11


def test_bad_options_are_usage_errors(planted) -> None:
    split, features, _ = planted
    for kwargs, match in (({"folds": 1}, "--folds"), ({"duplicate_threshold": 1.5}, "cosine"),
                          ({"outlier_z": 0}, "--outlier-z"), ({"min_side": -1}, "--min-side")):
        with pytest.raises(UsageError, match=match):
            audit_features(split, features, **kwargs)


def test_balance_of_an_empty_split() -> None:
    assert balance(DataSplit((), (), ())) == {}


# -- the command, on a tiny random-init model --------------------------------------------------


@pytest.fixture
def command() -> typer.Typer:
    from tlreg.cli import audit as cli_audit

    app = typer.Typer()
    app.callback()(lambda: None)  # keep `audit` a subcommand, as in the tlreg app
    cli_audit.register(app)
    return app


def test_the_command_writes_json_csv_and_audit_json(command, tmp_path: Path) -> None:
    pytest.importorskip("cleanlab")  # the [audit] extra; CI's audit step runs this
    data = colour_folder(tmp_path / "data", per_class=8, val_per_class=4, size=40)
    shutil.copy(data / "val" / "red" / "red_000.png", data / "train" / "red" / "leaked.png")
    args = ["audit", str(data), "--backbone", "timm:test_resnet", "--no-pretrained",
            "--cache-dir", str(tmp_path / "cache"), "--workers", "0", "--device", "cpu"]
    result = CliRunner().invoke(command, [*args, "--json", "--csv", str(tmp_path / "a.csv"),
                                          "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["backbone"] == "timm:test_resnet" and doc["data"] == str(data)
    assert doc == json.loads((tmp_path / "out" / "audit.json").read_text())
    leak = next(f for f in doc["findings"] if f["file"].endswith("leaked.png"))
    assert leak["kind"] == "leak" and leak["score"] == 1.0
    assert leak["reason"].startswith("byte-identical to val image val/red/red_000.png")
    assert doc["summary"]["label_issues"]["checked"]
    assert doc["summary"]["features"]["cached"]
    assert (tmp_path / "a.csv").read_text().startswith(",".join(CSV_COLUMNS))
    # Again, as a table: the feature cache answers, and only two findings are shown.
    result = CliRunner().invoke(command, [*args, "--no-label-issues", "--limit", "2"],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "class balance: smallest / largest 0.89 (blue 8, red 9 in train)" in result.stdout
    assert "leaked.png" in result.stdout and "more: --limit 0" in result.stdout
    assert "label issues not checked: not asked for" in result.stderr


def test_the_command_refuses_bad_input(command, tmp_path: Path) -> None:
    result = CliRunner().invoke(command, ["audit", str(tmp_path / "nowhere")])
    assert result.exit_code != 0
    assert isinstance(result.exception, UsageError)  # tlreg's main prints it as one line
    assert "does not exist" in str(result.exception)
    data = colour_folder(tmp_path / "data", per_class=2, val_per_class=1, size=8)
    result = CliRunner().invoke(command, ["audit", str(data), "--folds", "1"])
    assert isinstance(result.exception, UsageError) and "--folds" in str(result.exception)


def test_the_default_backbone_is_trains(monkeypatch) -> None:
    from tlreg.engine.config import TrainConfig

    seen = {}

    def fake(split, backbone, **kwargs):
        seen["backbone"] = backbone
        raise UsageError("stop here")

    monkeypatch.setattr("tlreg.analysis.features.dataset_features", fake)
    split = DataSplit(("a", "b"), (Sample("x.png", 0),), ())
    with pytest.raises(UsageError, match="stop here"):
        audit(split)
    assert seen["backbone"] == TrainConfig.__dataclass_fields__["backbone"].default


# -- the acceptance check: real photos, real weights --------------------------------------------

OTHER = {"ants": "bees", "bees": "ants"}


@pytest.fixture(scope="module")
def hymenoptera_copy(shared_dir: Path, tmp_path_factory) -> tuple[Path, str]:
    """A copy of hymenoptera to plant problems in, and one feature cache for the module."""
    src = shared_dir / "data" / "hymenoptera_data"
    if not src.is_dir():
        pytest.skip(f"{src} not found")
    pytest.importorskip("cleanlab")
    from tlreg.models.backbones import get_backbone

    try:
        get_backbone("efficientnet_lite0")
    except Exception as exc:
        pytest.skip(f"efficientnet_lite0 is not installed (tlreg-efficientnet-lite): {exc}")
    root = tmp_path_factory.mktemp("audit")
    return shutil.copytree(src, root / "hymenoptera"), str(root / "cache")


def _leak_copy(src: Path, dst: Path) -> None:
    """`src` resized to 80% (Lanczos) and saved as JPEG quality 75 (the originals: ~90)."""
    with Image.open(src) as img:
        img = img.convert("RGB")
        img.resize((round(img.width * 0.8), round(img.height * 0.8)),
                   Image.Resampling.LANCZOS).save(dst, quality=75)


@pytest.mark.slow
def test_hymenoptera_flipped_labels_and_leaks_are_found(hymenoptera_copy) -> None:
    root, cache = hymenoptera_copy

    def run() -> AuditReport:
        return audit(str(root), backbone="efficientnet_lite0", cache_dir=cache, workers=0)

    clean = run()
    clean_issues = clean.of_kind("label_issue")
    print(f"\nclean: {len(clean_issues)} label-issue candidates, counts "
          f"{clean.summary['counts']}, probe {clean.summary['label_issues']}")
    assert len(clean_issues) <= 5  # "at most a handful"
    assert not clean.of_kind("leak") and not clean.of_kind("duplicate")
    assert str(root / "train" / "ants" / "imageNotFound.gif") in {
        f.file for f in clean.of_kind("outlier")}  # the placeholder GIF is no photo of either
    recalls = []
    for seed in (0, 1, 2):
        rng = random.Random(seed)
        flips = rng.sample(sorted((root / "train").glob("*/*.jpg")), 10)
        moved = [(p, root / "train" / OTHER[p.parent.name] / p.name) for p in flips]
        leaks = [(p, root / "train" / p.parent.name / f"copy_{p.stem}.jpg")
                 for p in rng.sample(sorted((root / "val").glob("*/*.jpg")), 5)]
        try:
            for src, dst in moved:
                src.rename(dst)
            for src, dst in leaks:
                _leak_copy(src, dst)
            t0 = time.perf_counter()
            report = run()
            seconds = time.perf_counter() - t0
        finally:  # restore the copy: the next seed's unchanged files hit the feature cache
            for src, dst in moved:
                if dst.exists():
                    dst.rename(src)
            for _, dst in leaks:
                dst.unlink(missing_ok=True)
        top = [f.file for f in report.of_kind("label_issue")[:20]]
        found = [str(dst) in top for _, dst in moved]
        recalls.append(sum(found))
        reported = {f.file: f for f in report.of_kind("leak")}
        sims = [round(reported[str(dst)].score, 3) if str(dst) in reported else None
                for _, dst in leaks]
        print(f"seed {seed}: {sum(found)}/10 flipped in the top 20 of "
              f"{len(report.of_kind('label_issue'))} candidates, leak cosines {sims}, "
              f"{seconds:.1f}s")
        for src, dst in leaks:
            assert str(dst) in reported, f"leak {dst.name} not reported ({sims})"
            assert reported[str(dst)].other == str(src)
    print(f"mean recall {sum(recalls) / 30:.2f} ({recalls})")
    assert sum(recalls) / 3 >= 7
