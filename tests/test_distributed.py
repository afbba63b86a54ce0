"""DDP with gloo on the CPU: 2 processes equal 1 process with the same global batch.

Every 2-process run is a real torchrun (`python -m torch.distributed.run`), on `test_vit` (no
BatchNorm, no dropout) with per-sample seeded augmentation and 16 training images (divisible
by 2 processes x 4 per process). The 1-process references run in this process with batch 8.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from images import colour_folder, count_backbone_images

from tlreg._io import read_checkpoint
from tlreg.engine import distributed, sharding
from tlreg.engine.trainer import fit
from tlreg.errors import UsageError

pytestmark = pytest.mark.skipif(not torch.distributed.is_available()
                                or not torch.distributed.is_gloo_available(),
                                reason="this torch build has no gloo backend")

BASE: dict[str, Any] = dict(backbone="timm:test_vit", pretrained=False, img_size=32, epochs=3,
                            workers=0, device="cpu", optimizer="sgd", lr=0.05, seed=3,
                            quiet=True)
TOL = 1e-5

# Runs inside each torchrun worker: test hooks set by environment variables, then the CLI.
WORKER = r"""
import os, sys, time
from pathlib import Path

rank = os.environ["RANK"]
if os.environ.get("T_PIDS"):
    Path(os.environ["T_PIDS"], f"rank{rank}").write_text(str(os.getpid()))
if os.environ.get("T_WHOLE_DATA"):  # the deliberate bug: every rank sees the whole data set
    from torch.utils.data.distributed import DistributedSampler
    from tlreg.engine import sharding

    def whole(n, *, shuffle, seed, epoch=0, weights=None):
        s = DistributedSampler(range(n), num_replicas=1, rank=0, shuffle=shuffle, seed=seed)
        s.set_epoch(epoch)
        return s

    sharding.sampler = whole
if os.environ.get("T_SLEEP"):  # a pause after every saved epoch, to kill a rank in
    from tlreg.engine.trainer import Trainer

    end_epoch = Trainer._end_epoch

    def slow(self, *args, **kwargs):
        end_epoch(self, *args, **kwargs)
        time.sleep(float(os.environ["T_SLEEP"]))

    Trainer._end_epoch = slow
if os.environ.get("T_RAISE_RANK") == rank:  # an exception on one rank in epoch 2
    from tlreg.engine.trainer import Trainer

    finish_epoch = Trainer._end_epoch

    def boom(self, epoch, *args, **kwargs):
        if epoch >= 1:
            raise RuntimeError("injected failure on rank " + rank)
        return finish_epoch(self, epoch, *args, **kwargs)

    Trainer._end_epoch = boom
if os.environ.get("T_STOP_RANK") == rank:  # only this rank's callback asks to stop, epoch 2
    from tlreg.engine.callbacks import Callback
    from tlreg.engine.trainer import Trainer

    class StopAfterTwo(Callback):
        def on_epoch_end(self, trainer, epoch):
            if epoch == 1:
                trainer.request_stop("rank " + rank + " asked")

    init = Trainer.__init__

    def with_stop(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.callbacks.named.append(("stop", StopAfterTwo()))

    Trainer.__init__ = with_stop
if os.environ.get("T_COUNT"):  # images this rank ran through the backbone
    from tlreg.models.transfer import TransferModel

    features, inference = TransferModel.forward_features, TransferModel.inference_features

    def count(n):
        with Path(os.environ["T_COUNT"], f"rank{rank}").open("a") as f:
            f.write(f"{n}\n")

    def counting(self, x):
        count(x.shape[0])
        return features(self, x)

    def counting_inference(self):
        extract = inference(self)
        extract.register_forward_pre_hook(lambda _, args: count(args[0].shape[0]))
        return extract

    TransferModel.forward_features = counting
    TransferModel.inference_features = counting_inference
if os.environ.get("T_SAMPLES"):  # the training indices this rank drew, one epoch per line
    from tlreg.engine import sharding

    weighted = sharding.WeightedShard.__iter__

    def record(self):
        drawn = list(weighted(self))
        with Path(os.environ["T_SAMPLES"], f"rank{rank}").open("a") as f:
            f.write(" ".join(map(str, drawn)) + "\n")
        return iter(drawn)

    sharding.WeightedShard.__iter__ = record
if os.environ.get("T_ALIVE"):  # DDP wrappers still alive when the group is destroyed
    import gc

    from tlreg.engine import distributed

    destroy = distributed.cleanup

    def counted():
        from torch.nn.parallel import DistributedDataParallel

        alive = sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects())
        Path(os.environ["T_ALIVE"], f"rank{rank}").write_text(str(alive))
        destroy()

    distributed.cleanup = counted
from tlreg.cli import main

main(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 training images (8 per class) and 5 validation images (odd: shards get padded)."""
    root = colour_folder(tmp_path_factory.mktemp("data"), per_class=8, val_per_class=3,
                         size=36)
    sorted((root / "val" / "red").glob("*.png"))[0].unlink()
    return root


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("worker") / "worker.py"
    path.write_text(WORKER)
    return path


def options(policy: str, **kw: Any) -> dict[str, Any]:
    opts = dict(BASE, policy=policy, augment=policy != "feature-extract")
    if policy == "gradual":
        opts["policy_args"] = {"every": 1}
    opts.update(kw)
    return opts


def argv(data: Path, out: Path, opts: dict[str, Any], batch_size: int) -> list[str]:
    """`train DATA --out OUT ...` for the same options as `fit(**opts)`."""
    args = ["train", str(data), "--out", str(out), "--batch-size", str(batch_size)]
    for key, value in opts.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else f"--no-{key.replace('_', '-')}")
        elif key == "policy_args":
            args += [a for k, v in value.items() for a in ("--policy-arg", f"{k}={v}")]
        else:
            args += [flag, str(value)]
    return args


def env(**extra: str) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    out.update(OMP_NUM_THREADS="1", TLREG_DIST_TIMEOUT="60", **extra)
    return out


def torchrun(*args: str, timeout: float = 120, **extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", *args]
    return subprocess.run(cmd, env=env(**extra), capture_output=True, text=True,
                          timeout=timeout)


def weights(run: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(run / "checkpoints" / "last")[0]


def max_diff(a: Path, b: Path) -> float:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    return max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa)


def reference(tmp_path_factory: pytest.TempPathFactory, data: Path, policy: str) -> Path:
    out = tmp_path_factory.mktemp(f"ref-{policy}") / "run"
    cache = tmp_path_factory.mktemp(f"ref-cache-{policy}")
    fit(data=str(data), out=str(out), batch_size=8, cache_dir=str(cache), **options(policy))
    return out


@pytest.fixture(scope="module")
def ref_finetune(tmp_path_factory: pytest.TempPathFactory, data: Path) -> Path:
    return reference(tmp_path_factory, data, "finetune")


@pytest.fixture(scope="module")
def ref_gradual(tmp_path_factory: pytest.TempPathFactory, data: Path) -> Path:
    return reference(tmp_path_factory, data, "gradual")


@pytest.fixture(scope="module")
def ref_features(tmp_path_factory: pytest.TempPathFactory, data: Path) -> Path:
    return reference(tmp_path_factory, data, "feature-extract")


def test_finetune_on_two_processes_matches_one(data: Path, ref_finetune: Path,
                                               tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = torchrun("-m", "tlreg", *argv(data, out, options("finetune"), batch_size=4))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert max_diff(out, ref_finetune) < TOL
    run = json.loads((out / "run.json").read_text())
    assert (run["world_size"], run["global_batch_size"], run["backend"]) == (2, 8, "gloo")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["replicas_identical"] is True and summary["world_size"] == 2
    # 5 val images on 2 ranks: 3 + 3 with one padded repeat; each image is counted once.
    best = json.loads((out / "checkpoints" / "best" / "state.json").read_text())
    assert sum(map(sum, best["report"]["confusion_matrix"])) == 5
    ours = json.loads((out / "history.json").read_text())
    ref = json.loads((ref_finetune / "history.json").read_text())
    for a, b in zip(ours, ref, strict=True):
        assert a["val_accuracy"] == b["val_accuracy"]
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=TOL)
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=TOL)
    assert proc.stdout.count("val accuracy") == 1  # only rank 0 reports


def test_gradual_with_devices_shortcut_matches_one(data: Path, ref_gradual: Path,
                                                   tmp_path: Path) -> None:
    """`--devices 2` starts torchrun's agent; the DDP wrapper is rebuilt at each unfreeze."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "tlreg", *argv(data, out, options("gradual"), batch_size=4),
           "--devices", "2"]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert max_diff(out, ref_gradual) < TOL
    assert json.loads((out / "summary.json").read_text())["replicas_identical"] is True
    # test_vit has 7 stages; in 3 epochs with every=1 stages 0-4 never train: bitwise equal.
    import tlreg

    torch.manual_seed(BASE["seed"])  # as the trainer seeds before building the model
    model = tlreg.create_model("timm:test_vit", 2, pretrained=False)
    frozen = [f"backbone.{n}" for n, s in model.stage_of.items() if s < 5]
    ours, ref = weights(out), weights(ref_gradual)
    assert frozen and all(torch.equal(ours[k], ref[k]) for k in frozen)
    assert all(torch.equal(ours[k], model.state_dict()[k]) for k in frozen)  # still the init
    history = json.loads((out / "history.json").read_text())
    trainable = [h["trainable_params"] for h in history]
    assert trainable[0] < trainable[1] < trainable[2]  # two phase changes, two rebuilds


def test_every_rank_on_the_whole_data_set_fails_the_comparison(
        data: Path, ref_finetune: Path, worker: Path, tmp_path: Path) -> None:
    """The deliberately wrong setup (no sharding) must not pass: the test can fail."""
    out, alive = tmp_path / "run", tmp_path / "alive"
    alive.mkdir()
    proc = torchrun(str(worker), *argv(data, out, options("finetune"), batch_size=4),
                    T_WHOLE_DATA="1", T_ALIVE=str(alive))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert max_diff(out, ref_finetune) > 100 * TOL
    # No DDP wrapper outlives the process group: one freed at interpreter exit can abort
    # gloo's threads (a SIGABRT after a run that succeeded, seen in CI).
    assert [(alive / f"rank{r}").read_text() for r in (0, 1)] == ["0", "0"]


def test_feature_cache_under_ddp(data: Path, ref_features: Path, worker: Path, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Each rank runs the backbone on its shard once; the gathered cache trains the same head."""
    out, cache, counts = tmp_path / "run", tmp_path / "cache", tmp_path / "counts"
    counts.mkdir()
    opts = options("feature-extract", cache_dir=str(cache))
    proc = torchrun(str(worker), *argv(data, out, opts, batch_size=4), T_COUNT=str(counts))
    assert proc.returncode == 0, proc.stderr[-3000:]
    per_rank = [sum(map(int, (counts / f"rank{r}").read_text().split())) for r in (0, 1)]
    assert sum(per_rank) == 16 + 5 and min(per_rank) > 0, per_rank
    assert json.loads((out / "summary.json").read_text())["feature_cache"] is True
    assert max_diff(out, ref_features) < TOL
    # Rank 0 wrote a complete cache: one process now computes nothing and trains the same head.
    seen = count_backbone_images(monkeypatch)
    again = tmp_path / "again"
    fit(data=str(data), out=str(again), batch_size=8, **opts)
    assert seen == []
    assert max_diff(again, out) < TOL


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@pytest.mark.slow  # two processes: ~15 s on 2 cores; CI's slow step runs it
def test_sigkill_of_one_rank_stops_the_job_and_resume_completes_it(
        data: Path, ref_finetune: Path, worker: Path, tmp_path: Path, cli: Any) -> None:
    out, pids = tmp_path / "run", tmp_path / "pids"
    pids.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", str(worker), *argv(data, out, options("finetune"), batch_size=4)]
    proc = subprocess.Popen(cmd, env=env(T_PIDS=str(pids), T_SLEEP="3"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(out / "checkpoints" / "last" / "state.json", proc)
    os.kill(int((pids / "rank1").read_text()), signal.SIGKILL)
    killed = time.monotonic()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert time.monotonic() - killed < 30
    assert "SIGKILL" in err
    _, state, _ = read_checkpoint(out / "checkpoints" / "last")  # intact, loads
    assert state["epoch"] == 1
    assert not (out / "summary.json").exists()
    # Resume on one process (a different count): the global batch of 8 is kept.
    code, _, err = cli("train", "--resume", str(out))
    assert code == 0, err
    assert [h["epoch"] for h in json.loads((out / "history.json").read_text())] == [1, 2, 3]
    assert max_diff(out, ref_finetune) < TOL


@pytest.mark.slow  # two processes: ~15 s on 2 cores; CI's slow step runs it
def test_exception_on_one_rank_fails_the_job(data: Path, tmp_path: Path,
                                             worker: Path) -> None:
    out = tmp_path / "run"
    started = time.monotonic()
    proc = torchrun(str(worker), *argv(data, out, options("finetune", epochs=3),
                                       batch_size=4), T_RAISE_RANK="1")
    assert proc.returncode != 0
    assert time.monotonic() - started < 60
    assert "injected failure on rank 1" in proc.stderr
    _, state, _ = read_checkpoint(out / "checkpoints" / "last")
    assert state["epoch"] == 1  # rank 0 never saved past the failure, and epoch 1 is whole


@pytest.mark.slow  # two processes: ~15 s on 2 cores; CI's slow step runs it
def test_a_stop_asked_on_one_rank_stops_every_rank(data: Path, tmp_path: Path,
                                                    worker: Path) -> None:
    out = tmp_path / "run"
    proc = torchrun(str(worker), *argv(data, out, options("finetune", epochs=4),
                                       batch_size=4), T_STOP_RANK="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert (s["status"], s["epochs"], s["stopped_early"]) == ("completed", 2, True)
    assert s["stop_reason"] == "rank 1 asked" and s["replicas_identical"] is True
    _, state, _ = read_checkpoint(out / "checkpoints" / "last")
    assert (state["epoch"], state["stop_reason"]) == (2, "rank 1 asked")


def test_devices_reports_the_failed_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    """`--devices`: the agent's ChildFailedError becomes one line and a non-zero exit."""
    import torch.distributed.run as torchrun_mod
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    seen: list[Any] = []

    def failing(args: Any) -> None:
        seen.append(args)
        raise ChildFailedError("tlreg", {1: ProcessFailure(1, 4242, -9, "<N/A>")})

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torchrun_mod, "run", failing)
    with pytest.raises(distributed.DistributedError, match="rank 1 of 2 was killed by SIGKILL"):
        distributed.launch(["train", "DATA", "--out", "RUN"], 2)
    args = seen[0]
    assert (args.nproc_per_node, args.module, args.standalone) == ("2", True, True)
    assert [args.training_script, *args.training_script_args] == ["tlreg", "train", "DATA",
                                                                  "--out", "RUN"]


# -- in-process checks (one process) -----------------------------------------------------------


def test_eval_sharding_counts_each_sample_once() -> None:
    """What 2 ranks' padded eval shards gather to: each of 5 indices exactly once, in order."""
    from torch.utils.data.distributed import DistributedSampler

    shards = [list(DistributedSampler(range(5), num_replicas=2, rank=r, shuffle=False))
              for r in (0, 1)]
    assert shards == [[0, 2, 4], [1, 3, 0]]  # index 0 is a padded repeat
    idx = torch.tensor(shards[0] + shards[1])
    preds = idx * 10
    got_idx, got_preds = sharding.gather_by_index(idx, preds)
    assert got_idx.tolist() == [0, 1, 2, 3, 4]
    assert got_preds.tolist() == [0, 10, 20, 30, 40]
    # Training: the one-process order, and rank r of 2 takes its positions r, r + 2, ...; so
    # the ranks' k-th batches of 4 together are the one-process k-th batch of 8.
    order = list(sharding.sampler(16, shuffle=True, seed=7, epoch=2))
    assert sorted(order) != order and sorted(order) == list(range(16))
    for r in (0, 1):
        shard = DistributedSampler(range(16), num_replicas=2, rank=r, shuffle=True, seed=7)
        shard.set_epoch(2)
        assert list(shard) == order[r::2]
    for k in range(2):
        together = {*order[k * 8:(k + 1) * 8]}
        assert together == {*order[0::2][k * 4:(k + 1) * 4], *order[1::2][k * 4:(k + 1) * 4]}


def test_sync_bn_on_cpu_is_a_clear_error(tmp_path: Path) -> None:
    data = colour_folder(tmp_path / "d", per_class=2, val_per_class=1, size=16)
    with pytest.raises(UsageError, match="does not run on the CPU"):
        fit(data=str(data), out=str(tmp_path / "run"), backbone="timm:test_resnet",
            pretrained=False, img_size=32, epochs=1, workers=0, device="cpu", sync_bn=True,
            policy="finetune", quiet=True)
    assert not (tmp_path / "run").exists()


def test_resume_keeps_the_global_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tlreg.engine.trainer import _resume_batch_size

    (tmp_path / "run.json").write_text(json.dumps({"global_batch_size": 8}))
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert _resume_batch_size(tmp_path, 8) == 4
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(UsageError, match="does not divide by 3"):
        _resume_batch_size(tmp_path, 8)
    with pytest.raises(UsageError, match="under torchrun leave it out"):
        distributed.launch(["train"], 2)
    monkeypatch.delenv("WORLD_SIZE")
    assert _resume_batch_size(tmp_path, 2) == 8


@pytest.mark.slow  # two processes: ~15 s on 2 cores; CI's slow step runs it
def test_balanced_sampler_on_two_processes_draws_what_one_draws(
        data: Path, worker: Path, tmp_path: Path) -> None:
    """Each epoch the two ranks' draws together are the one-process draw (the same global
    batches), and the trained weights match the one-process run's."""
    opts = options("finetune", sampler="balanced")
    ref = tmp_path / "ref"
    fit(data=str(data), out=str(ref), batch_size=8, **opts)
    out, samples = tmp_path / "run", tmp_path / "samples"
    samples.mkdir()
    proc = torchrun(str(worker), *argv(data, out, opts, batch_size=4), T_SAMPLES=str(samples))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [[list(map(int, line.split())) for line in
              (samples / f"rank{r}").read_text().splitlines()] for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == BASE["epochs"]
    from tlreg.engine.runtime import epoch_seed

    for epoch, (r0, r1) in enumerate(zip(*ranks, strict=True)):
        one = sharding.WeightedShard([1 / 8] * 16, seed=epoch_seed(BASE["seed"], epoch),
                                     epoch=epoch, replicas=1, rank=0)
        assert sorted(r0 + r1) == sorted(one.draws())  # the same multiset ...
        assert [i for pair in zip(r0, r1, strict=True) for i in pair] == one.draws()  # order
    assert max_diff(out, ref) < TOL
