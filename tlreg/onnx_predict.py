"""A deployed model: model.onnx and its preprocessing, run with onnxruntime, Pillow and NumPy.

What `tlreg predict model.onnx` and `tlreg.predict.load_model("model.onnx")` load. Nothing
here imports torch or timm (a subprocess test checks it), so a cold start on one image is the
onnxruntime import and the model's first run, not torch's multi-second import floor.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlreg.errors import UsageError
from tlreg.preprocess import (
    MODEL_FILE,
    MULTI_LABEL,
    PREPROCESS_FILE,
    Preprocess,
    check_deploy_config,
)

if TYPE_CHECKING:
    import numpy as np

INSTALL_HINT = "pip install 'tlreg[onnx]'"
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def is_onnx_source(source: str | os.PathLike[str]) -> bool:
    """A path ending in .onnx, or a folder holding model.onnx (decided without reading it)."""
    path = Path(source)
    return path.suffix.lower() == ".onnx" or (path.is_dir() and (path / MODEL_FILE).is_file()
                                              and (path / PREPROCESS_FILE).is_file())


def read_metadata(path: Path) -> dict[str, Any]:
    """An ONNX file's metadata_props as tlreg writes them (every value JSON text)."""
    session = _session(path, "cpu")
    return _decode(session.get_modelmeta().custom_metadata_map)


def _decode(props: dict[str, str]) -> dict[str, Any]:
    out = {}
    for key, value in props.items():
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def _session(path: Path, device: str) -> Any:
    try:
        import onnxruntime as ort
    except ImportError:
        raise UsageError(f"running an ONNX model needs onnxruntime: {INSTALL_HINT}") from None
    if device not in PROVIDERS:
        raise UsageError(f"device {device!r} for an ONNX model: choose cpu or cuda")
    if PROVIDERS[device] not in ort.get_available_providers():
        raise UsageError(f"onnxruntime here has no {PROVIDERS[device]} (installed: "
                         f"{', '.join(ort.get_available_providers())}); use --device cpu")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: warnings would precede our one line
    try:
        return ort.InferenceSession(str(path), options, providers=[PROVIDERS[device]])
    except Exception as exc:  # onnxruntime raises its own pybind classes (InvalidProtobuf, Fail)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"{path} is not a valid ONNX model onnxruntime can run ({first}); "
                         f"export it again with `tlreg export RUN OUT --format onnx`") from None


@dataclass(frozen=True)
class OnnxModel:
    """A loaded model.onnx: its session, preprocessing, labels and what the outputs mean."""

    path: Path
    session: Any  # onnxruntime.InferenceSession
    preprocess: Preprocess
    config: dict[str, Any]  # preprocess.json (or the same from the model's metadata)

    @property
    def label_names(self) -> tuple[str, ...]:
        return tuple(str(n) for n in self.config["label_names"])

    @property
    def thresholds(self) -> list[float] | None:
        """A multi-label model's per-class thresholds, else None (softmax over classes)."""
        if self.config.get("problem_type") != MULTI_LABEL:
            return None
        return [float(t) for t in self.config["thresholds"]]

    @property
    def temperature(self) -> float | None:
        """One label per image: the temperature fitted on val (softmax(logits / T)), or None."""
        return self.config.get("temperature") if self.thresholds is None else None

    @property
    def has_familiarity(self) -> bool:
        """Whether the graph also gives each image's familiarity (a frozen run's export)."""
        return self.config.get("familiarity_output") is not None

    def run(self, x: np.ndarray) -> np.ndarray:
        """Logits (float32) for a preprocessed (N, C, H, W) batch."""
        return self.scores(x, familiar=False)[0]

    def scores(self, x: np.ndarray,
               familiar: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """Logits and, where the graph has it and `familiar`, familiarity (float32), for a
        preprocessed (N, C, H, W) batch; outputs asked for by name, the others not computed."""
        import numpy as np

        names = [self.config.get("output_name", "logits")]
        if familiar and self.has_familiarity:
            names.append(self.config["familiarity_output"])
        inp = self.session.get_inputs()[0]
        if "float16" in inp.type:
            x = x.astype(np.float16)
        # A fixed batch axis (exported with --no-dynamic-batch) takes that many images a run.
        step = inp.shape[0] if isinstance(inp.shape[0], int) else max(len(x), 1)
        runs = [self.session.run(names, {inp.name: x[i:i + step]})
                for i in range(0, len(x), step)]
        if not runs:
            return (np.empty((0, len(self.label_names)), np.float32),
                    np.empty(0, np.float32) if len(names) > 1 else None)
        out = [np.concatenate([r[j] for r in runs]).astype(np.float32)
               for j in range(len(names))]
        return out[0], out[1] if len(out) > 1 else None

    def logits(self, files: Sequence[str], batch_size: int = 32) -> tuple[np.ndarray, list[int]]:
        """Logits for the decodable files (in order) and the positions that failed to decode,
        decoded as training decodes them (tlreg.data.images.load_rgb)."""
        logits, _, failed = self.outputs(files, batch_size, familiar=False)
        return logits, failed

    def outputs(self, files: Sequence[str], batch_size: int = 32, familiar: bool = True
                ) -> tuple[np.ndarray, np.ndarray | None, list[int]]:
        """`logits` and, where the graph has it and `familiar`, each file's familiarity."""
        import warnings

        import numpy as np

        from tlreg.data.images import load_rgb

        familiar = familiar and self.has_familiarity
        out, fam, failed, batch = [], [], [], []
        for i, f in enumerate(files):
            try:
                batch.append(self.preprocess(load_rgb(f)))
            except (OSError, ValueError) as exc:  # PIL's errors, ImageTooLarge
                warnings.warn(f"skipping unreadable image {f}: {exc}", stacklevel=2)
                failed.append(i)
            if len(batch) == batch_size or (i == len(files) - 1 and batch):
                logits, familiarity = self.scores(np.stack(batch), familiar)
                out.append(logits)
                fam.append(familiarity)
                batch = []
        logits = (np.concatenate(out) if out
                  else np.empty((0, len(self.label_names)), np.float32))
        if not familiar:
            return logits, None, failed
        return logits, (np.concatenate(fam) if fam else np.empty(0, np.float32)), failed


def load_onnx(source: str | os.PathLike[str], device: str = "cpu") -> OnnxModel:
    """model.onnx (or a folder holding it) with its preprocessing.

    A folder's preprocess.json wins; a lone .onnx file uses its own metadata, or a
    preprocess.json beside it. Every failure is one UsageError saying what to do.
    """
    path = Path(source)
    folder = path if path.is_dir() else path.parent
    model_path = path / MODEL_FILE if path.is_dir() else path
    if not model_path.is_file():
        raise UsageError(f"no such ONNX model: {model_path}")
    session = _session(model_path, device)
    cfg_path = folder / PREPROCESS_FILE
    meta = _decode(session.get_modelmeta().custom_metadata_map)
    if path.is_dir() or ("format" not in meta and cfg_path.is_file()):
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot read {cfg_path}: {exc}") from None
        where = str(cfg_path)
    else:
        cfg, where = meta, f"{model_path} (metadata)"
        if "format" not in meta:
            raise UsageError(f"{model_path} has no tlreg preprocessing metadata and no "
                             f"{PREPROCESS_FILE} beside it; export it with `tlreg export RUN "
                             f"OUT --format onnx`")
    cfg = check_deploy_config(cfg, where)
    n_out = session.get_outputs()[0].shape[-1]
    if isinstance(n_out, int) and n_out != len(cfg["label_names"]):
        raise UsageError(f"{where} names {len(cfg['label_names'])} labels but {model_path} "
                         f"gives {n_out} outputs")
    wanted = cfg.get("familiarity_output")
    if wanted is not None and wanted not in {o.name for o in session.get_outputs()}:
        raise UsageError(f"{where} names a {wanted!r} output that {model_path} does not have; "
                         f"export it again with `tlreg export RUN OUT --format onnx`")
    return OnnxModel(model_path, session, Preprocess.from_config(cfg), cfg)
