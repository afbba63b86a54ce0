"""Bad input caught before any work: typed options, odd images, hidden folders, file modes."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from images import colour_folder
from PIL import Image

from tlreg.data.folder import folder as discover
from tlreg.data.images import ImageTooLarge, load_rgb
from tlreg.engine.config import TrainConfig
from tlreg.errors import UsageError


def yaml_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text("data: d\nout: o\n" + text)
    return path


def test_yaml_values_are_parsed_to_their_types(tmp_path: Path) -> None:
    # PyYAML reads 1e-3 as a string (YAML 1.1 wants a dot); it is still a rate.
    cfg = TrainConfig.from_yaml(yaml_config(tmp_path, "lr: 1e-3\nepochs: '4'\naugment: 'no'\n"))
    assert (cfg.lr, cfg.epochs, cfg.augment) == (0.001, 4, False)
    assert isinstance(cfg.lr, float) and isinstance(cfg.epochs, int)


@pytest.mark.parametrize(("text", "message"), [
    ("epochs: ten", "epochs must be an integer, got 'ten'"),
    ("epochs: true", "epochs must be an integer, got True"),
    ("lr: fast", "lr must be a number, got 'fast'"),
    ("img_size: -5", "img_size must be in [16, 4096], got -5"),
    ("label_smoothing: 2", "label_smoothing must be in [0, 1), got 2.0"),
    ("device: tpu", "device must be auto, cpu, cuda, cuda:N or mps; got 'tpu'"),
    ("momentum: 1.5", "momentum must be in [0, 1), got 1.5"),
    ("weight_decay: -1", "weight_decay must be >= 0, got -1.0"),
    ("head_args: [1, 2]", "head_args must be a mapping of key: value, got [1, 2]"),
    ("cv_folds: 1", "cv_folds must be >= 2, got 1"),
])
def test_bad_values_are_one_clear_error(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(UsageError) as err:
        TrainConfig.from_yaml(yaml_config(tmp_path, text + "\n"))
    assert str(err.value) == message


def test_cli_rejects_a_bad_option_before_creating_anything(tmp_path: Path) -> None:
    data = colour_folder(tmp_path / "data", per_class=2, val_per_class=1)
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "tlreg", "train", str(data), "--out", str(out),
                           "--img-size", "-5"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "img_size must be in [16, 4096], got -5" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


def test_predict_options_are_checked(tmp_path: Path) -> None:
    from tlreg.models.transfer import create_model
    from tlreg.predict import evaluate, predict

    model = create_model("timm:test_resnet", 2, pretrained=False, label_names=("a", "b"))
    with pytest.raises(UsageError, match="batch_size must be an integer >= 1, got 0"):
        predict(model, [str(tmp_path)], batch_size=0)
    with pytest.raises(UsageError, match="top_k must be an integer >= 1, got 0"):
        predict(model, [str(tmp_path)], top_k=0)
    with pytest.raises(UsageError, match="device must be"):
        evaluate(model, str(tmp_path), device="tpu")


def test_hidden_folders_are_skipped_at_any_depth(tmp_path: Path) -> None:
    data = colour_folder(tmp_path / "data", per_class=3, val_per_class=1)
    for hidden in ("train/red/.thumbs/x.png", "train/red/sub/.cache/y.png", "train/red/.z.png"):
        path = data / hidden
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(path)
    (data / "train" / "red" / "sub" / "ok.png").write_bytes(
        (data / "train" / "red" / "red_000.png").read_bytes())
    split = discover(data)
    names = [Path(s.path).relative_to(data).as_posix() for s in split.train]
    assert not any("/." in n for n in names)
    assert "train/red/sub/ok.png" in names


def test_16_bit_images_are_scaled_not_clipped(tmp_path: Path) -> None:
    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    rgb = np.asarray(load_rgb(tmp_path / "ramp16.png"))
    assert rgb.shape == (32, 32, 3)
    assert rgb.min() == 0 and rgb.max() == 255
    assert abs(int(rgb[16, 0, 0]) - 128) <= 2  # mid-grey stays mid-grey (was clipped to white)
    Image.fromarray((ramp / 65535).astype(np.float32)).save(tmp_path / "ramp.tiff")
    assert np.asarray(load_rgb(tmp_path / "ramp.tiff")).max() == 255


def test_an_image_that_would_explode_in_memory_is_refused(tmp_path: Path) -> None:
    Image.new("L", (200_000, 1)).save(tmp_path / "line.png")
    assert (tmp_path / "line.png").stat().st_size < 1000
    with pytest.raises(ImageTooLarge, match=r"line\.png: 200000x1"):
        load_rgb(tmp_path / "line.png")


def test_training_skips_the_oversized_image_and_names_it(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from tlreg.engine.trainer import fit

    monkeypatch.setenv("TLREG_CACHE_DIR", str(tmp_path / "cache"))
    data = colour_folder(tmp_path / "data", per_class=6, val_per_class=2)
    Image.new("RGB", (20_000, 10)).save(data / "train" / "red" / "line.png")
    with pytest.warns(UserWarning, match=r"line\.png"):
        result = fit(data=str(data), out=str(tmp_path / "run"), backbone="timm:test_resnet",
                     pretrained=False, img_size=32, workers=0, quiet=True, device="cpu",
                     policy="feature-extract")
    assert result.summary["skipped"] == [str(data / "train" / "red" / "line.png")]


def _modes(root: Path) -> set[tuple[str, int]]:
    return {("d" if p.is_dir() else "f", stat.S_IMODE(p.stat().st_mode))
            for p in root.rglob("*") if not p.is_symlink()}


def test_created_files_follow_the_umask(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tlreg.engine.trainer import fit
    from tlreg.sharing.exporters import export_run

    monkeypatch.setenv("TLREG_CACHE_DIR", str(tmp_path / "cache"))
    data = colour_folder(tmp_path / "data", per_class=4, val_per_class=2)
    old = os.umask(0o022)
    try:
        fit(data=str(data), out=str(tmp_path / "run"), backbone="timm:test_resnet",
            pretrained=False, img_size=32, workers=0, quiet=True, device="cpu",
            policy="feature-extract")
        export_run(tmp_path / "run", tmp_path / "artifact")
    finally:
        os.umask(old)
    for root in (tmp_path / "run", tmp_path / "artifact"):
        assert _modes(root) <= {("d", 0o755), ("f", 0o644)}, root


@pytest.mark.slow  # two training processes racing: ~15 s; CI's slow step runs it
def test_two_writers_one_run_folder(tmp_path: Path) -> None:
    """A second `tlreg train` on a run folder in use is refused, naming the first's pid."""
    data = colour_folder(tmp_path / "data", per_class=4, val_per_class=2)
    out = tmp_path / "run"
    env = {**os.environ, "TLREG_CACHE_DIR": str(tmp_path / "cache")}
    # The first holds the lock while it waits on its own stdin; the second must not wait.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; from tlreg.lock import "
         "exclusive\nPath(sys.argv[1]).mkdir()\nwith exclusive(Path(sys.argv[1])):\n"
         "    print('locked', flush=True); sys.stdin.read()", str(out)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        proc = subprocess.run(
            [sys.executable, "-m", "tlreg", "train", str(data), "--out", str(out),
             "--backbone", "timm:test_resnet", "--no-pretrained", "--img-size", "32",
             "--device", "cpu", "--quiet"], capture_output=True, text=True, env=env)
        assert proc.returncode == 7, proc.stderr
        assert f"pid and host: {holder.pid} " in proc.stderr
        assert "Traceback" not in proc.stderr
        assert [p.name for p in out.iterdir()] == [".tlreg.lock"]  # nothing of the second
    finally:
        holder.communicate("")
    # The holder is gone (the kernel released its lock): the same folder trains now.
    proc = subprocess.run(
        [sys.executable, "-m", "tlreg", "train", str(data), "--out", str(out),
         "--backbone", "timm:test_resnet", "--no-pretrained", "--img-size", "32",
         "--device", "cpu", "--quiet", "--policy", "feature-extract"],
        capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert (out / "summary.json").is_file()


def test_a_run_that_fails_early_leaves_no_folder(tmp_path: Path) -> None:
    from tlreg.engine.trainer import fit

    with pytest.raises(UsageError, match="does not exist"):
        fit(data=str(tmp_path / "missing"), out=str(tmp_path / "run"), quiet=True)
    assert not (tmp_path / "run").exists()


@pytest.fixture
def finished(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    import shutil

    from tlreg.engine.trainer import fit

    monkeypatch.setenv("TLREG_CACHE_DIR", str(tmp_path / "cache"))
    data = colour_folder(tmp_path / "data", per_class=4, val_per_class=2)
    fit(data=str(data), out=str(tmp_path / "run"), backbone="timm:test_resnet",
        pretrained=False, img_size=32, workers=0, quiet=True, device="cpu",
        policy="feature-extract", epochs=1)
    shutil.copytree(tmp_path / "run", tmp_path / "pristine")
    return data, tmp_path / "run"


def _unchanged(run: Path) -> None:
    pristine = run.with_name("pristine")
    for f in pristine.rglob("*"):
        if f.is_file() and f.name != ".tlreg.lock":
            assert (run / f.relative_to(pristine)).read_bytes() == f.read_bytes(), f


@pytest.mark.parametrize(("change", "options", "message"), [
    (lambda d: [(d / s / "red").rename(d / s / "crimson") for s in ("train", "val")], {},
     'classes ["blue", "red"] -> ["blue", "crimson"]'),
    (lambda d: colour_folder(d, classes=("green",), per_class=2, val_per_class=1), {},
     'classes ["blue", "red"] -> ["blue", "green", "red"]'),
    (lambda d: None, {"img_size": 48}, "data_config"),
    (lambda d: None, {"backbone": "timm:test_efficientnet"}, 'backbone "timm:test_resnet"'),
    (lambda d: None, {"label_smoothing": 0.1}, "label_smoothing 0.0 -> 0.1"),
])
def test_resume_refuses_a_changed_world(finished: tuple[Path, Path], change, options,
                                        message: str) -> None:
    from tlreg.engine.trainer import fit

    data, run = finished
    change(data)
    with pytest.raises(UsageError, match="cannot resume") as err:
        fit(resume=run, epochs=2, **options)
    assert message in str(err.value) and "\n" not in str(err.value)
    _unchanged(run)


def test_resume_on_added_files_needs_resume_anyway(finished: tuple[Path, Path]) -> None:
    from tlreg.engine.trainer import fit

    data, run = finished
    extra = data / "train" / "red" / "extra.png"
    extra.write_bytes((data / "train" / "red" / "red_000.png").read_bytes())
    with pytest.raises(UsageError, match=r"the file list changed.*--resume-anyway"):
        fit(resume=run, epochs=2)
    _unchanged(run)
    result = fit(resume=run, epochs=2, resume_anyway=True)
    assert result.summary["epochs"] == 2 and result.summary["train_images"] == 9


@pytest.mark.parametrize("policy", ["feature-extract", "finetune"])
@pytest.mark.parametrize("split", ["train", "val"])
def test_a_split_with_no_readable_image_is_an_error(tmp_path: Path, policy: str,
                                                    split: str) -> None:
    from tlreg.engine.trainer import fit

    data = colour_folder(tmp_path / "data", per_class=3, val_per_class=2)
    for f in (data / split).rglob("*.png"):
        f.write_bytes(b"not an image")
    with pytest.warns(UserWarning, match="skipped unreadable image"), \
            pytest.raises(UsageError, match=f"none of the .* images under .*{split} could be read"):
        fit(data=str(data), out=str(tmp_path / "run"), backbone="timm:test_resnet",
            pretrained=False, img_size=32, workers=0, quiet=True, device="cpu", policy=policy,
            epochs=1, cache_dir=str(tmp_path / "cache"))
    assert not (tmp_path / "run").exists()  # nothing half-made to trip the next attempt


def test_a_run_killed_before_its_first_epoch_starts_again(finished: tuple[Path, Path],
                                                          tmp_path: Path) -> None:
    from tlreg.engine.trainer import fit

    data, run = finished
    killed = tmp_path / "killed"
    killed.mkdir()
    for name in ("config.yaml", "model.json"):  # what a SIGKILL after two writes leaves
        (killed / name).write_bytes((run / name).read_bytes())
    with pytest.raises(UsageError, match="no completed epoch was saved; start it again"):
        fit(resume=killed)
    result = fit(data=str(data), out=str(killed), backbone="timm:test_resnet", pretrained=False,
                 img_size=32, workers=0, quiet=True, device="cpu", policy="feature-extract")
    assert result.summary["status"] == "completed"


def test_stale_temporary_folders_are_cleaned_under_the_lock(finished: tuple[Path, Path]) -> None:
    from tlreg.engine.trainer import fit

    _, run = finished
    stale = [run / "checkpoints" / ".last.tmp-dead", run / ".config.yaml.x.tmp"]
    stale[0].mkdir()
    (stale[0] / "model.safetensors").write_bytes(b"half")
    stale[1].write_text("half")
    fit(resume=run, epochs=2)
    assert not any(p.exists() for p in stale)


def test_an_artifact_swap_killed_between_its_renames(finished: tuple[Path, Path],
                                                     tmp_path: Path) -> None:
    from tlreg.sharing.api import load_artifact
    from tlreg.sharing.exporters import export_run

    _, run = finished
    art = export_run(run, tmp_path / "art")
    art.rename(tmp_path / ".art.old")  # killed after the first rename of a second export
    assert load_artifact(tmp_path / "art").info.num_classes == 2  # readers find the old state
    export_run(run, tmp_path / "art")  # the next writer restores, then swaps
    assert (tmp_path / "art" / "config.json").is_file()
    assert not (tmp_path / ".art.old").exists()


def test_a_checkpoint_swap_killed_between_renames_is_never_lost(tmp_path: Path) -> None:
    """Resumed from `.last.old` (its swap was killed), the next save keeps a copy throughout."""
    import torch

    from tlreg._io import checkpoint_dir, read_checkpoint, save_checkpoint

    last = tmp_path / "checkpoints" / "last"
    save_checkpoint(last, {"w": torch.ones(2)}, {"epoch": 1})
    last.rename(last.with_name(".last.old"))  # killed after the first rename of a save
    assert checkpoint_dir(last) == last.with_name(".last.old")
    seen: list[bool] = []
    real_rmtree = __import__("shutil").rmtree

    def watching_rmtree(path, *a, **k):  # at every removal, some complete copy must exist
        seen.append(checkpoint_dir(last) is not None and Path(path) != checkpoint_dir(last))
        return real_rmtree(path, *a, **k)

    import shutil as _shutil

    _shutil.rmtree = watching_rmtree
    try:
        save_checkpoint(last, {"w": torch.zeros(2)}, {"epoch": 2})
    finally:
        _shutil.rmtree = real_rmtree
    assert seen and all(seen)
    assert read_checkpoint(last)[1]["epoch"] == 2


def test_a_val_split_that_ends_up_empty_is_an_error(tmp_path: Path) -> None:
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / c / "1.png")
    with pytest.raises(UsageError, match=r"validation split of .* is empty: every class has a "
                                         "single image"):
        discover(tmp_path, 0.2)


@pytest.mark.parametrize(("name", "content", "message"), [
    ("model.json", "{not json", "is damaged or not tlreg's"),
    ("model.json", '{"info": []}', "'info' is list"),
    ("model.json", '{"info": {"backbone": 3}}', "info.backbone is missing"),
    ("checkpoints/last/state.json", '{"epoch": "2"}', "last checkpoint is damaged"),
    ("checkpoints/last/state.json", "[1, 2]", "not a JSON object"),
])
def test_damaged_run_files_are_one_clear_error(finished: tuple[Path, Path], name: str,
                                               content: str, message: str) -> None:
    from tlreg.engine.trainer import fit
    from tlreg.predict import load_model

    _, run = finished
    (run / name).write_text(content)
    with pytest.raises(UsageError, match=re.escape(message)):
        fit(resume=run, epochs=2)
    if name == "model.json":
        with pytest.raises(UsageError, match=re.escape(message)):
            load_model(str(run))
