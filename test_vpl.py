"""Promises vpl.py keeps, one per test. CPU only, tiny configurations, nothing downloaded.
Run: python -m pytest -q test_vpl.py"""
import argparse
import collections
import glob
import inspect
import io
import json
import math
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import vpl

HERE = os.path.dirname(os.path.abspath(__file__))
VPL = os.path.join(HERE, "vpl.py")
# A tiny demo run: 12 steps per epoch, 2 epochs, the three stages all visited.
TINY = ["--demo-train", "384", "--demo-val", "100", "--batch-size", "32", "--epochs", "2", "--workers", "0",
        "--log-every", "1", "--stages", "0.25,0.75", "--ramp", "0.1"]


def run_vpl(*args, check=True, timeout=300, env=None):
    result = subprocess.run([sys.executable, VPL, *args], capture_output=True, text=True, timeout=timeout,
                            cwd=HERE, env={**os.environ, **(env or {})})
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def model_state(out):
    return torch.load(os.path.join(out, "last.pt"), map_location="cpu", weights_only=True)["model"]


def assert_same(a, b, where="state"):
    """Exact equality of nested checkpoint contents: every tensor bit for bit."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def assert_same_weights(a, b):
    assert_same(a, b, "model")


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def assert_same_log(out, reference):
    """Every record of the two runs' logs equal, but for the timings."""
    timings = ("img_per_s", "time_s")
    a, b = ([{k: v for k, v in h.items() if k not in timings} for h in read_log(d)] for d in (out, reference))
    assert a == b


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """One uninterrupted tiny run that the resume tests must reproduce bit for bit."""
    out = str(tmp_path_factory.mktemp("reference"))
    result = run_vpl(*TINY, "--out", out)
    return out, result.stdout


# ------------------------------------------------------------------------------------ the branches
def test_parameter_counts_equal_torchvision():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(vpl.vit_b_16()) == count(torchvision.models.vit_b_16()) == 86_567_656
    assert count(vpl.resnet50()) == count(torchvision.models.resnet50()) == 25_557_032


def test_vit_parameter_names_are_timm_and_deit_names():
    names = set(vpl.vit_b_16().state_dict())
    expected = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight",
                "norm.bias", "head.weight", "head.bias"}
    for i in range(12):
        for part in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            expected |= {f"blocks.{i}.{part}.weight", f"blocks.{i}.{part}.bias"}
    assert names == expected


def test_resnet50_matches_torchvision():
    torch.manual_seed(0)
    reference = torchvision.models.resnet50().eval()
    for m in reference.modules():  # non-trivial BN statistics, so that eval mode really is tested
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
    ours = vpl.resnet50()
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert (ours.eval()(x) - reference(x)).abs().max() < 1e-4
        # channels_last gives the same logits up to float rounding (other kernels, other summation order)
        expected = reference(x)
        cl = ours.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
        assert (cl - expected).abs().max() < 1e-5 * expected.abs().max()


def test_each_residual_branch_starts_at_zero_as_torchvisions_zero_init_residual():
    zeroed = lambda model: {k for k, v in model.state_dict().items() if k.endswith(".weight") and not v.any()}  # noqa: E731
    assert zeroed(vpl.resnet50()) == zeroed(torchvision.models.resnet50(zero_init_residual=True))
    for block in vpl.resnet_tiny().eval().modules():  # a block without a downsample starts as relu(x)
        if isinstance(block, vpl.Bottleneck) and block.downsample is None:
            x = torch.randn(2, block.conv1.in_channels, 8, 8)
            with torch.no_grad():
                assert torch.equal(block(x.clone()), torch.relu(x))


def test_vit_b_16_matches_torchvision():
    torch.manual_seed(0)
    reference = torchvision.models.vit_b_16().eval()
    with torch.no_grad():
        for p in reference.parameters():  # torchvision zero-inits the head: re-draw every weight, large enough
            p.normal_(0, 0.1)             # that the blocks are far from linear (a tanh GELU is then 1e-4 off)
    ours = vpl.vit_b_16()
    ours.load_state_dict(vpl.vit_from_torchvision(reference.state_dict()), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = reference(x)
        assert (ours.eval()(x) - expected).abs().max() < 1e-5 * expected.abs().max()
    assert_same(vpl.vit_to_torchvision(ours.state_dict()), reference.state_dict())  # and back, every name and weight


def test_position_embedding_resize_keeps_cls_and_the_grids_function():
    base = vpl.vit_b_16()
    big = vpl.vit_b_16(img_size=384)
    big.load_state_dict(base.state_dict(), strict=True)
    assert big.pos_embed.shape == (1, 1 + 24 * 24, 768)
    assert torch.equal(big.pos_embed[:, 0], base.pos_embed[:, 0])
    with torch.no_grad():
        assert big.eval()(torch.randn(1, 3, 384, 384)).shape == (1, 1000)
    # a smooth grid stays the same smooth function: 14 x 14 samples of it, resized, are close to 24 x 24 samples
    def grid(n):  # the function at the centres of n x n cells of the unit square
        c = (torch.arange(n) + 0.5) / n
        return (torch.sin(3 * c)[:, None] + torch.cos(2 * c)[None, :]).reshape(1, n * n, 1)
    resized = vpl.resize_pos_embed(torch.cat([torch.zeros(1, 1, 1), grid(14)], 1), 24)
    assert (resized[:, 1:] - grid(24)).abs().view(24, 24)[2:-2, 2:-2].max() < 0.03  # align_corners=True: 0.07
    def wiggly(n):  # where bicubic (as DeiT and timm resize) is closer than bilinear: 0.034 against 0.077
        c = (torch.arange(n) + 0.5) / n
        return (torch.sin(9 * c)[:, None] * torch.cos(7 * c)[None, :]).reshape(1, n * n, 1)
    resized = vpl.resize_pos_embed(torch.cat([torch.zeros(1, 1, 1), wiggly(14)], 1), 24)
    assert (resized[:, 1:] - wiggly(24)).abs().view(24, 24)[2:-2, 2:-2].max() < 0.05
    def channels(n):  # three channels, each its own function: a resize must not mix them
        c = (torch.arange(n) + 0.5) / n
        return torch.stack([(torch.sin((3 + k) * c)[:, None] + torch.cos((2 + k) * c)[None, :]).flatten()
                            for k in range(3)], 1)[None]
    resized = vpl.resize_pos_embed(torch.cat([torch.zeros(1, 1, 3), channels(14)], 1), 24)
    assert (resized[:, 1:] - channels(24)).abs().view(24, 24, 3)[2:-2, 2:-2].max() < 0.03


def test_fine_tuning_loads_torchvision_and_deit_checkpoints_with_a_new_head_at_another_size(tmp_path):
    torch.manual_seed(0)
    source = torchvision.models.vit_b_16()
    target = vpl.vit_b_16(num_classes=5, img_size=256)
    head_before = target.head.weight.clone()
    vpl.load_branch_weights(target, {"model": source.state_dict()})  # DeiT nests weights under "model"
    assert torch.equal(target.blocks[3].attn.qkv.weight, source.encoder.layers[3].self_attention.in_proj_weight)
    assert torch.equal(target.head.weight, head_before)  # 1000 -> 5 classes: the head starts afresh
    assert target.pos_embed.shape == (1, 1 + 16 * 16, 768)
    # the MLP's older names, which torchvision itself still reads (files saved before torchvision renamed them)
    old = {k.replace("mlp.0", "mlp.linear_1").replace("mlp.3", "mlp.linear_2"): v for k, v in source.state_dict().items()}
    torchvision.models.vit_b_16().load_state_dict(old, strict=True)
    fresh = vpl.vit_b_16()
    vpl.load_branch_weights(fresh, old)
    assert torch.equal(fresh.blocks[5].mlp.fc2.weight, source.encoder.layers[5].mlp[3].weight)
    # a checkpoint of DeiT's, timm's or torchvision's trainers also holds their argparse arguments
    small = vpl.vit_tiny()
    torch.save({"model": small.state_dict(), "args": argparse.Namespace(lr=5e-4, model="deit")}, tmp_path / "deit.pth")
    copy = vpl.vit_tiny(drop_path=0.0)
    vpl.load_branch_weights(copy, vpl.load_checkpoint(str(tmp_path / "deit.pth")))
    assert torch.equal(copy.pos_embed, small.pos_embed)
    cnn = vpl.resnet50(num_classes=5)
    vpl.load_branch_weights(cnn, torchvision.models.resnet50().state_dict())
    with pytest.raises(vpl.UserError):
        vpl.load_branch_weights(cnn, vpl.resnet_tiny().state_dict())
    with pytest.raises(vpl.UserError, match="unexpected"):  # a ResNet-101 holds every ResNet-50 key, and more
        vpl.load_branch_weights(vpl.resnet50(), torchvision.models.resnet101().state_dict())
    tiny = vpl.resnet_tiny()
    nested = vpl.resnet_tiny()
    vpl.load_branch_weights(nested, {"state_dict": tiny.state_dict(), "epoch": 3})  # as timm's trainer saves
    assert_same(nested.state_dict(), tiny.state_dict())
    headless = vpl.vit_tiny()  # timm's weights without a classifier (num_classes=0): the branch keeps its new head
    head_before = headless.head.weight.clone()
    vpl.load_branch_weights(headless, {k: v for k, v in small.state_dict().items() if not k.startswith("head.")})
    assert torch.equal(headless.pos_embed, small.pos_embed) and torch.equal(headless.head.weight, head_before)
    # a vpl last.pt: --init-vit and --init-cnn take the branch of their side from its pair
    pair = vpl.PairModel(vpl.vit_tiny(), vpl.resnet_tiny(), 10)
    ema = vpl.PairModel(vpl.vit_tiny(), vpl.resnet_tiny(), 10)  # the trained weights are taken, not their EMA
    torch.save({"model": pair.state_dict(), "ema": ema.state_dict(), "epoch": 2}, tmp_path / "last.pt")
    started = vpl.PairModel(vpl.vit_tiny(), vpl.resnet_tiny(), 10)
    last = str(tmp_path / "last.pt")
    vpl.load_initial_weights(vpl.Config(init_vit=last, init_cnn=last), started)
    assert_same(started.vit.state_dict(), pair.vit.state_dict())
    assert_same(started.cnn.state_dict(), pair.cnn.state_dict())
    assert not torch.equal(started.pair_head.fc.weight, pair.pair_head.fc.weight)  # a pair head is not a branch's


COPIED = {  # what the README says to copy with each class, and a small one built from the copy
    "ViT": (["DropPath", "Attention", "Mlp", "Block", "PatchEmbed", "resize_pos_embed", "ViT"],
            lambda ns: ns["ViT"](img_size=32, patch_size=4, dim=64, depth=2, heads=4, drop_path=0.1, num_classes=10)),
    "ResNet": (["conv3x3", "conv1x1", "Bottleneck", "ResNet"],
               lambda ns: ns["ResNet"]((1, 2, 1, 1), num_classes=10, width=8, small_stem=True)),
}


@pytest.mark.parametrize("name", COPIED)
def test_each_model_class_works_copied_alone_with_only_torch_imported(name):
    names, build = COPIED[name]
    namespace = {"math": math, "torch": torch, "nn": nn, "F": F}  # the imports a codebase that copies it has
    for part in names:
        exec(inspect.getsource(getattr(vpl, part)), namespace)
    torch.manual_seed(0)
    copied = build(namespace).eval()
    torch.manual_seed(0)
    original = build(vars(vpl)).eval()
    assert_same(copied.state_dict(), original.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(copied(x), original(x))


def test_the_pair_loss_and_schedule_work_copied_alone_with_only_torch_imported():
    namespace = {"math": math, "torch": torch, "nn": nn, "F": F}
    for part in ("kd_loss", "PairLoss", "PairSchedule"):
        exec(inspect.getsource(getattr(vpl, part)), namespace)
    out = {k: torch.randn(4, 10) for k in ("vit", "cnn", "pair")}
    target = torch.randint(10, (4,))
    copied = namespace["PairLoss"](2.0, "pair", 0.1)(out, target, 0.3)
    original = vpl.PairLoss(2.0, "pair", 0.1)(out, target, 0.3)
    assert torch.equal(copied[0], original[0])
    assert [namespace["PairSchedule"]("0.1,0.8", 0.2, 0.05)(p) for p in (0.05, 0.12, 0.5, 0.9)] == \
           [vpl.PairSchedule("0.1,0.8", 0.2, 0.05)(p) for p in (0.05, 0.12, 0.5, 0.9)]


@pytest.mark.parametrize("name", ["vit_tiny", "resnet_tiny"])
def test_every_parameter_gets_a_finite_gradient(name):
    torch.manual_seed(0)
    model = vpl.build_branch(name, 10, 32, 0.1).train()
    F.cross_entropy(model(torch.randn(8, 3, 32, 32)), torch.randint(10, (8,))).backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("name", ["vit_tiny", "resnet_tiny"])
def test_eval_mode_is_deterministic(name):
    model = vpl.build_branch(name, 10, 32, 0.5).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_forward_is_features_then_head():
    for model in (vpl.vit_tiny().eval(), vpl.resnet_tiny().eval()):
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            f = model.forward_features(x)
            assert f.shape == (2, model.num_features)
            assert torch.equal(model.forward_head(f), model(x))


# ------------------------------------------------------------------------------- pair learning
def kd_by_hand(student, teacher, T):
    """T^2 * mean over samples of sum_k p_t log(p_t / p_s), with plain Python floats."""
    total = 0.0
    for s_row, t_row in zip(student, teacher):
        zs, zt = sum(math.exp(v / T) for v in s_row), sum(math.exp(v / T) for v in t_row)
        for s, t in zip(s_row, t_row):
            p_s, p_t = math.exp(s / T) / zs, math.exp(t / T) / zt
            total += p_t * math.log(p_t / p_s)
    return T * T * total / len(student)


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_kd_loss_matches_hand_computation(T):
    student, teacher = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]], [[0.5, 2.5, 0.0], [1.0, 1.0, 1.0]]
    got = vpl.kd_loss(torch.tensor(student), torch.tensor(teacher), T).item()
    assert got == pytest.approx(kd_by_hand(student, teacher, T), rel=1e-5)
    assert vpl.kd_loss(torch.tensor(student), torch.tensor(student), T).item() == pytest.approx(0.0, abs=1e-7)


def tiny_pair(drop_path=0.0):
    torch.manual_seed(0)
    return vpl.PairModel(vpl.vit_tiny(drop_path=drop_path), vpl.resnet_tiny(), 10).train()


def grads(loss, params):
    return [torch.zeros_like(p) if g is None else g
            for p, g in zip(params, torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True))]


def test_teacher_gets_no_gradient():
    pair = tiny_pair()
    out = pair(torch.randn(8, 3, 32, 32))
    _, terms = vpl.PairLoss(teacher="partner")(out, torch.randint(10, (8,)), 0.5)
    vit_params, cnn_params = list(pair.vit.parameters()), list(pair.cnn.parameters())
    assert all((g == 0).all() for g in grads(terms["vit_kd"], cnn_params))  # the CNN teaches, unmoved
    assert all((g == 0).all() for g in grads(terms["cnn_kd"], vit_params))
    assert all((g == 0).all() for g in grads(terms["pair_ce"], vit_params + cnn_params))
    assert any((g != 0).any() for g in grads(terms["vit_kd"], vit_params))  # ... but the student learns
    _, terms = vpl.PairLoss(teacher="pair")(out, torch.randint(10, (8,)), 0.5)
    head = list(pair.pair_head.parameters())
    assert all((g == 0).all() for g in grads(terms["vit_kd"] + terms["cnn_kd"], head))


@pytest.mark.parametrize("teacher", ["partner", "pair"])
def test_one_backward_gives_each_branch_the_gradient_of_its_own_loss(teacher):
    pair, a = tiny_pair(), 0.5
    out = pair(torch.randn(8, 3, 32, 32))
    total, t = vpl.PairLoss(2.0, teacher, 0.1)(out, torch.randint(10, (8,)), a)
    own = {"vit": (1 - a) * t["vit_ce"] + a * t["vit_kd"], "cnn": (1 - a) * t["cnn_ce"] + a * t["cnn_kd"]}
    for branch in ("vit", "cnn"):
        params = list(getattr(pair, branch).parameters())
        for g_total, g_own in zip(grads(total, params), grads(own[branch], params)):
            assert torch.allclose(g_total, g_own, atol=1e-6)


@pytest.mark.parametrize("teacher", ["partner", "pair"])
def test_pair_loss_terms_and_total_match_hand_computation(teacher):
    torch.manual_seed(0)
    out = {k: torch.randn(4, 10) for k in ("vit", "cnn", "pair")}
    target, a, T = torch.randint(10, (4,)), 0.3, 2.0
    total, terms = vpl.PairLoss(T, teacher, 0.1)(out, target, a)
    teach = {"vit": "cnn", "cnn": "vit"} if teacher == "partner" else {"vit": "pair", "cnn": "pair"}
    kd = {b: kd_by_hand(out[b].tolist(), out[teach[b]].tolist(), T) for b in ("vit", "cnn")}
    ce = {b: F.cross_entropy(out[b], target, label_smoothing=0.1).item() for b in ("vit", "cnn", "pair")}
    for b in ("vit", "cnn"):
        assert terms[f"{b}_kd"].item() == pytest.approx(kd[b], rel=1e-5)
    by_hand = sum((1 - a) * ce[b] + a * kd[b] for b in ("vit", "cnn")) + ce["pair"]
    assert total.item() == pytest.approx(by_hand, rel=1e-5)


def test_lr_warms_up_linearly_then_follows_the_cosine_and_scales_with_the_global_batch():
    lr = lambda step: vpl.lr_at(step, 110, 10, 1.0, 0.1)  # noqa: E731  (110 steps, 10 of warm-up, peak 1, end 0.1)
    assert [lr(0), lr(4), lr(9)] == pytest.approx([0.1, 0.5, 1.0])
    assert [lr(10), lr(60), lr(110)] == pytest.approx([1.0, 0.55, 0.1])  # cosine: peak, halfway, end
    (_, peak_vit, end_vit), (_, peak_head, end_head), (_, peak_cnn, end_cnn) = vpl.build_optimizers(
        vpl.Config(), tiny_pair(), 2048, False)
    assert (peak_vit, end_vit, peak_cnn, end_cnn) == pytest.approx((4e-3 * 4, 1e-5, 0.8 * 2, 0.0))
    assert (peak_head, end_head) == (peak_vit, end_vit)  # the pair head follows the ViT's schedule


def test_weight_decay_falls_on_the_weights_of_linear_and_conv_layers_only():
    pair = tiny_pair()
    optimizers = [optimizer for optimizer, _, _ in vpl.build_optimizers(vpl.Config(), pair, 64, False)]
    decayed = {id(p) for opt in optimizers for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    layers = {id(m.weight) for m in pair.modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    assert decayed == layers
    owners = [id(p) for opt in optimizers for g in opt.param_groups for p in g["params"]]
    assert sorted(owners) == sorted(id(p) for p in pair.parameters())  # each parameter in one optimizer
    # the ImageNet preset's recipes (VPL.md): DeiT-B's AdamW for the ViT and the pair head, torchvision's SGD
    (vit, vit_peak, vit_final), (head, _, _), (cnn, cnn_peak, cnn_final) = vpl.build_optimizers(
        vpl.parse_config(["--preset", "imagenet"]), pair, 1024, False)
    assert type(vit) is type(head) is torch.optim.AdamW and type(cnn) is torch.optim.SGD
    assert (vit_peak, vit_final, cnn_peak, cnn_final) == pytest.approx((5e-4 * 2, 1e-5, 0.5, 0.0))
    assert [g["weight_decay"] for g in vit.param_groups] == [0.05, 0.0] and vit.defaults["betas"] == (0.9, 0.999)
    assert [g["weight_decay"] for g in cnn.param_groups] == [2e-5, 0.0]
    assert cnn.defaults["momentum"] == 0.9 and not cnn.defaults["nesterov"]


def test_apply_step_skips_only_the_optimizer_with_nonfinite_gradients():
    torch.manual_seed(0)
    a, b = nn.Linear(4, 2), nn.Linear(4, 2)
    opt_a, opt_b = torch.optim.SGD(a.parameters(), lr=0.1), torch.optim.SGD(b.parameters(), lr=0.1)
    scaler = vpl.make_scaler(torch.device("cpu"), None)
    before_a, before_b = [p.detach().clone() for p in a.parameters()], [p.detach().clone() for p in b.parameters()]
    x = torch.randn(3, 4)
    scaler.scale((a(x) * float("nan")).sum() + b(x).sum()).backward()
    expected_b = [p - 0.1 * p.grad for p in b.parameters()]  # plain SGD, by hand
    vpl.apply_step([opt_a, opt_b], scaler, 1e6, fp16=False)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), before_a))  # NaN gradients: not applied
    assert all(torch.allclose(p, q) for p, q in zip(b.parameters(), expected_b))
    assert not any(torch.equal(p, q) for p, q in zip(b.parameters(), before_b))
    assert scaler.get_scale() == 1.0 and all(p.grad is None for p in [*a.parameters(), *b.parameters()])
    assert vpl.to_host_async(torch.tensor([1.5, float("inf")]))() == [1.5, float("inf")]


def test_fp16_apply_step_clips_the_unscaled_gradient_and_backs_off_once_for_a_nonfinite_branch():
    torch.manual_seed(0)
    a, b = nn.Linear(4, 2), nn.Linear(4, 2)
    params, x = [*a.parameters(), *b.parameters()], torch.randn(3, 4) * 10
    optimizers = [torch.optim.SGD(m.parameters(), lr=1.0) for m in (a, b)]
    scaler = vpl.make_scaler(torch.device("cpu"), torch.float16)  # scale 2^16
    loss = a(x).sum() + b(x).sum()
    grads = torch.autograd.grad(loss, params, retain_graph=True)
    before = [p.detach().clone() for p in params]
    scaler.scale(loss).backward()
    vpl.apply_step(optimizers, scaler, 1.0, fp16=True)
    for part in (slice(0, 2), slice(2, 4)):  # each optimizer clips its own true gradient to norm 1, by hand
        norm = torch.cat([g.flatten() for g in grads[part]]).norm().item()
        for p, p0, g in zip(params[part], before[part], grads[part]):
            assert torch.allclose(p, p0 - g * min(1.0, 1.0 / norm), atol=1e-5)
    scaler = vpl.make_scaler(torch.device("cpu"), torch.float16)
    scaler.scale((a(x) * float("nan")).sum() + b(x).sum()).backward()
    before = [p.detach().clone() for p in params]
    expected_b = [p - 1.0 * p.grad / 2.0 ** 16 for p in b.parameters()]  # the scaled gradient, unscaled by hand
    vpl.apply_step(optimizers, scaler, 0.0, fp16=True)
    assert all(torch.equal(p, p0) for p, p0 in zip(params[:2], before[:2]))
    assert all(torch.allclose(p, q) for p, q in zip(b.parameters(), expected_b))
    assert scaler.get_scale() == 2.0 ** 15  # halved once for the step, not once per optimizer


def test_finite_buffers_restore_every_statistic_when_any_is_nonfinite():
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm1d(3), nn.BatchNorm1d(3)).train()
    keep_finite = vpl.FiniteBuffers(model)
    model(torch.randn(8, 3))
    keep_finite()
    good = {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    x = torch.randn(8, 3)
    x[:, 1] = float("nan")  # one channel: the others' statistics are finite, but from a step that was skipped
    model(x)
    keep_finite()
    assert_same({k: v for k, v in model.state_dict().items() if v.is_floating_point()}, good)


def test_progress_counts_nonfinite_steps_in_a_row_means_finite_ones_and_unreadable_images_per_epoch():
    def flight(step, loss, bad_images=0.0):
        return vpl.Flight(step, 0, 1, 0.0, step + 1, [0.1, 0.1], lambda: [loss, bad_images, 0.0])
    progress = vpl.Progress(vpl.Config(log_every=1000, max_bad_steps=2), 0, 1, 100, 1000, "/nonexistent/last.pt",
                            lambda *args, **kwargs: None, False)
    progress.names = ["total"]
    progress.start_epoch()
    stops = [progress.settle(flight(i, loss)) for i, loss in enumerate([1.0, math.nan, 3.0, math.nan, 5.0])]
    assert stops == [None] * 5 and progress.bad_steps == 0  # never two in a row
    assert progress.summary()["train_total"] == pytest.approx(3.0)  # (1 + 3 + 5) / 3: finite steps only
    assert progress.settle(flight(5, math.nan)) is None and progress.settle(flight(6, math.nan)) == "nonfinite"
    progress.bad_steps = 0
    assert progress.settle(flight(7, 1.0, bad_images=10)) is None  # 10 of 1000 images: 1%, not more
    progress.start_epoch()
    assert progress.summary()["bad_images"] == 0  # counted per epoch
    assert progress.settle(flight(8, 1.0, bad_images=10)) is None
    said = []  # and says that it keeps no checkpoint, as none was saved yet
    progress.log = lambda line, **kwargs: said.append(line)
    assert progress.settle(flight(9, 1.0, bad_images=1)) == "bad_images"  # 11 of 1000
    assert said[-1].endswith("11 unreadable images this epoch (> 1%): check --data; no checkpoint was saved yet")
    lines = []  # --log-every 1000 of 100 steps an epoch: the epoch's last step still prints, with the ViT's and CNN's lr
    progress = vpl.Progress(vpl.Config(log_every=1000), 0, 1, 100, 1000, "last.pt", lambda line, **kw: lines.append(line), False)
    progress.names = ["total"]
    progress.start_epoch()
    for step in (98, 99):  # lrs of the ViT, the pair head and the CNN
        progress.settle(vpl.Flight(step, 0, 1, 0.0, step + 1, [0.1, 0.2, 0.3], lambda: [1.0, 0.0, 0.0]))
        assert len(lines) == step - 98
    assert "| lr 1.00e-01/3.00e-01 |" in lines[0]


def test_drop_path_drops_whole_samples_at_its_rate_and_keeps_the_expected_output():
    torch.manual_seed(0)
    drop, x = vpl.DropPath(0.25).train(), torch.ones(4000, 3, 5)
    y = drop(x)
    assert torch.equal(y, y[:, :1, :1].expand_as(y))  # a sample is kept or dropped whole
    kept = y[:, 0, 0] != 0
    assert kept.float().mean().item() == pytest.approx(0.75, abs=0.03)
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.75))  # rescaled: the expected output is x
    assert torch.equal(drop.eval()(x), x)
    rates = [block.drop_path.p for block in vpl.vit_tiny(drop_path=0.3).blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])  # deeper blocks more often (DeiT)
    for silenced in ("mlp", "attn"):  # a block drops each of its two residual branches, as DeiT's and timm's
        block = vpl.Block(8, 2, drop_path=0.5).train()
        out_proj = block.mlp.fc2 if silenced == "mlp" else block.attn.proj
        nn.init.zeros_(out_proj.weight), nn.init.zeros_(out_proj.bias)  # that branch adds 0: the other one is seen
        x = torch.randn(400, 5, 8)
        unchanged = ((block(x) - x).flatten(1).abs().amax(1) == 0).float().mean().item()
        assert unchanged == pytest.approx(0.5, abs=0.08), silenced


def test_ema_update_matches_the_formula_for_weights_and_batchnorm_statistics():
    model, ema = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    model(torch.randn(5, 3))  # BatchNorm statistics and its step counter move
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    vpl.ema_update(list(ema.state_dict().values()), list(model.state_dict().values()), 0.9)
    for k, v in ema.state_dict().items():
        want = model.state_dict()[k] if k.endswith("num_batches_tracked") else 0.9 * before[k] + 0.1 * model.state_dict()[k]
        assert torch.allclose(v, want), k


def test_stage_and_weight_at_exact_points():
    schedule = vpl.PairSchedule("0.1,0.8", pair_weight=0.5, ramp=0.05)
    expected = [(0.0, 1, 0.0), (0.1, 2, 0.0), (0.125, 2, 0.25), (0.15, 2, 0.5), (0.5, 2, 0.5), (0.8, 3, 0.0), (1.0, 3, 0.0)]
    for progress, stage, weight in expected:
        assert schedule(progress) == (stage, pytest.approx(weight)), progress
    no_ramp = vpl.PairSchedule("0.1,0.8", pair_weight=0.5, ramp=0.0)  # the full weight from S1 on
    assert [no_ramp(p) for p in (0.0999, 0.1, 0.7999, 0.8)] == [(1, 0.0), (2, 0.5), (2, 0.5), (3, 0.0)]


def test_the_pair_overfits_one_batch():
    # the smoke check of every trainer: with both optimizers, the scaler and the pair loss wired as in
    # training, 80 steps on one batch of 32 must drive every loss term to ~0 and memorize every label
    torch.manual_seed(0)
    cfg = vpl.Config(drop_path=0.0)
    pair = vpl.build_pair(cfg, 10)
    optimizers = [optimizer for optimizer, _, _ in vpl.build_optimizers(cfg, pair, 512, False)]
    scaler = vpl.make_scaler(torch.device("cpu"), None)
    images, labels = vpl.make_demo(32, seed=3)
    images = (images.float() / 255 - 0.5) / 0.25
    for _ in range(80):
        terms = vpl.train_step(pair, vpl.PairLoss(), images, labels, 0.2, None, scaler)
        vpl.apply_step(optimizers, scaler, 0.0, False)
    assert all(value < 0.02 for value in terms.values()), terms
    with torch.no_grad():
        out = pair.eval()(images)
    for name in ("vit", "cnn", "pair"):
        assert torch.equal(out[name].argmax(1), labels), name


def test_pair_weight_zero_gives_plain_cross_entropy():
    out = {k: torch.randn(4, 10) for k in ("vit", "cnn", "pair")}
    target = torch.randint(10, (4,))
    total, terms = vpl.PairLoss(label_smoothing=0.1)(out, target, 0.0)
    ce = lambda z: F.cross_entropy(z, target, label_smoothing=0.1)  # noqa: E731
    assert total.item() == pytest.approx((ce(out["vit"]) + ce(out["cnn"]) + ce(out["pair"])).item(), rel=1e-6)
    # soft targets (MixUp/CutMix) work too
    soft = F.softmax(torch.randn(4, 10), -1)
    assert torch.isfinite(vpl.PairLoss()(out, soft, 0.5)[0])


def test_at_pair_weight_zero_a_nan_vit_leaves_the_cnns_gradient_finite():
    pair, target = tiny_pair(), torch.randint(10, (4,))
    with torch.no_grad():
        pair.vit.head.weight.fill_(float("nan"))
    cnn = list(pair.cnn.parameters())
    for a, finite in ((0.0, True), (0.2, False)):  # with a > 0 the ViT teaches the CNN: NaN is passed on
        total, _ = vpl.PairLoss()(pair(torch.randn(4, 3, 32, 32)), target, a)
        assert all(g.isfinite().all() for g in grads(total, cnn)) == finite, a


def test_at_pair_weight_zero_the_branches_step_and_clip_independently():
    # a NaN CNN skips its own step and the pair head's (whose input it is), not the ViT's; and the ViT's gradient
    # is clipped by its own norm, not one that includes the pair head's
    cfg = vpl.Config(drop_path=0.0)
    for clip, nan_cnn in ((0.0, True), (0.05, False)):
        pair = tiny_pair()
        optimizers = [optimizer for optimizer, _, _ in vpl.build_optimizers(cfg, pair, 64, False)]
        if nan_cnn:
            with torch.no_grad():
                pair.cnn.bn1.weight.fill_(float("nan"))  # its features, so also the pair head's input
        before = {name: [p.detach().clone() for p in part.parameters()]
                  for name, part in (("vit", pair.vit), ("pair_head", pair.pair_head), ("cnn", pair.cnn))}
        scaler = vpl.make_scaler(torch.device("cpu"), None)
        images, labels = torch.randn(8, 3, 32, 32), torch.randint(10, (8,))
        vit_grads = grads(vpl.PairLoss()(pair(images), labels, 0.0)[1]["vit_ce"], list(pair.vit.parameters()))
        vpl.train_step(pair, vpl.PairLoss(), images, labels, 0.0, None, scaler)
        vpl.apply_step(optimizers, scaler, clip, False)
        moved = {name: not all(torch.equal(p.nan_to_num(), q.nan_to_num()) for p, q in zip(getattr(pair, name).parameters(), old))
                 for name, old in before.items()}
        if nan_cnn:
            assert moved == {"vit": True, "pair_head": False, "cnn": False}
        else:  # AdamW's first step is lr * sign(g) where |g| >> eps: compare its second moment, (scale * g)^2
            scale = min(1.0, clip / torch.linalg.vector_norm(torch.stack([g.norm() for g in vit_grads])).item())
            state = optimizers[0].state
            for p, g in zip(pair.vit.parameters(), vit_grads):
                assert torch.allclose(state[p]["exp_avg_sq"], (1 - 0.999) * (scale * g) ** 2, rtol=1e-4, atol=1e-12)


@pytest.mark.parametrize("progress", [0.0, 0.3, 0.9])
def test_every_parameter_gets_a_gradient_in_every_stage(progress):
    pair = tiny_pair(drop_path=0.1)
    _, a = vpl.PairSchedule("0.1,0.8", 0.5, 0.05)(progress)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    vpl.train_step(pair, vpl.PairLoss(), torch.randn(8, 3, 32, 32), torch.randint(10, (8,)), a, None, scaler)
    missing = [n for n, p in pair.named_parameters() if p.grad is None]
    assert not missing  # so DDP never needs find_unused_parameters


@pytest.mark.parametrize("option,make", [
    ("--pair-weight", lambda: vpl.PairSchedule(pair_weight=1.5)), ("--pair-temp", lambda: vpl.PairLoss(temperature=0.0)),
    ("--teacher", lambda: vpl.PairLoss(teacher="nobody")), ("--stages", lambda: vpl.PairSchedule("0.9,0.1")),
    ("--stages", lambda: vpl.PairSchedule("half")), ("--ramp", lambda: vpl.PairSchedule(ramp=-0.1))])
def test_invalid_pair_options_raise_value_error_naming_the_option(option, make):
    with pytest.raises(ValueError, match=option):
        make()


# ---------------------------------------------------------------------------------- the program
def test_demo_data_is_a_function_of_the_seed():
    a, b, c = vpl.make_demo(64, 0), vpl.make_demo(64, 0), vpl.make_demo(64, 1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert len(a[1].unique()) > 5


def test_run_logs_every_field_and_draws_the_chart(reference_run):
    out, stdout = reference_run
    log = read_log(out)
    assert [h["epoch"] for h in log] == [0, 1]
    for key in ("stage", "pair_weight", "world_size", "val_images", "val_vit_top1", "val_cnn_top1", "val_pair_top1",
                "val_ens_top1", "val_vit_top5", "val_ens_top5", "train_vit_ce", "train_cnn_kd", "img_per_s", "time_s"):
        assert key in log[0], key
    assert log[0]["val_images"] == 100 and log[0]["world_size"] == 1
    assert "stage 1 |" in stdout and "stage 2 |" in stdout and "stage 3 |" in stdout
    assert "v ViT, c CNN" in stdout
    for name in ("last.pt", "vit.pt", "cnn.pt"):
        assert os.path.exists(os.path.join(out, name))
    exported = torch.load(os.path.join(out, "cnn.pt"), weights_only=True)  # trained channels_last, exported plain:
    assert all(t.is_contiguous() for t in exported.values())                # safetensors takes only these


def test_resume_after_a_stop_is_bit_identical_and_drops_stale_and_torn_log_lines(reference_run, tmp_path):
    out = str(tmp_path)
    first = run_vpl(*TINY, "--out", out, "--max-steps", "7")
    assert "stopped at step 7" in first.stdout
    with open(os.path.join(out, "log.jsonl"), "a") as f:  # a record last.pt does not hold (a crash between the log's
        f.write(json.dumps(read_log(reference_run[0])[0] | {"val_vit_top1": -1.0}) + "\n")  # write and the save),
        f.write('{"epoch": 0, "val_vi')  # and a line torn by a crash
    run_vpl(*TINY, "--out", out, "--resume")
    assert_same_weights(model_state(out), model_state(reference_run[0]))
    assert_same_log(out, reference_run[0])  # the stopped epoch's mean losses too


def test_resume_with_another_amp_starts_the_grad_scaler_afresh(reference_run, tmp_path):
    # fp32's (and bf16's) scaler holds scale 1: loaded into an fp16 run, small fp16 gradients would flush to zero
    out = str(tmp_path / "run")
    shutil.copytree(reference_run[0], out)  # made with --amp off
    resumed = run_vpl(*TINY, "--out", out, "--resume", "--epochs", "3", "--max-steps", "26", "--amp", "fp16")
    assert "GradScaler was not fp16's (scale 1): it starts afresh" in resumed.stdout
    ckpt = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    assert ckpt["step"] == 26 and ckpt["scaler"]["scale"] >= 2.0 ** 10


def test_a_resume_whose_first_step_ends_the_epoch_prints_its_line(tmp_path):
    # the first step after a start is not timed, so its line has no rate: the ETA must not divide by it
    out, long_run = str(tmp_path), [*TINY, "--epochs", "300"]
    run_vpl(*long_run, "--out", out, "--max-steps", "11")
    resumed = run_vpl(*long_run, "--out", out, "--resume", "--max-steps", "12")
    assert "| step 12/3600 |" in resumed.stdout and "eta ?" in resumed.stdout


SPY = f"""
import json, sys
sys.path.insert(0, {HERE!r})
import vpl
calls = {{"train_step": [], "apply_step": []}}
train_step, apply_step = vpl.train_step, vpl.apply_step
def spy_train_step(model, criterion, images, targets, pair_weight, amp_dtype, scaler, loss_scale=1.0):
    terms = train_step(model, criterion, images, targets, pair_weight, amp_dtype, scaler, loss_scale)
    calls["train_step"].append([pair_weight, loss_scale, terms["total"].item(), targets.tolist()])
    return terms
def spy_apply_step(optimizers, *args):  # the lr of every parameter group as the step applies it
    calls["apply_step"].append([[group["lr"] for group in optimizer.param_groups] for optimizer in optimizers])
    return apply_step(optimizers, *args)
vpl.train_step, vpl.apply_step = spy_train_step, spy_apply_step
vpl.main(sys.argv[2:])
json.dump(calls, open(sys.argv[1], "w"))
"""


def test_the_loop_steps_with_the_lr_pair_weight_and_accumulation_computed_by_hand(tmp_path):
    # TINY with micro-batches of 16, two per step: global batch 32, 12 steps per epoch, 24 in all, 12 of warm-up
    record, out = tmp_path / "calls.json", str(tmp_path / "run")
    result = subprocess.run([sys.executable, "-c", SPY, str(record), *TINY, "--batch-size", "16", "--accum-steps", "2",
                             "--out", out], capture_output=True, text=True, cwd=HERE, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    calls = json.loads(record.read_text())
    def lr(step, peak, final):
        if step < 12:
            return peak * (step + 1) / 12
        return final + (peak - final) * 0.5 * (1 + math.cos(math.pi * (step - 12) / 12))
    def pair_weight(step):  # stages 0.25,0.75 of 24 steps, ramp 0.1, --pair-weight 0.2
        return 0.2 * min(1.0, (step / 24 - 0.25) / 0.1) if 0.25 <= step / 24 < 0.75 else 0.0
    assert len(calls["apply_step"]) == 24 and len(calls["train_step"]) == 48
    for step, (vit, head, cnn) in enumerate(calls["apply_step"]):
        assert vit + head == pytest.approx([lr(step, 4e-3 * 32 / 512, 1e-5)] * (len(vit) + len(head)))
        assert cnn == pytest.approx([lr(step, 0.8 * 32 / 1024, 0.0)] * len(cnn))
    for micro, (a, loss_scale, _, _) in enumerate(calls["train_step"]):
        assert a == pytest.approx(pair_weight(micro // 2), abs=1e-12) and loss_scale == 0.5
    labels = vpl.make_demo(484, 0)[1][:384]  # each epoch in its own order: DistributedSampler's, seed 0 + epoch
    for micro, (_, _, _, targets) in enumerate(calls["train_step"]):
        order = torch.randperm(384, generator=torch.Generator().manual_seed(micro // 24)).tolist()
        assert targets == labels[order[16 * (micro % 24):16 * (micro % 24 + 1)]].tolist(), micro
    for epoch, record in enumerate(read_log(out)):  # each step's total is the mean of its two micro-batches'
        totals = [total for _, _, total, _ in calls["train_step"][24 * epoch:24 * (epoch + 1)]]
        assert record["train_total"] == pytest.approx(sum(totals) / 24, rel=1e-5)
        assert record["pair_weight"] == pytest.approx(pair_weight(12 * epoch + 11), abs=1e-12)


def test_accumulation_ema_mixup_clipping_and_fp16_resume_bit_identically(tmp_path):
    # 96 images in micro-batches of 10: 9 per epoch, 4 optimizer steps and one leftover micro-batch (fp16 is slow on a
    # CPU);
    # SIGTERM inside the first epoch, then at its last step: it stops before the evaluation, and stage 2 starts
    # with the second epoch, so the resumed epoch, with no step left, must log the first one's stage
    options = [*TINY, "--demo-train", "96", "--demo-val", "20", "--batch-size", "10", "--accum-steps", "2", "--ema", "0.9", "--mixup", "0.8",
               "--cutmix", "1.0",
               "--clip-grad", "1.0", "--amp", "fp16", "--randaug", "9", "--reprob", "0.25", "--stages", "0.5,0.75",
               "--seed", "20240101"]  # a date as seed: MixUp's per-step seeds must not overflow
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    run_vpl(*options, "--out", whole)
    for call, at, resume in ((1, 3, []), (1, 4, ["--resume"])):  # mid-epoch: the data order and MixUp continue
        stopped = subprocess.run([sys.executable, "-c", SIGNAL_ON_CALL, "apply_step", str(call), "0", "signal", *options,
                                  *resume, "--out", parts], capture_output=True, text=True, cwd=HERE, timeout=300)
        assert f"stopped at step {at} (signal)" in stopped.stdout, stopped.stdout[-3000:] + stopped.stderr[-3000:]
    assert not os.path.exists(os.path.join(parts, "log.jsonl"))  # the first epoch is not evaluated yet
    run_vpl(*options, "--out", parts, "--resume")
    a, b = (torch.load(os.path.join(d, "last.pt"), weights_only=True) for d in (whole, parts))
    for key in ("model", "ema", "scaler", "opt_vit", "opt_pair", "opt_cnn", "step", "best"):
        assert_same(a[key], b[key], key)
    assert_same_log(parts, whole)
    assert [h["stage"] for h in read_log(whole)] == [1, 3]
    log = read_log(whole)
    assert "ema_val_vit_top1" in log[-1]
    for branch in ("vit", "cnn"):  # the exported EMA branches are the checkpoint's EMA
        exported = torch.load(os.path.join(whole, f"{branch}_ema.pt"), weights_only=True)
        assert_same(exported, {k[len(branch) + 1:]: v for k, v in a["ema"].items() if k.startswith(branch + ".")})
    # --eval-only evaluates the checkpoint's EMA too, without being told
    evaluated = json.loads(run_vpl(*options, "--out", whole, "--eval-only").stdout.splitlines()[-1])
    assert evaluated.keys() == {k for k in log[-1] if k.startswith(("val_", "ema_val_"))}
    for key, value in evaluated.items():
        assert value == pytest.approx(log[-1][key], abs=1e-9), key


def test_ema_added_on_resume_starts_from_the_resumed_weights(reference_run, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(reference_run[0], out)  # a checkpoint without EMA
    result = run_vpl(*TINY, "--out", out, "--resume", "--epochs", "3", "--max-steps", "25", "--ema", "0.5")
    assert "changed: --epochs 2 -> 3, --ema 0.0 -> 0.5, --max-steps 0 -> 25" in result.stdout  # in Config's order
    resumed, after = model_state(reference_run[0]), torch.load(os.path.join(out, "last.pt"), weights_only=True)
    assert after["step"] == 25
    for key, ema in after["ema"].items():  # one step of decay 0.5: halfway from the resumed to the new weights
        if ema.is_floating_point():
            assert torch.allclose(ema, (resumed[key] + after["model"][key]) / 2, atol=1e-6), key


def test_augmentation_strength_is_deits():
    # DeiT's rand-m9 is on timm's 0-10 scale: magnitude 9 rotates by 9/10 of 30 degrees and shears by 9/10
    # of 0.3 (torchvision's default 31 bins would give 9/30); each of its two ops is applied with probability
    # 0.5, so a quarter of the images or more pass unchanged; its RandomErasing fills with noise per pixel
    from PIL import Image
    from torchvision.transforms import v2
    train, _ = vpl.build_transforms(vpl.Config(img_size=224, randaug=9, reprob=1.0), from_files=True)
    randaug = next(t.transforms[0] for t in train.transforms if isinstance(t, v2.RandomApply))
    assert randaug.interpolation == v2.InterpolationMode.BICUBIC  # DeiT's --train-interpolation, on image files
    for op, expected in (("Rotate", 27.0), ("ShearX", 0.27)):
        levels = randaug._AUGMENTATION_SPACE[op][0](randaug.num_magnitude_bins, 224, 224)  # torchvision's table
        assert levels[randaug.magnitude].item() == pytest.approx(expected), op
    applied, apply_op = [], randaug._apply_image_or_video_transform
    randaug._apply_image_or_video_transform = lambda *args, **kwargs: applied.append(1) or apply_op(*args, **kwargs)
    augment = v2.Compose([t for t in train.transforms if isinstance(t, v2.RandomApply)])
    image = Image.fromarray((torch.rand(48, 48, 3) * 255).to(torch.uint8).numpy())  # files are read as PIL images
    ops = collections.Counter()
    torch.manual_seed(0)
    for _ in range(400):
        applied.clear()
        augment(image)
        ops[len(applied)] += 1
    assert set(ops) == {0, 1, 2}  # two ops, each with probability 0.5: binomial(2, 0.5) ops per image
    assert ops[0] / 400 == pytest.approx(0.25, abs=0.07) and ops[1] / 400 == pytest.approx(0.5, abs=0.08)
    erased = train.transforms[-1](torch.zeros(3, 224, 224))
    assert erased[erased != 0].std() > 0.5  # normal noise, not a constant


def test_val_transform_resizes_to_size_over_0_875_and_crops_the_centre_with_imagenets_constants():
    from PIL import Image
    _, val = vpl.build_transforms(vpl.Config(img_size=224), from_files=True)
    pixels = (torch.rand(256, 256, 3) * 255).to(torch.uint8)
    weights = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.transforms()  # torchvision's ImageNet constants
    mean, std = torch.tensor(weights.mean)[:, None, None], torch.tensor(weights.std)[:, None, None]
    expected = (pixels[16:240, 16:240].permute(2, 0, 1) / 255 - mean) / std  # 256 = 224 / 0.875: a centre crop
    assert torch.allclose(val(Image.fromarray(pixels.numpy())), expected, atol=1e-5)


@pytest.mark.parametrize("data,mirrors", [("demo", False), ("cifar10", True)])
def test_small_images_train_as_pad_and_crop_mirrored_but_for_the_demos_chiral_glyphs(data, mirrors):
    train, _ = vpl.build_transforms(vpl.Config(data=data), from_files=False)
    image = (torch.rand(3, 32, 32) * 255).to(torch.uint8)
    def crops(x):  # the 81 crops of the image padded by 4 px, the unshifted one at 40
        padded = F.pad(x / 255, (4, 4, 4, 4))
        return [padded[:, dy:dy + 32, dx:dx + 32] for dy in range(9) for dx in range(9)]
    plain, mirrored = crops(image), crops(image.flip(-1))
    mean, std = torch.tensor(vpl.MEAN)[:, None, None], torch.tensor(vpl.STD)[:, None, None]
    torch.manual_seed(0)
    seen = collections.Counter()
    for _ in range(100):
        out = train(image) * std + mean
        match = [(kind, i) for kind, candidates in (("plain", plain), ("mirrored", mirrored))
                 for i, c in enumerate(candidates) if torch.allclose(out, c, atol=1e-5)]
        assert match, "not a padded crop"
        seen[match[0][0]] += 1
        seen["shifted"] += match[0][1] != 40
    assert seen["shifted"] > 80 and (seen["mirrored"] > 30) == mirrors


def test_each_draw_of_an_image_is_augmented_anew_and_the_same_draw_alike():
    train, _, _ = vpl.build_datasets(vpl.Config(demo_train=64, demo_val=8))
    assert all(torch.equal(train[0, i][0], train[0, i][0]) for i in range(64))  # a function of (draw, image)
    differ = sum(not torch.equal(train[0, i][0], train[1, i][0]) for i in range(64))
    assert differ >= 58  # 81 crop positions: the same crop twice by chance about 1 time in 81


def test_epoch_sampler_is_distributed_samplers_order_and_repeats_each_image_with_its_own_seeds():
    from torch.utils.data import DistributedSampler
    data = list(range(61))
    for rank in (0, 1):  # no repeats: torch's own sampler (shuffled, whole shares only)
        ours, torchs = vpl.EpochSampler(data, 2, rank, 5), DistributedSampler(data, 2, rank, True, 5, drop_last=True)
        ours.set_epoch(3), torchs.set_epoch(3)
        assert list(ours) == [(3, i) for i in torchs]
    shares = []
    for rank in (0, 1):  # 3 repeats: as many draws per rank, a third of the images, each 3 times
        sampler = vpl.EpochSampler(data, 2, rank, 5, repeats=3)
        sampler.set_epoch(3)
        shares.append(list(sampler))
    assert [len(share) for share in shares] == [30, 30]
    images = collections.Counter(i for _, i in shares[0] + shares[1])
    assert len(images) == 20 and set(images.values()) == {3}
    assert len(set(shares[0] + shares[1])) == 60  # each copy is augmented with its own seed
    sampler.set_epoch(4)  # ... also against the next epoch's copies
    assert not {draw for draw, _ in shares[1]} & {draw for draw, _ in sampler}
    in_order = [i for keys in zip(*shares) for _, i in keys]  # rank 0's first, rank 1's first, rank 0's second, ...
    assert in_order == [in_order[3 * (k // 3)] for k in range(60)]  # the 3 copies of an image are side by side


def test_data_loaders_leave_the_global_rng_alone():
    cfg = vpl.Config(demo_train=64, demo_val=20, batch_size=8, workers=0)
    train_set, val_set, _ = vpl.build_datasets(cfg)
    for workers in (0, 1):
        cfg.workers = workers
        train, val = vpl.build_loaders(cfg, train_set, val_set, 0, 1, False)
        state = torch.get_rng_state()
        next(iter(train)), list(val)
        assert torch.equal(state, torch.get_rng_state())  # so drop-path masks do not depend on them


def test_evaluate_gives_the_top1_and_top5_computed_by_hand():
    cfg = vpl.Config(demo_train=16, demo_val=37, batch_size=8, workers=0)
    train_set, val_set, _ = vpl.build_datasets(cfg)
    _, val_loader = vpl.build_loaders(cfg, train_set, val_set, 0, 1, False)
    pair = tiny_pair()
    result = vpl.evaluate(pair, val_loader, torch.device("cpu"), None, 1)
    assert pair.training and result["val_images"] == 37
    items = [val_set[(0, i)] for i in range(37)]  # (image, label, unreadable)
    images, labels = torch.stack([image for image, _, _ in items]), torch.tensor([label for _, label, _ in items])
    with torch.no_grad():
        out = pair.eval()(images)
    out["ens"] = (out["vit"].softmax(-1) + out["cnn"].softmax(-1)) / 2
    for name in ("vit", "cnn", "pair", "ens"):
        ranked = out[name].argsort(dim=1, descending=True)
        assert result[f"val_{name}_top1"] == pytest.approx(100 * (ranked[:, 0] == labels).float().mean().item())
        assert result[f"val_{name}_top5"] == pytest.approx(100 * (ranked[:, :5] == labels[:, None]).any(1).float().mean().item())


def test_eval_only_reproduces_the_logged_accuracies_and_leaves_the_log_alone(reference_run, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(reference_run[0], out)
    last = read_log(out)[-1]
    with open(os.path.join(out, "log.jsonl"), "a") as f:  # as a run still training writes it after its checkpoint
        f.write(json.dumps({**last, "epoch": last["epoch"] + 1}) + "\n")
    before = open(os.path.join(out, "log.jsonl"), "rb").read()
    ckpt = torch.load(os.path.join(out, "last.pt"), weights_only=True)  # without its optimizers: it needs none
    torch.save({k: v for k, v in ckpt.items() if not k.startswith(("opt_", "scaler"))}, os.path.join(out, "last.pt"))
    result = run_vpl(*TINY, "--out", out, "--eval-only", "--repeat-aug", "40")  # a train-only setting: not checked
    evaluated = json.loads(result.stdout.strip().splitlines()[-1])
    for key, value in evaluated.items():
        assert value == pytest.approx(last[key], abs=1e-9), key
    assert open(os.path.join(out, "log.jsonl"), "rb").read() == before


def test_a_run_starts_its_branches_from_the_init_files(reference_run, tmp_path):
    ref = reference_run[0]  # at lr 0 a step leaves every weight where it started (BatchNorm's statistics move)
    run_vpl(*TINY, "--init-vit", os.path.join(ref, "vit.pt"), "--init-cnn", os.path.join(ref, "cnn.pt"),
            "--lr-vit", "0", "--lr-cnn", "0", "--max-steps", "1", "--out", str(tmp_path))
    state = model_state(str(tmp_path))
    for branch, model in (("vit", vpl.vit_tiny()), ("cnn", vpl.resnet_tiny())):
        start = torch.load(os.path.join(ref, f"{branch}.pt"), weights_only=True)
        for name, _ in model.named_parameters():
            assert torch.equal(state[f"{branch}.{name}"], start[name]), (branch, name)


def test_exported_branches_reproduce_their_best_val_accuracy(reference_run):
    out = reference_run[0]
    log, cfg = read_log(out), vpl.parse_config(TINY)
    _, val_set, _ = vpl.build_datasets(cfg)
    items = [val_set[(0, i)] for i in range(len(val_set))]
    images, labels = torch.stack([image for image, _, _ in items]), torch.tensor([label for _, label, _ in items])
    for name, branch in (("vit", vpl.vit_tiny(10)), ("cnn", vpl.resnet_tiny(10))):
        state = torch.load(os.path.join(out, f"{name}.pt"), weights_only=True)
        assert not any(k.startswith(("module.", "_orig_mod.")) for k in state)  # no wrapper prefixes
        branch.load_state_dict(state, strict=True)
        with torch.no_grad():
            top1 = 100 * (branch.eval()(images).argmax(1) == labels).float().mean().item()
        assert top1 == pytest.approx(max(h[f"val_{name}_top1"] for h in log), abs=1e-6), name


def ddp_rank(rank, world, images, targets, result_dir):
    store = f"file://{os.path.join(result_dir, 'store')}"  # a file, not a port that another run may hold
    torch.distributed.init_process_group("gloo", init_method=store, rank=rank, world_size=world)
    model = torch.nn.parallel.DistributedDataParallel(tiny_pair())
    half = len(images) // world
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    vpl.train_step(model, vpl.PairLoss(), images[rank * half:(rank + 1) * half],
                   targets[rank * half:(rank + 1) * half], 0.0, None, scaler)
    torch.save([p.grad for p in model.module.vit.parameters()], os.path.join(result_dir, f"grad{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_ddp_step_gives_the_single_process_gradient(tmp_path):
    torch.manual_seed(1)
    images, targets = torch.randn(16, 3, 32, 32), torch.randint(10, (16,))
    mp.spawn(ddp_rank, args=(2, images, targets, str(tmp_path)), nprocs=2)
    single = tiny_pair()
    vpl.train_step(single, vpl.PairLoss(), images, targets, 0.0, None, torch.amp.GradScaler("cpu", enabled=False))
    for rank in (0, 1):
        for g_ddp, p in zip(torch.load(tmp_path / f"grad{rank}.pt"), single.vit.parameters()):
            assert torch.allclose(g_ddp, p.grad, atol=1e-6)


def torchrun_two(*args, check=True, env=None):
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args],
                            capture_output=True, text=True, timeout=300, cwd=HERE, env={**os.environ, **(env or {})})
    assert result.returncode == 0 or not check, result.stderr[-3000:]
    return result.stdout if check else result


FAKE_CIFAR = f"""
import os, sys, time, torchvision
sys.path.insert(0, {HERE!r})
import vpl
class Slow(torchvision.datasets.FakeData):  # CIFAR's interface: (root, train, download); notes when it runs
    classes = list(range(10))
    def __init__(self, root, train, download):
        with open(os.path.join(root, os.environ["RANK"]), "a") as f:
            f.write(f"{{time.time()}} ")
            time.sleep(1)
            f.write(f"{{time.time()}} ")
        super().__init__(size=8, image_size=(3, 32, 32), num_classes=10)
torchvision.datasets.CIFAR10 = Slow
rank, world, device = vpl.setup_distributed("cpu")
vpl.build_datasets(vpl.parse_config(["--data", "cifar10", "--data-root", sys.argv[1]]), rank, world)
"""


def test_cifar_is_downloaded_by_rank_0_before_the_others_read_it(tmp_path):
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "--no-python", sys.executable, "-c",
                             FAKE_CIFAR, str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=HERE)
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = ([float(t) for t in (tmp_path / rank).read_text().split()] for rank in ("0", "1"))
    assert len(first) == len(second) == 4 and max(first) <= min(second)  # train and val: all of rank 0's first


def test_two_processes_with_accumulation_train_as_one_with_the_same_global_batch(tmp_path):
    # ViT + ViT without drop-path (no BatchNorm, nothing random per rank): 2 processes x 16 images x 2 micro-steps
    # see each step the same 64 images as 1 process x 16 x 4, and DDP's mean is the same gradient; one epoch of 3
    args = [*TINY, "--cnn", "vit_tiny", "--drop-path", "0", "--batch-size", "16", "--epochs", "1", "--lr-vit", "0.04",
            "--warmup-epochs", "0", "--demo-train", "192", "--demo-val", "20"]
    torchrun_two(VPL, *args, "--accum-steps", "2", "--out", str(tmp_path / "two"))
    run_vpl(*args, "--accum-steps", "4", "--out", str(tmp_path / "one"))
    two, one = model_state(str(tmp_path / "two")), model_state(str(tmp_path / "one"))
    start = vpl.build_pair(vpl.parse_config(args), 10).state_dict()
    differ = sum((two[key] - value).abs().sum() for key, value in one.items())
    moved = sum((value - start[key]).abs().sum() for key, value in one.items())
    # measured 5e-5: sums taken in another order, which AdamW magnifies where a gradient is near 0; ranks that
    # did not average their gradients would differ by about as much as the weights moved
    assert differ < 1e-3 * moved
    two, one = read_log(str(tmp_path / "two"))[0], read_log(str(tmp_path / "one"))[0]
    for key in [k for k in one if k.startswith("train_")]:  # the mean losses, over both processes' images
        assert two[key] == pytest.approx(one[key], rel=1e-4), key


def test_torchrun_two_processes_count_each_val_image_once_and_stop_together(tmp_path):
    out = str(tmp_path / "ddp")
    args = [*TINY, "--demo-val", "101", "--epochs", "1", "--out", out]
    result = torchrun_two("--max-restarts", "1", VPL, *args, check=False,  # restarts on torchrun's shared store: warned
                          env={"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "0"})
    assert result.returncode == 0 and result.stderr.count("TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1") == 1, result.stderr
    assert "is seen by" not in result.stderr and not glob.glob(os.path.join(out, ".probe*"))  # shared; probe removed
    log = read_log(out)
    assert log[0]["world_size"] == 2 and log[0]["val_images"] == 101
    # one process evaluating the same checkpoint gets the same accuracies
    single = json.loads(run_vpl(*args, "--eval-only").stdout.strip().splitlines()[-1])
    for key, value in single.items():
        assert value == pytest.approx(log[0][key], abs=1e-9), key
    # SIGTERM to rank 1 alone, at its third step: the request travels in the all-reduced flags, so both
    # ranks stop after the same step; two processes resumed from there end as the uninterrupted pair did
    stopped = str(tmp_path / "stopped")
    wrapper = tmp_path / "signal_on_call.py"
    wrapper.write_text(SIGNAL_ON_CALL)
    assert "(signal)" in torchrun_two(str(wrapper), "apply_step", "3", "1", "signal", *args, "--out", stopped)
    assert 2 < torch.load(os.path.join(stopped, "last.pt"), weights_only=True)["step_in_epoch"] < 6
    result = torchrun_two("--max-restarts", "1", VPL, *args, "--out", stopped, "--resume", check=False,
                          env={"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})  # restarts on stores of their own
    assert result.returncode == 0 and "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" not in result.stderr, result.stderr
    assert_same_weights(model_state(stopped), model_state(out))
    assert_same_log(stopped, out)
    # a node-local --out: should rank 1 not see last.pt, both ranks stop with one line instead of parting ways
    hidden = tmp_path / "hidden.py"
    hidden.write_text(f"""import os, sys
sys.path.insert(0, {HERE!r})
import vpl
if os.environ["RANK"] == "1":  # rank 1 is on a node of its own: other data and another --out if RANK1_ARGS says so
    exists = os.path.exists
    os.path.exists = lambda path: exists(path) and not path.endswith("last.pt")
    sys.argv += os.environ.get("RANK1_ARGS", "").split()
vpl.main(sys.argv[1:])
""")
    result = torchrun_two(str(hidden), *args, "--out", out, "--epochs", "2", "--auto-resume", check=False)
    assert result.returncode != 0 and result.stderr.count("is seen by 1 of 2 processes") == 2, result.stderr[-3000:]
    # a fresh start is warned that its --out is node-local, and data sets that differ stop every rank with one line
    result = torchrun_two(str(hidden), *args, "--out", str(tmp_path / "fresh"), check=False,
                          env={"RANK1_ARGS": f"--demo-val 50 --out {tmp_path / 'node1'}"})
    assert result.stderr.count("is seen by 1 of 2 processes: a restart") == 1, result.stderr[-3000:]
    assert result.stderr.count("see different data (train images, val images, classes from [384, 50, 10] to "
                               "[384, 101, 10])") == 2 and result.returncode != 0, result.stderr[-3000:]
    assert not glob.glob(str(tmp_path / "fresh" / ".probe*")) and "TORCH_DISABLE" not in result.stderr  # no restarts


def test_help_gives_each_flags_default_and_the_imagenet_presets_where_it_differs(capsys):
    with pytest.raises(SystemExit):
        vpl.parse_config(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the lines
    assert "image side, pixels (default 32, imagenet preset 224)" in text
    assert "images per process per micro-step (default 128) " in text  # the preset's is the same: said once


def test_auto_precision_on_the_cpu_is_fp32_and_eager():
    assert vpl.choose_precision(vpl.Config(), torch.device("cpu"), print) == (None, False)  # bf16 is slow on most CPUs


@pytest.mark.parametrize("capability,dtype", [((7, 0), torch.float16), ((8, 0), torch.bfloat16)])
def test_gpus_without_bf16_units_fall_back_to_fp16(monkeypatch, capability, dtype):
    # a V100 (7.0) has no bf16 units (is_bf16_supported() still says yes: emulation); an A100 (8.0) has
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    said = []
    amp_dtype, _ = vpl.choose_precision(vpl.Config(), torch.device("cuda"), lambda line, **kwargs: said.append(line))
    assert amp_dtype == dtype and (("no bf16" in " ".join(said)) == (dtype == torch.float16))


def test_compiled_bf16_step_matches_eager_and_lowers_the_loss():
    eager, pair = tiny_pair(), tiny_pair()
    with torch.no_grad():  # BatchNorm weights away from the ResNet's zero init, so that every gradient is non-zero
        for m in eager.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
    pair.load_state_dict(eager.state_dict())  # the same weights
    compiled = torch.compile(pair)
    criterion, scaler = vpl.PairLoss(), torch.amp.GradScaler("cpu", enabled=False)
    opt = torch.optim.AdamW(pair.parameters(), lr=1e-3)
    torch.manual_seed(0)
    images, targets = torch.randn(16, 3, 32, 32), torch.randint(10, (16,))
    want = vpl.train_step(eager, criterion, images, targets, 0.5, torch.bfloat16, scaler)
    got = vpl.train_step(compiled, criterion, images, targets, 0.5, torch.bfloat16, scaler)
    for name, value in want.items():  # bf16 rounds differently once kernels are fused: a bf16 tolerance
        assert got[name].item() == pytest.approx(value.item(), rel=5e-3, abs=1e-4), name
    for part in ("vit", "cnn", "pair_head"):  # each part's whole gradient (bf16 noise is large on single tensors)
        g_eager, g_compiled = (torch.cat([p.grad.flatten() for p in getattr(m, part).parameters()]) for m in (eager, pair))
        assert F.cosine_similarity(g_eager, g_compiled, dim=0) > 0.97, part  # measured: 1.000, 0.990, 1.000
        assert g_compiled.norm().item() == pytest.approx(g_eager.norm().item(), rel=0.05), part
    opt.zero_grad()
    losses = []
    for _ in range(6):
        terms = vpl.train_step(compiled, criterion, images, targets, 0.5, torch.bfloat16, scaler)
        opt.step()
        opt.zero_grad()
        losses.append(terms["total"].item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]


def write_image_folder(root, per_class, size=40, corrupt=()):
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for c in ("ant", "bee"):
            os.makedirs(os.path.join(root, split, c), exist_ok=True)
            for i in range(per_class if split == "train" else 4):
                pixels = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(os.path.join(root, split, c, f"{i}.png"))
    for split, c, i in corrupt:
        with open(os.path.join(root, split, c, f"{i}.png"), "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n this is not an image")


FOLDER_ARGS = ["--preset", "demo", "--batch-size", "8", "--workers", "0", "--log-every", "1"]


def png_header(width, height):  # a PNG that claims this size and holds no pixels
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    size = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + size + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


def test_image_folder_trains_and_a_corrupt_image_is_replaced_or_left_out_with_a_warning(tmp_path):
    data, out = tmp_path / "data", str(tmp_path / "out")
    write_image_folder(data, 104, corrupt=[("train", "ant", 3), ("val", "bee", 1)])  # train: 2 of 208, < 1%
    (data / "train" / "bee" / "5.png").write_bytes(png_header(20000, 20000))  # PIL's DecompressionBombError
    result = run_vpl("--data", str(data), *FOLDER_ARGS, "--epochs", "1", "--out", out)
    warnings = [line for line in result.stderr.splitlines() if "unreadable image" in line]
    assert len(warnings) == 3 and os.path.join("ant", "3.png") in warnings[0], warnings
    assert "DecompressionBombError: Image size (400000000 pixels)" in "".join(warnings)  # PIL's reason: 20000 x 20000
    log = read_log(out)[0]
    assert log["bad_images"] == 2 and log["val_images"] == 7 and log["val_bad_images"] == 1
    # the unreadable val image is left out, not replaced: the same as evaluating without it
    os.remove(data / "val" / "bee" / "1.png")
    evaluated = json.loads(run_vpl("--data", str(data), *FOLDER_ARGS, "--out", out, "--eval-only").stdout.splitlines()[-1])
    assert "val_bad_images" not in evaluated
    for key, value in evaluated.items():
        assert value == pytest.approx(log[key], abs=1e-9), key


def test_an_unreadable_image_or_one_its_transform_fails_on_is_replaced_by_the_next_one():
    from PIL import Image
    class Images(torch.utils.data.Dataset):  # image i is i pixels wide; ImageFolder's `targets`
        targets = list(range(40))
        def __len__(self):
            return 40
        def __getitem__(self, i):
            if i in (3, 20):
                raise OSError("truncated file")
            return Image.new("RGB", (i + 1, 8)), i
    def transform(image):  # fails on wide images, as Resize runs out of memory on a very thin one
        if image.width > 20 and image.height == 8:
            raise MemoryError
        return torch.tensor(image.width)
    data = vpl.Augmented(Images(), transform, seed=0)
    assert data[0, 2] == (3, 2, 0)
    assert data[0, 3] == (5, 4, 1)      # unreadable: the next image, flagged
    assert data[0, 39] == (1, 0, 1)     # its transform fails: the next image (the first), flagged
    image, label, flagged = data[0, 24]  # 24..39 all fail: a black 32 px stand-in, flagged, with image 24's label
    assert (image.item(), label, flagged) == (32, 24, 1)


def test_a_split_that_cannot_be_listed_is_one_line(tmp_path, monkeypatch):
    write_image_folder(tmp_path, 1)
    def denied(path):  # as chmod 000 does to anyone but root
        raise PermissionError(13, "Permission denied", path)
    monkeypatch.setattr(os, "scandir", denied)
    with pytest.raises(vpl.UserError, match=r"cannot list .*train \(Permission denied\)"):
        vpl.check_image_folder(str(tmp_path))


def test_image_folder_check_accepts_images_in_subfolders_as_image_folder_does(tmp_path):
    import torchvision
    write_image_folder(tmp_path, 2)
    for split in ("train", "val"):  # the Tiny-ImageNet layout: train/<class>/images/*.png
        for c in ("ant", "bee"):
            folder = tmp_path / split / c
            (folder / "images").mkdir()
            for image in folder.glob("*.png"):
                image.rename(folder / "images" / image.name)
    reference = torchvision.datasets.ImageFolder(str(tmp_path / "train"))
    assert vpl.check_image_folder(str(tmp_path)) == reference.classes and len(reference) == 4


@pytest.mark.parametrize("split,corrupt", [("train", 4), ("train", 24), ("val", 8)],
                         ids=["some", "all-more-than-16-in-a-row", "all-of-val"])
def test_too_many_bad_images_stop_the_run_and_keep_the_checkpoint(tmp_path, split, corrupt):
    data, out = tmp_path / "data", str(tmp_path / "out")
    write_image_folder(data, 12)
    run_vpl("--data", str(data), *FOLDER_ARGS, "--epochs", "1", "--out", out)
    before = open(os.path.join(out, "last.pt"), "rb").read()
    write_image_folder(data, 12, corrupt=[(split, c, i) for i in range(12) for c in ("bee", "ant")][:corrupt])
    result = run_vpl("--data", str(data), *FOLDER_ARGS, "--epochs", "2", "--out", out, "--resume", check=False)
    assert result.returncode == (3 if split == "train" else 2) and "Traceback" not in result.stderr, result.stderr[-2000:]
    message = "unreadable images this epoch" if split == "train" else "none of the 8 val images could be read: check " \
        f"--data; this epoch's steps are saved in {out}/last.pt: --resume evaluates them"
    assert result.stderr.splitlines()[-1].startswith("vpl: error: ") and message in result.stderr
    if split == "train":  # images the run trained on as black: nothing of this epoch is kept
        assert open(os.path.join(out, "last.pt"), "rb").read() == before
        return
    saved = torch.load(os.path.join(out, "last.pt"), weights_only=True)  # the epoch's steps, not yet evaluated
    assert (saved["epoch"], saved["step"], saved["step_in_epoch"]) == (1, 6, 3)
    write_image_folder(data, 12)  # val repaired: the resume evaluates the epoch without training it again
    resumed = run_vpl("--data", str(data), *FOLDER_ARGS, "--epochs", "2", "--out", out, "--resume")
    assert "resumed from" in resumed.stdout and "step 6/6" not in resumed.stdout
    assert [h["epoch"] for h in read_log(out)] == [0, 1] and read_log(out)[1]["val_images"] == 8


MAIN_EACH = f"""
import contextlib, io, json, sys
sys.path.insert(0, {HERE!r})
import vpl
results = {{}}
for name, args in json.loads(sys.stdin.read()).items():  # vpl.main of each, in one process: torch imported once
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            vpl.main(args)
            code = 0
        except SystemExit as e:
            code = e.code
    results[name] = [code, stderr.getvalue()]
print(json.dumps(results))
"""


@pytest.mark.parametrize("name,bad", [(n, -1) for n in ("max_steps", "workers", "warmup_epochs", "clip_grad", "mixup", "cutmix",
                                     "randaug", "lr_vit", "lr_cnn", "min_lr_vit", "wd_vit", "wd_cnn")]
                         + [("label_smoothing", 1.0), ("reprob", 1.5), ("ema", -0.1)])
def test_a_setting_out_of_its_range_is_refused_naming_its_flag(name, bad):
    # a negative --clip-grad flips the gradients; --label-smoothing 1 makes every target uniform
    with pytest.raises(vpl.UserError, match="--" + name.replace("_", "-")):
        vpl.check_config(vpl.Config(**{name: type(getattr(vpl.Config(), name))(bad)}))


def test_bad_input_gives_one_line_and_exit_code_2(tmp_path, reference_run):
    d = tmp_path
    write_image_folder(d / "no_val", 1)
    shutil.rmtree(d / "no_val" / "val")
    (d / "no_classes" / "train").mkdir(parents=True)
    (d / "no_classes" / "val").mkdir(parents=True)
    write_image_folder(d / "no_images", 1)
    for image in (d / "no_images" / "val" / "bee").iterdir():
        image.unlink()
    (d / "no_images" / "val" / "bee" / "notes.txt").write_text("no image")
    write_image_folder(d / "one_class", 1)
    for split in ("train", "val"):
        shutil.rmtree(d / "one_class" / split / "bee")
    write_image_folder(d / "mismatch", 1)
    os.rename(d / "mismatch" / "val" / "bee", d / "mismatch" / "val" / "wasp")
    other = d / "other"
    shutil.copytree(reference_run[0], other)
    (d / "foreign").mkdir()
    torch.save({"weight": torch.zeros(1)}, d / "foreign" / "last.pt")  # a readable file, but no vpl checkpoint
    (d / "tensor").mkdir()
    torch.save(torch.zeros(2), d / "tensor" / "last.pt")  # a readable file, but no dict
    (d / "a_file").write_text("hello")  # torch.load of it raises a KeyError
    write_image_folder(d / "images", 16)  # 32 train images, where the run below was saved with 40
    (d / "other_data").mkdir()
    torch.save({**torch.load(other / "last.pt", weights_only=True), "num_classes": 2, "train_images": 40},
               d / "other_data" / "last.pt")
    (d / "stopped").mkdir()  # as if stopped 3 steps into its second epoch
    ckpt = torch.load(other / "last.pt", weights_only=True)
    torch.save({**ckpt, "epoch": 1, "step_in_epoch": 3}, d / "stopped" / "last.pt")
    cases = {  # name: (what its one line must say, so it fails for its own reason; the flags)
        "missing path": ("nowhere: no such folder", ["--data", str(d / "nowhere")]),
        "no val split": ("no 'val' folder", ["--data", str(d / "no_val")]),
        "no class folders": ("has 0 class folders", ["--data", str(d / "no_classes")]),
        "one class": ("train has 1 class folders, a classifier needs 2 or more", ["--data", str(d / "one_class")]),
        "a class without images": ("val: Found no valid file for the classes bee", ["--data", str(d / "no_images")]),
        "data is a file": ("a_file: not a folder", ["--data", str(d / "a_file")]),
        "repeat-aug beyond the batch": ("--repeat-aug 20 fills a global batch of 32 with copies of fewer than 2 images: "
                                        "use at most 16", [*TINY, "--repeat-aug", "20"]),
        "init a ViT from a ResNet": (f"--init-vit {other / 'cnn.pt'}: checkpoint does not fit the branch",
                                     ["--init-vit", str(other / "cnn.pt")]),
        "val classes differ": ("val classes differ", ["--data", str(d / "mismatch")]),
        "pair weight": ("--pair-weight must be in [0, 1]", ["--pair-weight", "1.5"]),
        "stages": ("--stages must satisfy", ["--stages", "0.9,0.1"]),
        "temperature": ("--pair-temp must be > 0", ["--pair-temp", "0"]),
        "batch size": ("--batch-size must be >= 1", ["--batch-size", "0"]),
        "accumulation": ("--accum-steps must be >= 1", ["--accum-steps", "0"]),
        "unknown preset": ("invalid choice: 'huge'", ["--preset", "huge"]),
        "unknown flag": ("unrecognized arguments: --epoch", ["--epoch", "3"]),
        "resume without checkpoint": ("no checkpoint to resume from", ["--resume", "--out", str(d / "empty")]),
        "resume other models": ("made with cnn resnet_tiny, not vit_tiny",
                                [*TINY, "--resume", "--out", str(other), "--cnn", "vit_tiny"]),
        "resume another global batch": ("global batch 32 on 1 processes",
                                        [*TINY, "--resume", "--out", str(other), "--batch-size", "16"]),
        "resume with fewer epochs": ("has trained 2 epochs, more than --epochs 1",
                                     [*TINY, "--resume", "--out", str(other), "--epochs", "1"]),
        "resume inside the last epoch of fewer": ("has trained 1.25 epochs, more than --epochs 1",
                                                  [*TINY, "--resume", "--out", str(d / "stopped"), "--epochs", "1"]),
        "resume with another data order": ("made with repeat-aug 1, not 2",
                                           [*TINY, "--resume", "--out", str(other), "--repeat-aug", "2"]),
        "evaluate on another demo set": ("made with seed 0, not 3",
                                         [*TINY, "--eval-only", "--out", str(other), "--seed", "3"]),
        "resume on another train set": ("made with train images 40, not 32", [*TINY, "--preset", "demo", "--data",
                                        str(d / "images"), "--resume", "--out", str(d / "other_data")]),
        "a batch of one image at 8 px": ("--batch-size 1 at 8 px leaves BatchNorm one value per channel",
                                         ["--batch-size", "1", "--img-size", "8"]),
        "resume at another size": ("made with img-size 32, not 64", [*TINY, "--resume", "--out", str(other),
                                                                   "--img-size", "64"]),
        "evaluate at another size": ("made with img-size 32, not 64", [*TINY, "--eval-only", "--out", str(other),
                                                                       "--img-size", "64"]),
        "resume on other demo images": ("made with demo-val 100, not 50",
                                        [*TINY, "--resume", "--out", str(other), "--demo-val", "50"]),
        "size not a multiple of the patch": ("a multiple of the ViT's patch size (4)", ["--img-size", "30"]),
        "cifar at 64 px": ("holds 32 px images", ["--data", "cifar10", "--img-size", "64"]),
        "ema of 1": ("--ema, --label-smoothing and --drop-path must be in [0, 1)", ["--ema", "1"]),
        "resume a foreign checkpoint": ("not a checkpoint of this vpl.py",
                                        [*TINY, "--resume", "--out", str(d / "foreign")]),
        "drop-path of 1": ("--drop-path must be in [0, 1)", ["--drop-path", "1"]),
        "negative lr": ("--lr-vit must be >= 0", ["--lr-vit", "-1"]),
        "unknown device": ("invalid choice: 'tpu'", ["--device", "tpu"]),
        "randaug beyond its scale": ("--randaug must be at most 10", ["--randaug", "11"]),
        "fresh run over a checkpoint": ("exists: pass --resume", [*TINY, "--out", str(other)]),
        "init from a file that is no checkpoint": ("vpl.py: not a readable checkpoint", ["--init-vit", VPL]),
        "init from a text file": ("a_file: not a readable checkpoint", ["--init-vit", str(d / "a_file")]),
        "init from a tensor": ("holds a Tensor", ["--init-cnn", str(d / "tensor" / "last.pt")]),
        "resume a tensor": ("holds a Tensor", [*TINY, "--resume", "--out", str(d / "tensor")]),
        "eval-only without checkpoint": ("last.pt: no checkpoint", ["--eval-only", "--out", str(d / "empty")]),
        "out is a file": ("cannot make that folder", [*TINY, "--out", str(d / "a_file")]),
        "lr of NaN": ("--lr-vit must be a finite number", ["--lr-vit", "nan"]),
        "infinite temperature": ("--pair-temp must be a finite number", ["--pair-temp", "inf"]),
        "warm-up of NaN": ("--warmup-epochs must be a finite number", ["--warmup-epochs", "nan"]),
        "seed beyond 64 bits": ("--seed must be in [0, 2^32)", ["--seed", "99999999999999999999"]),
        "no val images": ("--demo-val must be >= 1", ["--demo-val", "0"]),
        "negative train images": ("--demo-train must be >= 1", ["--demo-train", "-5"]),
        "no cuda": ("no CUDA device" if not torch.cuda.is_available() else "--epochs must be >= 1",
                    ["--device", "cuda"] if not torch.cuda.is_available() else ["--epochs", "-1"]),
        "resume past --max-steps": ("has trained 24 steps, reaching --max-steps 5",
                                    [*TINY, "--resume", "--out", str(other), "--max-steps", "5"]),
    }
    flags = {name: [*args, *([] if "--out" in args else ["--out", str(d / "out")])] for name, (_, args) in cases.items()}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    ran = subprocess.run([sys.executable, "-c", MAIN_EACH], input=json.dumps(flags), capture_output=True, text=True,
                         env=env, cwd=HERE, timeout=300)
    assert ran.returncode == 0 and not ran.stderr, ran.stderr[-3000:]
    for name, (code, stderr) in json.loads(ran.stdout.splitlines()[-1]).items():
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert code == 2, (name, stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith("vpl: error:") and cases[name][0] in lines[0], (name, stderr)
    assert open(other / "last.pt", "rb").read() == open(os.path.join(reference_run[0], "last.pt"), "rb").read()


def test_nonfinite_loss_stops_naming_the_term_and_keeps_the_checkpoint(reference_run, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(reference_run[0], out)
    before = open(os.path.join(out, "last.pt"), "rb").read()
    result = run_vpl(*TINY, "--out", out, "--resume", "--epochs", "3", "--lr-vit", "1e30", "--max-bad-steps", "2",
                     check=False)
    assert result.returncode == 3, result.stderr[-2000:]
    warnings = [line for line in result.stderr.splitlines() if "non-finite loss at step" in line]
    assert len(warnings) == 2 and "vit_ce" in warnings[0] and "(2/2 in a row)" in warnings[1]
    assert open(os.path.join(out, "last.pt"), "rb").read() == before


def wait_for(predicate, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_sigterm_saves_and_resume_is_bit_identical(reference_run, tmp_path):
    out = str(tmp_path)
    proc = subprocess.Popen([sys.executable, VPL, *TINY, "--out", out, "--workers", "2"],
                            stdout=subprocess.PIPE, text=True, cwd=HERE, start_new_session=True)
    for line in proc.stdout:  # stop in the middle of the first epoch, the way a scheduler does:
        if "| step 5/" in line:  # SIGTERM to the whole process group, data workers included
            os.killpg(proc.pid, signal.SIGTERM)
            break
    rest = proc.stdout.read()
    assert proc.wait(timeout=120) == 0
    assert "stopped at step" in rest and "(signal)" in rest
    run_vpl(*TINY, "--out", out, "--resume")  # with 0 workers: augmentation does not depend on them
    assert_same_weights(model_state(out), model_state(reference_run[0]))
    assert_same_log(out, reference_run[0])


SIGNAL_ON_CALL = f"""
import os, signal, sys
sys.path.insert(0, {HERE!r})
import vpl
def signal_on_call(name, n, rank, action):  # in process `rank`, call n of vpl.<name> gets SIGTERM, raises,
    fn, calls = getattr(vpl, name), []      # or (train_step) gets images of NaN
    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == n and os.environ.get("RANK", "0") == rank:
            if action == "crash":
                raise RuntimeError("a simulated crash")
            if action == "nan":
                args = (*args[:2], args[2] * float("nan"), *args[3:])
            else:
                os.kill(os.getpid(), signal.SIGTERM)
        return fn(*args, **kwargs)
    setattr(vpl, name, wrapped)
signal_on_call(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4])
vpl.main(sys.argv[5:])
"""


@pytest.mark.parametrize("function,call", [("apply_step", 12), ("evaluate", 1), ("save_checkpoint", 1), ("max-steps", 12)])
def test_a_stop_at_an_epochs_end_stops_at_once_and_resume_is_bit_identical(reference_run, tmp_path, function, call):
    # SIGTERM at the first epoch's last step (12), after its stop request has left with its flags, or during the
    # evaluation or the saving after it: the run stops before the evaluation or right after the saving, not 2 steps
    # on; --max-steps 12 stops after the epoch's evaluation and saving
    out = str(tmp_path)
    if function == "max-steps":
        stopped = run_vpl(*TINY, "--out", out, "--max-steps", str(call))
        assert len(read_log(out)) == 1 and "stopped at step 12 (max_steps)" in stopped.stdout
        assert "continue with --resume and a higher --max-steps" in stopped.stdout
        again = run_vpl(*TINY, "--out", out, "--resume", "--max-steps", str(call), check=False)  # nothing left to do
        assert again.returncode == 2 and again.stderr.startswith("vpl: error:") and "max-steps" in again.stderr
    else:  # with --max-steps 12 too, which the signal before the evaluation must not make unreachable
        limit = ["--max-steps", "12"] if function == "apply_step" else []
        stopped = subprocess.run([sys.executable, "-c", SIGNAL_ON_CALL, function, str(call), "0", "signal", *TINY,
                                  *limit, "--out", out], capture_output=True, text=True, cwd=HERE, timeout=300)
        assert stopped.returncode == 0, stopped.stderr[-3000:]
        assert "stopped at step 12 (signal)" in stopped.stdout
        if limit:  # the resume with the same limit evaluates the epoch, then stops
            again = run_vpl(*TINY, "--out", out, "--resume", *limit)
            assert len(read_log(out)) == 1 and "stopped at step 12 (max_steps)" in again.stdout
    run_vpl(*TINY, "--out", out, "--resume")
    assert_same_weights(model_state(out), model_state(reference_run[0]))
    assert_same_log(out, reference_run[0])


@pytest.mark.parametrize("partner,batchnorms", [("resnet_tiny", 17), ("vit_tiny", 0)])
def test_a_nonfinite_forward_leaves_the_weights_and_batchnorm_statistics_of_the_step_before(tmp_path, partner, batchnorms):
    # a batch of NaN at the third step: the step is skipped, and weights and running statistics stay those that a
    # run of two steps ends with (but for BatchNorm's counter of forwards)
    nan, clean = str(tmp_path / "nan"), str(tmp_path / "clean")
    result = subprocess.run([sys.executable, "-c", SIGNAL_ON_CALL, "train_step", "3", "0", "nan", *TINY,
                             "--cnn", partner, "--max-steps", "3", "--out", nan], capture_output=True, text=True, cwd=HERE)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "non-finite loss at step 3 in vit_ce, vit_kd, cnn_ce" in result.stderr  # counted from 1, as the progress line
    run_vpl(*TINY, "--cnn", partner, "--max-steps", "2", "--out", clean)
    after_nan, after_two = model_state(nan), model_state(clean)
    counters = [k for k in after_two if k.endswith("num_batches_tracked")]
    assert_same({k: v for k, v in after_nan.items() if k not in counters},
                {k: v for k, v in after_two.items() if k not in counters})
    means = [v for k, v in after_two.items() if k.endswith("running_mean")]
    assert len(means) == batchnorms and all(v.abs().sum() > 0 for v in means)  # they have moved from their start


def test_a_nonfinite_step_right_after_a_resume_keeps_the_resumed_statistics_and_counts_on(tmp_path):
    clean, nan = str(tmp_path / "clean"), str(tmp_path / "nan")
    run_vpl(*TINY, "--max-steps", "2", "--out", clean)
    shutil.copytree(clean, nan)
    for steps, code in ((3, 0), (4, 3)):  # a NaN batch first after each resume; the second makes 2 in a row
        result = subprocess.run([sys.executable, "-c", SIGNAL_ON_CALL, "train_step", "1", "0", "nan", *TINY, "--resume",
                                 "--max-steps", str(steps), "--max-bad-steps", "2", "--out", nan],
                                capture_output=True, text=True, cwd=HERE, timeout=300)
        assert result.returncode == code, result.stderr[-2000:]
        if code == 0:  # the skipped step left the resumed weights and BatchNorm statistics, not the initial ones
            after, before = model_state(nan), model_state(clean)
            assert_same({k: v for k, v in after.items() if not k.endswith("num_batches_tracked")},
                        {k: v for k, v in before.items() if not k.endswith("num_batches_tracked")})
    assert "(2/2 in a row)" in result.stderr  # the count of non-finite steps in a row went on across the resume


def test_mixup_rarely_pairs_an_image_with_its_repeated_copy(tmp_path):
    # MixUp pairs neighbours in the batch, and on one process --repeat-aug's copies are neighbours: a target
    # of one class would then be the rule (lam * y + (1 - lam) * y), not the chance of two images sharing one
    script = f"""
import sys, torch
sys.path.insert(0, {HERE!r})
import vpl
step, targets = vpl.train_step, []
def recording(*args, **kwargs):
    targets.append(args[3])
    return step(*args, **kwargs)
vpl.train_step = recording
vpl.main(sys.argv[1:])
targets = torch.cat(targets)
print((targets.max(1).values > 0.999).float().mean().item())
"""
    result = subprocess.run([sys.executable, "-c", script, *TINY, "--repeat-aug", "3", "--mixup", "0.8",
                             "--label-smoothing", "0", "--max-steps", "6", "--out", str(tmp_path)],
                            capture_output=True, text=True, cwd=HERE)
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(result.stdout.split()[-1]) < 0.3  # 10 classes: about 0.1 by chance; with copies paired, 0.7


def test_a_failed_write_is_one_line_and_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pt")
    vpl.save_atomic({"step": 1}, path)

    class FillsUp(io.FileIO):  # a disk that fills up 1 kB into the file: torch.save then raises a RuntimeError
        def write(self, data):
            if self.tell() + len(data) > 1000:
                raise OSError(28, "No space left on device")
            return super().write(data)
    monkeypatch.setattr(vpl, "open", lambda name, mode: io.BufferedWriter(FillsUp(name, mode)), raising=False)
    with pytest.raises(vpl.UserError, match="No space left on device"):
        vpl.save_atomic({"weight": torch.zeros(10_000)}, path)
    assert torch.load(path, weights_only=True) == {"step": 1} and os.listdir(tmp_path) == ["last.pt"]
    monkeypatch.undo()

    def disk_full(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(vpl.UserError, match="No space left on device"):
        vpl.save_atomic({"step": 2}, path)
    assert torch.load(path, weights_only=True) == {"step": 1} and os.listdir(tmp_path) == ["last.pt"]
    # the same for the log, in a real run: a folder where log.jsonl should go cannot be appended to
    out = tmp_path / "run"
    (out / "log.jsonl").mkdir(parents=True)
    result = run_vpl(*TINY, "--epochs", "1", "--out", str(out), check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"vpl: error: cannot write {out}/log.jsonl")


def test_a_warm_up_as_long_as_the_run_is_warned_of(tmp_path):
    short = ["--demo-train", "64", "--demo-val", "8", "--batch-size", "32", "--epochs", "1", "--workers", "0"]
    for warmup, warned in (("1", True), ("0.5", False)):  # 2 steps: all of them warm-up, or one
        floor = [] if warned else ["--min-lr-vit", "0.001"]  # above the peak, 4e-3 x 32 / 512 = 0.00025
        result = run_vpl(*short, "--warmup-epochs", warmup, *floor, "--out", str(tmp_path / warmup))
        assert ("the lr never anneals" in result.stderr) == warned, result.stderr
        assert ("--min-lr-vit 0.001 is above the ViT's peak lr 0.00025" in result.stderr) != warned, result.stderr


def test_run_gives_the_signal_handlers_back_also_after_an_error(tmp_path, monkeypatch):
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    def crash(*args, **kwargs):
        raise RuntimeError("a simulated crash")
    monkeypatch.setattr(vpl, "evaluate", crash)
    cfg = vpl.parse_config(["--demo-train", "64", "--demo-val", "8", "--batch-size", "32", "--epochs", "1",
                            "--workers", "0", "--out", str(tmp_path)])
    with pytest.raises(RuntimeError, match="simulated"):
        vpl.run(cfg)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_a_crash_with_data_workers_ends_the_process(tmp_path):
    # the workers ignore SIGTERM (the main process handles a scheduler's): after a crash, the interpreter's
    # exit must still end them, not wait for them forever
    crashed = subprocess.run([sys.executable, "-c", SIGNAL_ON_CALL, "apply_step", "3", "0", "crash", *TINY,
                              "--workers", "2", "--out", str(tmp_path)], capture_output=True, text=True, cwd=HERE,
                             timeout=120)
    assert crashed.returncode == 1 and "RuntimeError: a simulated crash" in crashed.stderr


def test_data_workers_ignore_a_foreign_sigterm_and_end_with_a_script_holding_them(tmp_path):
    # a SIGTERM from another process (a scheduler's) leaves the workers working, also where Python's default
    # start method is not fork; the main process's own (sent at the interpreter's exit) ends them
    script = f"""
import multiprocessing, subprocess, sys
sys.path.insert(0, {HERE!r})
import vpl
multiprocessing.set_start_method("spawn")
cfg = vpl.parse_config(["--demo-train", "256", "--demo-val", "64", "--batch-size", "32", "--workers", "2"])
train_set, val_set, _ = vpl.build_datasets(cfg)
train, val = vpl.build_loaders(cfg, train_set, val_set, 0, 1, False)
batches = iter(train)
next(batches), next(batches)  # one batch from each worker: both have set their signals up
for worker in multiprocessing.active_children():
    subprocess.run(["kill", "-TERM", str(worker.pid)], check=True)
print(sum(len(images) for images, targets, bad in batches))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0 and result.stdout == "192\n", result.stderr[-2000:]


KILL_MID_WRITE = f"""
import io, os, signal, sys, torch
sys.path.insert(0, {HERE!r})
import vpl
save, writes = torch.save, []
def half_then_kill(obj, f):  # the KILL_AT-th write of last.pt stops half way: SIGKILL, as a preempted node
    if os.path.basename(getattr(f, "name", "")).startswith("last.pt"):
        writes.append(1)
        if len(writes) == int(os.environ.get("KILL_AT", 2)):
            whole = io.BytesIO()
            save(obj, whole)
            f.write(whole.getvalue()[:len(whole.getvalue()) // 2])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    return save(obj, f)
torch.save = half_then_kill
vpl.main(sys.argv[1:])
"""


def test_kill_9_during_a_checkpoint_write_leaves_the_previous_one_which_resumes_bit_identically(reference_run, tmp_path):
    out = str(tmp_path)
    killed = subprocess.run([sys.executable, "-c", KILL_MID_WRITE, *TINY, "--out", out], capture_output=True, cwd=HERE)
    assert killed.returncode == -signal.SIGKILL
    assert [name for name in os.listdir(out) if name.startswith("last.pt.tmp")]  # the half-written file
    assert torch.load(os.path.join(out, "last.pt"), weights_only=True)["epoch"] == 1  # the first epoch's, whole
    run_vpl(*TINY, "--out", out, "--resume")
    assert not [name for name in os.listdir(out) if ".tmp" in name]
    assert_same_weights(model_state(out), model_state(reference_run[0]))
    assert_same_log(out, reference_run[0])


def test_a_kill_during_the_first_checkpoint_write_leaves_a_fresh_start_a_log_of_its_own(tmp_path):
    out, options = str(tmp_path), [*TINY, "--epochs", "1", "--demo-val", "20"]
    killed = subprocess.run([sys.executable, "-c", KILL_MID_WRITE, *options, "--out", out], capture_output=True, cwd=HERE,
                            env={**os.environ, "KILL_AT": "1"})
    assert killed.returncode == -signal.SIGKILL
    assert len(read_log(out)) == 1 and not os.path.exists(os.path.join(out, "last.pt"))  # epoch 0 logged, not saved
    fresh = run_vpl(*options, "--out", out, "--auto-resume")  # nothing to resume: a fresh start, the old log moved aside
    assert "has no last.pt beside it: moved to log.jsonl.old" in fresh.stderr
    with open(os.path.join(out, "log.jsonl.old")) as f:
        old = [json.loads(line) for line in f]
    timings = ("img_per_s", "time_s")  # one record each: the fresh run's epoch 0 is the killed run's, timings aside
    assert [{k: v for k, v in h.items() if k not in timings} for h in read_log(out)] == \
        [{k: v for k, v in h.items() if k not in timings} for h in old]


def test_torchrun_restarts_a_killed_worker_which_resumes_bit_identically(reference_run, tmp_path):
    out = str(tmp_path / "elastic")
    printed = open(tmp_path / "printed.txt", "w")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                             "--max-restarts=1", VPL, *TINY, "--out", out, "--auto-resume"],
                            stdout=printed, stderr=subprocess.DEVNULL, cwd=HERE)
    assert wait_for(lambda: os.path.exists(os.path.join(out, "last.pt")))

    def workers():  # the vpl.py process torchrun started, not torchrun itself
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmd = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
            except OSError:
                continue
            if out in cmd and "torch.distributed.run" not in cmd:
                yield int(pid)
    killed = list(workers())
    assert killed, "found no worker to kill"
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    assert proc.wait(timeout=300) == 0
    assert "resumed from" in (tmp_path / "printed.txt").read_text()  # restarted, and resumed
    assert_same_weights(model_state(out), model_state(reference_run[0]))
    assert_same_log(out, reference_run[0])


# ------------------------------------------------------------------------------ bench and chart
def test_bench_prints_every_figure(capsys, tmp_path):
    vpl.main(["--bench", "--batch-size", "4"])
    printed = capsys.readouterr().out
    rows = {m[0]: [float(v) for v in m[1:]] for m in re.findall(
        r"(ViT|CNN|pair): +([\d.e+]+) img/s, \d+ ms/step \(spread ([\d.e+]+)-([\d.e+]+)\).*?, ([\d.e+-]+) GFLOP/img", printed)}
    assert set(rows) == {"ViT", "CNN", "pair"}, printed
    for median, low, high, _ in rows.values():
        assert 0 < low <= median <= high
    # the pair step counts both branches' FLOPs and its small head's
    assert 0.99 <= rows["pair"][3] / (rows["ViT"][3] + rows["CNN"][3]) <= 1.05  # printed to 3 digits
    # the ViT's, counted by hand as multiply-adds of its matmuls: vit_tiny, 64 patches + cls, width 128, MLP 256
    tokens, dim, hidden = 65, 128, 256
    block = tokens * dim * 3 * dim + 2 * tokens * tokens * dim + tokens * dim * dim + 2 * tokens * dim * hidden
    macs = 64 * dim * 3 * 4 * 4 + 4 * block + dim * 10
    assert rows["ViT"][3] == pytest.approx(3 * 2 * macs / 1e9, rel=0.005)  # training: 3x the forward
    assert re.search(r"pair overhead vs ViT \+ CNN alone: [+-]\d+\.\d%", printed), printed
    write_image_folder(tmp_path, 12)  # with --data, the input pipeline alone too
    vpl.main(["--bench", "--data", str(tmp_path), *FOLDER_ARGS])
    assert "input pipeline:" in capsys.readouterr().out


def test_text_chart_marks_stages_and_both_branches():
    history = [{"val_vit_top1": 10.0 * e, "val_cnn_top1": 20.0 + 5 * e} for e in range(10)]
    chart = vpl.text_chart(history, (0.2, 0.8), 10, height=5).splitlines()
    assert chart[0].strip().startswith("90.0") and chart[4].strip().startswith("0.0")
    assert chart[0].endswith("v")          # ViT at the top in the last epoch
    assert chart[4].split()[1][0] == "v"   # ... and at the bottom in the first
    assert chart[5].count("|") == 2        # two stage boundaries: epochs 2 and 8
    assert sorted(line[7:].replace("|", "")[4] for line in chart[:5]) == [" "] * 4 + ["*"]  # both at 40 in epoch 4
