"""`tlreg report RUN`: one self-contained HTML page about a training run.

It reads what the run wrote (model.json, summary.json, history.json, checkpoints/best's
state.json, val_predictions.json, an audit.json) and shows the headline numbers, the training
curves, the learning rate per layer group, the confusion matrix, per-class metrics, the worst
validation errors as thumbnails, the reliability diagram before and after temperature scaling
and the audit's findings. A section whose file is missing, or does not apply (multi-label runs
have no confusion matrix), is one line saying so; only a folder that is no run is an error.

Pictures are drawn with matplotlib (Agg) and thumbnails made with Pillow, both inlined as
`data:` URIs; the page allows no other source (`_html.CSP`). Nothing is unpickled and no
tensor is loaded: every number comes from the JSON files.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tlreg._io import (
    MAX_JSON_BYTES,
    MODEL_JSON,
    STATE_FILE,
    atomic_write_text,
    checkpoint_dir,
    read_json,
)
from tlreg.errors import UsageError
from tlreg.runs import _html as H

REPORT_FILE = "report.html"
PREDICTIONS_FILE = "val_predictions.json"
AUDIT_FILE = "audit.json"
MULTI_LABEL = "multi_label_classification"
#: How many misclassified val images, audit findings and thumbnail pixels the page shows.
MAX_ERRORS, MAX_FINDINGS, THUMB_PX = 24, 50, 128


def write_report(run_dir: Path, out: Path | None = None, *, audit: Path | None = None) -> Path:
    """Write the report of `run_dir` to `out` (default RUN/report.html; a folder gets
    report.html inside) atomically, and return its path.

    `audit`: an audit.json (or a folder holding one) to show instead of RUN/audit.json.
    Raises UsageError when `run_dir` is no run folder (no model.json) or `audit` is missing.
    """
    text = render_report(run_dir, audit=audit)
    path = Path(run_dir) / REPORT_FILE if out is None else Path(out)
    if path.is_dir():
        path = path / REPORT_FILE
    atomic_write_text(path, text)
    return path


def render_report(run_dir: Path, *, audit: Path | None = None) -> str:
    """The report page of `run_dir` as HTML text (see `write_report`)."""
    run = _Run(Path(run_dir), audit)
    info = run.model.get("info") or {}
    parts = [H.section(ident, title, _guard(build, run)) for ident, title, build in _SECTIONS]
    classes = len(info.get("label_names") or ())
    subtitle = f"{info.get('backbone', '?')} + {info.get('head', '?')} head, {classes} classes"
    return H.page(f"tlreg report: {run.dir.name}", subtitle, "\n".join(parts))


class _Run:
    """The run's files, read once; each optional one is None with a note saying why."""

    def __init__(self, run_dir: Path, audit: Path | None) -> None:
        if not (run_dir / MODEL_JSON).is_file():
            raise UsageError(f"{run_dir} is not a tlreg run directory (no {MODEL_JSON}): "
                             "pass the folder `tlreg train --out` wrote")
        self.dir = run_dir
        self.model = read_json(run_dir / MODEL_JSON)
        self.notes: dict[str, str] = {}
        self.summary = self._optional(run_dir / "summary.json", "the run has not finished")
        self.history = self._optional(run_dir / "history.json", "no epoch was saved", list)
        best = checkpoint_dir(run_dir / "checkpoints" / "best")
        state = self._optional((best or run_dir / "checkpoints" / "best") / STATE_FILE,
                               "no epoch was saved", key="best")
        self.report = (state.get("report_tuned") or state.get("report")) if state else None
        self.best_epoch = state.get("epoch") if state else None
        self.predictions = self._optional(run_dir / PREDICTIONS_FILE,
                                          "written by newer tlreg, for single-label runs")
        if audit is not None:
            audit = Path(audit) / AUDIT_FILE if Path(audit).is_dir() else Path(audit)
            if not audit.is_file():
                raise UsageError(f"--audit {audit}: no such file (pass the audit.json that "
                                 "`tlreg audit` wrote)")
        self.audit = self._optional(audit or run_dir / AUDIT_FILE,
                                    "run `tlreg audit` to add its findings", key="audit")
        problem = (self.summary or {}).get("problem_type") or \
            (self.model.get("info") or {}).get("problem_type")
        self.multi_label = problem == MULTI_LABEL

    def _optional(self, path: Path, why: str, kind: type = dict, key: str | None = None) -> Any:
        """The JSON in `path`, or None with a note under `key` (default: the file's stem)."""
        key = key or path.stem
        if not path.is_file():
            where = path.relative_to(self.dir) if path.is_relative_to(self.dir) else path
            self.notes[key] = f"no {where} ({why}): section left out"
            return None
        try:
            if kind is dict:
                return read_json(path)
            if path.stat().st_size > MAX_JSON_BYTES:
                raise ValueError(f"over {MAX_JSON_BYTES:,} bytes")
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, kind):
                raise ValueError(f"not a JSON {kind.__name__}")
            return data
        except (UsageError, OSError, UnicodeDecodeError, ValueError) as exc:
            self.notes[key] = f"{path.name} could not be read: {exc}"
            return None


def _guard(build: Callable[[_Run], str], run: _Run) -> str:
    """One section's HTML; a hand-edited or damaged file is a note, never a broken page."""
    try:
        return build(run)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        return H.note(f"this section could not be drawn from the run's files "
                      f"({type(exc).__name__}: {exc})")


def _missing(run: _Run, key: str) -> str:
    return H.note(run.notes.get(key, f"no {key} data"))


# -- the sections ----------------------------------------------------------------------------


def _summary(run: _Run) -> str:
    info = run.model.get("info") or {}
    s = run.summary or {}
    policy = info.get("policy")
    if isinstance(s.get("policy_auto"), dict):
        policy = f"auto → {s['policy_auto'].get('policy')}"
    images = f"{s['train_images']} / {s['val_images']}" if "train_images" in s else None
    rows = [("status", s.get("status")), ("backbone", info.get("backbone")),
            ("head", info.get("head")), ("policy", policy),
            ("classes", len(info.get("label_names") or ())), ("epochs", s.get("epochs")),
            ("best epoch", s.get("best_epoch", run.best_epoch)),
            ("best val accuracy", s.get("best_val_accuracy")), ("monitor", s.get("monitor")),
            ("train / val images", images), ("stopped early", s.get("stop_reason")),
            ("wall seconds", s.get("wall_seconds"))]
    if run.multi_label:
        rows += [("best val mAP", s.get("best_val_map")),
                 ("best val macro F1", s.get("best_val_macro_f1"))]
    shown = [(H.esc(k), H.num(v)) for k, v in rows if v is not None]
    reason = s.get("policy_auto", {}).get("reason") if isinstance(s.get("policy_auto"), dict) \
        else None
    return ((_missing(run, "summary") if run.summary is None else "")
            + H.table(None, shown, cls="headline")
            + (H.note(f"auto: {reason}") if reason else ""))


def _curves(run: _Run) -> str:
    if not run.history:
        return _missing(run, "history")
    rows = [r for r in run.history if isinstance(r, dict) and "epoch" in r]
    losses = _series(rows, ("train_loss", "val_loss"))
    metrics = _series(rows, ("train_accuracy", "val_accuracy", "val_balanced_accuracy",
                             "val_map", "val_macro_f1"))
    if not losses and not metrics:
        return H.note("history.json has no loss or accuracy columns")
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, series, title in ((axes[0], losses, "loss"), (axes[1], metrics, "accuracy, F1")):
        for name, (xs, ys) in series.items():
            ax.plot(xs, ys, "o-", ms=3, label=name.replace("_", " "))
        if run.best_epoch is not None:
            ax.axvline(run.best_epoch, color="0.6", ls="--", lw=1, label="best epoch")
        ax.set(title=title, xlabel="epoch")
        _epoch_axis(ax)
        if series:
            ax.legend(fontsize=8)
    return H.img(_png(fig), "image/png", "training curves", id="curves-img")


def _learning_rates(run: _Run) -> str:
    if not run.history:
        return _missing(run, "history")
    groups: dict[str, tuple[list[float], list[float]]] = {}
    for row in run.history:
        lr = row.get("lr") if isinstance(row, dict) else None
        for name, value in (lr or {}).items() if isinstance(lr, dict) else ():
            if _is_number(value) and _is_number(row.get("epoch")):
                xs, ys = groups.setdefault(str(name), ([], []))
                xs.append(row["epoch"])
                ys.append(float(value))
    if not groups:
        return H.note("history.json records no learning rate per layer group")
    positive = [v for _, ys in groups.values() for v in ys if v > 0]
    log = bool(positive) and max(positive) / min(positive) > 50  # layer-wise decay: decades
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for name, (xs, ys) in groups.items():
        pts = [(x, y) for x, y in zip(xs, ys, strict=True) if y > 0 or not log]
        ax.plot([x for x, _ in pts], [y for _, y in pts], "o-", ms=3, label=_text(name))
    title = "learning rate per layer group" + (" (log scale: 0 not drawn)" if log else "")
    ax.set(title=title, xlabel="epoch", ylabel="lr", yscale="log" if log else "linear")
    _epoch_axis(ax)
    ax.legend(fontsize=8, ncol=2 if len(groups) > 6 else 1)
    return H.img(_png(fig), "image/png", "learning rate per layer group", id="lr-img")


def _confusion(run: _Run) -> str:
    if run.multi_label:
        return H.note("multi-label run: no confusion matrix (each label is its own yes/no)")
    if run.report is None:
        return _missing(run, "best")
    matrix = [[int(v) for v in row] for row in run.report["confusion_matrix"]]
    classes = [_text(c) for c in run.report["classes"]]
    n = len(classes)
    if n == 0 or len(matrix) != n or any(len(r) != n for r in matrix):
        raise ValueError(f"a {len(matrix)}-row confusion matrix for {n} classes")
    shares = [[v / (sum(r) or 1) for v in r] for r in matrix]
    plt = _pyplot()
    side = min(14.0, 2.5 + 0.45 * n)
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    shown = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    if n <= 40:
        ax.set_xticks(range(n), classes, rotation=60 if n > 4 else 0, ha="right" if n > 4
                      else "center", fontsize=8)
        ax.set_yticks(range(n), classes, fontsize=8)
    if n <= 25:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(matrix[i][j]), ha="center", va="center", fontsize=8,
                        color="white" if shares[i][j] > 0.55 else "black")
    ax.set(xlabel="predicted", ylabel="true", title=f"confusion matrix (epoch "
           f"{run.best_epoch}, {sum(map(sum, matrix))} val images)")
    return H.img(_png(fig), "image/png", "confusion matrix", id="confusion-img")


def _per_class(run: _Run) -> str:
    if run.report is None:
        return _missing(run, "best")
    r = run.report
    multi = "map" in r
    rows = []
    for name, m in r["per_class"].items():
        p, rec = m.get("precision"), m.get("recall")
        f1 = 2 * p * rec / (p + rec) if _is_number(p) and _is_number(rec) and p + rec else 0.0
        extra = [H.num(m.get("ap")), H.num(m.get("threshold"))] if multi else []
        rows.append([H.esc(name), H.num(p), H.num(rec), H.num(f1), *extra,
                     H.num(m.get("support"))])
    headers = ["class", "precision", "recall", "F1", *(["AP", "threshold"] if multi else []),
               "support"]
    keys = ("accuracy", "balanced_accuracy", "macro_f1", "map", "micro_f1", "images")
    totals = ", ".join(f"{k.replace('_', ' ')} {H.num(r[k])}" for k in keys if k in r)
    return (f"<p>{totals}</p>" + H.table(headers, rows, numeric=range(1, len(headers)))
            + (H.note("at the thresholds tuned on val") if multi else ""))


def _errors(run: _Run) -> str:
    if run.multi_label:
        return H.note("multi-label run: no single predicted class to be wrong about")
    p = run.predictions
    if p is None:
        return _missing(run, "val_predictions")
    classes = [str(c) for c in p.get("classes") or (run.report or {}).get("classes") or ()]
    wrong = [r for r in p["rows"] if isinstance(r, dict) and r.get("label") != r.get("predicted")]
    if not wrong:
        return H.note(f"no misclassified val image at epoch {p.get('epoch')}")
    wrong.sort(key=lambda r: -float(r.get("probability") or 0.0))

    def name(i: Any) -> str:
        return classes[i] if isinstance(i, int) and 0 <= i < len(classes) else str(i)

    cards = []
    for r in wrong[:MAX_ERRORS]:
        top = ", ".join(f"{H.esc(name(c))} {H.num(q, 2)}" for c, q in (r.get("top") or [])[:5])
        file = r.get("file")
        cards.append(
            f'<div class="card">{_thumbnail(file)}'
            f'<div>true <b>{H.esc(name(r.get("label")))}</b> '
            f'({H.num(r.get("label_probability"), 2)})</div>'
            f'<div class="wrong">predicted {H.esc(name(r.get("predicted")))} '
            f'({H.num(r.get("probability"), 2)})</div>'
            f'<div>top: {top}</div>'
            f'<div class="file">{H.esc(Path(file).name if file else "in memory")}</div></div>')
    t = p.get("temperature")
    scaled = f"calibrated with T = {H.num(t, 2)}" if _is_number(t) else "uncalibrated"
    return (f"<p>{len(wrong)} of {len(p['rows'])} val images misclassified at epoch "
            f"{H.esc(p.get('epoch'))} ({H.esc(p.get('weights', 'model'))} weights); the "
            f"{min(len(wrong), MAX_ERRORS)} most confident shown, probabilities "
            f"{scaled}.</p>" + f'<div class="grid" id="errors">{"".join(cards)}</div>')


def _calibration(run: _Run) -> str:
    c = (run.summary or {}).get("calibration")
    if not isinstance(c, dict):
        return (_missing(run, "summary") if run.summary is None else
                H.note("summary.json has no calibration (no temperature was fitted)"))
    panels = [(when, c[f"reliability_{when}"], c.get(f"ece_{when}")) for when in
              ("before", "after") if isinstance(c.get(f"reliability_{when}"), list)]
    t, images = c.get("temperature"), H.num(c.get("val_images"))
    text = (f"temperature T = {H.num(t)}, fitted on {H.esc(c.get('fitted_on', 'val'))} "
            f"({images} images); ECE {H.num(c.get('ece_before'))} → {H.num(c.get('ece_after'))}"
            if _is_number(t) else f"no temperature fitted on the {images} val images"
            + (f": {H.esc(c['reason'])}" if c.get("reason") else "")
            + f"; ECE {H.num(c.get('ece_before'))}")
    if not panels:
        return f"<p>{text}</p>" + H.note("no reliability bins recorded")
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), sharey=True,
                             squeeze=False)
    for ax, (when, bins, ece) in zip(axes[0], panels, strict=True):
        bins = [b for b in bins if isinstance(b, dict) and b.get("count")]
        lows = [float(b["lower"]) for b in bins]
        widths = [float(b["upper"]) - float(b["lower"]) for b in bins]
        acc = [float(b["accuracy"]) for b in bins]
        ax.bar(lows, acc, widths, align="edge", edgecolor="tab:blue", color="tab:blue",
               alpha=0.6, label="accuracy")
        ax.bar(lows, [float(b["confidence"]) - a for b, a in zip(bins, acc, strict=True)],
               widths, bottom=acc, align="edge", color="tab:red", alpha=0.25, hatch="//",
               label="gap to confidence")
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfectly calibrated")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence",
               title=f"{when} scaling (ECE {H.num(ece)})")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy")
    axes[0][0].legend(fontsize=8, loc="upper left")
    return f"<p>{text}</p>" + H.img(_png(fig), "image/png", "reliability diagram",
                                    id="calibration-img")


def _audit(run: _Run) -> str:
    if run.audit is None:
        return _missing(run, "audit")
    findings = run.audit.get("findings")
    if not isinstance(findings, list):
        raise ValueError("audit.json has no list of findings")
    if not findings:
        return H.note("the audit found nothing to look at")
    rows = [[H.esc(f.get("file")), H.esc(f.get("kind")), H.num(f.get("score")),
             H.esc(f.get("reason"))] for f in findings[:MAX_FINDINGS] if isinstance(f, dict)]
    more = f" (the first {MAX_FINDINGS} shown)" if len(findings) > MAX_FINDINGS else ""
    return (f"<p>{len(findings)} findings{more}</p>"
            + H.table(["file", "kind", "score", "reason"], rows, numeric=(2,)))


_SECTIONS: tuple[tuple[str, str, Callable[[_Run], str]], ...] = (
    ("summary", "Summary", _summary),
    ("curves", "Training curves", _curves),
    ("learning-rates", "Learning rate per layer group", _learning_rates),
    ("confusion", "Confusion matrix", _confusion),
    ("per-class", "Per-class metrics", _per_class),
    ("errors", "Worst validation errors", _errors),
    ("calibration", "Calibration", _calibration),
    ("audit", "Audit findings", _audit),
)


# -- pictures --------------------------------------------------------------------------------


def _thumbnail(file: Any) -> str:
    """A small JPEG of the image file inline, or a placeholder saying why there is none."""
    if not file:
        return '<div class="thumb-missing">no file (image held in memory)</div>'
    from PIL import Image, ImageOps

    path = Path(str(file))
    if not path.is_file():
        return '<div class="thumb-missing">file no longer exists</div>'
    try:
        with Image.open(path) as im:
            im.draft("RGB", (THUMB_PX * 2, THUMB_PX * 2))  # JPEG: decode at a fraction
            im = ImageOps.exif_transpose(im).convert("RGB")
            im.thumbnail((THUMB_PX, THUMB_PX))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=82)
    except Exception:  # Pillow raises many kinds for a broken file; any means "no picture"
        return '<div class="thumb-missing">cannot decode the image</div>'
    return H.img(buf.getvalue(), "image/jpeg", path.name, cls="thumb")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    """The figure as PNG bytes; the figure is closed either way."""
    import matplotlib.pyplot as plt

    try:
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90)
        return buf.getvalue()
    finally:
        plt.close(fig)


def _text(value: Any) -> str:
    """A run's string as matplotlib text: a `$` is a dollar sign, never the start of TeX."""
    return str(value).replace("$", r"\$")


def _epoch_axis(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def _series(rows: Sequence[dict[str, Any]],
            keys: Sequence[str]) -> dict[str, tuple[list[Any], list[float]]]:
    out = {}
    for key in keys:
        pts = [(r["epoch"], float(r[key])) for r in rows
               if _is_number(r.get(key)) and _is_number(r["epoch"])]
        if pts:
            out[key] = ([x for x, _ in pts], [y for _, y in pts])
    return out


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)
