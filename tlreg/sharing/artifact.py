"""Head-only artifacts: save, verify and load a trained head on a pinned public backbone.

An artifact folder (format `tlreg-head`, see docs/format.md) holds `head.safetensors`, a
`backbone.safetensors` only when the backbone cannot be rebuilt by name (random-init or
local-file weights: all of it; a named pretrained source: only the tensors training changed),
`config.json` (everything needed to rebuild and verify the model) and a model card.

Loading is strict on purpose (PEFT #577: heads that load silently random): the format version,
every file's SHA-256, the tensor names, shapes and dtypes, and the canonical hash of the
pretrained weights the backbone is rebuilt from must all match, or the load fails with a message
that says what to do. Only safetensors are ever read; a folder holding pickles is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlreg._io import follow_umask, save_file, temp_dir
from tlreg.errors import PluginError, TlregError, UnknownNameError, UsageError
from tlreg.runs.checkpoint import _tuples, load_run_model

if TYPE_CHECKING:
    from torch import Tensor, nn

    from tlreg.models.transfer import ModelInfo, TransferModel

FORMAT_NAME = "tlreg-head"
FORMAT_VERSION = 1

CONFIG_FILE = "config.json"
HEAD_FILE = "head.safetensors"
BACKBONE_FILE = "backbone.safetensors"
CARD_FILE = "README.md"
CURVE_FILE = "training.png"
# Every file an artifact may hold; nothing else is written, pushed or downloaded.
ARTIFACT_FILES = (CONFIG_FILE, HEAD_FILE, BACKBONE_FILE, CARD_FILE, CURVE_FILE)
# Pickle-based formats: loading one can run arbitrary code, so tlreg refuses to touch them.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")
# Stands in for the repo id in a saved card; `tlreg push` fills it in.
REPO_ID_PLACEHOLDER = "<REPO_ID>"

# Backbone weight modes recorded in config.json.
WEIGHTS_NONE = "none"  # rebuilt from the named pretrained source, unchanged
WEIGHTS_DELTA = "delta"  # named pretrained source plus the changed tensors in backbone.safetensors
WEIGHTS_FULL = "full"  # the whole backbone is in backbone.safetensors
_NAMED_SOURCES = ("timm", "loader")  # weight sources anyone can rebuild by name

_DATA_KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")


class ArtifactError(TlregError):
    """An artifact is malformed, tampered with, unsafe or does not fit this installation."""

    exit_code = 6


class FormatVersionError(ArtifactError):
    """config.json is from a format version this tlreg does not know."""


class ChecksumError(ArtifactError):
    """A file's SHA-256 differs from the one config.json records."""


class UnsafeFileError(ArtifactError):
    """The artifact holds pickle files, which tlreg never loads."""


class BackboneUnavailableError(ArtifactError):
    """The backbone the artifact names is not installed here."""


class BackboneMismatchError(ArtifactError):
    """The pretrained weights here are not the ones the head was trained on."""


class BackboneMismatchWarning(UserWarning):
    """Loaded despite a backbone weights mismatch (allow_backbone_mismatch=True)."""


# -- saving -------------------------------------------------------------------------------------


def save_artifact(model: TransferModel, directory: str | os.PathLike[str], *,
                  metrics: Mapping[str, Any] | None = None,
                  training_curve: str | os.PathLike[str] | None = None,
                  pretrained_state: Mapping[str, Tensor] | None = None,
                  pretrained_sha256: str | None = None,
                  dataset: str | None = None) -> Path:
    """Write `model` as an artifact folder at `directory`, atomically; returns the folder.

    For a named pretrained backbone the stored delta is computed against `pretrained_state`
    (the backbone state dict before training); without it, the pretrained backbone is rebuilt
    (and downloaded if needed). `pretrained_sha256` (a run's recorded hash) skips that rebuild
    when the backbone did not change, and otherwise checks the rebuilt weights are the same.
    """

    directory = Path(directory)
    head = _cpu_tensors(model.head.state_dict())
    mode, backbone, weights_hash = _backbone_part(model, pretrained_state, pretrained_sha256)
    curve = Path(training_curve) if training_curve else None
    if curve is not None and not curve.is_file():
        raise UsageError(f"training curve {curve} does not exist")
    config = _config(model, mode, weights_hash, metrics, dataset)

    def write(tmp: Path) -> None:
        save_file(head, tmp / HEAD_FILE, metadata={"format": "pt"})
        if mode != WEIGHTS_NONE:
            save_file(backbone, tmp / BACKBONE_FILE, metadata={"format": "pt"})
        if curve is not None:
            shutil.copyfile(curve, tmp / CURVE_FILE)
        config["files"] = {p.name: {"sha256": file_sha256(p), "size": p.stat().st_size}
                           for p in sorted(tmp.iterdir())}
        _write_json(tmp / CONFIG_FILE, config)
        (tmp / CARD_FILE).write_text(model_card(config, has_curve=curve is not None),
                                     encoding="utf-8")

    write_folder_atomically(directory, write)
    return directory


def _backbone_part(model: TransferModel, pretrained_state: Mapping[str, Tensor] | None,
                   pretrained_sha256: str | None) -> tuple[str, dict[str, Tensor], str | None]:
    """(weights mode, tensors for backbone.safetensors, canonical hash of pretrained weights)."""
    from tlreg.models.backbones import weights_sha256

    current = model.backbone.state_dict()
    source = model.info.weights_source
    if source not in _NAMED_SOURCES:  # random init or a local file: nobody can rebuild it
        known = weights_sha256(_restrict(pretrained_state, current)) if pretrained_state else None
        return WEIGHTS_FULL, _cpu_tensors(current), known or pretrained_sha256
    unchanged = pretrained_sha256 and weights_sha256(current) == pretrained_sha256
    if pretrained_state is None and unchanged:
        return WEIGHTS_NONE, {}, pretrained_sha256
    if pretrained_state is None:
        pretrained_state = pretrained_backbone(model.info).state_dict()
    pretrained_state = _restrict(pretrained_state, current)
    got = weights_sha256(pretrained_state)
    if pretrained_sha256 and got != pretrained_sha256:
        raise BackboneMismatchError(
            f"the pretrained weights of backbone {model.info.backbone!r} now hash to {got}, but "
            f"the run was trained on weights hashing to {pretrained_sha256}: the stored delta "
            f"would be wrong. Export on a machine with the original weights")
    delta = {}
    for name, tensor in current.items():
        ref = pretrained_state[name]
        if ref.shape != tensor.shape or ref.dtype != tensor.dtype:
            raise ArtifactError(f"backbone tensor {name!r} is {_desc(tensor)} in the model but "
                                f"{_desc(ref)} in the pretrained weights")
        if not _equal(ref, tensor):
            delta[name] = tensor
    return (WEIGHTS_DELTA if delta else WEIGHTS_NONE), _cpu_tensors(delta), got


def _restrict(state: Mapping[str, Tensor] | None, like: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The backbone's own keys from `state` (a full-model state dict may carry a classifier)."""
    state = dict(state or {})
    missing = sorted(set(like) - set(state))
    if missing:
        raise ArtifactError(f"pretrained state lacks backbone tensors {_few(missing)}")
    return {k: state[k] for k in like}


def _equal(a: Tensor, b: Tensor) -> bool:
    import torch

    return bool(torch.equal(a.detach().cpu(), b.detach().cpu()))


def pretrained_backbone(info: ModelInfo) -> nn.Module:
    """The named pretrained backbone `info` was built on (downloads through timm if needed)."""
    from tlreg.models.backbones import build_backbone, get_backbone

    return build_backbone(get_backbone(info.backbone), name=info.backbone, pretrained=True)


def _config(model: TransferModel, mode: str, weights_hash: str | None,
            metrics: Mapping[str, Any] | None, dataset: str | None) -> dict[str, Any]:
    import timm

    from tlreg import __version__

    info = model.info
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "tlreg_version": __version__,
        "backbone": {
            "name": info.backbone,
            "provider": info.provider,
            "provider_version": _dist_version(info.provider),
            "timm_name": info.timm_name,
            "tag": info.tag,
            "timm_version": timm.__version__,
            "weights_source": info.weights_source,
            "hub_id": info.hub_id,
            "revision": _cached_revision(info.hub_id) if info.weights_source == "timm" else None,
            "weights_sha256": weights_hash,
            "weights": mode,
            "feature_dim": model.feature_dim,
            "global_pool": _global_pool(model.backbone),
        },
        "head": {"name": info.head, "provider": _provider("head", info.head),
                 "args": dict(info.head_args)},
        "policy": {"name": info.policy, "provider": _provider("policy", info.policy),
                   "args": dict(info.policy_args)},
        "num_classes": info.num_classes,
        "label_names": list(info.label_names) or [str(i) for i in range(info.num_classes)],
        "data_config": jsonable_data_config(model.data_config),
        "metrics": _clean_metrics(metrics),
        "dataset": dataset,
    }


def jsonable_data_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The preprocessing keys of a timm data config, as JSON values."""
    out = {}
    for key in _DATA_KEYS:
        if key in cfg:
            value = cfg[key]
            out[key] = list(value) if isinstance(value, tuple | list) else value
    return out


def _clean_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    out = {}
    for key, value in (metrics or {}).items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        out[str(key)] = float(value) if math.isfinite(value) else None
    return out


def _global_pool(backbone: nn.Module) -> str | None:
    pool = getattr(backbone, "global_pool", None)
    if isinstance(pool, str):
        return pool
    pool_type = getattr(pool, "pool_type", None)
    return pool_type if isinstance(pool_type, str) else None


def _provider(kind: str, name: str) -> str | None:
    from tlreg.registry import find

    try:
        return find(kind, name).dist
    except TlregError:
        return None


def _dist_version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cached_revision(hub_id: str | None) -> str | None:
    """The commit of the weights in the local HF cache, when timm fetched them from the Hub."""
    if not hub_id:
        return None
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    repo, _, rev = hub_id.partition("@")
    ref = (Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo, repo_type="model")
           / "refs" / (rev or "main"))
    try:
        value = ref.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return value if re.fullmatch(r"[0-9a-f]{40}", value) else None


def write_folder_atomically(directory: Path, write: Any) -> None:
    """Call `write(tmp)` on a fresh sibling folder, then swap it in for `directory`.

    An existing folder is only replaced when it is empty or a tlreg artifact, so a typo in the
    output path cannot wipe unrelated files; on any failure the old folder stays as it was.
    """
    directory = Path(directory)
    old = directory.with_name(f".{directory.name}.old")
    if not directory.exists() and old.is_dir():  # a swap killed between its two renames
        os.replace(old, directory)
    if directory.exists() and not directory.is_dir():
        raise UsageError(f"{directory} exists and is not a folder")
    if directory.is_dir() and any(directory.iterdir()) and not _replaceable(directory):
        raise UsageError(f"{directory} is not empty and is not a tlreg artifact; "
                         f"choose a new folder (nothing was written)")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(directory.parent, prefix=f".{directory.name}.tmp-")
    try:
        write(tmp)
        follow_umask(tmp)
        if old.exists():
            shutil.rmtree(old)
        if directory.exists():
            os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not directory.exists():
            os.replace(old, directory)
        raise


def _replaceable(directory: Path) -> bool:
    try:
        cfg = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    is_artifact = isinstance(cfg, dict) and cfg.get("format") == FORMAT_NAME
    is_timm_export = isinstance(cfg, dict) and "architecture" in cfg and "pretrained_cfg" in cfg
    return is_artifact or is_timm_export


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")


def _cpu_tensors(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# -- the model card ------------------------------------------------------------------------------


def model_card(config: Mapping[str, Any], *, has_curve: bool) -> str:
    """README.md: Hub metadata (via huggingface_hub's ModelCardData) and a human summary."""
    from huggingface_hub import ModelCard, ModelCardData

    bb = config["backbone"]
    labels = config["label_names"]
    metrics = config.get("metrics") or {}
    data = ModelCardData(
        library_name="tlreg",
        pipeline_tag="image-classification",
        tags=["tlreg", "image-classification", "timm", "transfer-learning",
              f"head:{config['head']['name']}", f"policy:{config['policy']['name']}"],
        base_model=bb.get("hub_id") if bb["weights_source"] == "timm" else None,
        datasets=[config["dataset"]] if config.get("dataset") else None,
        metrics=sorted({_metric_id(k) for k in metrics}) or None,
    )
    arch = f"{bb['timm_name']}.{bb['tag']}" if bb.get("tag") else bb["timm_name"]
    linked = bb.get("hub_id") and bb["weights_source"] == "timm"
    base = f"[{arch}](https://huggingface.co/{bb['hub_id']})" if linked else f"`{arch}`"
    title = " vs ".join(labels) if len(labels) <= 4 else f"{len(labels)}-class classifier"
    stored = {
        WEIGHTS_NONE: "Only the head is stored here; the backbone is rebuilt from its public "
                      "weights, pinned by their SHA-256.",
        WEIGHTS_DELTA: "The head and the backbone tensors that training changed are stored here; "
                       "the rest is rebuilt from the public weights, pinned by their SHA-256.",
        WEIGHTS_FULL: "The head and the whole backbone are stored here (its weights were not a "
                      "public named source).",
    }[bb["weights"]]
    dc = config["data_config"]
    lines = [
        f"# {title}",
        "",
        f"An image classifier: a `{config['head']['name']}` head on the {base} backbone "
        f"(`{bb['name']}`), trained with [tlreg](https://github.com/tlreg/tlreg) "
        f"(policy `{config['policy']['name']}`). {stored}",
        "",
        "## Labels",
        "",
        "| index | label |",
        "| --- | --- |",
        *(f"| {i} | {_cell(name)} |" for i, name in enumerate(labels)),
        "",
    ]
    if metrics:
        lines += ["## Validation metrics", "", "| metric | value |", "| --- | --- |",
                  *(f"| {_cell(k)} | {_fmt(v)} |" for k, v in sorted(metrics.items())), ""]
    if has_curve:
        lines += ["## Training curve", "", f"![training curve]({CURVE_FILE})", ""]
    lines += [
        "## Preprocessing",
        "",
        f"Input size {dc.get('input_size')}, mean {dc.get('mean')}, std {dc.get('std')}, "
        f"{dc.get('interpolation')} interpolation, crop {dc.get('crop_mode')} "
        f"{dc.get('crop_pct')}. `from_pretrained` restores it with the model.",
        "",
        "## Use it",
        "",
        "```python",
        "from tlreg import TransferModel",
        "",
        f'model = TransferModel.from_pretrained("{REPO_ID_PLACEHOLDER}")',
        "print(model.info.label_names, model.data_config)",
        "```",
        "",
        "or from the command line:",
        "",
        "```bash",
        "pip install tlreg",
        f"tlreg predict {REPO_ID_PLACEHOLDER} image.jpg --top-k {min(5, len(labels))}",
        "```",
        "",
        f"Backbone weights SHA-256: `{bb.get('weights_sha256')}`. "
        f"Format: `{FORMAT_NAME}` version {FORMAT_VERSION}.",
        "",
    ]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)))


def _metric_id(key: str) -> str:
    name = re.sub(r"^(val|valid|validation|best|eval)[_/-]", "", key.lower())
    return {"acc": "accuracy", "top1": "accuracy", "acc1": "accuracy"}.get(name, name)


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# -- reading and verifying ------------------------------------------------------------------------


def read_config(folder: Path) -> dict[str, Any]:
    """config.json, checked against the format it claims (an unknown version is an error)."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise ArtifactError(f"{folder} is not a tlreg artifact: it has no {CONFIG_FILE}")
    if path.stat().st_size > MAX_CONFIG_BYTES:  # a real one is a few kB; never parse a bomb
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
    if config["backbone"]["weights"] not in (WEIGHTS_NONE, WEIGHTS_DELTA, WEIGHTS_FULL):
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
    if HEAD_FILE not in config["files"]:
        raise ArtifactError(f"{path}: 'files' does not list {HEAD_FILE}")
    if (config["backbone"]["weights"] != WEIGHTS_NONE) != (BACKBONE_FILE in config["files"]):
        raise ArtifactError(f"{path}: backbone.weights is {config['backbone']['weights']!r} but "
                            f"'files' {'lacks' if BACKBONE_FILE not in config['files'] else 'has'}"
                            f" {BACKBONE_FILE}")
    return config


MAX_CONFIG_BYTES = 1 << 20


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
        path = folder / name
        if not path.is_file():
            raise ArtifactError(f"{folder}: {name} is listed in {CONFIG_FILE} but missing")
        want = meta.get("sha256") if isinstance(meta, dict) else None
        got = file_sha256(path)
        if got != want:
            raise ChecksumError(f"{name} in {folder} is corrupt or was modified: its SHA-256 is "
                                f"{got}, {CONFIG_FILE} records {want}. Download it again")


def _local_files(folder: Path) -> list[str]:
    return [p.relative_to(folder).as_posix() for p in folder.rglob("*")
            if p.is_file() and ".cache" not in p.relative_to(folder).parts]


def load_artifact(source: str | os.PathLike[str], *, revision: str | None = None,
                  token: str | None = None, allow_backbone_mismatch: bool = False,
                  cache_dir: str | os.PathLike[str] | None = None, endpoint: str | None = None,
                  checkpoint: str = "best") -> TransferModel:
    """A ready-to-use model (eval mode, labels and preprocessing in `.info`) from any source.

    `source` is an artifact folder, a run directory (`checkpoint` picks best or last), or a Hub
    repo id `user/name[@revision]`; a path that exists locally wins, `hf:user/name` forces the
    Hub.
    """
    kind, value, rev = parse_source(source)
    if kind == "run":
        if revision:
            raise UsageError("revision= only applies to Hub sources")
        return load_run_model(Path(value), checkpoint)
    if kind == "artifact":
        if revision:
            raise UsageError("revision= only applies to Hub sources")
        return load_artifact_dir(Path(value), allow_backbone_mismatch=allow_backbone_mismatch)
    from tlreg.sharing.hub import pull

    if rev and revision and rev != revision:
        raise UsageError(f"two revisions given: {rev!r} in {str(source)!r} and {revision!r}")
    folder = pull(value, revision=revision or rev, token=token, endpoint=endpoint,
                  cache_dir=cache_dir, verify=False)
    return load_artifact_dir(folder, allow_backbone_mismatch=allow_backbone_mismatch)


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")


def parse_source(source: str | os.PathLike[str]) -> tuple[str, str, str | None]:
    """('run' | 'artifact', path, None) or ('hub', repo_id, revision or None)."""
    text = os.fspath(source)
    if text.startswith("hf:"):
        repo_id, rev = split_revision(text.removeprefix("hf:"))
        return "hub", repo_id, rev
    path = Path(text).expanduser()
    if not path.exists() and path.with_name(f".{path.name}.old").is_dir():
        return "artifact", str(path), None  # a swap killed between its renames: the old state
    if path.exists():
        if (path / "model.json").is_file():
            return "run", str(path), None
        if path.is_dir():
            return "artifact", str(path), None
        raise UsageError(f"{path} is a file; give an artifact folder, a run directory or a Hub id")
    if _HUB_ID.fullmatch(text):
        repo_id, rev = split_revision(text)
        return "hub", repo_id, rev
    raise UsageError(f"{text!r} is neither an existing local path nor a Hub repo id "
                     f"('user/name[@revision]'; 'hf:user/name' forces the Hub)")


def split_revision(repo: str) -> tuple[str, str | None]:
    """'user/name@rev' -> ('user/name', 'rev'); the id by huggingface_hub's own rule, the
    revision by git's ref rules (it names a file in the cache's refs/ folder)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    repo_id, sep, rev = repo.partition("@")
    try:
        if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", repo_id) or (sep and not rev):
            raise HFValidationError("expected 'user/name' or 'user/name@rev'")
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise UsageError(f"invalid Hub repo id {repo!r}: {exc}") from None
    if rev:
        check_revision(rev)
    return repo_id, rev or None


def check_revision(rev: str) -> str:
    """A branch, tag or commit name that is safe as a path under refs/ (git's ref rules)."""
    parts = rev.split("/")
    if (len(rev) > 255 or not rev.strip() or rev != rev.strip() or ".." in rev
            or "\\" in rev or any(ord(c) < 32 or c in " ~^:?*[" for c in rev)
            or any(not p or p.startswith(".") or p.endswith(".lock") for p in parts)
            or rev.endswith(".") or "@{" in rev):
        raise UsageError(f"invalid revision {rev!r}: expected a branch, tag or commit name")
    return rev


def load_artifact_dir(folder: Path, *, allow_backbone_mismatch: bool = False) -> TransferModel:
    """Verify and load a local artifact folder (see the module docstring for the checks)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not folder.exists() and folder.with_name(f".{folder.name}.old").is_dir():
        folder = folder.with_name(f".{folder.name}.old")  # the old state of a killed swap
    if not folder.is_dir():
        raise UsageError(f"{folder} is not a folder")
    check_no_pickles(_local_files(folder), str(folder))
    config = read_config(folder)
    verify_files(folder, config)
    model, info = _rebuild(config, allow_backbone_mismatch)
    bb = config["backbone"]

    def read(name: str) -> dict[str, Any]:
        try:  # a damaged header can match its checksum if the file was written so
            return load_file(folder / name)
        except Exception as exc:
            raise ArtifactError(f"{folder / name} is not a readable safetensors file: "
                                f"{exc}") from None

    if bb["weights"] != WEIGHTS_NONE:
        _load_strict(model.backbone, read(BACKBONE_FILE), f"{BACKBONE_FILE} ({bb['weights']})",
                     partial=bb["weights"] == WEIGHTS_DELTA)
    _load_strict(model.head, read(HEAD_FILE), HEAD_FILE, partial=False)
    model.info = info
    model.eval()
    return model


def _rebuild(config: Mapping[str, Any], allow_mismatch: bool) -> tuple[TransferModel, ModelInfo]:
    """The model config.json describes, with pretrained weights where the artifact needs them."""
    from tlreg.models.backbones import weights_sha256
    from tlreg.models.transfer import ModelInfo, create_model
    from tlreg.registry import get_policy

    bb = config["backbone"]
    spec = _backbone_spec(bb)
    head = config["head"]
    policy = config["policy"].get("name") or "feature-extract"
    policy_args = config["policy"].get("args") or {}
    try:
        get_policy(policy)
    except (UnknownNameError, PluginError):  # inference needs no policy: fall back quietly
        policy, policy_args = "feature-extract", {}
    try:
        model = create_model(
            bb["name"], config["num_classes"], head=head["name"], head_args=head["args"],
            policy=policy, policy_args=policy_args, pretrained=bb["weights"] != WEIGHTS_FULL,
            label_names=tuple(config["label_names"]),
        )
    except (UnknownNameError, PluginError) as exc:
        provider = head.get("provider")
        hint = f" (it came from package {provider!r}: pip install {provider})" if provider else ""
        raise BackboneUnavailableError(f"cannot rebuild the model: {exc}{hint}") from exc
    if model.feature_dim != bb.get("feature_dim", model.feature_dim):
        raise ArtifactError(f"backbone {bb['name']!r} gives {model.feature_dim} features here, the "
                            f"artifact was trained on {bb['feature_dim']}")
    expected = bb.get("weights_sha256")
    if bb["weights"] != WEIGHTS_FULL:
        got = weights_sha256(model.backbone.state_dict())
        if not expected:
            warnings.warn(f"the artifact records no hash for the weights of backbone "
                          f"{bb['name']!r}: they cannot be verified", BackboneMismatchWarning,
                          stacklevel=3)
        elif got != expected:
            message = (f"the pretrained weights of backbone {bb['name']!r} ({spec.arch}) here "
                       f"hash to {got}, but the head was trained on weights hashing to "
                       f"{expected}; its predictions would be wrong")
            if not allow_mismatch:
                raise BackboneMismatchError(
                    message + ". Get the original weights, or pass --allow-backbone-mismatch "
                              "(allow_backbone_mismatch=True) to load anyway")
            warnings.warn(message + " (loaded anyway: allow_backbone_mismatch)",
                          BackboneMismatchWarning, stacklevel=3)
    info = ModelInfo(
        backbone=bb["name"], provider=bb.get("provider") or model.info.provider,
        timm_name=bb["timm_name"], tag=bb.get("tag"), weights_source=bb["weights_source"],
        head=head["name"], num_classes=config["num_classes"], head_args=dict(head["args"]),
        policy=config["policy"].get("name") or policy,
        policy_args=dict(config["policy"].get("args") or {}),
        label_names=tuple(config["label_names"]), hub_id=bb.get("hub_id"),
        data_config=_data_config_from_json(config["data_config"], model.data_config),
    )
    return model, info


def _backbone_spec(bb: Mapping[str, Any]) -> Any:
    """The installed spec for the artifact's backbone, or an error naming who provides it."""
    from tlreg.models import _timm
    from tlreg.models.backbones import get_backbone

    name, timm_name = bb["name"], bb["timm_name"]
    made = f"timm {bb['timm_version']}" if bb.get("timm_version") else "a newer timm"
    if not _timm.is_model(timm_name):
        raise BackboneUnavailableError(
            f"backbone {name!r} needs timm model {timm_name!r}, which the installed timm "
            f"{_dist_version('timm')} does not have; the artifact was made with {made}: "
            f"pip install -U 'timm>={bb.get('timm_version') or _dist_version('timm')}'")
    try:
        spec = get_backbone(name)
    except (UnknownNameError, PluginError) as exc:
        provider = bb.get("provider")
        version = bb.get("provider_version")
        pin = f"=={version}" if version else ""
        hint = (f"it is provided by the package {provider!r}"
                f"{f' (version {version} made this artifact)' if version else ''}: "
                f"pip install '{provider}{pin}'") if provider and provider != "timm" else \
            f"it needs {made}"
        raise BackboneUnavailableError(f"backbone {name!r} is not available here ({exc}); "
                                       f"{hint}") from exc
    if spec.timm_name != timm_name or (spec.tag or None) != (bb.get("tag") or None):
        raise BackboneMismatchError(
            f"backbone {name!r} is {spec.arch} here, but the artifact was trained on "
            f"{timm_name}{'.' + bb['tag'] if bb.get('tag') else ''}; install the version of "
            f"{bb.get('provider') or 'its package'} that made it ({bb.get('provider_version')})")
    return spec


def _data_config_from_json(saved: Mapping[str, Any], default: Mapping[str, Any]) -> dict[str, Any]:
    return {**default, **_tuples(saved)}


def _load_strict(module: nn.Module, tensors: Mapping[str, Tensor], what: str,
                 partial: bool) -> None:
    """Load with names, shapes and dtypes checked; `partial` allows a subset (a delta)."""
    own = module.state_dict()
    unexpected = sorted(set(tensors) - set(own))
    missing = [] if partial else sorted(set(own) - set(tensors))
    if unexpected or missing:
        raise ArtifactError(f"{what} does not fit the model the config describes: "
                            f"missing {_few(missing)}, unexpected {_few(unexpected)}")
    for name, tensor in tensors.items():
        ref = own[name]
        if tuple(ref.shape) != tuple(tensor.shape) or ref.dtype != tensor.dtype:
            raise ArtifactError(f"{what}: tensor {name!r} is {_desc(tensor)}, the model "
                                f"expects {_desc(ref)}")
    result = module.load_state_dict(dict(tensors), strict=not partial)
    if result.missing_keys and not partial:  # pragma: no cover - checked above
        raise ArtifactError(f"{what}: missing {_few(result.missing_keys)}")


def _desc(t: Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}"


def _few(keys: list[str], n: int = 5) -> str:
    if not keys:
        return "none"
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


# -- exporting runs ------------------------------------------------------------------------------


def export_run(run_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str],
               checkpoint: str = "best", *, format: str = "tlreg",
               dataset: str | None = None) -> Path:
    """Turn a run directory into an artifact folder (or, `format='timm'`, a timm folder).

    Metrics are the checkpoint's validation metrics, the curve is training.png, the pretrained
    weights hash from model.json; nothing else from the run (no paths, no optimizer state) goes in.
    """
    if format not in ("tlreg", "timm"):
        raise UsageError(f"format must be 'tlreg' or 'timm', got {format!r}")
    from tlreg._io import MODEL_JSON

    run_dir = Path(run_dir)
    if not (run_dir / MODEL_JSON).is_file():
        raise UsageError(f"{run_dir} is not a tlreg run directory (no {MODEL_JSON})")
    model = load_run_model(run_dir, checkpoint)
    if format == "timm":
        return export_timm(model, out_dir)
    meta = json.loads((run_dir / MODEL_JSON).read_text(encoding="utf-8"))
    curve = run_dir / CURVE_FILE
    return save_artifact(
        model, out_dir, metrics=run_metrics(run_dir, checkpoint),
        pretrained_sha256=meta.get("pretrained_sha256"),
        training_curve=curve if curve.is_file() else None, dataset=dataset,
    )


def run_metrics(run_dir: Path, checkpoint: str = "best") -> dict[str, float]:
    """Validation metrics of a run's checkpoint: its epoch's `val_*` values from history.json.

    Falls back to the checkpoint's state.json, then to summary.json's validation entries.
    """
    from tlreg._io import STATE_FILE, checkpoint_dir

    run_dir = Path(run_dir)
    found = checkpoint_dir(run_dir / "checkpoints" / checkpoint)
    state = _read_json(found / STATE_FILE) if found is not None else None
    state = state if isinstance(state, dict) else {}
    history = _read_json(run_dir / "history.json")
    epoch = state.get("epoch")
    if isinstance(history, list) and epoch is not None:
        for row in history:
            if isinstance(row, dict) and row.get("epoch") == epoch:
                picked = {k: v for k, v in row.items() if k.startswith("val_")}
                return _clean_metrics({"epoch": epoch, **picked})
    picked = {k: v for k, v in state.items() if k.startswith("val_")}
    if picked:
        return _clean_metrics({"epoch": epoch, **picked} if epoch is not None else picked)
    summary = _read_json(run_dir / "summary.json")
    if not isinstance(summary, dict):
        return {}
    return _clean_metrics({k: v for k, v in summary.items()
                           if re.match(r"(best_)?val_", k) and not k.endswith(_COUNTS)})


_COUNTS = ("_images", "_files", "_seconds")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def export_timm(model: TransferModel, out_dir: str | os.PathLike[str]) -> Path:
    """A plain timm folder: `timm.create_model("local-dir:OUT", pretrained=True)` loads it.

    Only a linear head maps onto timm's own classifier; other heads are an error.
    """
    from torch import nn

    from tlreg.models import _timm

    info = model.info
    linears = [m for m in model.head.modules() if isinstance(m, nn.Linear)]
    others = [m for m in model.head.modules()
              if not isinstance(m, nn.Linear | nn.Dropout | nn.Sequential | nn.Identity)]
    if info.head != "linear" or len(linears) != 1 or others:
        raise UsageError(f"--format timm needs a linear head (timm's classifier is one linear "
                         f"layer); this model has a {info.head!r} head. Use --format tlreg")
    full = _timm.create_backbone(info.timm_name, info.tag, pretrained=False)
    full.load_state_dict(model.backbone.state_dict(), strict=True)
    full.reset_classifier(info.num_classes)
    classifier = full.get_classifier()
    if not isinstance(classifier, nn.Linear) or classifier.weight.shape != linears[0].weight.shape:
        raise UsageError(f"timm model {info.timm_name!r} has no single linear classifier of the "
                         f"head's shape; use --format tlreg")
    classifier.load_state_dict(linears[0].state_dict())
    config = _timm_config(model, full)
    state = _cpu_tensors(full.state_dict())

    def write(tmp: Path) -> None:
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        _write_json(tmp / CONFIG_FILE, config)

    out_dir = Path(out_dir)
    write_folder_atomically(out_dir, write)
    return out_dir


def _timm_config(model: TransferModel, full: nn.Module) -> dict[str, Any]:
    drop = {"url", "file", "hf_hub_id", "hf_hub_filename", "source", "state_dict", "label_names",
            "label_descriptions", "label_offset", "test_input_size", "test_crop_pct"}
    cfg = {k: v for k, v in dict(full.pretrained_cfg).items() if k not in drop and v is not None}
    cfg.update(jsonable_data_config(model.data_config))
    cfg["num_classes"] = model.info.num_classes
    cfg["custom_load"] = False
    architecture = cfg.pop("architecture", None) or model.info.timm_name
    cfg = json.loads(json.dumps(cfg, default=list))
    labels = list(model.info.label_names) or [str(i) for i in range(model.info.num_classes)]
    return {"architecture": architecture, "num_classes": model.info.num_classes,
            "num_features": int(full.num_features), "label_names": labels,
            "pretrained_cfg": cfg}
