"""The `tlreg-head` format (docs/format.md): its file names, constants and config checks.

Everything both sides of the format agree on lives here, so a writer and a reader cannot
drift apart: which files an artifact may hold, the backbone weight modes, how `config.json` is
checked before anything trusts it (bounded in size, typed key by key, a newer format version
refused with the tlreg to upgrade to), the checksums, and the refusal of pickles. Reading is
strict on purpose (PEFT #577: heads that load silently random).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlreg.errors import ArtifactError, ChecksumError, FormatVersionError, UnsafeFileError
from tlreg.preprocess import check_temperature

if TYPE_CHECKING:
    from torch import Tensor

FORMAT_NAME = "tlreg-head"
FORMAT_VERSION = 2  # the newest this tlreg reads and writes
#: Version 2 added `problem_type` and `thresholds` (multi-label). Single-label artifacts are
#: still written as version 1, so an older tlreg reads them; a multi-label one is version 2,
#: so an older tlreg refuses it instead of applying softmax to independent sigmoids.
MULTI_LABEL_VERSION = 2

CONFIG_FILE = "config.json"
HEAD_FILE = "head.safetensors"
BACKBONE_FILE = "backbone.safetensors"
CARD_FILE = "README.md"
CURVE_FILE = "training.png"
# A frozen run's training-feature bank (tlreg.engine.familiarity), for `predict
# --reject-unfamiliar`. Recorded under config.json's `familiarity`, not its `files`: a tlreg
# that predates it refuses unknown names in `files`, and reads the artifact without the bank.
FAMILIARITY_FILE = "familiarity.safetensors"
# Every file an artifact may hold; nothing else is written, pushed or downloaded.
ARTIFACT_FILES = (CONFIG_FILE, HEAD_FILE, BACKBONE_FILE, CARD_FILE, CURVE_FILE, FAMILIARITY_FILE)
TIMM_WEIGHTS = "model.safetensors"  # `--format timm`: timm's (and transformers') weights file
# Pickle-based formats: loading one can run arbitrary code, so tlreg refuses to touch them.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")
# Stands in for the repo id in a saved card; `tlreg push` fills it in.
REPO_ID_PLACEHOLDER = "<REPO_ID>"
MAX_CONFIG_BYTES = 1 << 20  # a real config is a few kB; a bigger one is never parsed

# Backbone weight modes recorded in config.json.
WEIGHTS_NONE = "none"  # rebuilt from the named pretrained source, unchanged
WEIGHTS_DELTA = "delta"  # named pretrained source plus the changed tensors in backbone.safetensors
WEIGHTS_FULL = "full"  # the whole backbone is in backbone.safetensors
WEIGHT_MODES = (WEIGHTS_NONE, WEIGHTS_DELTA, WEIGHTS_FULL)
NAMED_SOURCES = ("timm", "loader")  # weight sources anyone can rebuild by name

_DATA_KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")


# -- what goes into a config ---------------------------------------------------------------------


def jsonable_data_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The preprocessing keys of a timm data config, as JSON values."""
    out = {}
    for key in _DATA_KEYS:
        if key in cfg:
            value = cfg[key]
            out[key] = list(value) if isinstance(value, tuple | list) else value
    return out


def clean_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    """Numeric metrics only, non-finite ones as null (config.json is strict JSON)."""
    out = {}
    for key, value in (metrics or {}).items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        out[str(key)] = float(value) if math.isfinite(value) else None
    return out


def dist_version(dist: str) -> str | None:
    """The installed version of a distribution (recorded as, and compared with, provenance)."""
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# -- reading and verifying -----------------------------------------------------------------------


def read_config(folder: Path) -> dict[str, Any]:
    """config.json, checked against the format it claims (an unknown version is an error)."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise ArtifactError(f"{folder} is not a tlreg artifact: it has no {CONFIG_FILE}")
    if path.stat().st_size > MAX_CONFIG_BYTES:  # never parse a bomb
        raise ArtifactError(f"{path} is {path.stat().st_size:,} bytes, over the "
                            f"{MAX_CONFIG_BYTES:,} a tlreg config may have")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ArtifactError(f"cannot parse {path}: {exc}") from exc
    if not isinstance(config, dict) or config.get("format") != FORMAT_NAME:
        found = config.get("format") if isinstance(config, dict) else None
        raise ArtifactError(f"{path} is not a tlreg artifact config "
                            f"(format {found!r}, expected {FORMAT_NAME!r})")
    version = config.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ArtifactError(f"{path}: format_version must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        made_with = config.get("tlreg_version", "a newer tlreg")
        raise FormatVersionError(
            f"artifact format version {version} is newer than this tlreg supports "
            f"({FORMAT_VERSION}); it was made with tlreg {made_with}. "
            f"Upgrade: pip install -U 'tlreg>={made_with}'")
    _require(config, path, {"backbone": dict, "head": dict, "policy": dict, "num_classes": int,
                            "label_names": list, "data_config": dict, "files": dict})
    _require(config["backbone"], path, {"name": str, "timm_name": str, "weights_source": str,
                                        "weights": str}, prefix="backbone.")
    _require(config["head"], path, {"name": str, "args": dict}, prefix="head.")
    if config["backbone"]["weights"] not in WEIGHT_MODES:
        raise ArtifactError(f"{path}: unknown backbone.weights {config['backbone']['weights']!r}")
    _check_data_config(config["data_config"], path)
    if not 2 <= config["num_classes"] <= 1_000_000:
        raise ArtifactError(f"{path}: num_classes must be in [2, 1000000], "
                            f"got {config['num_classes']}")
    if len(config["label_names"]) != config["num_classes"]:
        raise ArtifactError(f"{path}: {len(config['label_names'])} label names for "
                            f"{config['num_classes']} classes")
    for name in config["files"]:
        if name not in ARTIFACT_FILES or name == CONFIG_FILE:
            raise ArtifactError(f"{path}: unexpected file {name!r} in 'files'")
    _check_problem(config, path, version)
    check_temperature(config.get("temperature"), f"{path}: temperature", ArtifactError)
    if HEAD_FILE not in config["files"]:
        raise ArtifactError(f"{path}: 'files' does not list {HEAD_FILE}")
    if (config["backbone"]["weights"] != WEIGHTS_NONE) != (BACKBONE_FILE in config["files"]):
        raise ArtifactError(f"{path}: backbone.weights is {config['backbone']['weights']!r} but "
                            f"'files' {'lacks' if BACKBONE_FILE not in config['files'] else 'has'}"
                            f" {BACKBONE_FILE}")
    return config


def problem_fields(problem_type: str, thresholds: tuple[float, ...]) -> dict[str, Any]:
    """The format version and the config keys that say what the outputs mean."""
    from tlreg.engine.objective import MULTI_LABEL, SINGLE_LABEL

    if problem_type != MULTI_LABEL:
        return {"format_version": 1, "problem_type": SINGLE_LABEL}
    return {"format_version": MULTI_LABEL_VERSION, "problem_type": MULTI_LABEL,
            "thresholds": [float(t) for t in thresholds]}


def _check_problem(config: Mapping[str, Any], path: Path, version: int) -> None:
    from tlreg.engine.objective import MULTI_LABEL, PROBLEM_TYPES, SINGLE_LABEL

    problem = config.get("problem_type", SINGLE_LABEL)
    if problem not in PROBLEM_TYPES:
        raise ArtifactError(f"{path}: unknown problem_type {problem!r} (one of "
                            f"{', '.join(PROBLEM_TYPES)})")
    if problem != MULTI_LABEL:
        return
    if version < MULTI_LABEL_VERSION:
        raise ArtifactError(f"{path}: a multi-label artifact must be format version "
                            f"{MULTI_LABEL_VERSION}, not {version}")
    t = config.get("thresholds")
    if (not isinstance(t, list) or len(t) != config["num_classes"] or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v <= 1 for v in t)):
        raise ArtifactError(f"{path}: thresholds must be {config['num_classes']} numbers in "
                            "[0, 1], one per class")


def _check_data_config(dc: Mapping[str, Any], path: Path) -> None:
    """The preprocessing a config asks for, checked before any image is resized by it."""
    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    size = dc.get("input_size")
    if size is not None and not (
            isinstance(size, list) and len(size) == 3 and all(
                isinstance(v, int) and not isinstance(v, bool) for v in size)
            and size[0] in (1, 3) and all(16 <= v <= 4096 for v in size[1:])):
        raise ArtifactError(f"{path}: data_config.input_size must be [channels, height, width] "
                            f"with sides in [16, 4096], got {size!r}")
    for key in ("mean", "std"):
        v = dc.get(key)
        if v is not None and not (isinstance(v, list) and len(v) in (1, 3)
                                  and all(number(x) for x in v)
                                  and (key == "mean" or all(x > 0 for x in v))):
            raise ArtifactError(f"{path}: data_config.{key} must be 1 or 3 numbers"
                                f"{' > 0' if key == 'std' else ''}, got {v!r}")
    crop = dc.get("crop_pct")
    if crop is not None and not (number(crop) and 0 < crop <= 2):
        raise ArtifactError(f"{path}: data_config.crop_pct must be in (0, 2], got {crop!r}")
    for key in ("interpolation", "crop_mode"):
        if dc.get(key) is not None and not isinstance(dc[key], str):
            raise ArtifactError(f"{path}: data_config.{key} must be a string, got {dc[key]!r}")


def _require(d: Mapping[str, Any], path: Path, keys: Mapping[str, type], prefix: str = "") -> None:
    for key, typ in keys.items():
        if key not in d:
            raise ArtifactError(f"{path}: missing key {prefix}{key!r}")
        if not isinstance(d[key], typ) or (typ is int and isinstance(d[key], bool)):
            raise ArtifactError(f"{path}: {prefix}{key} must be {typ.__name__}, "
                                f"got {type(d[key]).__name__}")


def check_no_pickles(names: list[str], where: str) -> None:
    """Refuse a folder or repo that holds pickle files (they are never opened)."""
    bad = sorted(n for n in names if n.lower().endswith(PICKLE_SUFFIXES))
    if bad:
        raise UnsafeFileError(
            f"{where} holds pickle files ({', '.join(bad)}); tlreg never loads pickles (they can "
            f"run arbitrary code) and refuses the whole artifact. Only safetensors are read")


def verify_files(folder: Path, config: Mapping[str, Any]) -> None:
    """Every file config.json lists is present with the recorded SHA-256 and size."""
    folder = Path(folder)
    for name, meta in config["files"].items():
        _verify_file(folder, name, meta.get("sha256") if isinstance(meta, dict) else None,
                     "listed")
    bank = config.get("familiarity")
    if bank is None:
        return
    if not isinstance(bank, dict) or not isinstance(bank.get("sha256"), str):
        raise ArtifactError(f"{folder / CONFIG_FILE}: 'familiarity' must record the sha256 of "
                            f"{FAMILIARITY_FILE}")
    _verify_file(folder, FAMILIARITY_FILE, bank["sha256"], "recorded")


def _verify_file(folder: Path, name: str, want: str | None, how: str) -> None:
    """`folder / name` exists and hashes to `want` (`how` config.json names it)."""
    path = folder / name
    if not path.is_file():
        raise ArtifactError(f"{folder}: {name} is {how} in {CONFIG_FILE} but missing")
    got = file_sha256(path)
    if got != want:
        raise ChecksumError(f"{name} in {folder} is corrupt or was modified: its SHA-256 is "
                            f"{got}, {CONFIG_FILE} records {want}. Download it again")


# -- messages both writer and reader give about tensors ------------------------------------------


def tensor_desc(t: Tensor) -> str:
    """`float32[2, 96]`: a tensor's dtype and shape, as error messages name them."""
    return f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}"


def few(keys: list[str], n: int = 5) -> str:
    """The first `n` keys and how many more, for an error message."""
    if not keys:
        return "none"
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more
