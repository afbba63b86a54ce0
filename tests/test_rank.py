"""`tlreg rank` (tlreg.analysis.rank, tlreg.cli.rank) and `--backbone best-of:RANK_DIR`."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import typer
from images import colour_folder, count_backbone_images
from typer.testing import CliRunner

from tlreg.analysis.rank import BackboneScore, Ranking, expand, rank, write_rank
from tlreg.errors import UnknownNameError, UsageError
from tlreg.models.backbones import resolve_best_of

TINY = "timm:test_resnet,timm:test_efficientnet"


@pytest.fixture(scope="module")
def colours(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("colours")
    return colour_folder(root, ("red", "blue", "green"), per_class=10, val_per_class=4, size=32)


@pytest.fixture
def tiny_plugin(plugin_site, tmp_path: Path) -> tuple[str, str]:
    """Two registered backbones, rk_resnet and rk_effnet, with 'pretrained' weights in files
    (seeded, so no download): the glob, the random-init control and best-of need names."""
    import torch
    from safetensors.torch import save_file

    from tlreg.models.backbones import build_backbone
    from tlreg.specs import BackboneSpec

    files = {}
    for arch in ("test_resnet", "test_efficientnet"):
        torch.manual_seed(123)
        model = build_backbone(BackboneSpec(arch), name=arch, pretrained=False)
        files[arch] = tmp_path / f"{arch}.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(files[arch]))
    plugin_site.add("Rank-Test", {"tlreg.backbones": {"rk_resnet": "rank_test:rk_resnet",
                                                       "rk_effnet": "rank_test:rk_effnet"}},
                    {"rank_test": f"""
                        from tlreg.specs import BackboneSpec

                        rk_resnet = BackboneSpec("test_resnet",
                                                 weights_file={str(files['test_resnet'])!r})
                        rk_effnet = BackboneSpec("test_efficientnet",
                                                 weights_file={str(files['test_efficientnet'])!r})
                    """})
    return "rk_resnet", "rk_effnet"


def _sorted_best_first(rows: tuple[BackboneScore, ...]) -> bool:
    ranked = [r for r in rows if r.status == "ranked"]
    keys = [(r.cv_accuracy, r.logme) for r in ranked]
    return keys == sorted(keys, reverse=True) and all(
        r.status != "ranked" for r in rows[len(ranked):])


# -- which backbones --------------------------------------------------------------------------


def test_expand_globs_registered_names_and_passes_timm_through(tiny_plugin):
    # a glob expands to the matching names in sorted order, an explicit list keeps its own
    got = expand("rk_*, timm:test_resnet,random:rk_effnet")
    assert [(c.label, c.backbone, c.pretrained, c.control) for c in got] == [
        ("rk_effnet", "rk_effnet", True, False), ("rk_resnet", "rk_resnet", True, False),
        ("timm:test_resnet", "timm:test_resnet", True, False),
        ("random:rk_effnet", "rk_effnet", False, True)]
    # --random-init: the first backbone's control; every candidate once
    got = expand(["rk_resnet,rk_resnet", "rk_effnet"], random_init=True)
    assert [c.label for c in got] == ["rk_resnet", "rk_effnet", "random:rk_resnet"]
    # --no-pretrained: every candidate is random-init already, no control of its own
    assert [(c.label, c.control) for c in expand("random:rk_resnet,rk_resnet",
                                                 pretrained=False)] == [("rk_resnet", False)]


@pytest.mark.parametrize(("patterns", "message"), [
    ("nothing_like_this*", "matches no registered backbone"),
    ("timm:resnet*", "timm: names are not expanded"),
    (" , ", "needs at least one name"),
    ("random:", "needs a backbone name"),
])
def test_expand_bad_patterns_are_one_clear_error(patterns, message):
    with pytest.raises(UsageError, match=message):
        expand(patterns)


def test_expand_unknown_name_suggests_a_close_one():
    with pytest.raises(UnknownNameError, match="did you mean 'resnet50'"):
        expand("resnet5O")
    with pytest.raises(UsageError, match="with --no-pretrained"):
        expand("resnet18", random_init=True, pretrained=False)


# -- scores, order, cache ---------------------------------------------------------------------


def test_rank_scores_sorts_and_a_second_rank_reads_the_cache(colours, tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    first = rank(str(colours), TINY, pretrained=False, cache_dir=cache, device="cpu")
    assert isinstance(first, Ranking) and len(first.rows) == 2
    assert (first.train_images, first.val_images, first.folds) == (30, 12, 5)
    assert _sorted_best_first(first.rows)
    for r in first.rows:
        assert r.status == "ranked" and not r.control and not r.pretrained
        assert r.computed_images == 42 and r.params > 0 and r.feature_dim > 0
        assert len(r.fold_accuracies) == r.folds == 5
        assert r.cv_std == pytest.approx(statistics.stdev(r.fold_accuracies))
        # the folds at the chosen C agree with the solver's pooled CV accuracy (6 per fold)
        assert statistics.mean(r.fold_accuracies) == pytest.approx(r.cv_accuracy, abs=1 / 30)
        assert 0 <= r.val_accuracy <= 1 and r.logme is not None and r.C is not None
        # LogME and the probe are timed apart from the feature pass
        assert r.feature_seconds > 0 and r.logme_seconds > 0 and r.probe_seconds > 0
        assert r.score_seconds == pytest.approx(r.logme_seconds + r.probe_seconds)
    assert first.best is first.rows[0]
    assert first.recommendation.startswith(f"train {first.rows[0].backbone}: probe CV accuracy")

    seen = count_backbone_images(monkeypatch)
    second = rank(str(colours), TINY, pretrained=False, cache_dir=cache, device="cpu")
    assert seen == []  # every feature from the cache: no image through a backbone
    assert [r.computed_images for r in second.rows] == [0, 0]
    for a, b in zip(first.rows, second.rows, strict=True):  # the same features, the same scores
        assert (a.name, a.cv_accuracy, a.fold_accuracies, a.C, a.val_accuracy) == (
            b.name, b.cv_accuracy, b.fold_accuracies, b.C, b.val_accuracy)
        assert a.logme == pytest.approx(b.logme, rel=1e-9)


def test_to_dict_and_files(colours, tmp_path):
    ranking = rank(str(colours), TINY, pretrained=False, cache_dir=str(tmp_path / "c"),
                   device="cpu")
    data = json.loads(json.dumps(ranking.to_dict()))  # plain JSON
    assert data["format"] == "tlreg-rank" and data["best"] == ranking.rows[0].backbone
    assert data["best_pretrained"] is False and data["classes"] == ["blue", "green", "red"]
    assert data["order"].startswith("probe CV accuracy, then LogME")
    assert [r["rank"] for r in data["rows"]] == [1, 2]
    assert data["score_seconds"] == pytest.approx(
        sum(r["logme_seconds"] + r["probe_seconds"] for r in data["rows"]))
    row = data["rows"][0]
    for key in ("name", "backbone", "status", "cv_accuracy", "cv_std", "fold_accuracies",
                "logme", "val_accuracy", "params", "feature_seconds", "logme_seconds",
                "probe_seconds", "score_seconds", "computed_images", "C", "folds"):
        assert key in row, key
    json_path, png_path = write_rank(ranking, tmp_path / "out")
    assert json.loads(json_path.read_text()) == data
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png_path.stat().st_size > 2000
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["rank.json", "rank.png"]
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError, match="is a file"):
        write_rank(ranking, tmp_path / "file")


def test_budget_skips_slow_backbones_but_never_cached_ones(colours, tmp_path):
    cache = str(tmp_path / "cache")
    cold = rank(str(colours), TINY, pretrained=False, cache_dir=cache, device="cpu",
                budget=1e-6)
    assert [r.status for r in cold.rows] == ["skipped", "skipped"]
    for r in cold.rows:
        assert r.estimate_seconds > 1e-6 and "over --budget 1e-06s" in r.reason
        assert r.feature_seconds is None and r.cv_accuracy is None and r.params > 0
    assert cold.best is None and cold.recommendation.startswith("no backbone could be ranked")
    write_rank(cold, tmp_path / "none")
    with pytest.raises(UsageError, match="recommends no backbone"):
        resolve_best_of(f"best-of:{tmp_path / 'none'}")

    rank(str(colours), "timm:test_resnet", pretrained=False, cache_dir=cache, device="cpu")
    warm = rank(str(colours), TINY, pretrained=False, cache_dir=cache, device="cpu",
                budget=1e-6)
    by = {r.name: r for r in warm.rows}
    assert by["timm:test_resnet"].status == "ranked"  # cached features cost nothing
    assert by["timm:test_resnet"].estimate_seconds == 0.0
    assert by["timm:test_efficientnet"].status == "skipped"
    assert warm.rows[0].name == "timm:test_resnet" and warm.best.name == "timm:test_resnet"


def test_random_control_and_a_failing_backbone(tiny_plugin, colours, tmp_path, monkeypatch):
    from tlreg.errors import WeightsError
    from tlreg.models import backbones

    real = backbones.build_backbone

    def offline(spec, *, name, pretrained=True, **kw):
        if name == "rk_resnet" and pretrained:
            raise WeightsError("could not get pretrained weights for backbone 'rk_resnet'")
        return real(spec, name=name, pretrained=pretrained, **kw)

    monkeypatch.setattr("tlreg.models.transfer.build_backbone", offline)
    ranking = rank(str(colours), "rk_*", random_init=True, cache_dir=str(tmp_path / "c"),
                   device="cpu")
    by = {r.name: r for r in ranking.rows}  # the glob sorts: rk_effnet is first, controlled
    assert set(by) == {"rk_effnet", "rk_resnet", "random:rk_effnet"}
    assert by["rk_resnet"].status == "failed" and "pretrained weights" in by["rk_resnet"].reason
    assert ranking.rows[-1].name == "rk_resnet"  # failures last
    control = by["random:rk_effnet"]
    assert control.control and not control.pretrained and control.status == "ranked"
    assert control.backbone == "rk_effnet" and by["rk_effnet"].pretrained
    assert ranking.best.name == "rk_effnet"  # a control is never the recommendation
    assert ranking.to_dict()["best"] == "rk_effnet"


def test_rank_refuses_multi_label_and_one_class_data(tmp_path):
    from tlreg.data.sources import DataSplit, Sample

    one = DataSplit(("a", "b"), tuple(Sample(f"{i}.png", 0) for i in range(4)), ())
    with pytest.raises(UsageError, match="at least 2 classes"):
        rank(one, "timm:test_resnet", pretrained=False)
    multi = DataSplit(("a", "b"), tuple(Sample(f"{i}.png", (1, i % 2)) for i in range(4)), ())
    with pytest.raises(UsageError, match="one label per image"):
        rank(multi, "timm:test_resnet", pretrained=False)
    with pytest.raises(UsageError, match="--folds"):
        rank(one, "timm:test_resnet", folds=1)
    with pytest.raises(UsageError, match="--budget"):
        rank(one, "timm:test_resnet", budget=0)


# -- best-of: ---------------------------------------------------------------------------------


def test_fit_of_the_winner_reads_the_cache_and_records_its_name(colours, tmp_path,
                                                                  monkeypatch):
    import tlreg
    from tlreg.engine.config import TrainConfig

    cache = str(tmp_path / "cache")
    ranking = rank(str(colours), TINY, pretrained=False, cache_dir=cache, device="cpu")
    write_rank(ranking, tmp_path / "ranked")
    winner = ranking.best
    seen = count_backbone_images(monkeypatch)
    config = TrainConfig(data=str(colours), out=str(tmp_path / "run"),
                         backbone=f"best-of:{tmp_path / 'ranked'}", pretrained=False,
                         policy="feature-extract", cache_dir=cache, device="cpu", quiet=True)
    assert config.backbone == winner.backbone
    result = tlreg.fit(config)
    assert seen == []  # rank's features (random-init too: seeded as the Trainer seeds)
    run_json = json.loads((tmp_path / "run" / "run.json").read_text())
    model_json = json.loads((tmp_path / "run" / "model.json").read_text())
    assert winner.backbone in json.dumps(run_json) and "best-of:" not in json.dumps(run_json)
    assert model_json["info"]["backbone"] == winner.backbone
    # the same solver on the same features: rank's val accuracy is what training reaches
    assert result.summary["val_accuracy"] == pytest.approx(winner.val_accuracy)


def test_best_of_errors(tmp_path):
    assert resolve_best_of("resnet18") == "resnet18"
    with pytest.raises(UsageError, match="needs the folder"):
        resolve_best_of("best-of:")
    with pytest.raises(UsageError, match="tlreg rank DATA --backbones PATTERNS --out"):
        resolve_best_of(f"best-of:{tmp_path / 'missing'}")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "rank.json").write_text("{not json")
    with pytest.raises(UsageError, match=r"rank file .* is damaged or not tlreg's"):
        resolve_best_of(f"best-of:{bad}")
    (bad / "rank.json").write_text(json.dumps({"best": 3, "rows": []}))
    with pytest.raises(UsageError, match="'best' is int"):
        resolve_best_of(f"best-of:{bad}")
    (bad / "rank.json").write_text(json.dumps({"best": "resnet50", "rows": []}))
    assert resolve_best_of(f"best-of:{bad}") == "resnet50"
    assert resolve_best_of(f"best-of:{bad / 'rank.json'}") == "resnet50"  # the file itself
    from tlreg.engine.config import TrainConfig

    with pytest.raises(UsageError, match=r"no .*rank\.json"):
        TrainConfig(data="d", out="o", backbone=f"best-of:{tmp_path / 'nowhere'}")


# -- the command ------------------------------------------------------------------------------


def _app() -> typer.Typer:
    from tlreg.cli import rank as rank_cli

    app = typer.Typer()
    rank_cli.register(app)

    @app.callback()
    def _root() -> None:  # a group, as in tlreg: `rank` stays a subcommand
        pass

    return app


def test_cli_table_json_and_out(colours, tmp_path):
    runner = CliRunner()
    out = tmp_path / "ranked"
    args = ["rank", str(colours), "--backbones", TINY, "--no-pretrained", "--device", "cpu",
            "--cache-dir", str(tmp_path / "cache")]
    res = runner.invoke(_app(), [*args, "--out", str(out)], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "recommended: train timm:test_" in res.output and "best-of:" in res.output
    assert "timm:test_resnet" in res.output and "± " in res.output
    assert (out / "rank.json").is_file() and (out / "rank.png").is_file()
    res = runner.invoke(_app(), [*args, "--json", "--quiet"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert [r["computed_images"] for r in data["rows"]] == [0, 0]  # the first call's cache
    assert data["best"] == json.loads((out / "rank.json").read_text())["best"]


def test_cli_pattern_matching_nothing_fails_clearly(colours, tmp_path):
    res = CliRunner().invoke(_app(), ["rank", str(colours), "--backbones", "nothing_here*",
                                      "--cache-dir", str(tmp_path)])
    assert res.exit_code != 0
    assert isinstance(res.exception, UsageError)
    assert "backbone pattern 'nothing_here*' matches no registered backbone" in str(
        res.exception)
    assert not (tmp_path / "features").exists()  # nothing was computed
