"""The callback contract: hook order, state through SIGKILL and --resume, early stopping.

The third-party callback is a real distribution on `sys.path` (the `plugin_site` fixture),
found through its entry-point metadata as a pip-installed package would be, and run by the
`tlreg` console script in a subprocess that kills itself mid-epoch.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from images import colour_folder

from tlreg._io import read_checkpoint
from tlreg.engine.callbacks import Callback, EarlyStopping, Monitor
from tlreg.engine.config import TrainConfig
from tlreg.engine.trainer import fit
from tlreg.errors import UsageError

# Counts every hook; on the epoch and step named by T_KILL_AT ("epoch:step") it SIGKILLs its
# own process, mid-epoch: the epochs before are saved, that one is not.
COUNTER = '''
import os, signal
from tlreg.engine.callbacks import Callback

HOOKS = ("on_run_start", "on_epoch_start", "on_train_step_end", "on_evaluate_end",
         "on_epoch_end", "on_save_checkpoint")


class Counter(Callback):
    def __init__(self, every=1):
        self.every = int(every)
        self.counts = {h: 0 for h in HOOKS}
        self.losses = 0.0

    def on_run_start(self, trainer):
        self.counts["on_run_start"] += 1

    def on_epoch_start(self, trainer, epoch):
        self.counts["on_epoch_start"] += 1

    def on_train_step_end(self, trainer, step, loss):
        self.counts["on_train_step_end"] += 1
        self.losses += float(loss)
        kill = os.environ.get("T_KILL_AT")
        if kill and kill == f"{trainer.history.__len__()}:{step}":
            os.kill(os.getpid(), signal.SIGKILL)

    def on_evaluate_end(self, trainer, epoch, metrics):
        self.counts["on_evaluate_end"] += 1

    def on_epoch_end(self, trainer, epoch):
        self.counts["on_epoch_end"] += 1

    def on_save_checkpoint(self, trainer, epoch):
        self.counts["on_save_checkpoint"] += 1

    def state_dict(self):
        return {"counts": dict(self.counts), "losses": self.losses, "every": self.every}

    def load_state_dict(self, state):
        self.counts.update(state["counts"])
        self.losses = state["losses"]
'''


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return colour_folder(tmp_path_factory.mktemp("cb") / "data", per_class=8, val_per_class=3,
                         size=24)


def tiny(data: Path, out: Path, **kw: Any) -> TrainConfig:
    base = dict(data=str(data), out=str(out), backbone="timm:test_resnet", pretrained=False,
                img_size=32, batch_size=8, epochs=3, workers=0, quiet=True, device="cpu",
                cache=False)
    base.update(kw)
    return TrainConfig(**base)


class Recorder(Callback):
    def __init__(self, run: Path) -> None:
        self.run, self.calls = run, []

    def on_run_start(self, trainer: Any) -> None:
        self.calls.append("run_start")

    def on_epoch_start(self, trainer: Any, epoch: int) -> None:
        self.calls.append(f"epoch_start {epoch}")

    def on_train_step_end(self, trainer: Any, step: int, loss: torch.Tensor) -> None:
        assert loss.dim() == 0 and not loss.requires_grad
        self.calls.append(f"step {step}")

    def on_evaluate_end(self, trainer: Any, epoch: int, metrics: Any) -> None:
        assert metrics["epoch"] == epoch + 1 and "val_loss" in metrics
        self.calls.append(f"evaluate {epoch}")

    def on_epoch_end(self, trainer: Any, epoch: int) -> None:
        self.calls.append(f"epoch_end {epoch}")

    def on_save_checkpoint(self, trainer: Any, epoch: int) -> None:
        saved = self._saved_epoch()
        assert saved == epoch, "on_save_checkpoint must run before the epoch is written"
        self.calls.append(f"save {epoch}")

    def on_epoch_saved(self, trainer: Any, epoch: int) -> None:
        assert self._saved_epoch() == epoch + 1
        self.calls.append(f"saved {epoch}")

    def on_run_end(self, trainer: Any, summary: Any) -> None:
        assert (self.run / "summary.json").is_file() and summary["status"] == "completed"
        self.calls.append("run_end")

    def _saved_epoch(self) -> int:
        state = self.run / "checkpoints" / "last" / "state.json"
        return json.loads(state.read_text())["epoch"] if state.is_file() else 0


@pytest.mark.parametrize("policy", ["feature-extract", "finetune"])
def test_hooks_run_in_order_on_both_paths(data: Path, tmp_path: Path, policy: str) -> None:
    rec = Recorder(tmp_path / "run")
    opts = {"solver": "sgd"} if policy == "feature-extract" else {"augment": False}
    fit(tiny(data, tmp_path / "run", policy=policy, epochs=2, **opts), callbacks=[rec])
    steps = ["step 0", "step 1"]  # 16 training images in batches of 8
    epoch = ["epoch_start {e}", *steps, "evaluate {e}", "epoch_end {e}", "save {e}",
             "saved {e}"]
    expected = ["run_start", *[c.format(e=e) for e in range(2) for c in epoch], "run_end"]
    assert rec.calls == expected


def test_plain_functions_are_called_after_each_saved_epoch(data: Path, tmp_path: Path) -> None:
    seen: list[tuple[int, int]] = []
    run = tmp_path / "run"

    def fn(trainer: Any, epoch: int) -> None:
        seen.append((epoch, json.loads((run / "history.json").read_text())[-1]["epoch"]))

    fit(tiny(data, run, policy="feature-extract", solver="sgd", epochs=2), callbacks=[fn])
    assert seen == [(0, 1), (1, 2)]


def _plateau(data: Path, out: Path, **kw: Any) -> TrainConfig:
    # min_delta 1 can never be beaten by an accuracy: epoch 1 stays the best, and with
    # patience 2 the run stops after epoch 3 while the weights go on changing (lr 0.05).
    return tiny(data, out, policy="feature-extract", solver="sgd", epochs=8, lr=0.05,
                early_stopping=2, monitor="val_accuracy", min_delta=1.0, **kw)


def test_early_stopping_on_a_plateau_stops_and_exports_the_best_epoch(
        data: Path, tmp_path: Path, cli: Any) -> None:
    heads: list[dict[str, torch.Tensor]] = []

    def keep(trainer: Any, epoch: int) -> None:
        heads.append({k: v.clone() for k, v in trainer.model.head.state_dict().items()})

    result = fit(_plateau(data, tmp_path / "run"), callbacks=[keep])
    s = result.summary
    assert (s["status"], s["epochs"], s["best_epoch"], s["stopped_early"]) == (
        "completed", 3, 1, True)
    assert "val_accuracy did not improve" in s["stop_reason"]
    assert not torch.equal(heads[0]["0.weight"], heads[2]["0.weight"])  # it did train
    code, _, err = cli("export", str(tmp_path / "run"), str(tmp_path / "art"))
    assert code == 0, err
    from safetensors.torch import load_file

    exported = load_file(tmp_path / "art" / "head.safetensors")
    for k, v in exported.items():
        assert torch.equal(v, heads[0][k]), f"exported {k} is not epoch 1's"

    code, out, err = cli("train", str(data), "--out", str(tmp_path / "cli"), "--backbone",
                         "timm:test_resnet", "--no-pretrained", "--img-size", "32",
                         "--workers", "0", "--device", "cpu", "--no-cache", "--policy",
                         "feature-extract", "--solver", "sgd", "--epochs", "8", "--lr", "0.05",
                         "--early-stopping", "2", "--monitor", "val_accuracy",
                         "--min-delta", "1")
    assert code == 0, err
    assert "stopped early" in out
    assert json.loads((tmp_path / "cli" / "summary.json").read_text())["epochs"] == 3


def test_monitor_val_loss_picks_the_lowest_loss_epoch(data: Path, tmp_path: Path) -> None:
    result = fit(tiny(data, tmp_path / "run", policy="feature-extract", solver="sgd",
                      epochs=4, lr=0.05, monitor="val_loss"))
    losses = [h["val_loss"] for h in result.history]
    best = losses.index(min(losses)) + 1
    assert result.summary["best_epoch"] == best and result.summary["monitor"] == "val_loss"
    state = json.loads((tmp_path / "run" / "checkpoints" / "best" / "state.json").read_text())
    assert (state["epoch"], state["monitor"], state["score"]) == (best, "val_loss", min(losses))


def test_monitor_and_early_stopping_options_are_checked(data: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="monitor must be one of val_accuracy"):
        tiny(data, tmp_path / "a", monitor="accuracy")
    with pytest.raises(UsageError, match="early_stopping must be >= 1"):
        tiny(data, tmp_path / "a", early_stopping=0)
    with pytest.raises(UsageError, match="min_delta must be >= 0"):
        tiny(data, tmp_path / "a", min_delta=-1)
    with pytest.raises(UsageError, match="unknown callback 'countr'"):
        fit(tiny(data, tmp_path / "a", callbacks=["countr"]))
    with pytest.raises(UsageError, match="callback_args names 'x'"):
        tiny(data, tmp_path / "a", callback_args={"x": {}})
    assert not (tmp_path / "a").exists()


def test_early_stopping_and_monitor_rules() -> None:
    m = Monitor("val_loss", min_delta=0.1)
    assert m.improves(1.0, None) and m.improves(0.85, 1.0) and not m.improves(0.95, 1.0)
    assert not m.improves(float("nan"), None)

    class Stub:
        reason = None

        def request_stop(self, reason: str) -> None:
            self.reason = reason

    es, stub = EarlyStopping(2, "val_accuracy"), Stub()
    for epoch, acc in enumerate([0.5, 0.6, 0.6, 0.6]):
        es.on_evaluate_end(stub, epoch, {"val_accuracy": acc})
    assert stub.reason and "best 0.6 at epoch 2" in stub.reason
    restored = EarlyStopping(2)
    restored.load_state_dict(es.state_dict())
    assert restored.state_dict() == es.state_dict() == {"best": 0.6, "best_epoch": 2, "wait": 2}
    with pytest.raises(UsageError, match="patience >= 1"):
        EarlyStopping(0)


@pytest.mark.slow  # a subprocess killed and resumed: 30 s on 2 cores
def test_third_party_callback_state_survives_sigkill_and_resume(
        data: Path, tmp_path: Path, plugin_site: Any, cli: Any, tlreg_cmd: list[str]) -> None:
    plugin_site.add("tlreg-counter", {"tlreg.callbacks": {"counter": "tlreg_counter:Counter"}},
                    {"tlreg_counter": COUNTER})
    code, out, _ = cli("plugins")
    assert code == 0 and "counter" in out and "tlreg-counter" in out

    def train(out: Path, *extra: str, **env: str) -> subprocess.CompletedProcess:
        cmd = [*tlreg_cmd, "train", str(data), "--out", str(out), "--backbone",
               "timm:test_resnet", "--no-pretrained", "--img-size", "32", "--workers", "0",
               "--device", "cpu", "--no-cache", "--policy", "finetune", "--no-augment",
               "--epochs", "6", "--lr", "0.05", "--batch-size", "4", "--quiet",
               "--callback", "counter", "--callback-arg", "every=2",
               "--early-stopping", "2", "--monitor", "val_accuracy", "--min-delta", "1", *extra]
        return subprocess.run(cmd, env=plugin_site.env(**env), capture_output=True, text=True,
                              timeout=300)

    whole = train(tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-2000:]
    killed = train(tmp_path / "killed", T_KILL_AT="1:2")  # epoch 2, its third step
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = subprocess.run([*tlreg_cmd, "train", "--resume", str(tmp_path / "killed")],
                             env=plugin_site.env(), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    def state(run: Path) -> dict[str, Any]:
        return json.loads((run / "checkpoints" / "last" / "state.json").read_text())

    a, b = state(tmp_path / "whole"), state(tmp_path / "killed")
    counts_a, counts_b = a["callbacks"]["counter"], b["callbacks"]["counter"]
    assert counts_a["every"] == 2  # --callback-arg reached the plugin
    assert counts_b["counts"].pop("on_run_start") == 2  # once per process, as it should
    assert counts_a["counts"].pop("on_run_start") == 1
    assert counts_a == counts_b
    assert counts_a["counts"]["on_epoch_start"] == 3  # stopped early after epoch 3
    assert a["callbacks"]["early-stopping"] == b["callbacks"]["early-stopping"]
    for run in ("whole", "killed"):
        s = json.loads((tmp_path / run / "summary.json").read_text())
        assert (s["status"], s["epochs"], s["stopped_early"]) == ("completed", 3, True)
    wa, wb = (read_checkpoint(tmp_path / r / "checkpoints" / "last")[0]
              for r in ("whole", "killed"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ba, bb = (read_checkpoint(tmp_path / r / "checkpoints" / "best")[0]
              for r in ("whole", "killed"))
    assert all(torch.equal(ba[k], bb[k]) for k in ba)
