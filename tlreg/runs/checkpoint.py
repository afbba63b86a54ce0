"""A run's model and training state: model.json, rebuilding a run's model, the `last` codec.

Checkpoint folders themselves (written aside and swapped in whole) are tlreg._io's; the run
folder's life is tlreg.runs.rundir's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from tlreg._io import (
    MODEL_JSON,
    atomic_write_json,
    checkpoint_dir,
    read_checkpoint,
    read_json,
    save_checkpoint,
)
from tlreg.errors import UsageError
from tlreg.preprocess import check_temperature

if TYPE_CHECKING:
    from torch import Tensor

    from tlreg.models.transfer import ModelInfo, TransferModel

FAMILIARITY_FILE = "familiarity.safetensors"  # written by tlreg.engine.record


def _tuples(d: Mapping[str, Any]) -> dict[str, Any]:
    """JSON gives lists; timm's data configs use tuples."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def info_to_dict(info: ModelInfo) -> dict[str, Any]:
    d = asdict(info)
    d["label_names"] = list(info.label_names)
    return d


#: A training checkpoint's state.json (the `last` one, which --resume reads).
TRAIN_STATE_SCHEMA: dict[str, type | tuple[type, ...]] = {
    "epoch": int, "history": list, "optimizer": dict, "scheduler": dict, "rng": dict,
    "best_val_accuracy": (int, float), "skipped": list,
}
_INFO_SCHEMA: dict[str, type | tuple[type, ...]] = {
    "backbone": str, "timm_name": str, "head": str, "num_classes": int, "policy": str,
    "head_args": dict, "policy_args": dict, "label_names": (list, tuple),
}


def info_from_dict(d: Mapping[str, Any]) -> ModelInfo:
    from tlreg.models.transfer import ModelInfo

    for key, typ in _INFO_SCHEMA.items():
        if not isinstance(d.get(key), typ) or (typ is int and isinstance(d.get(key), bool)):
            raise UsageError(f"model.json's info.{key} is missing or not "
                             f"{getattr(typ, '__name__', 'a list')}: the run file is damaged")
    d = dict(d)
    d["label_names"] = tuple(d.get("label_names") or ())
    d["thresholds"] = tuple(float(v) for v in d.get("thresholds") or ())
    d["temperature"] = check_temperature(d.get("temperature"), "model.json's info.temperature")
    known = set(ModelInfo.__dataclass_fields__)
    return ModelInfo(**{k: v for k, v in d.items() if k in known})


def write_model_json(run_dir: Path, model: TransferModel, extra: Mapping[str, Any] = ()) -> None:
    """What the run's model is: ModelInfo, the data config and the pretrained weights hash."""
    data = {"info": info_to_dict(model.info), "data_config": model.data_config, **dict(extra)}
    atomic_write_json(Path(run_dir) / MODEL_JSON, data)


def load_run_model(run_dir: Path, checkpoint: str = "best") -> TransferModel:
    """Rebuild a run's TransferModel (no download: every weight comes from the checkpoint)."""
    from tlreg.models.transfer import build_from_info

    run_dir = Path(run_dir)
    if checkpoint not in {"best", "last"}:
        raise UsageError(f"checkpoint must be 'best' or 'last', got {checkpoint!r}")
    meta_path = run_dir / MODEL_JSON
    if not meta_path.is_file():
        raise UsageError(f"{run_dir} is not a tlreg run directory (no {MODEL_JSON})")
    meta = read_json(meta_path)
    info = info_from_dict(meta["info"])
    if meta.get("data_config"):  # the preprocessing it was trained with (--img-size included)
        info = replace(info, data_config=_tuples(meta["data_config"]))
    tensors, state, _ = read_checkpoint(run_dir / "checkpoints" / checkpoint)
    if state.get("thresholds"):  # multi-label: tuned on the val split of that epoch
        info = replace(info, thresholds=tuple(float(v) for v in state["thresholds"]))
    if state.get("temperature") is not None:  # one label: fitted on val for these weights
        info = replace(info, temperature=check_temperature(
            state["temperature"], f"{run_dir}/checkpoints/{checkpoint}'s temperature"))
    model = build_from_info(info, pretrained=False)
    model.load_state_dict(tensors, strict=True)
    model.eval()
    bank = run_dir / FAMILIARITY_FILE  # a frozen run's training features (engine.familiarity)
    if bank.is_file():
        from safetensors.torch import load_file

        model.familiarity = load_file(bank)
    return model


# -- the training state of `checkpoints/last`: what --resume restores bitwise ----------------


class RngState(NamedTuple):
    """Every random generator a run draws from, as their own get-state functions give it."""

    torch: Tensor
    cuda: Tensor | None  # the current CUDA device's, when there is one
    python: tuple[Any, ...]
    numpy: tuple[Any, ...]


def capture_rng() -> RngState:
    """The state of torch's (CPU and current CUDA device), Python's and NumPy's generators."""
    import random

    import numpy as np
    import torch

    return RngState(torch.get_rng_state(),
                    torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
                    random.getstate(), np.random.get_state())


def restore_rng(rng: RngState) -> None:
    """Put every generator back as `capture_rng` (or a checkpoint) found it."""
    import random

    import numpy as np
    import torch

    torch.set_rng_state(rng.torch)
    if rng.cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng.cuda)
    random.setstate(rng.python)
    np.random.set_state(rng.numpy)


def save_train_state(path: Path, model_tensors: Mapping[str, Tensor], frozen: Path | None,
                     optimizer: Any, scheduler: Any, state: Mapping[str, Any],
                     extra_tensors: Mapping[str, Tensor] | None = None) -> None:
    """A `last` checkpoint: model, optimizer (tensors apart), scheduler, every RNG, `state`;
    `extra_tensors` (e.g. --ema's average) come back as `state["extra_tensors"]`."""
    import torch

    opt = optimizer.state_dict()
    rng = capture_rng()
    tensors: dict[str, torch.Tensor] = {"rng.torch": rng.torch}
    tensors |= {f"extra.{k}": v for k, v in (extra_tensors or {}).items()}
    if rng.cuda is not None:
        tensors["rng.cuda"] = rng.cuda
    opt_state: dict[str, dict[str, Any]] = {}
    for pid, st in opt["state"].items():
        opt_state[str(pid)] = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{pid}.{k}"] = v
            else:
                opt_state[str(pid)][k] = v
    full = {
        **dict(state),
        "optimizer": {"param_groups": opt["param_groups"], "state": opt_state},
        "scheduler": scheduler.state_dict(),
        "rng": {"python": rng.python,  # JSON: tuples become lists, the uint32 key a list
                "numpy": [rng.numpy[0], rng.numpy[1].tolist(), *rng.numpy[2:]]},
    }
    save_checkpoint(path, model_tensors, full, train_state=tensors, frozen=frozen)


def _match_layouts(optimizer: Any) -> None:
    """Give each loaded state tensor its parameter's memory layout (channels_last included).

    A checkpoint stores tensors contiguous; the optimizer made its moments with its
    parameter's strides. The fused kernels pair a parameter's and its moments' elements by
    storage order, so a channels_last weight with contiguous moments would step differently
    after --resume than in an unbroken run."""
    import torch

    for p, st in optimizer.state.items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and v.shape == p.shape and v.stride() != p.stride():
                st[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)


def load_train_state(path: Path, model: Any, optimizer: Any, scheduler: Any,
                     device: Any, run_dir: Path) -> dict[str, Any]:
    """Restore what `save_train_state` wrote into the live objects; returns its JSON state."""
    import numpy as np

    if checkpoint_dir(path) is None:
        raise UsageError(f"cannot resume {run_dir}: no completed epoch was saved; "
                         "start it again")
    model_state, state, tensors = read_checkpoint(path)
    bad = [k for k, t in TRAIN_STATE_SCHEMA.items() if not isinstance(state.get(k), t)]
    if bad or not tensors or "rng.torch" not in tensors:
        raise UsageError(f"cannot resume {run_dir}: its last checkpoint is damaged "
                         f"({', '.join(bad) or 'no training state'}); start a new run")
    model.load_state_dict(model_state, strict=True)
    opt_state: dict[int, dict[str, Any]] = {
        int(pid): dict(st) for pid, st in state["optimizer"]["state"].items()}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            opt_state.setdefault(int(pid), {})[name] = value.to(device)
    optimizer.load_state_dict({"state": opt_state,
                               "param_groups": state["optimizer"]["param_groups"]})
    _match_layouts(optimizer)
    scheduler.load_state_dict(state["scheduler"])
    py, npst = state["rng"]["python"], state["rng"]["numpy"]
    restore_rng(RngState(tensors["rng.torch"], tensors.get("rng.cuda"),
                         (py[0], tuple(py[1]), py[2]),
                         (npst[0], np.array(npst[1], dtype=np.uint32), *npst[2:])))
    return {**state, "extra_tensors": {k[6:]: v.to(device) for k, v in tensors.items()
                                       if k.startswith("extra.")}}
