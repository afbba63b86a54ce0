"""TransferModel: assembly, stages and layers, freezing and BatchNorm rules, weights sources.

Parameter counts are written by hand from timm's definitions of its tiny test models, never
computed by the code under test:

test_resnet (BasicBlock, BasicBlock, Bottleneck, BasicBlock; one block each; deep stem of width
16; avg_down; channels 32, 48, 48, 96), 372688 parameters without the classifier:
  stem   conv1 = 3x3 convs 3->16 (432) + BN 16 (32) + 16->16 (2304) + BN 16 (32) + 16->32 (4608),
         bn1 = BN 32 (64)                                                           =   7472
  layer1 BasicBlock 32->32: 2 x (3x3 32->32 (9216) + BN 32 (64))                     =  18560
  layer2 BasicBlock 32->48: 3x3 32->48 (13824) + BN (96) + 3x3 48->48 (20736) + BN (96)
         + downsample 1x1 32->48 (1536) + BN (96)                                     =  36384
  layer3 Bottleneck 48->192: 1x1 48->48 (2304) + BN (96) + 3x3 48->48 (20736) + BN (96)
         + 1x1 48->192 (9216) + BN 192 (384) + downsample 1x1 48->192 (9216) + BN (384)  =  42432
  layer4 BasicBlock 192->96: 3x3 192->96 (165888) + BN (192) + 3x3 96->96 (82944) + BN (192)
         + downsample 1x1 192->96 (18432) + BN (192)                                  = 267840
  feature width 96

test_vit (patch 16, width 64, depth 6, 2 heads, mlp ratio 3, 160x160 input), 306240 parameters:
  stem   cls_token 64 + pos_embed (100 patches + 1) * 64 = 6464
         + patch_embed 3*16*16*64 + 64 = 49216                                        =  55744
  block  norm1 128 + qkv 64*192+192 = 12480 + proj 64*64+64 = 4160 + norm2 128
         + fc1 64*192+192 = 12480 + fc2 192*64+64 = 12352                            =  41728
  norm   final LayerNorm 64 + 64 (joins the last block: timm's (99999,) rule)          =    128
  stages: stem, then one per block (7); feature width 64
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

import tlreg
from tlreg.errors import UsageError, WeightsError
from tlreg.models.backbones import BackboneSpec, build_backbone, weights_sha256
from tlreg.models.transfer import TransferModel, build_from_info

STEM, L1, L2, L3, L4 = 7472, 18560, 36384, 42432, 267840
RESNET = STEM + L1 + L2 + L3 + L4  # 372688
VIT_STEM, VIT_BLOCK, VIT_NORM = 55744, 41728, 128
VIT = VIT_STEM + 6 * VIT_BLOCK + VIT_NORM  # 306240

# Heads for num_classes=3. mlp defaults: BatchNorm1d(in) + Linear(in, 512) + Linear(512, 3).
HEADS = {
    "timm:test_resnet": {"linear": 96 * 3 + 3,  # 291
                         "mlp": 2 * 96 + (96 * 512 + 512) + (512 * 3 + 3),  # 51395
                         "cosine": 3 * 96 + 1},  # 289: weight + learnable scale
    "timm:test_vit": {"linear": 64 * 3 + 3,  # 195
                      "mlp": 2 * 64 + (64 * 512 + 512) + (512 * 3 + 3),  # 34947
                      "cosine": 3 * 64 + 1},  # 193
}
# (policy, args) -> trainable backbone parameters.
POLICIES = {
    "timm:test_resnet": [
        ("feature-extract", {}, 0),
        ("finetune", {}, RESNET),
        ("partial", {"train_last": 1}, L4),
        ("partial", {"freeze_first": 3}, L3 + L4),
        ("gradual", {"every": 1}, 0),  # epoch 0: head only
        # BN rule 'frozen' on the trained stage freezes layer4's three BNs (3 x 192).
        ("partial", {"train_last": 1, "trainable_bn": "frozen"}, L4 - 3 * 192),
    ],
    "timm:test_vit": [
        ("feature-extract", {}, 0),
        ("finetune", {}, VIT),
        ("partial", {"train_last": 1}, VIT_BLOCK + VIT_NORM),  # 41856
        ("partial", {"freeze_first": 3}, 4 * VIT_BLOCK + VIT_NORM),  # 167040
        ("gradual", {"every": 1}, 0),
    ],
}
CASES = [(bb, head, pol, args, n + HEADS[bb][head])
         for bb in POLICIES for head in HEADS[bb] for pol, args, n in POLICIES[bb]]


def _trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize(("backbone", "head", "policy", "args", "expected"), CASES,
                         ids=[f"{c[0][5:]}-{c[1]}-{c[2]}{len(c[3])}" for c in CASES])
def test_trainable_parameters_by_hand(backbone, head, policy, args, expected):
    model = tlreg.create_model(backbone, 3, head=head, policy=policy, policy_args=args,
                               pretrained=False)
    assert isinstance(model, TransferModel) and isinstance(model, nn.Module)
    assert _trainable(model) == expected
    assert model.num_trainable() == expected
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    assert model(x).shape == (2, 3)


def test_backbone_totals_and_stages_by_hand():
    cnn = tlreg.create_model("timm:test_resnet", 3, pretrained=False)
    vit = tlreg.create_model("timm:test_vit", 3, pretrained=False)
    assert sum(p.numel() for p in cnn.backbone.parameters()) == 372688
    assert sum(p.numel() for p in vit.backbone.parameters()) == 306240
    per_stage = [0] * cnn.num_stages
    for name, p in cnn.backbone.named_parameters():
        per_stage[cnn.stage_of[name]] += p.numel()
    assert per_stage == [STEM, L1, L2, L3, L4]
    assert (cnn.feature_dim, vit.feature_dim) == (96, 64)
    assert (cnn.num_stages, cnn.num_layers, vit.num_stages, vit.num_layers) == (5, 5, 7, 7)
    assert cnn.stage_names == ["stem", "stage1", "stage2", "stage3", "stage4"]


def test_gradual_unfreezes_without_touching_parameter_identity():
    model = tlreg.create_model("timm:test_resnet", 3, policy="gradual", policy_args={"every": 2},
                               pretrained=False)
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.1)
    groups = [list(g["params"]) for g in opt.param_groups]
    counts = []
    for epoch in range(8):
        model.apply_policy(epoch)
        counts.append(_trainable(model) - 291)
    # every=2: one more stage (from the top) each two epochs.
    assert counts == [0, 0, L4, L4, L3 + L4, L3 + L4, L2 + L3 + L4, L2 + L3 + L4]
    assert list(model.parameters()) == params
    assert [list(g["params"]) for g in opt.param_groups] == groups
    assert model.epoch == 7


# -- BatchNorm ---------------------------------------------------------------------------------


def _bn_state(model: TransferModel) -> dict[str, tuple[torch.Tensor, ...]]:
    return {name: (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone(),
                   m.weight.detach().clone())
            for name, m in model.backbone.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def _one_step(model: TransferModel) -> None:
    torch.manual_seed(0)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)  # every group at the start
    loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 64, 64) * 3 + 1),
                                       torch.tensor([0, 1, 2, 0]))
    loss.backward()
    opt.step()


def _changed(a: torch.Tensor, b: torch.Tensor) -> bool:
    return not torch.equal(a, b)


def test_partial_freezes_bn_statistics_of_frozen_stages_only():
    model = tlreg.create_model("timm:test_resnet", 3, head="mlp", policy="partial",
                               policy_args={"train_last": 1}, pretrained=False)
    before = _bn_state(model)
    frozen_conv = model.backbone.layer1[0].conv1.weight.detach().clone()
    train_conv = model.backbone.layer4[0].downsample[1].weight.detach().clone()
    _one_step(model)
    after = _bn_state(model)
    modules = dict(model.backbone.named_modules())
    frozen = [n for n in before if not n.startswith("layer4")]
    trained = [n for n in before if n.startswith("layer4")]
    assert len(frozen) == 2 + 1 + 2 + 3 + 4 and len(trained) == 3  # stem, layer1..3 / layer4
    for n in frozen:  # 'frozen' rule: eval mode despite model.train(), nothing moves
        assert not modules[n].training
        assert all(torch.equal(a, b) for a, b in zip(before[n], after[n], strict=True)), n
        assert not modules[n].weight.requires_grad
    for n in trained:  # 'train' rule: statistics and affine parameters move
        assert modules[n].training
        mean0, var0, count0, _ = before[n]
        mean1, var1, count1, _ = after[n]
        assert _changed(mean0, mean1) and _changed(var0, var1) and int(count1) == int(count0) + 1
        assert modules[n].weight.requires_grad
    # timm zero-initialises each block's last BN, so bn1 gets no gradient yet; these do.
    for n in ("layer4.0.bn2", "layer4.0.downsample.2"):  # avg_down: pool, conv, BN
        assert _changed(before[n][3], after[n][3]), n
    assert torch.equal(model.backbone.layer1[0].conv1.weight, frozen_conv)
    assert _changed(model.backbone.layer4[0].downsample[1].weight, train_conv)
    # The head's own BatchNorm1d trains normally.
    assert model.head[0].training and int(model.head[0].num_batches_tracked) == 1


def test_bn_rule_eval_keeps_statistics_but_trains_affine():
    model = tlreg.create_model("timm:test_resnet", 3, policy="partial",
                               policy_args={"train_last": 1, "trainable_bn": "eval"},
                               pretrained=False)
    assert model.plan.bn == ("frozen", "frozen", "frozen", "frozen", "eval")
    before = _bn_state(model)
    _one_step(model)
    after = _bn_state(model)
    bn = model.backbone.layer4[0].bn1
    assert not bn.training and bn.weight.requires_grad
    for n in (n for n in before if n.startswith("layer4")):
        mean0, var0, count0, _ = before[n]
        mean1, var1, count1, _ = after[n]
        assert torch.equal(mean0, mean1) and torch.equal(var0, var1) and count0 == count1
    assert _changed(before["layer4.0.bn2"][3], after["layer4.0.bn2"][3])
    # A trainable count that includes layer4's BN affine parameters.
    assert _trainable(model) == L4 + 291


def test_bn_rule_train_on_frozen_stages_moves_statistics_only():
    model = tlreg.create_model("timm:test_resnet", 3, policy="feature-extract",
                               policy_args={"frozen_bn": "train"}, pretrained=False)
    assert not model.backbone_frozen  # statistics move, so features are not fixed
    before = _bn_state(model)
    _one_step(model)
    after = _bn_state(model)
    for n in before:
        mean0, _, _, w0 = before[n]
        mean1, _, _, w1 = after[n]
        assert _changed(mean0, mean1) and torch.equal(w0, w1), n
    assert _trainable(model) == 291


def test_bn_rules_survive_train_eval_cycles():
    model = tlreg.create_model("timm:test_resnet", 3, policy="feature-extract",
                               pretrained=False)
    assert model.backbone_frozen
    for _ in range(2):
        model.eval()
        model.train()
        assert model.training and model.head.training
        assert not any(m.training for m in model.backbone.modules()
                       if isinstance(m, nn.modules.batchnorm._BatchNorm))
    model.apply_policy(0)
    assert not model.backbone.bn1.training


def test_bn_modules_keep_timm_classes_and_state_dict_keys():
    model = tlreg.create_model("timm:test_resnet", 3, policy="partial",
                               policy_args={"freeze_first": 2}, pretrained=False)
    raw = timm.create_model("test_resnet", num_classes=0)
    assert [type(m) for m in model.backbone.modules()] == [type(m) for m in raw.modules()]
    assert list(model.backbone.state_dict()) == list(raw.state_dict())
    assert type(model.backbone.bn1) is nn.BatchNorm2d
    assert {k for k in model.state_dict() if k.startswith("backbone.")} == {
        f"backbone.{k}" for k in raw.state_dict()}


def test_apply_plan_rejects_a_plan_of_the_wrong_size():
    model = tlreg.create_model("timm:test_resnet", 3, pretrained=False)
    from tlreg.models.policies import FreezePlan

    with pytest.raises(UsageError, match="2 BN rules for 5 stages"):
        model.apply_plan(FreezePlan(frozenset(), ("frozen", "frozen")))


# -- stages and layers -------------------------------------------------------------------------

BUILTINS = {  # name: (stages, layers, feature width), from timm's group_matcher by hand
    "resnet18": (5, 9, 512),  # stem + 4 stages; stem + 2+2+2+2 blocks
    "resnet50": (5, 17, 2048),  # stem + 3+4+6+3 blocks
    "efficientnet_b0": (8, 17, 1280),  # stem + 7 block stages; stem + 1+2+2+3+3+4+1 blocks
    "convnext_tiny": (5, 19, 768),  # stem + 4 stages; stem + 3+3+9+3 blocks
    "mobilenetv3_large_100": (8, 17, 1280),  # head_hidden_size 1280, not num_features 960
    "vit_small_patch16_224": (13, 13, 384),  # stem + 12 blocks, at both granularities
}
TINY = [f"timm:{n}" for n in timm.list_models("test_*")]


@pytest.fixture(scope="module")
def built() -> dict[str, TransferModel]:
    return {}


def _model(built: dict[str, TransferModel], name: str) -> TransferModel:
    if name not in built:
        built[name] = tlreg.create_model(name, 2, policy="finetune", pretrained=False)
    return built[name]


@pytest.mark.parametrize("name", [*BUILTINS, *TINY])
def test_every_parameter_in_exactly_one_stage_and_layer(name, built):
    model = _model(built, name)
    names = [n for n, _ in model.backbone.named_parameters()]
    assert len(names) == len(set(names))
    assert set(model.stage_of) == set(names) == set(model.layer_of)
    assert sorted(set(model.stage_of.values())) == list(range(model.num_stages))
    assert sorted(set(model.layer_of.values())) == list(range(model.num_layers))
    assert 2 <= model.num_stages <= model.num_layers
    # Layers nest inside stages, in the same order.
    stage_of_layer: dict[int, set[int]] = {}
    for n in names:
        stage_of_layer.setdefault(model.layer_of[n], set()).add(model.stage_of[n])
    assert all(len(s) == 1 for s in stage_of_layer.values())
    firsts = [min(stage_of_layer[i]) for i in range(model.num_layers)]
    assert firsts == sorted(firsts) and firsts[0] == 0 and firsts[-1] == model.num_stages - 1
    assert len(model.stage_names) == model.num_stages


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_stage_and_layer_counts(name, built):
    model = _model(built, name)
    assert (model.num_stages, model.num_layers, model.feature_dim) == BUILTINS[name]


TAILS = {  # modules between the last block and the head -> the last stage and layer
    "timm:test_vit": ["norm.weight", "norm.bias"],
    "vit_small_patch16_224": ["norm.weight"],
    "timm:test_efficientnet": ["conv_head.weight", "bn2.weight", "bn2.bias"],
    "efficientnet_b0": ["conv_head.weight", "bn2.weight"],
    "timm:test_convnext": ["head.norm.weight", "head.norm.bias"],
    "convnext_tiny": ["head.norm.weight"],
    "mobilenetv3_large_100": ["conv_head.weight", "conv_head.bias"],
}
LAST_BLOCK = {
    "timm:test_vit": "blocks.5.", "vit_small_patch16_224": "blocks.11.",
    "timm:test_efficientnet": "blocks.4.", "efficientnet_b0": "blocks.6.",
    "timm:test_convnext": "stages.3.", "convnext_tiny": "stages.3.",
    "mobilenetv3_large_100": "blocks.6.",
}


@pytest.mark.parametrize("name", TAILS)
def test_modules_after_the_last_block_join_the_last_stage(name, built):
    model = _model(built, name)
    last_stage, last_layer = model.num_stages - 1, model.num_layers - 1
    for param in TAILS[name]:
        assert model.stage_of[param] == last_stage, param
        assert model.layer_of[param] == last_layer, param
    # Merged into the last block's group, not a group of their own.
    block = [n for n in model.stage_of if n.startswith(LAST_BLOCK[name])]
    assert block and {model.stage_of[n] for n in block} == {last_stage}
    assert any(model.layer_of[n] == last_layer for n in block)
    # `backbones show` names them among the last stage's modules.
    members = model.stage_members()[last_stage]
    tail_modules = {p.rsplit(".", 1)[0] for p in TAILS[name]}
    # ConvNeXt's backbone `head` holds only `head.norm` once the classifier is removed.
    assert tail_modules <= set(members) or members.count("head") == 1, members


def test_mobilenetv3_feature_width_is_head_hidden_size(built):
    model = _model(built, "mobilenetv3_large_100")
    assert model.feature_dim == 1280 and model.backbone.num_features == 960
    model.eval()
    with torch.no_grad():
        feats = model.forward_features(torch.randn(1, 3, 64, 64))
    assert feats.shape == (1, 1280)
    assert model.head[0].in_features == 1280


def test_vit_and_cnn_pooled_features(built):
    for name, width in (("timm:test_vit", 64), ("timm:test_resnet", 96)):
        model = _model(built, name).eval()
        with torch.no_grad():
            assert model.forward_features(torch.randn(2, 3, 160, 160)).shape == (2, width)


@pytest.mark.parametrize("name", ["timm:test_resnet", "timm:test_efficientnet",
                                  "timm:test_vit"])
def test_inference_features_fold_batchnorm_and_match_forward_features(name: str) -> None:
    torch.manual_seed(0)
    model = tlreg.create_model(name, 2, pretrained=False)
    for m in model.modules():  # non-trivial statistics, so a wrong fold would show
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    extract = model.inference_features()
    x = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(extract(x), model.forward_features(x), atol=1e-5, rtol=1e-5)
    convs = [m for m in extract.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in extract.modules() if type(m) is nn.BatchNorm2d]
    if name == "timm:test_resnet":  # plain Conv2d + BatchNorm2d pairs: every one folded
        assert convs and not bns and all(c.bias is not None for c in convs)
    for k, v in model.state_dict().items():  # the model itself is untouched
        assert torch.equal(v, before[k]), k
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == (name != "timm:test_vit")


# -- weights -----------------------------------------------------------------------------------


def test_offline_pretrained_is_one_clear_error(tmp_path):
    code = (
        "import tlreg\n"
        "from tlreg.errors import WeightsError\n"
        "try:\n"
        "    tlreg.create_model('timm:test_resnet', 2)\n"
        "except WeightsError as exc:\n"
        "    print('WeightsError', exc)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
               PYTHONWARNINGS="ignore")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    out = res.stdout.strip()
    assert out.startswith("WeightsError could not get pretrained weights for backbone "
                          "'timm:test_resnet' from timm's source 'test_resnet'")
    assert "HF_HUB_OFFLINE" in out and "--weights FILE.safetensors" in out
    assert out.count("\n") == 0


def _save_backbone(path, arch="test_resnet", seed=0, **kwargs):
    torch.manual_seed(seed)
    model = timm.create_model(arch, **kwargs)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model


def test_weights_file_loads_exactly(tmp_path):
    path = tmp_path / "bb.safetensors"
    src = _save_backbone(path, num_classes=0)
    model = tlreg.create_model("timm:test_resnet", 3, weights=str(path))
    assert model.info.weights_source == "file"
    for k, v in src.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[k], v), k
    # A full checkpoint, classifier included, loads too: the classifier is dropped.
    full = tmp_path / "full.safetensors"
    src = _save_backbone(full, num_classes=10, seed=1)
    model = tlreg.create_model("timm:test_resnet", 3, weights=full)
    assert torch.equal(model.backbone.layer4[0].conv1.weight, src.layer4[0].conv1.weight)
    assert weights_sha256(model.backbone.state_dict()) == weights_sha256(
        {k: v for k, v in src.state_dict().items() if not k.startswith("fc.")})


def test_mismatching_weights_file_is_a_clear_error(tmp_path):
    vit = tmp_path / "vit.safetensors"
    _save_backbone(vit, "test_vit", num_classes=0)
    with pytest.raises(WeightsError) as exc:
        tlreg.create_model("timm:test_resnet", 3, weights=vit)
    msg = str(exc.value)
    assert "'timm:test_resnet'" in msg and str(vit) in msg and "do not match" in msg
    assert "missing conv1.0.weight" in msg and "unexpected" in msg and "more)" in msg

    # Same keys, wrong shapes (another width): still one WeightsError, not a RuntimeError.
    wide = tmp_path / "wide.safetensors"
    torch.manual_seed(0)
    state = timm.create_model("test_resnet", num_classes=0).state_dict()
    state["layer4.0.conv1.weight"] = torch.zeros(8, 192, 3, 3)
    save_file(state, str(wide))
    with pytest.raises(WeightsError, match=r"do not match .*wrong shape for "
                                           r"layer4\.0\.conv1\.weight"):
        tlreg.create_model("timm:test_resnet", 3, weights=wide)


def test_non_safetensors_weights_are_refused(tmp_path):
    pickled = tmp_path / "bb.pth"
    torch.save(timm.create_model("test_resnet", num_classes=0).state_dict(), pickled)
    with pytest.raises(WeightsError, match=r"must be a \.safetensors file.*never loaded"):
        tlreg.create_model("timm:test_resnet", 3, weights=pickled)
    with pytest.raises(WeightsError, match=r"could not read weights file .*missing\.safetensors"):
        tlreg.create_model("timm:test_resnet", 3, weights=tmp_path / "missing.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(WeightsError, match="could not read weights file"):
        tlreg.create_model("timm:test_resnet", 3, weights=garbage)


def test_loader_and_pinned_hash(tmp_path):
    torch.manual_seed(3)
    state = timm.create_model("test_resnet", num_classes=0).state_dict()
    digest = weights_sha256(state)
    spec = BackboneSpec("test_resnet", loader=lambda: state, weights_sha256=digest)
    assert spec.source == "loader"
    model = build_backbone(spec, name="pinned")
    assert weights_sha256(model.state_dict()) == digest

    wrong = BackboneSpec("test_resnet", loader=lambda: state, weights_sha256="0" * 64)
    with pytest.raises(WeightsError, match=f"hash to {digest}, expected 0000"):
        build_backbone(wrong, name="pinned")

    def failing():
        raise ConnectionError("mirror is down")

    with pytest.raises(WeightsError, match=r"backbone 'flaky' from loader .*ConnectionError: "
                                           "mirror is down"):
        build_backbone(BackboneSpec("test_resnet", loader=failing), name="flaky")
    # A file always wins over the spec's own source.
    path = tmp_path / "w.safetensors"
    _save_backbone(path, num_classes=0, seed=9)
    build_backbone(BackboneSpec("test_resnet", loader=failing), name="flaky", weights=path)


def test_info_and_rebuild():
    model = tlreg.create_model("timm:test_resnet", 3, head="mlp", head_args={"hidden": 16},
                               policy="partial", policy_args={"train_last": 2},
                               pretrained=False, label_names=["a", "b", "c"])
    info = model.info
    assert (info.provider, info.timm_name, info.tag, info.weights_source) == (
        "timm", "test_resnet", None, "random")
    assert info.hub_id == "timm/test_resnet.r160_in1k"
    assert model.data_config["input_size"] == (3, 160, 160)
    again = build_from_info(info)
    assert again.info == info
    assert list(again.state_dict()) == list(model.state_dict())
    assert again.num_trainable() == model.num_trainable() == L3 + L4 + (
        2 * 96 + 96 * 16 + 16 + 16 * 3 + 3)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"num_classes": 1}, "num_classes must be at least 2"),
    ({"label_names": ["a"]}, "1 label names for 3 classes"),
    ({"policy": "partial"}, "exactly one of freeze_first=N or train_last=K"),
    ({"policy": "partial", "policy_args": {"last": 1}}, "policy 'partial': bad arguments"),
    ({"head": "mlp", "head_args": {"activation": "swish"}}, "unknown activation 'swish'"),
    ({"head": "linear", "head_args": {"depth": 2}}, "head 'linear': bad arguments"),
])
def test_bad_arguments_are_usage_errors(kwargs, message):
    kwargs = {"num_classes": 3, **kwargs}
    with pytest.raises(UsageError, match=message):
        tlreg.create_model("timm:test_resnet", pretrained=False, **kwargs)
