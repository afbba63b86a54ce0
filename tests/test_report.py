"""`tlreg report RUN`: the self-contained HTML page, its sections, escaping, and a real browser.

Most tests write a run folder's files by hand (every section's input, or some missing); one
trains a tiny real run. The browser test drives Debian's headless chromium over the DevTools
protocol on a pipe (`--remote-debugging-pipe`: stdlib only, no client library).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import html
import io
import json
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tlreg.errors import UsageError
from tlreg.runs.report import MAX_ERRORS, render_report, write_report

CLASSES = ["ants", "bees", "wasps"]
EVIL = '<script>alert("x")</script>'


# -- a run folder written by hand ------------------------------------------------------------


def _json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")


def _bins(shift: float) -> list[dict[str, Any]]:
    """Ten reliability bins whose accuracy trails their confidence by `shift`."""
    out = []
    for i in range(10):
        lo, hi = i / 10, (i + 1) / 10
        count = 0 if i < 3 else 5 + i
        conf = (lo + hi) / 2
        out.append({"lower": lo, "upper": hi, "count": count,
                    "accuracy": max(0.0, conf - shift) if count else None,
                    "confidence": conf if count else None})
    return out


def make_run(root: Path, *, classes: list[str] = CLASSES, images: Path | None = None,
             wrong: int = 4, multi_label: bool = False, files: tuple[str, ...] = (
                 "summary", "history", "best", "predictions", "audit")) -> Path:
    """A run folder with the files named in `files` (model.json always)."""
    run = root / "run"
    n = len(classes)
    _json(run / "model.json", {"info": {
        "backbone": "timm:test_resnet", "timm_name": "test_resnet", "head": "linear",
        "num_classes": n, "policy": "finetune", "head_args": {}, "policy_args": {},
        "label_names": classes, "problem_type": "multi_label_classification" if multi_label
        else "single_label_classification"}})
    if "summary" in files:
        summary: dict[str, Any] = {
            "status": "completed", "val_accuracy": 0.8, "best_val_accuracy": 0.85,
            "best_epoch": 2, "epochs": 3, "monitor": "val_accuracy", "train_images": 40,
            "val_images": 20, "wall_seconds": 3.5, "stop_reason": None}
        if multi_label:
            summary |= {"problem_type": "multi_label_classification", "best_val_map": 0.7}
        else:
            summary["calibration"] = {
                "temperature": 1.7, "fitted_on": "val", "val_images": 20, "ece_before": 0.21,
                "ece_after": 0.04, "reliability_before": _bins(0.2),
                "reliability_after": _bins(0.03)}
        _json(run / "summary.json", summary)
    if "history" in files:
        _json(run / "history.json", [
            {"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.1 / e, "train_accuracy": 0.5 + e / 10,
             "val_accuracy": 0.45 + e / 10,
             "lr": {"layer0": 1e-5 * (4 - e), "layer1": 1e-4 * (4 - e), "head": 1e-3 * (4 - e)}}
            for e in (1, 2, 3)])
    if "best" in files:
        best = run / "checkpoints" / "best"
        if multi_label:
            report = {"accuracy": 0.6, "map": 0.7, "micro_f1": 0.72, "macro_f1": 0.7,
                      "images": 20, "classes": classes, "per_class": {
                          c: {"precision": 0.7, "recall": 0.6, "ap": 0.75, "support": 8,
                              "threshold": 0.4} for c in classes}}
        else:
            matrix = [[6 if i == j else 1 for j in range(n)] for i in range(n)]
            from tlreg.metrics import classification_report

            labels = [i for i in range(n) for row in matrix[i] for _ in range(row)]
            preds = [j for i in range(n) for j in range(n) for _ in range(matrix[i][j])]
            report = classification_report(labels, preds, classes)
        _json(best / "state.json", {"epoch": 2, "val_accuracy": report["accuracy"],
                                    "report": report})
        (best / "model.safetensors").write_bytes(b"")  # never read: the report needs no tensor
    if "predictions" in files:
        rows = []
        folder = images or root / "images"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(wrong + 3):
            label, predicted = i % n, (i + (1 if i < wrong else 0)) % n
            path = folder / f"img_{i:03d}.png"
            Image.new("RGB", (200, 150), ((40 * i) % 255, 90, 160)).save(path)
            prob = 0.5 + 0.4 * (i + 1) / (wrong + 3)
            rows.append({"file": str(path), "label": label, "predicted": predicted,
                         "probability": prob, "label_probability": 1 - prob if label != predicted
                         else prob, "top": [[predicted, prob], [label, 1 - prob]]})
        _json(run / "val_predictions.json", {"epoch": 2, "weights": "model", "classes": classes,
                                             "temperature": 1.7, "rows": rows})
    if "audit" in files:
        _json(run / "audit.json", {"findings": [
            {"file": f"/data/train/ants/{i}.jpg", "kind": "label_error", "score": 0.9 - i / 100,
             "reason": f"looks like bees ({i})", "suggested": "bees"} for i in range(60)]})
    return run


def sections(page: str) -> dict[str, str]:
    """Each <section>'s HTML by its id."""
    return dict(re.findall(r'<section id="([a-z-]+)">(.*?)</section>', page, re.S))


def data_image(page: str, ident: str) -> Image.Image:
    m = re.search(rf'<img id="{ident}"[^>]*src="data:image/png;base64,([^"]+)"', page)
    assert m, f"no inlined {ident}"
    return Image.open(io.BytesIO(base64.b64decode(m.group(1))))


def assert_self_contained(page: str) -> None:
    assert ('<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
            "img-src data:; style-src 'unsafe-inline'\">") in page
    sources = re.findall(r'\b(?:src|href)="([^"]*)"', page)
    assert all(s.startswith("data:image/") for s in sources), sources
    assert "<script" not in page and "<link" not in page and "url(" not in page


# -- the page --------------------------------------------------------------------------------


def test_every_section_is_drawn_from_the_run_files(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    path = write_report(run)
    assert path == run / "report.html"
    page = path.read_text(encoding="utf-8")
    assert_self_contained(page)
    got = sections(page)
    assert list(got) == ["summary", "curves", "learning-rates", "confusion", "per-class",
                         "errors", "calibration", "audit"]
    for name, body in got.items():
        assert 'class="note"' not in body, (name, body[:300])
    summary = got["summary"]
    for text in ("completed", "timm:test_resnet", "finetune", "0.850", "best epoch"):
        assert text in summary
    for ident in ("curves-img", "lr-img", "confusion-img", "calibration-img"):
        im = data_image(page, ident)
        assert im.width > 200 and im.height > 150
        assert len(im.convert("RGB").getcolors(1 << 20)) > 20  # a drawn plot, not a blank
    rows = re.findall(r"<tr><td>(\w+)</td>", got["per-class"])
    assert rows == CLASSES
    assert "0.750" in got["per-class"]  # precision of each class: 6 / 8
    assert "T = 1.70" in got["calibration"] and "0.210 → 0.040" in got["calibration"]
    assert "60 findings (the first 50 shown)" in got["audit"]
    assert got["audit"].count("<tr>") == 51 and "looks like bees (49)" in got["audit"]
    assert "looks like bees (50)" not in got["audit"]


def test_worst_errors_are_the_most_confident_mistakes_with_labels_and_thumbnails(
        tmp_path: Path) -> None:
    run = make_run(tmp_path, wrong=MAX_ERRORS + 6)
    errors = sections(render_report(run))["errors"]
    cards = re.findall(r'<div class="card">(.*?)</div></div>', errors, re.S)
    assert len(cards) == MAX_ERRORS
    assert f"{MAX_ERRORS + 6} of {MAX_ERRORS + 9} val images misclassified" in errors
    shown = [float(p) for p in re.findall(r'class="wrong">predicted \w+ \(([\d.]+)\)', errors)]
    assert shown == sorted(shown, reverse=True) and len(shown) == MAX_ERRORS
    predictions = json.loads((run / "val_predictions.json").read_text())["rows"]
    most = max((r for r in predictions if r["label"] != r["predicted"]),
               key=lambda r: r["probability"])
    first = cards[0]
    assert f"true <b>{CLASSES[most['label']]}</b>" in first
    assert f"predicted {CLASSES[most['predicted']]}" in first
    assert Path(most["file"]).name in first
    assert "calibrated with T = 1.70" in errors
    thumbs = re.findall(r'<img class="thumb" alt="[^"]*" src="data:image/jpeg;base64,([^"]+)"',
                        errors)
    assert len(thumbs) == MAX_ERRORS
    im = Image.open(io.BytesIO(base64.b64decode(thumbs[0])))
    assert im.format == "JPEG" and max(im.size) == 128 and im.size == (128, 96)


def test_missing_unreadable_and_in_memory_images_are_placeholders(tmp_path: Path) -> None:
    run = make_run(tmp_path, wrong=4)
    pred = json.loads((run / "val_predictions.json").read_text())
    wrong = sorted((r for r in pred["rows"] if r["label"] != r["predicted"]),
                   key=lambda r: -r["probability"])
    Path(wrong[0]["file"]).unlink()
    Path(wrong[1]["file"]).write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    wrong[2]["file"] = None
    _json(run / "val_predictions.json", pred)
    errors = sections(render_report(run))["errors"]
    assert "file no longer exists" in errors
    assert "cannot decode the image" in errors
    assert "no file (image held in memory)" in errors
    assert errors.count('<img class="thumb"') == 1


def test_user_strings_are_escaped(tmp_path: Path) -> None:
    classes = [EVIL, "b&w", "cost $5 \"quoted\""]
    images = tmp_path / '<img src=x onerror=alert(1)>'
    run = make_run(tmp_path, classes=classes, images=images)
    _json(run / "audit.json", {"findings": [{"file": EVIL, "kind": "<b>dup</b>",
                                             "score": "<i>", "reason": EVIL}]})
    page = write_report(run).read_text(encoding="utf-8")
    assert_self_contained(page)  # no <script> anywhere, every src a data: image
    assert "<b>dup</b>" not in page and "onerror=alert(1)>" not in page
    assert html.escape(EVIL) in sections(page)["per-class"]
    assert html.escape(EVIL) in sections(page)["errors"]
    assert "&lt;b&gt;dup&lt;/b&gt;" in sections(page)["audit"]
    assert "b&amp;w" in page and "cost $5 &quot;quoted&quot;" in page
    assert data_image(page, "confusion-img").width > 200  # `$` in a label: text, not TeX


def test_a_run_with_only_model_json_renders_with_a_note_per_section(tmp_path: Path) -> None:
    run = make_run(tmp_path, files=())
    page = write_report(run).read_text(encoding="utf-8")
    assert_self_contained(page)
    got = sections(page)
    assert len(got) == 8
    assert "no summary.json (the run has not finished)" in got["summary"]
    assert "timm:test_resnet" in got["summary"]  # model.json's part of the headline
    for name in ("curves", "learning-rates"):
        assert "no history.json" in got[name]
    for name in ("confusion", "per-class"):
        assert "no checkpoints/best/state.json" in got[name]
    assert "no val_predictions.json" in got["errors"]
    assert "no audit.json" in got["audit"]
    assert "<img" not in page


def test_each_missing_file_leaves_out_only_its_sections(tmp_path: Path) -> None:
    run = make_run(tmp_path, files=("summary", "history", "best"))
    got = sections(render_report(run))
    assert 'id="confusion-img"' in got["confusion"] and 'id="curves-img"' in got["curves"]
    assert 'id="calibration-img"' in got["calibration"]
    assert "no val_predictions.json" in got["errors"] and "no audit.json" in got["audit"]
    summary = json.loads((run / "summary.json").read_text())
    (run / "history.json").write_text("[{not json")
    summary["calibration"] = {"temperature": None, "fitted_on": "val", "val_images": 20,
                              "ece_before": 0.01, "reliability_before": _bins(0.0),
                              "reason": "every validation image is classified right"}
    _json(run / "summary.json", summary)
    got = sections(render_report(run))
    assert ("no temperature fitted on the 20 val images: every validation image is "
            "classified right; ECE 0.010") in got["calibration"]
    assert data_image(got["calibration"], "calibration-img").width < 500  # one panel: before
    del summary["calibration"]
    _json(run / "summary.json", summary)
    got = sections(render_report(run))
    assert "summary.json has no calibration" in got["calibration"]
    assert "history.json could not be read" in got["curves"]
    assert 'id="confusion-img"' in got["confusion"]


def test_damaged_contents_are_a_note_not_a_broken_page(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    state = run / "checkpoints" / "best" / "state.json"
    data = json.loads(state.read_text())
    data["report"]["confusion_matrix"] = [[1, 2]]  # 1 row for 3 classes
    _json(state, data)
    _json(run / "audit.json", {"findings": "nothing"})
    got = sections(render_report(run))
    assert "this section could not be drawn" in got["confusion"]
    assert "this section could not be drawn" in got["audit"]
    assert 'id="curves-img"' in got["curves"]


def test_multi_label_runs_skip_what_does_not_apply(tmp_path: Path) -> None:
    run = make_run(tmp_path, multi_label=True, files=("summary", "history", "best"))
    got = sections(render_report(run))
    assert "multi-label run: no confusion matrix" in got["confusion"]
    assert "<img" not in got["confusion"]
    assert "multi-label run" in got["errors"]
    assert "<th>AP</th>" in got["per-class"] and "map 0.700" in got["per-class"]
    assert "best val mAP" in got["summary"]
    assert 'id="curves-img"' in got["curves"]


def test_audit_option_and_its_errors(tmp_path: Path) -> None:
    run = make_run(tmp_path, files=("summary",))
    elsewhere = tmp_path / "audit-out"
    _json(elsewhere / "audit.json", {"findings": [
        {"file": "a.jpg", "kind": "duplicate", "score": 0.99, "reason": "same as val/b.jpg"}]})
    got = sections(render_report(run, audit=elsewhere / "audit.json"))
    assert "same as val/b.jpg" in got["audit"] and "1 findings" in got["audit"]
    assert "same as val/b.jpg" in sections(render_report(run, audit=elsewhere))["audit"]
    with pytest.raises(UsageError, match="no such file"):
        render_report(run, audit=tmp_path / "nope.json")
    _json(elsewhere / "audit.json", {"findings": []})
    assert "the audit found nothing" in sections(render_report(run, audit=elsewhere))["audit"]


def test_not_a_run_folder_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not a tlreg run directory"):
        write_report(tmp_path)
    with pytest.raises(UsageError, match="not a tlreg run directory"):
        write_report(tmp_path / "missing")
    (tmp_path / "model.json").write_text("[1, 2]")
    with pytest.raises(UsageError, match="damaged"):
        write_report(tmp_path)
    assert not (tmp_path / "report.html").exists()


def test_the_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = make_run(tmp_path)
    (run / "report.html").write_text("the old report")
    import tlreg._io
    import tlreg.runs.report as report

    def full(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:  # the disk fills at the final rename
        m.setattr(tlreg._io.os, "replace", full)
        with pytest.raises(OSError):
            write_report(run)
    assert (run / "report.html").read_text() == "the old report"
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []

    def broken(fig: object) -> bytes:
        raise RuntimeError("matplotlib broke")

    with monkeypatch.context() as m:  # an error while drawing: nothing is written at all
        m.setattr(report, "_png", broken)
        with pytest.raises(RuntimeError):
            write_report(run, tmp_path / "elsewhere" / "r.html")
    assert not (tmp_path / "elsewhere").exists()
    assert (run / "report.html").read_text() == "the old report"
    out = write_report(run, tmp_path / "folder-out" / "r.html")
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    (tmp_path / "dir").mkdir()
    assert write_report(run, tmp_path / "dir") == tmp_path / "dir" / "report.html"


def test_importing_the_report_and_its_command_stays_cheap() -> None:
    code = ("import sys, tlreg.runs.report, tlreg.cli.report; "
            "heavy = [m for m in ('matplotlib', 'PIL', 'torch', 'timm') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- the command -----------------------------------------------------------------------------


def test_report_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                        capsys: pytest.CaptureFixture[str]) -> None:
    import typer

    import tlreg.cli
    from tlreg.cli import report

    app = typer.Typer(pretty_exceptions_enable=False)
    app.callback()(lambda: None)  # a group: `report` stays a subcommand, as in `tlreg`
    report.register(app)
    monkeypatch.setattr(tlreg.cli, "app", app)  # main()'s error handling around this app
    opened: list[str] = []
    monkeypatch.setattr("webbrowser.open", lambda url, *a, **k: opened.append(url) or True)
    run = make_run(tmp_path, files=("summary", "history"))
    audit = tmp_path / "a.json"
    _json(audit, {"findings": [{"file": "x.jpg", "kind": "outlier", "score": 3.0,
                                "reason": "far from every class"}]})

    def tlreg_main(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            tlreg.cli.main(list(argv))
        out, err = capsys.readouterr()
        return int(exc.value.code or 0), out, err

    code, out, err = tlreg_main("report", str(run))
    assert code == 0 and out.strip() == f"wrote {run / 'report.html'}" and not opened
    code, out, _ = tlreg_main("report", str(run), "--out", str(tmp_path / "r.html"),
                              "--audit", str(audit), "--open")
    assert code == 0 and opened == [(tmp_path / "r.html").resolve().as_uri()]
    assert "far from every class" in (tmp_path / "r.html").read_text(encoding="utf-8")
    code, out, err = tlreg_main("report", str(tmp_path / "nothing"))
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [
        f"error: {tmp_path / 'nothing'} is not a tlreg run directory (no model.json): pass "
        "the folder `tlreg train --out` wrote"]
    code, _, err = tlreg_main("report", str(run), "--audit", str(tmp_path / "no.json"))
    assert code == 2 and "no such file" in err


# -- a real run ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from images import colour_folder

    from tlreg.engine.config import TrainConfig
    from tlreg.engine.trainer import fit

    root = tmp_path_factory.mktemp("real")
    data = colour_folder(root / "data", per_class=8, val_per_class=4, size=24)
    old = os.environ.get("TLREG_CACHE_DIR")
    os.environ["TLREG_CACHE_DIR"] = str(root / "cache")
    try:
        fit(TrainConfig(data=str(data), out=str(root / "run"), backbone="timm:test_resnet",
                        pretrained=False, policy="finetune", img_size=32, batch_size=8,
                        epochs=2, workers=0, quiet=True, device="cpu"))
    finally:
        if old is None:
            os.environ.pop("TLREG_CACHE_DIR", None)
        else:
            os.environ["TLREG_CACHE_DIR"] = old
    return root / "run"


def test_report_of_a_real_tiny_run(real_run: Path) -> None:
    page = write_report(real_run).read_text(encoding="utf-8")
    assert_self_contained(page)
    got = sections(page)
    assert "could not" not in page  # every file the trainer wrote is read as it wrote it
    for name, ident in (("curves", "curves-img"), ("learning-rates", "lr-img"),
                        ("confusion", "confusion-img")):
        assert f'id="{ident}"' in got[name], got[name][:300]
    assert re.findall(r"<tr><td>(\w+)</td>", got["per-class"]) == ["blue", "red"]
    assert "completed" in got["summary"] and "timm:test_resnet" in got["summary"]
    # The trainer's newer files: drawn when this tlreg writes them, a note when it does not.
    if (real_run / "val_predictions.json").is_file():
        assert 'class="card"' in got["errors"] or "no misclassified" in got["errors"]
    else:
        assert "no val_predictions.json" in got["errors"]
    summary = json.loads((real_run / "summary.json").read_text())
    if "calibration" in summary:
        assert 'id="calibration-img"' in got["calibration"]
    else:
        assert "has no calibration" in got["calibration"]


# -- a real browser --------------------------------------------------------------------------


def _chromium() -> str:
    found = shutil.which("chromium")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: .ci/run installs it (apt-get install "
                        "chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return found


class DevTools:
    """Headless chromium driven over the DevTools protocol on a pipe (fds 3 and 4 of the
    browser: JSON messages ending in a NUL byte)."""

    def __init__(self, exe: str, width: int = 1280, height: int = 900) -> None:
        import fcntl

        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        self.profile = tempfile.mkdtemp(prefix="tlreg-chromium-")
        args = [exe, "--headless", "--remote-debugging-pipe", f"--user-data-dir={self.profile}",
                f"--window-size={width},{height}", "--no-first-run", "--disable-gpu",
                "--disable-extensions", "--disable-background-networking", "--disable-sync",
                "--disable-component-update", "--no-default-browser-check", "about:blank"]
        if os.geteuid() == 0:
            args.insert(1, "--no-sandbox")  # chromium refuses root without it

        def fds() -> None:  # in the child: the pipe ends as fds 3 and 4, whatever they were
            r = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD, 10)
            w = fcntl.fcntl(from_browser_w, fcntl.F_DUPFD, 10)
            os.dup2(r, 3)
            os.dup2(w, 4)

        self.proc = subprocess.Popen(args, preexec_fn=fds, close_fds=False,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buf, self._id, self.events = b"", 0, []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target,
                                 flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Network", "Log"):
            self.call(f"{domain}.enable", session=True)

    def _message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_browser], [], [], left)[0]:
                raise TimeoutError("chromium did not answer")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, session: bool = False, timeout: float = 30,
             **params: Any) -> dict[str, Any]:
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params}
        if session:
            msg["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            m = self._message(deadline)
            if m.get("id") == self._id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m["result"]
            self.events.append(m)

    def open(self, path: Path, timeout: float = 30) -> None:
        """Load the page; return once its load event fired and every image is decoded."""
        self.events.clear()
        self.call("Page.navigate", session=True, url=path.resolve().as_uri())
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events):
            self.events.append(self._message(deadline))
        self.evaluate("Promise.all([...document.images].map(i => i.decode().catch(() => 0)))")

    def evaluate(self, expression: str) -> Any:
        r = self.call("Runtime.evaluate", session=True, expression=expression,
                      returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(r["exceptionDetails"])
        return r["result"].get("value")

    def requests(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self.events
                if e.get("method") == "Network.requestWillBeSent"]

    def problems(self) -> list[str]:
        """Console errors and warnings, uncaught exceptions, and log entries (CSP blocks)."""
        out = []
        for e in self.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.exceptionThrown":
                out.append(f"exception: {p['exceptionDetails'].get('text')}")
            elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "warning",
                                                                          "assert"):
                out.append(f"console.{p['type']}: {p.get('args')}")
            elif m == "Log.entryAdded" and p["entry"].get("level") in ("error", "warning"):
                out.append(f"log {p['entry']['level']}: {p['entry'].get('text')}")
            elif m == "Network.loadingFailed":
                out.append(f"failed load: {p.get('errorText')}")
        return out

    def screenshot(self) -> Image.Image:
        shot = self.call("Page.captureScreenshot", session=True, format="png",
                         captureBeyondViewport=True)
        return Image.open(io.BytesIO(base64.b64decode(shot["data"])))

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, TimeoutError, OSError):
            self.call("Browser.close", timeout=10)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._to_browser, self._from_browser):
            os.close(fd)
        shutil.rmtree(self.profile, ignore_errors=True)


def _ink(im: Image.Image) -> float:
    """The share of pixels that are not (nearly) white."""
    return float((np.asarray(im.convert("RGB")).min(axis=2) < 235).mean())


@pytest.mark.browser
def test_the_page_in_headless_chromium(tmp_path: Path) -> None:
    browser = DevTools(_chromium())
    try:
        run = make_run(tmp_path, wrong=6)
        page = write_report(run)
        browser.open(page)
        assert browser.problems() == []
        assert [u for u in browser.requests() if not u.startswith("data:")] == [
            page.resolve().as_uri()]
        images = browser.evaluate(
            "[...document.images].map(i => [i.id || i.className, i.naturalWidth, "
            "i.naturalHeight, i.getBoundingClientRect().width])")
        sizes = {name: (w, h, shown) for name, w, h, shown in images}
        for ident in ("confusion-img", "curves-img", "lr-img", "calibration-img"):
            w, h, shown = sizes[ident]
            assert w > 200 and h > 150 and shown > 100, (ident, sizes[ident])
        thumbs = [(w, h) for name, w, h, _ in images if name == "thumb"]
        assert len(thumbs) == 6 and all(w == 128 and h == 96 for w, h in thumbs)
        assert browser.evaluate("document.querySelectorAll('section').length") == 8
        assert browser.evaluate("document.title") == "tlreg report: run"
        shot = browser.screenshot().convert("RGB")
        assert shot.width >= 1000 and shot.height > 1500  # the whole page, not the viewport
        assert _ink(shot) > 0.05, f"only {_ink(shot):.1%} of the screenshot is not white"
        rgb = np.asarray(shot).reshape(-1, 3).astype(np.uint32)
        colours = np.unique(rgb[:, 0] << 16 | rgb[:, 1] << 8 | rgb[:, 2])
        assert len(colours) > 500  # plots, thumbnails and text, not one flat colour

        # The checks can fail: a page that fetches and logs is caught by the same checks.
        control = tmp_path / "control.html"
        control.write_text('<!DOCTYPE html><img src="http://127.0.0.1:65530/x.png">'
                           "<script>console.error('boom')</script>")
        browser.open(control)
        assert "http://127.0.0.1:65530/x.png" in browser.requests()
        assert any("boom" in p for p in browser.problems())
        blank = tmp_path / "blank.html"
        blank.write_text("<!DOCTYPE html><title>blank</title>")
        browser.open(blank)
        assert _ink(browser.screenshot().convert("RGB")) < 0.01  # the measure sees blank
    finally:
        browser.close()
