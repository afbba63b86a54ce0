"""Layer-wise optimizer groups, schedulers and `tlreg lr-plan`: exact rates, written by hand.

timm:test_resnet has 5 layers (stem, layer1..layer4: one block per stage) and a linear head,
so with lr=1e-2 and layer_decay=0.5 the rates are, from the first layer to the head:
3.125e-4, 6.25e-4, 1.25e-3, 2.5e-3, 5e-3, 1e-2.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR, OneCycleLR, StepLR

from tlreg.cli import main
from tlreg.engine.optim import build_optimizer, layer_lrs, lr_plan
from tlreg.engine.schedulers import build_scheduler
from tlreg.errors import UsageError
from tlreg.models.transfer import create_model

NAMES = ["layer0", "layer1", "layer2", "layer3", "layer4", "head"]
RATES = [3.125e-4, 6.25e-4, 1.25e-3, 2.5e-3, 5e-3, 1e-2]  # lr=1e-2, layer_decay=0.5


@pytest.fixture(scope="module")
def resnet():
    return create_model("timm:test_resnet", 2, pretrained=False)  # feature-extract: frozen


@pytest.fixture(scope="module")
def vit():
    return create_model("timm:test_vit", 2, pretrained=False)


def rates(opt) -> list[float]:
    """Per-layer rates in layer order (each layer has a decayed and a no-wd group)."""
    return list(layer_lrs(opt).values())


def advance(opt, sched, n: int) -> None:
    for _ in range(n):
        opt.step()  # no grads: a no-op, but keeps torch's call-order check quiet
        sched.step()


def approx(values):
    return pytest.approx(values, rel=1e-12, abs=0)


# -- groups ---------------------------------------------------------------------------------


def test_groups_follow_layers_with_real_lr(resnet):
    opt = build_optimizer(resnet, "adamw", lr=1e-2, layer_decay=0.5, weight_decay=0.05)
    groups = opt.param_groups
    assert [g["name"] for g in groups] == [n for n in NAMES for _ in (0, 1)]
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0] * 6
    assert [g["layer"] for g in groups] == [i for i in range(6) for _ in (0, 1)]
    assert [g["stage"] for g in groups] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, None, None]
    assert list(layer_lrs(opt)) == NAMES
    assert rates(opt) == approx(RATES)
    for g in groups:
        assert g["initial_lr"] == g["lr"]
        assert g["lr_mult"] == pytest.approx(g["lr"] / 1e-2, rel=1e-12)
        assert "lr_scale" not in g  # timm's schedulers would apply the decay a second time
    # Every parameter exactly once, frozen ones included.
    in_groups = [p for g in groups for p in g["params"]]
    assert len(in_groups) == len({id(p) for p in in_groups}) == len(list(resnet.parameters()))
    assert not any(p.requires_grad for p in resnet.backbone.parameters())


def test_structure_does_not_depend_on_freezing(resnet):
    finetune = create_model("timm:test_resnet", 2, policy="finetune", pretrained=False)

    def shape(model):
        opt = build_optimizer(model, lr=1e-2, layer_decay=0.5)
        return [(g["name"], g["weight_decay"], g["lr"], [p.shape for p in g["params"]])
                for g in opt.param_groups]

    assert shape(finetune) == shape(resnet)


def test_no_weight_decay_for_biases_norms_and_pos_embed(vit):
    opt = build_optimizer(vit, lr=1e-2, layer_decay=0.5, weight_decay=0.1)
    wd = {}
    layer = {}
    ids = {id(p): n for n, p in vit.named_parameters()}
    for g in opt.param_groups:
        for p in g["params"]:
            wd[ids[id(p)]], layer[ids[id(p)]] = g["weight_decay"], g["name"]
    assert len(wd) == len(ids)
    for name in ("backbone.pos_embed", "backbone.cls_token",  # 3-D: only no_weight_decay() says
                 "backbone.patch_embed.proj.bias", "backbone.blocks.0.norm1.weight",
                 "backbone.blocks.0.norm1.bias", "backbone.blocks.0.attn.qkv.bias",
                 "backbone.norm.weight", "backbone.norm.bias", "head.0.bias"):
        assert wd[name] == 0.0, name
    for name in ("backbone.patch_embed.proj.weight", "backbone.blocks.0.attn.qkv.weight",
                 "backbone.blocks.5.mlp.fc2.weight", "head.0.weight"):
        assert wd[name] == 0.1, name
    assert layer["backbone.pos_embed"] == "layer0"
    assert layer["backbone.norm.weight"] == "layer6"  # final norm joins the last block
    # 7 layers: stem at depth 7 -> 1e-2 / 128.
    assert rates(opt) == approx([7.8125e-5, 1.5625e-4, 3.125e-4, 6.25e-4, 1.25e-3, 2.5e-3,
                                 5e-3, 1e-2])


def test_floor_and_backbone_multiplier(resnet):
    floored = build_optimizer(resnet, lr=1e-2, layer_decay=0.5, min_lr=1e-3)
    assert rates(floored) == approx([1e-3, 1e-3, 1.25e-3, 2.5e-3, 5e-3, 1e-2])
    assert floored.param_groups[0]["lr_mult"] == pytest.approx(0.1, rel=1e-12)
    mult = build_optimizer(resnet, lr=1e-2, layer_decay=0.5, backbone_lr_mult=0.1)
    assert rates(mult) == approx([3.125e-5, 6.25e-5, 1.25e-4, 2.5e-4, 5e-4, 1e-2])
    flat = build_optimizer(resnet, lr=1e-2)  # layer_decay=1: one rate everywhere
    assert rates(flat) == approx([1e-2] * 6)


def test_optimizers_by_name(resnet):
    sgd = build_optimizer(resnet, "SGD", lr=1e-2, nesterov=True)
    assert type(sgd) is torch.optim.SGD
    assert sgd.defaults["momentum"] == 0.9 and sgd.defaults["nesterov"] is True
    rms = build_optimizer(resnet, "rmsprop", lr=1e-2, momentum=0.5)
    assert type(rms) is torch.optim.RMSprop and rms.defaults["momentum"] == 0.5
    assert type(build_optimizer(resnet, "adam")) is torch.optim.Adam
    assert type(build_optimizer(resnet, "NAdam")) is torch.optim.NAdam
    assert type(build_optimizer(resnet, "radam")) is torch.optim.RAdam
    assert type(build_optimizer(resnet, "rprop", weight_decay=0)) is torch.optim.Rprop


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"name": "adamx"}, "unknown optimizer 'adamx'; choose one of torch.optim's: adadelta"),
    ({"name": "lbfgs", "weight_decay": 0}, "cannot build optimizer LBFGS"),
    ({"name": "rprop"}, "optimizer Rprop has no weight decay; use weight_decay=0"),
    ({"name": "adamw", "bogus": 1}, "cannot build optimizer AdamW with {'bogus': 1}"),
    ({"lr": 0}, "lr must be > 0, got 0"),
    ({"layer_decay": 1.5}, "layer_decay must be in (0, 1], got 1.5"),
    ({"lr": 1e-3, "min_lr": 1e-2}, "min_lr must be in [0, lr=0.001], got 0.01"),
    ({"weight_decay": -1}, "weight_decay must be >= 0"),
    ({"backbone_lr_mult": -1}, "backbone_lr_mult must be >= 0"),
])
def test_bad_optimizer_arguments(resnet, kwargs, message):
    with pytest.raises(UsageError) as info:
        build_optimizer(resnet, **kwargs)
    assert message in str(info.value)


# -- schedulers -----------------------------------------------------------------------------


def test_step_scheduler_per_epoch(resnet):
    opt = build_optimizer(resnet, lr=1e-2, layer_decay=0.5)
    sched, interval = build_scheduler(opt, "step", epochs=10, steps_per_epoch=3, step_size=2,
                                      gamma=0.1)
    assert isinstance(sched, StepLR) and interval == "epoch"
    assert rates(opt) == approx(RATES)
    advance(opt, sched, 1)
    assert rates(opt) == approx(RATES)
    advance(opt, sched, 1)
    assert rates(opt) == approx([3.125e-5, 6.25e-5, 1.25e-4, 2.5e-4, 5e-4, 1e-3])
    advance(opt, sched, 2)
    assert rates(opt) == approx([3.125e-6, 6.25e-6, 1.25e-5, 2.5e-5, 5e-5, 1e-4])


def test_cosine_with_warmup_per_step(resnet):
    # 4 epochs x 5 steps, 1 warmup epoch: warmup factor (s+1)/6 for s < 5, then cosine from 1
    # at step 5 to min_lr / lr = 0.1 at step 20; at step 10 it is 0.1 + 0.9 * 0.75 = 0.775.
    opt = build_optimizer(resnet, lr=1e-2, layer_decay=0.5)
    sched, interval = build_scheduler(opt, "cosine", epochs=4, steps_per_epoch=5,
                                      warmup_epochs=1, min_lr=1e-3)
    assert isinstance(sched, LambdaLR) and interval == "step"
    assert rates(opt) == approx([5.208333333333333e-5, 1.0416666666666667e-4,
                                 2.0833333333333335e-4, 4.166666666666667e-4,
                                 8.333333333333334e-4, 1.6666666666666668e-3])
    advance(opt, sched, 2)
    assert rates(opt) == approx([1.5625e-4, 3.125e-4, 6.25e-4, 1.25e-3, 2.5e-3, 5e-3])
    advance(opt, sched, 3)
    assert rates(opt) == approx(RATES)
    advance(opt, sched, 5)
    assert rates(opt) == approx([2.421875e-4, 4.84375e-4, 9.6875e-4, 1.9375e-3, 3.875e-3,
                                 7.75e-3])
    advance(opt, sched, 10)
    assert rates(opt) == approx([3.125e-5, 6.25e-5, 1.25e-4, 2.5e-4, 5e-4, 1e-3])
    # The multiplier is plain data, so a saved scheduler state is JSON and reloads.
    state = json.loads(json.dumps(sched.state_dict()))
    assert state["last_epoch"] == 20 and state["lr_lambdas"][0]["warmup_steps"] == 5


def test_onecycle_keeps_the_decay(resnet):
    # 2 epochs x 5 steps, pct_start 0.3: starts at max_lr / 25, peaks at step 2, ends at step 9
    # at min_lr (head) -- each group at its own max_lr and its own fraction of it.
    opt = build_optimizer(resnet, "sgd", lr=1e-2, layer_decay=0.5)
    sched, interval = build_scheduler(opt, "onecycle", epochs=2, steps_per_epoch=5, min_lr=1e-4)
    assert isinstance(sched, OneCycleLR) and interval == "step"
    assert [g["max_lr"] for g in opt.param_groups[::2]] == approx(RATES)
    assert rates(opt) == approx([1.25e-5, 2.5e-5, 5e-5, 1e-4, 2e-4, 4e-4])
    for step in range(1, 10):
        advance(opt, sched, 1)
        lrs = rates(opt)
        assert [lr / lrs[-1] for lr in lrs] == pytest.approx(
            [0.03125, 0.0625, 0.125, 0.25, 0.5, 1.0], rel=1e-9), step
        if step == 2:
            assert lrs == approx(RATES)
    assert rates(opt) == pytest.approx([3.125e-6, 6.25e-6, 1.25e-5, 2.5e-5, 5e-5, 1e-4],
                                       rel=1e-9)
    # warmup_epochs sets the rising phase: 1 of 2 epochs -> peak at step 4.
    opt = build_optimizer(resnet, "adamw", lr=1e-2, layer_decay=0.5)
    sched, _ = build_scheduler(opt, "onecycle", epochs=2, steps_per_epoch=5, warmup_epochs=1)
    advance(opt, sched, 4)
    assert rates(opt) == approx(RATES)


def test_constant_with_and_without_warmup(resnet):
    opt = build_optimizer(resnet, lr=1e-2, layer_decay=0.5)
    sched, interval = build_scheduler(opt, "constant", epochs=3, steps_per_epoch=4)
    assert interval == "epoch"
    advance(opt, sched, 3)
    assert rates(opt) == approx(RATES)
    opt = build_optimizer(resnet, lr=1e-2, layer_decay=0.5)
    sched, interval = build_scheduler(opt, "constant", epochs=3, steps_per_epoch=4,
                                      warmup_epochs=0.5)
    assert interval == "step"
    assert rates(opt)[-1] == pytest.approx(1e-2 / 3, rel=1e-12)
    advance(opt, sched, 7)
    assert rates(opt) == approx(RATES)



@pytest.mark.parametrize(("name", "optimizer"), [("cosine", "adamw"), ("onecycle", "adamw"),
                                                 ("step", "sgd")])
def test_scheduler_state_survives_json_and_a_rebuild(resnet, name, optimizer):
    """Resume: rebuild optimizer and scheduler, load both states (via JSON), same rates after."""

    def build():
        opt = build_optimizer(resnet, optimizer, lr=1e-2, layer_decay=0.5)
        return (opt, *build_scheduler(opt, name, epochs=4, steps_per_epoch=5, step_size=1,
                                      warmup_epochs=0 if name == "step" else 1, min_lr=1e-4))

    opt, sched, _ = build()
    advance(opt, sched, 7)
    saved = json.loads(json.dumps({"groups": opt.state_dict()["param_groups"],
                                   "sched": sched.state_dict()}))
    again, sched2, _ = build()
    again.load_state_dict({"state": {}, "param_groups": saved["groups"]})
    sched2.load_state_dict(saved["sched"])
    assert rates(again) == rates(opt)
    advance(opt, sched, 5)
    advance(again, sched2, 5)
    assert rates(again) == rates(opt)
    assert [g["initial_lr"] for g in again.param_groups] == [
        g["initial_lr"] for g in opt.param_groups]

@pytest.mark.parametrize(("name", "kwargs", "message"), [
    ("poly", {}, "unknown scheduler 'poly'; choose from step, cosine, onecycle, constant"),
    ("step", {"warmup_epochs": 1}, "warmup_epochs works with the cosine"),
    ("cosine", {"warmup_epochs": 3}, "warmup (3 epochs) must be shorter than the run (3 epochs)"),
    ("onecycle", {"warmup_epochs": 3}, "onecycle: warmup_epochs must be less than epochs (3)"),
    ("cosine", {"min_lr": 1.0}, "min_lr must be in [0, lr=0.01], got 1.0"),
    ("step", {"step_size": 0}, "step scheduler needs step_size >= 1"),
])
def test_bad_scheduler_arguments(resnet, name, kwargs, message):
    opt = build_optimizer(resnet, lr=1e-2, layer_decay=0.5)
    with pytest.raises(UsageError) as info:
        build_scheduler(opt, name, epochs=3, steps_per_epoch=4, **kwargs)
    assert message in str(info.value)


def test_timm_groups_lose_the_decay_under_a_torch_scheduler_ours_do_not():
    """Lesson 1: timm's groups carry only `lr_scale`; a plain torch scheduler ignores it."""
    from timm.optim import param_groups_layer_decay
    from timm.scheduler import CosineLRScheduler

    model = create_model("timm:test_resnet", 2, policy="finetune", pretrained=False)
    timm_groups = param_groups_layer_decay(model.backbone, weight_decay=0.01, layer_decay=0.5)
    timm_opt = torch.optim.AdamW(timm_groups, lr=1e-2)
    timm_sched = StepLR(timm_opt, step_size=1, gamma=0.5)
    advance(timm_opt, timm_sched, 1)
    assert len({g["lr_scale"] for g in timm_opt.param_groups}) == 5  # the decay is there...
    assert {g["lr"] for g in timm_opt.param_groups} == {5e-3}  # ...but every group runs at lr

    ours = build_optimizer(model, lr=1e-2, layer_decay=0.5)
    sched, _ = build_scheduler(ours, "step", epochs=3, steps_per_epoch=1, step_size=1, gamma=0.5)
    advance(ours, sched, 1)
    assert rates(ours) == approx([1.5625e-4, 3.125e-4, 6.25e-4, 1.25e-3, 2.5e-3, 5e-3])

    # And timm's own schedulers keep our ratios without applying the decay twice.
    ours = build_optimizer(model, lr=1e-2, layer_decay=0.5)
    cosine = CosineLRScheduler(ours, t_initial=10)
    cosine.step(0)
    assert rates(ours) == approx(RATES)
    cosine.step(5)
    assert rates(ours) == pytest.approx([r * 0.5 for r in RATES], rel=1e-9)


# -- freezing never touches the optimizer ---------------------------------------------------


def test_gradual_unfreezing_keeps_the_optimizer_and_uses_each_groups_lr():
    torch.manual_seed(0)
    model = create_model("timm:test_resnet", 2, policy="gradual", pretrained=False)
    opt = build_optimizer(model, "sgd", lr=0.1, layer_decay=0.5, weight_decay=0, momentum=0)
    sched, interval = build_scheduler(opt, "step", epochs=6, steps_per_epoch=1, step_size=1,
                                      gamma=0.5)
    assert interval == "epoch"
    groups_at_start = [(id(g), [id(p) for p in g["params"]]) for g in opt.param_groups]
    hand = [3.125e-3, 6.25e-3, 1.25e-2, 2.5e-2, 5e-2, 0.1]  # layers 0-4 (= stages 0-4), head
    x = torch.randn(4, 3, 32, 32)
    y = torch.tensor([0, 1, 0, 1])
    changed_at: dict[int, int] = {}
    for epoch in range(6):
        model.apply_policy(epoch)  # gradual: the last `epoch` stages train
        model.train()
        assert len(opt.param_groups) == 12
        assert [(id(g), [id(p) for p in g["params"]]) for g in opt.param_groups] == groups_at_start
        assert rates(opt) == approx([r * 0.5**epoch for r in hand])
        before = {id(p): p.detach().clone() for p in model.parameters()}
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        grads = {id(p): p.grad.clone() for p in model.parameters() if p.grad is not None}
        opt.step()
        opt.zero_grad()
        for g in opt.param_groups:
            for p in g["params"]:
                if p.requires_grad:  # trains at its group's rate as scheduled right now
                    expected = before[id(p)] - g["lr"] * grads[id(p)]
                    torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-9)
                else:
                    assert id(p) not in grads
                    assert torch.equal(p, before[id(p)])  # bitwise unchanged while frozen
        for name, p in model.backbone.named_parameters():
            stage = model.stage_of[name]
            if not torch.equal(p, before[id(p)]):
                changed_at.setdefault(stage, epoch)
        sched.step()
    # Stage s (of 5) first trains at epoch 5 - s; the stem never before epoch 5.
    assert changed_at == {4: 1, 3: 2, 2: 3, 1: 4, 0: 5}


# -- lr_plan and the CLI --------------------------------------------------------------------


def test_lr_plan_rows(resnet):
    rows = lr_plan(resnet, lr=1e-2, layer_decay=0.5, weight_decay=0.05)
    assert [r["layer"] for r in rows] == NAMES
    assert [r["stage"] for r in rows] == ["stem", "stage1", "stage2", "stage3", "stage4", "head"]
    assert [r["lr"] for r in rows] == approx(RATES)
    assert [r["params"] for r in rows] == [7472, 18560, 36384, 42432, 267840, 194]
    assert [r["no_decay_params"] for r in rows] == [128, 128, 288, 960, 576, 2]
    assert all(r["decay_params"] + r["no_decay_params"] == r["params"] for r in rows)
    assert sum(r["params"] for r in rows) == sum(p.numel() for p in resnet.parameters())
    assert rows[1]["modules"] == ["layer1"] and rows[-1]["modules"] == ["head"]


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(list(args))
    out, err = capsys.readouterr()
    return info.value.code, out, err


def test_cli_lr_plan_json(capsys):
    code, out, _ = run_cli(capsys, "lr-plan", "timm:test_resnet", "--lr", "1e-2",
                           "--layer-decay", "0.5", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["num_layers"] == 5 and data["lr"] == 1e-2 and data["layer_decay"] == 0.5
    assert [r["layer"] for r in data["layers"]] == NAMES
    assert [r["lr"] for r in data["layers"]] == approx(RATES)
    assert [r["weight_decay"] for r in data["layers"]] == [0.01] * 6


def test_cli_lr_plan_table_and_spec_defaults(capsys):
    code, out, _ = run_cli(capsys, "lr-plan", "timm:test_resnet", "--lr", "1e-2",
                           "--layer-decay", "0.5", "--min-lr", "1e-3")
    assert code == 0
    assert "layer4" in out and "0.005" in out and "floor 0.001" in out
    code, out, _ = run_cli(capsys, "lr-plan", "resnet18", "--json")  # spec: lr 1e-3, decay 0.7
    data = json.loads(out)
    assert (code, data["lr"], data["layer_decay"], data["num_layers"]) == (0, 1e-3, 0.7, 9)
    assert [r["lr"] for r in data["layers"][-3:]] == pytest.approx([4.9e-4, 7e-4, 1e-3])


@pytest.mark.parametrize(("args", "message"), [
    (["timm:test_resnet", "--layer-decay", "1.5"], "error: layer_decay must be in (0, 1], got 1.5"),
    (["timm:nope_net"], "error: unknown timm model 'nope_net'"),
])
def test_cli_lr_plan_errors(capsys, args, message):
    code, out, err = run_cli(capsys, "lr-plan", *args)
    assert code == 2 and out == ""
    assert message in err


def test_adam_adamw_and_sgd_use_the_fused_kernel_and_step_as_the_loop_does() -> None:
    """On the CPU torch's default is the per-tensor loop; tlreg asks for the fused kernel
    (unless the user names an implementation), and its steps agree with the loop's."""
    import copy

    torch.manual_seed(0)
    start = create_model("timm:test_resnet", 3, policy="finetune", pretrained=False)
    for name in ("adamw", "adam", "sgd"):
        a, b = copy.deepcopy(start), copy.deepcopy(start)
        opt_a = build_optimizer(a, name, lr=1e-2, layer_decay=0.7)
        assert opt_a.defaults["fused"] is True
        opt_b = build_optimizer(b, name, lr=1e-2, layer_decay=0.7, foreach=False)
        assert not opt_b.defaults.get("fused")
        x = torch.randn(4, 3, 32, 32)
        for _ in range(3):
            for model, opt in ((a, opt_a), (b, opt_b)):
                opt.zero_grad()
                model(x).square().mean().backward()
                opt.step()
        for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
            # float rounding, amplified by three steps through BatchNorm: 8e-6 measured, under
            # 1% of one lr=1e-2 step
            assert torch.allclose(p, q, atol=1e-4, rtol=0), n
    # The user's choice is kept, and an optimizer without a fused kernel is built as before.
    assert not build_optimizer(a, "adamw", foreach=True).defaults.get("fused")
    assert "fused" not in build_optimizer(a, "rmsprop").defaults
