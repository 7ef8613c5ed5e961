"""Promises vpl.py keeps, one per test. CPU only, tiny configurations, nothing downloaded.
Run: python -m pytest -q test_vpl.py"""
import argparse  # noqa: F401  (imports the unit tests below share)
import builtins
import collections  # noqa: F401
import contextlib
import glob  # noqa: F401
import inspect  # noqa: F401
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
import zlib

import pytest
import torch
import torch.multiprocessing as mp  # noqa: F401
import torch.nn as nn  # noqa: F401
import torch.nn.functional as F  # noqa: F401
import torchvision

import vpl

HERE = os.path.dirname(os.path.abspath(__file__))
VPL = os.path.join(HERE, "vpl.py")
# A tiny demo run: 12 steps per epoch, 2 epochs, the three stages all visited.
TINY = ["--demo-train", "384", "--demo-val", "100", "--batch-size", "32", "--epochs", "2", "--workers", "0",
        "--log-every", "1", "--stages", "0.25,0.75", "--ramp", "0.1"]
TIMINGS = ("img_per_s", "time_s")


def run_vpl(*args, check=True, timeout=300, env=None):
    result = subprocess.run([sys.executable, VPL, *args], capture_output=True, text=True, timeout=timeout,
                            cwd=HERE, env={**os.environ, **(env or {})})
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def run_script(script, *args, timeout=300, env=None):
    """`python -c script args`: vpl.py's main under a wrapper that the script sets up."""
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, cwd=HERE,
                          timeout=timeout, env={**os.environ, **(env or {})})


def vpl_main(*args, check=True):
    """run_vpl's vpl.main in this process: no interpreter to start and torch to import (about 3 s each).
    Its output is caught; the global RNG is left as it was."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with torch.random.fork_rng(devices=[]), contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            vpl.main(list(args))
            code = 0
        except SystemExit as e:
            code = e.code
    if check:
        assert code == 0, stderr.getvalue()[-3000:]
    return subprocess.CompletedProcess(args, code, stdout.getvalue(), stderr.getvalue())


@contextlib.contextmanager
def on_call(owner, name, n, action="signal"):
    """Call n of owner.name (vpl.optimizer_step, vpl.evaluate, ...) first sends this process SIGTERM, as a
    scheduler does (only inside the training loop, whose handler takes it), or raises (a crash)."""
    fn, calls = getattr(owner, name), []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            if action == "crash":
                raise RuntimeError("a simulated crash")
            os.kill(os.getpid(), signal.SIGTERM)
        return fn(*args, **kwargs)
    setattr(owner, name, wrapped)
    try:
        yield
    finally:
        setattr(owner, name, fn)


def checkpoint(out):
    return torch.load(os.path.join(out, "last.pt"), map_location="cpu", weights_only=True)


def model_state(out):
    return checkpoint(out)["model"]


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


def assert_same_checkpoint(out, reference):
    """Every part of the two last.pt bit for bit: weights, optimizers, scaler, EMA, step, best, every rank's
    RNG state, what it was made with; all but the config, whose --resume and --max-steps differ."""
    a, b = checkpoint(out), checkpoint(reference)
    assert_same({k: v for k, v in a.items() if k != "config"}, {k: v for k, v in b.items() if k != "config"})


def read_log(out, name="log.jsonl"):
    with open(os.path.join(out, name)) as f:
        return [json.loads(line) for line in f]


def without(record, keys):
    return {k: v for k, v in record.items() if k not in keys and not k.startswith(tuple(keys))}


def assert_same_log(out, reference, resumed=()):
    """Every record of the two runs' logs equal, but for the timings. An epoch in `resumed` was stopped
    inside and resumed: its mean train losses (and count of unreadable images) are those of the resumed
    part only, as the checkpoint keeps no per-epoch totals, so they are left out of its comparison."""
    a, b = read_log(out), read_log(reference)
    assert [h["epoch"] for h in a] == [h["epoch"] for h in b]
    for x, y in zip(a, b):
        left_out = TIMINGS + (("train_", "bad_images") if x["epoch"] in resumed else ())
        assert without(x, left_out) == without(y, left_out), x["epoch"]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """One uninterrupted tiny run that the resume tests must reproduce bit for bit."""
    out = str(tmp_path_factory.mktemp("reference"))
    result = vpl_main(*TINY, "--out", out)
    return out, result.stdout


def write_image_folder(root, per_class, size=40, corrupt=(), val_per_class=4):
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for c in ("ant", "bee"):
            os.makedirs(os.path.join(root, split, c), exist_ok=True)
            for i in range(per_class if split == "train" else val_per_class):
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


def torchrun(*args, nproc=2, check=True, timeout=300, env=None):
    """torchrun --standalone (a free port of its own) of a script and its flags."""
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             f"--nproc_per_node={nproc}", *args], capture_output=True, text=True, timeout=timeout,
                            cwd=HERE, env={**os.environ, **(env or {})})
    assert result.returncode == 0 or not check, result.stderr[-3000:]
    return result


# on_call in a process of its own: in the process of RANK `rank` (torchrun's; 0 without it), then vpl.main
ON_CALL = f"""
import os, signal, sys
sys.path.insert(0, {HERE!r})
import vpl
def on_call(name, n, rank, action):
    fn, calls = getattr(vpl, name), []
    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == n and os.environ.get("RANK", "0") == rank:
            if action == "crash":
                raise RuntimeError("a simulated crash")
            os.kill(os.getpid(), signal.SIGTERM)
        return fn(*args, **kwargs)
    setattr(vpl, name, wrapped)
on_call(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4])
vpl.main(sys.argv[5:])
"""


def progress_lines(stdout):
    return [line for line in stdout.splitlines() if line.startswith("stage ")]


def stopped_at(stdout):
    found = re.findall(r"^stopped at step (\d+) \((signal|max_steps)\); saved (.*?); continue with --resume$",
                       stdout, re.M)
    assert len(found) == 1, stdout[-3000:]
    return int(found[0][0]), found[0][1]


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
    keys = {"epoch", "stage", "pair_weight", "world_size", "val_images", "bad_images", *TIMINGS}
    keys |= {f"val_{m}_top{k}" for m in ("vit", "cnn", "pair", "ens") for k in (1, 5)}
    keys |= {f"train_{t}" for t in ("total", "vit_ce", "vit_kd", "cnn_ce", "cnn_kd", "pair_ce")}
    assert all(h.keys() == keys for h in log), log  # no val_bad_images: every image was read
    assert log[0]["val_images"] == 100 and log[0]["world_size"] == 1 and log[0]["bad_images"] == 0
    # stages 0.25,0.75 of 24 steps, ramp 0.1: each record has its epoch's last step's stage and pair weight
    assert [(h["stage"], h["pair_weight"]) for h in log] == [(2, pytest.approx(0.2)), (3, 0.0)]
    # one progress line a step (--log-every 1), with the stage of the step it ends: 1 up to step 6, 3 from 19
    lines = progress_lines(stdout)
    assert [int(re.search(r"\| step (\d+)/24 \|", line).group(1)) for line in lines] == list(range(1, 25))
    for step, line in enumerate(lines, 1):
        epoch = 1 + (step - 1) // 12
        assert line.startswith(f"stage {1 if step <= 6 else 2 if step <= 18 else 3} | epoch {epoch}/2 | "), line
    assert "v ViT, c CNN" in stdout
    best = re.search(r"best val top-1: ViT ([\d.]+), CNN ([\d.]+)", stdout)
    assert [float(v) for v in best.groups()] == [round(max(h[f"val_{b}_top1"] for h in log), 2) for b in ("vit", "cnn")]
    for name in ("last.pt", "vit.pt", "cnn.pt"):
        assert os.path.exists(os.path.join(out, name))
    assert not os.path.exists(os.path.join(out, "vit_ema.pt"))  # no --ema, no EMA export
    exported = torch.load(os.path.join(out, "cnn.pt"), weights_only=True)  # trained channels_last, exported plain:
    assert all(t.is_contiguous() for t in exported.values())                # safetensors takes only these
    ckpt = checkpoint(out)
    assert ckpt["made"] == {"vit": "vit_tiny", "cnn": "resnet_tiny", "img_size": 32, "classes": 10, "seed": 0,
                            "repeat_aug": 1, "train_images": 384, "global_batch": 32, "world": 1}
    assert ckpt["step"] == 24 and len(ckpt["rng"]) == 1 and "ema" not in ckpt


def test_a_stop_by_max_steps_at_an_epochs_end_logs_it_and_the_resume_is_bit_identical_without_stale_log_lines(
        reference_run, tmp_path):
    out, reference = str(tmp_path), reference_run[0]
    first = vpl_main(*TINY, "--out", out, "--max-steps", "12")
    assert stopped_at(first.stdout) == (12, "max_steps") and checkpoint(out)["step"] == 12
    # the epoch it ends is evaluated and logged before the stop, its train losses over all of its steps
    assert [without(h, TIMINGS) for h in read_log(out)] == [without(read_log(reference)[0], TIMINGS)]
    with open(os.path.join(out, "log.jsonl"), "a") as f:  # a record last.pt does not hold (a crash between the log's
        f.write(json.dumps(read_log(reference)[1] | {"val_vit_top1": -1.0}) + "\n")  # write and the save),
        f.write('{"epoch": 1, "val_vi')  # and a line torn by a crash
    resumed = run_vpl(*TINY, "--out", out, "--resume")  # in a process of its own, as a restart is
    assert f"resumed from {out}/last.pt at step 12" in resumed.stdout
    assert "| step 12/24 |" not in resumed.stdout and "| step 13/24 |" in resumed.stdout  # nothing redone
    assert_same_checkpoint(out, reference)
    assert_same_log(out, reference)  # whole: each epoch was trained in one run


def test_sigterm_anywhere_stops_at_the_next_log_point_and_the_resumes_are_bit_identical(reference_run, tmp_path):
    # 1. mid-epoch, the way a scheduler does it: SIGTERM to the whole process group, data workers included
    # (they ignore it: the main process finishes its step, saves and ends them)
    out, stderr = str(tmp_path / "run"), open(tmp_path / "stderr.txt", "w+")
    proc = subprocess.Popen([sys.executable, VPL, *TINY, "--out", out, "--workers", "2"], stdout=subprocess.PIPE,
                            stderr=stderr, text=True, cwd=HERE, start_new_session=True)
    for line in proc.stdout:
        if "| step 5/" in line:
            os.killpg(proc.pid, signal.SIGTERM)
            break
    rest = proc.stdout.read()
    assert proc.wait(timeout=120) == 0, open(stderr.name).read()[-3000:]
    step, why = stopped_at(rest)
    assert why == "signal" and 5 < step < 12 and checkpoint(out)["step"] == step
    assert not os.path.exists(os.path.join(out, "log.jsonl")) or not read_log(out)  # epoch 0 not evaluated
    first_part = float(re.search(rf"\| step {step}/24 \| total ([\d.]+) ", rest).group(1))
    # 2. during the evaluation of epoch 0: the request waits for the next log point, step 13
    with on_call(vpl, "evaluate", 1):
        second = vpl_main(*TINY, "--out", out, "--resume")
    assert stopped_at(second.stdout) == (13, "signal") and len(read_log(out)) == 1
    # epoch 0's mean train loss is that of the resumed part: with the stopped part's it makes the whole one
    whole, resumed_part = read_log(reference_run[0])[0]["train_total"], read_log(out)[0]["train_total"]
    assert (step * first_part + (12 - step) * resumed_part) / 12 == pytest.approx(whole, abs=1e-3)  # printed: 3 digits
    vpl_main(*TINY, "--out", out, "--resume")  # with 0 workers: augmentation does not depend on them
    assert_same_checkpoint(out, reference_run[0])
    assert_same_log(out, reference_run[0], resumed=(0, 1))


def test_the_loop_steps_with_the_lr_pair_weight_data_order_and_accumulation_computed_by_hand(tmp_path, monkeypatch):
    # 192 images in micro-batches of 16, two per step: global batch 32, 6 steps per epoch, 12 in all, 6 of warm-up.
    # Spies: the lr of every parameter group as each optimizer step applies it; each micro-batch's pair weight,
    # total loss and targets as the criterion gets them
    forward, optimizer_step, criterion, steps = vpl.PairLoss.forward, vpl.optimizer_step, [], []

    def spy_forward(self, outputs, target, a):
        total, terms = forward(self, outputs, target, a)
        criterion.append([a, total.item(), target.tolist()])
        return total, terms

    def spy_optimizer_step(optimizers, *args):
        steps.append([[group["lr"] for group in optimizer.param_groups] for optimizer in optimizers])
        return optimizer_step(optimizers, *args)
    monkeypatch.setattr(vpl.PairLoss, "forward", spy_forward)
    monkeypatch.setattr(vpl, "optimizer_step", spy_optimizer_step)
    out = str(tmp_path)
    vpl_main(*TINY, "--demo-train", "192", "--demo-val", "20", "--batch-size", "16", "--accum-steps", "2", "--out", out)

    def lr(step, peak, final):
        if step < 6:
            return peak * (step + 1) / 6
        return final + (peak - final) * 0.5 * (1 + math.cos(math.pi * (step - 6) / 6))

    def pair_weight(step):  # stages 0.25,0.75 of 12 steps, ramp 0.1, --pair-weight 0.2
        return 0.2 * min(1.0, (step / 12 - 0.25) / 0.1) if 0.25 <= step / 12 < 0.75 else 0.0
    assert len(steps) == 12 and len(criterion) == 24
    for step, (vit, head, cnn) in enumerate(steps):
        assert vit + head == pytest.approx([lr(step, 4e-3 * 32 / 512, 1e-5)] * (len(vit) + len(head)))
        assert cnn == pytest.approx([lr(step, 0.8 * 32 / 1024, 0.0)] * len(cnn))
    for micro, (a, _, _) in enumerate(criterion):
        assert a == pytest.approx(pair_weight(micro // 2), abs=1e-12)
    labels = vpl.make_demo(212, 0)[1][:192]  # each epoch in its own order: a permutation seeded by seed + epoch
    for micro, (_, _, targets) in enumerate(criterion):
        order = torch.randperm(192, generator=torch.Generator().manual_seed(micro // 12)).tolist()
        assert targets == labels[order[16 * (micro % 12):16 * (micro % 12 + 1)]].tolist(), micro
    log = read_log(out)
    assert [h["epoch"] for h in log] == [0, 1]
    for epoch, record in enumerate(log):  # each step's total is the mean of its two micro-batches'
        totals = [total for _, total, _ in criterion[12 * epoch:12 * (epoch + 1)]]
        assert record["train_total"] == pytest.approx(sum(totals) / 12, rel=1e-5)
        assert record["pair_weight"] == pytest.approx(pair_weight(6 * epoch + 5), abs=1e-12)


def test_accumulation_ema_mixup_clipping_and_fp16_resume_bit_identically(tmp_path):
    # 96 images in micro-batches of 10: 9 per epoch, 4 optimizer steps and one leftover micro-batch (fp16 is slow
    # on a CPU). SIGTERM inside the first epoch (step 3), then at its last step (4): that stop evaluates and logs
    # the epoch first. Stage 2 starts with the second epoch: the resumed epoch logs the first one's stage.
    options = [*TINY, "--demo-train", "96", "--demo-val", "20", "--batch-size", "10", "--accum-steps", "2",
               "--ema", "0.9", "--mixup", "0.8", "--cutmix", "1.0", "--clip-grad", "1.0", "--amp", "fp16",
               "--randaug", "9", "--reprob", "0.25", "--stages", "0.5,0.75",
               "--seed", "20240101"]  # a date as seed: the per-image seeds must not overflow
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    vpl_main(*options, "--out", whole)
    for call, at, resume in ((3, 3, []), (1, 4, ["--resume"])):  # mid-epoch: the data order and MixUp continue
        with on_call(vpl, "optimizer_step", call):
            stopped = vpl_main(*options, *resume, "--out", parts)
        assert stopped_at(stopped.stdout) == (at, "signal")
    assert "| step 4/8 |" in stopped.stdout  # a resume whose first step ends the epoch prints its line
    assert [h["epoch"] for h in read_log(parts)] == [0]
    vpl_main(*options, "--out", parts, "--resume")
    assert_same_checkpoint(parts, whole)
    assert_same_log(parts, whole, resumed=(0,))
    log = read_log(whole)
    assert [h["stage"] for h in log] == [1, 3] and "ema_val_vit_top1" in log[-1]
    ckpt = checkpoint(whole)
    assert ckpt["scaler"]["scale"] > 1.0  # fp16's scaler, saved and resumed (compared above)
    for branch in ("vit", "cnn"):  # the exported EMA branches are the checkpoint's EMA
        exported = torch.load(os.path.join(whole, f"{branch}_ema.pt"), weights_only=True)
        assert_same(exported, {k[len(branch) + 1:]: v for k, v in ckpt["ema"].items() if k.startswith(branch + ".")})
    # --eval-only evaluates the checkpoint's EMA too, without being told
    evaluated = json.loads(vpl_main(*options, "--out", whole, "--eval-only").stdout.splitlines()[-1])
    assert evaluated.keys() == {k for k in log[-1] if k.startswith(("val_", "ema_val_"))}
    for key, value in evaluated.items():
        assert value == pytest.approx(log[-1][key], abs=1e-9), key


def test_a_resume_may_add_an_ema_which_starts_from_the_resumed_weights_and_fp16_whose_scaler_starts_afresh(
        reference_run, tmp_path):
    # fp32's scaler state is empty (scale 1): loaded into an fp16 run, small fp16 gradients would flush to zero
    out = str(tmp_path / "run")
    shutil.copytree(reference_run[0], out)  # made with --amp off, without EMA
    vpl_main(*TINY, "--out", out, "--resume", "--epochs", "3", "--max-steps", "25", "--ema", "0.5", "--amp", "fp16")
    resumed, after = model_state(reference_run[0]), checkpoint(out)
    assert after["step"] == 25 and after["scaler"]["scale"] >= 2.0 ** 10
    for key, ema in after["ema"].items():  # one step of decay 0.5: halfway from the resumed to the new weights
        if ema.is_floating_point():
            assert torch.allclose(ema, (resumed[key] + after["model"][key]) / 2, atol=1e-6), key


def test_eval_only_reproduces_the_logged_accuracies_and_leaves_the_log_alone(reference_run, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(reference_run[0], out)
    last = read_log(out)[-1]
    with open(os.path.join(out, "log.jsonl"), "a") as f:  # as a run still training writes it after its checkpoint
        f.write(json.dumps({**last, "epoch": last["epoch"] + 1}) + "\n")
    ckpt = checkpoint(out)  # without its optimizers: it needs none
    torch.save({k: v for k, v in ckpt.items() if not k.startswith(("opt_", "scaler"))}, os.path.join(out, "last.pt"))
    before = {name: open(os.path.join(out, name), "rb").read() for name in os.listdir(out)}
    result = vpl_main(*TINY, "--out", out, "--eval-only", "--repeat-aug", "40")  # a train-only setting: not checked
    evaluated = json.loads(result.stdout.strip().splitlines()[-1])
    assert evaluated.keys() == {k for k in last if k.startswith("val_")}
    for key, value in evaluated.items():
        assert value == pytest.approx(last[key], abs=1e-9), key
    assert {name: open(os.path.join(out, name), "rb").read() for name in os.listdir(out)} == before  # all untouched


def test_a_run_starts_its_branches_from_the_init_files(reference_run, tmp_path):
    ref = reference_run[0]  # at lr 0 a step leaves every weight where it started (BatchNorm's statistics move)
    # the ViT from its export, the CNN from the pair in a vpl last.pt
    vpl_main(*TINY, "--init-vit", os.path.join(ref, "vit.pt"), "--init-cnn", os.path.join(ref, "last.pt"),
             "--lr-vit", "0", "--lr-cnn", "0", "--max-steps", "1", "--out", str(tmp_path))
    state = model_state(str(tmp_path))
    starts = {"vit": torch.load(os.path.join(ref, "vit.pt"), weights_only=True),
              "cnn": {k[4:]: v for k, v in model_state(ref).items() if k.startswith("cnn.")}}
    for branch, model in (("vit", vpl.vit_tiny()), ("cnn", vpl.resnet_tiny())):
        for name, _ in model.named_parameters():
            assert torch.equal(state[f"{branch}.{name}"], starts[branch][name]), (branch, name)


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


def test_two_processes_train_as_one_count_each_val_image_once_and_stop_together(tmp_path):
    # ViT + ViT without drop-path (no BatchNorm, nothing random per rank): 2 processes x 16 images x 2 micro-steps
    # see each step the same 64 images as 1 process x 16 x 4, and DDP's mean is the same gradient; 3 steps
    args = [*TINY, "--cnn", "vit_tiny", "--drop-path", "0", "--batch-size", "16", "--epochs", "1", "--lr-vit", "0.04",
            "--warmup-epochs", "0", "--demo-train", "192", "--demo-val", "101"]
    two, one, stopped = (str(tmp_path / name) for name in ("two", "one", "stopped"))
    torchrun(VPL, *args, "--accum-steps", "2", "--out", two)
    vpl_main(*args, "--accum-steps", "4", "--out", one)
    a, b = model_state(two), model_state(one)
    start = vpl.build_pair(vpl.parse_config(args), 10).state_dict()
    differ = sum((a[key] - value).abs().sum() for key, value in b.items())
    moved = sum((value - start[key]).abs().sum() for key, value in b.items())
    # sums taken in another order, which AdamW magnifies where a gradient is near 0; ranks that did not average
    # their gradients would differ by about as much as the weights moved
    assert differ < 1e-3 * moved
    log_two, log_one = read_log(two)[0], read_log(one)[0]
    for key in [k for k in log_one if k.startswith("train_")]:  # the mean losses, over both processes' images
        assert log_two[key] == pytest.approx(log_one[key], rel=1e-4), key
    # 101 val images split 51 + 50: each counted once; one process evaluating the checkpoint agrees
    assert log_two["world_size"] == 2 and log_two["val_images"] == 101
    assert checkpoint(two)["made"]["world"] == 2 and len(checkpoint(two)["rng"]) == 2
    single = json.loads(vpl_main(*args, "--out", two, "--eval-only").stdout.strip().splitlines()[-1])
    for key, value in single.items():
        assert value == pytest.approx(log_two[key], abs=1e-9), key
    # SIGTERM to rank 1 alone, at its second step: the request travels in the all-reduced flags, so both ranks
    # stop after the same step; two processes resumed from there end as the uninterrupted pair did
    wrapper = tmp_path / "on_call.py"
    wrapper.write_text(ON_CALL)
    result = torchrun(str(wrapper), "optimizer_step", "2", "1", "signal", *args, "--accum-steps", "2", "--out", stopped)
    assert stopped_at(result.stdout) == (2, "signal") and checkpoint(stopped)["step"] == 2
    torchrun(VPL, *args, "--accum-steps", "2", "--out", stopped, "--resume")
    assert_same_checkpoint(stopped, two)
    assert_same_log(stopped, two, resumed=(0,))


def test_image_folder_trains_and_a_corrupt_image_is_replaced_or_left_out_with_a_warning(tmp_path):
    data, out = tmp_path / "data", str(tmp_path / "out")
    write_image_folder(data, 52, corrupt=[("train", "ant", 3), ("val", "bee", 1)])  # train: 1 of 104, < 1%
    (data / "val" / "ant" / "2.png").write_bytes(png_header(20000, 20000))  # PIL's DecompressionBombError
    result = vpl_main("--data", str(data), *FOLDER_ARGS, "--epochs", "1", "--out", out)
    warnings = [line for line in result.stderr.splitlines() if "unreadable image" in line]
    named = sorted(re.search(r"unreadable image (\S+) ", line).group(1) for line in warnings)
    assert named == sorted(str(data / split / c / f"{i}.png") for split, c, i in
                           (("train", "ant", 3), ("val", "ant", 2), ("val", "bee", 1))), warnings
    assert all(line.startswith("vpl: warning: ") and line.endswith("; skipped") for line in warnings)
    assert "DecompressionBombError: Image size (400000000 pixels)" in "".join(warnings)  # PIL's reason: 20000 x 20000
    log = read_log(out)[0]
    assert log["bad_images"] == 1 and log["val_images"] == 6 and log["val_bad_images"] == 2
    # an unreadable val image is left out, not replaced: the same as evaluating without it
    os.remove(data / "val" / "bee" / "1.png")
    os.remove(data / "val" / "ant" / "2.png")
    evaluated = json.loads(vpl_main("--data", str(data), *FOLDER_ARGS, "--out", out, "--eval-only").stdout.splitlines()[-1])
    assert "val_bad_images" not in evaluated
    for key, value in evaluated.items():
        assert value == pytest.approx(log[key], abs=1e-9), key


def test_a_split_that_cannot_be_listed_is_one_line(tmp_path, monkeypatch):
    write_image_folder(tmp_path, 1)

    def denied(path):  # as chmod 000 does to anyone but root
        raise PermissionError(13, "Permission denied", path)
    monkeypatch.setattr(os, "scandir", denied)
    with pytest.raises(vpl.UserError, match=rf"^--data {re.escape(str(tmp_path))}: train: .*Permission denied"):
        vpl.image_folders(str(tmp_path))


def test_too_many_bad_images_stop_the_run_and_keep_the_checkpoint(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    write_image_folder(data, 12)  # 24 train images: 3 steps of 8; 8 val images
    vpl_main("--data", str(data), *FOLDER_ARGS, "--epochs", "1", "--out", str(out))
    # "some": the first step whose batch holds a bad image ends the run; its count by hand, with torchvision's
    # ImageFolder order and the epoch's permutation (seed 0 + epoch 1)
    samples = torchvision.datasets.ImageFolder(str(data / "train")).samples
    bad = [os.path.relpath(path, data / "train") in ("bee/0.png", "ant/0.png", "bee/1.png", "ant/1.png")
           for path, _ in samples]
    order = torch.randperm(24, generator=torch.Generator().manual_seed(1)).tolist()
    step = next(s for s in range(1, 4) if any(bad[i] for i in order[8 * (s - 1):8 * s]))
    cases = {"some": ("train", 4, 3, f"{sum(bad[i] for i in order[:8 * step])} unreadable images this epoch (> 1%)"),
             "all-more-than-16-in-a-row": ("train", 24, 3, "8 unreadable images this epoch (> 1%)"),
             "all-of-val": ("val", 8, 2, "none of the 8 val images could be read")}
    for name, (split, count, code, message) in cases.items():
        shutil.copytree(data, tmp_path / name / "data")
        shutil.copytree(out, tmp_path / name / "out")
        write_image_folder(tmp_path / name / "data", 12,
                           corrupt=[(split, c, i) for i in range(12) for c in ("bee", "ant")][:count])
        result = vpl_main("--data", str(tmp_path / name / "data"), *FOLDER_ARGS, "--epochs", "2", "--resume",
                          "--out", str(tmp_path / name / "out"), check=False)
        assert (result.returncode, result.stderr.strip().splitlines()[-1]) == \
            (code, f"vpl: error: {message}: check --data"), (name, result.stderr[-2000:])
        assert "Traceback" not in result.stderr and "stopped at" not in result.stdout
        # images the run trained on as stand-ins, or an epoch it cannot evaluate: nothing of the epoch is kept
        for kept in ("last.pt", "log.jsonl"):
            assert (tmp_path / name / "out" / kept).read_bytes() == (out / kept).read_bytes(), (name, kept)


@pytest.fixture(scope="module")
def bad_input(tmp_path_factory, reference_run):  # a fixture: the unit tests' range checks may share its runs
    """Each bad input's vpl.main: (cases, {name: its run}, a copy of the reference run that none may touch)."""
    d = tmp_path_factory.mktemp("bad_input")
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
    write_image_folder(d / "two_classes", 16)  # 32 train images of 2 classes
    other = d / "other"
    shutil.copytree(reference_run[0], other)
    ckpt = torch.load(other / "last.pt", weights_only=True)
    (d / "foreign").mkdir()
    torch.save({"weight": torch.zeros(1)}, d / "foreign" / "last.pt")  # a readable file, but no vpl checkpoint
    (d / "tensor").mkdir()
    torch.save(torch.zeros(2), d / "tensor" / "last.pt")  # a readable file, but no dict
    (d / "a_file").write_text("hello")  # torch.load of it raises
    (d / "two_processes").mkdir()  # as if made by torchrun with 2 processes of 16 images
    torch.save({**ckpt, "made": {**ckpt["made"], "world": 2}}, d / "two_processes" / "last.pt")
    cases = {  # name: (what its one line must say, so it fails for its own reason; the flags)
        "missing path": ("nowhere: no such folder", ["--data", str(d / "nowhere")]),
        "data is a file": ("a_file: no such folder", ["--data", str(d / "a_file")]),
        "no val split": ("no_val: no 'val' folder", ["--data", str(d / "no_val")]),
        "no class folders": ("no_classes: train: Couldn't find any class folder", ["--data", str(d / "no_classes")]),
        "one class": ("one_class: train has 1 class folder, a classifier needs 2", ["--data", str(d / "one_class")]),
        "a class without images": ("val: Found no valid file for the classes bee", ["--data", str(d / "no_images")]),
        "val classes differ": ("the class folders of train and val differ", ["--data", str(d / "mismatch")]),
        "pair weight": ("--pair-weight must be in [0, 1], got 1.5", ["--pair-weight", "1.5"]),
        "stages": ("--stages must satisfy 0 <= S1 <= S2 <= 1", ["--stages", "0.9,0.1"]),
        "stages not two numbers": ("--stages must be two fractions", ["--stages", "0.5"]),
        "temperature": ("--pair-temp must be ", ["--pair-temp", "0"]),
        "infinite temperature": ("--pair-temp must be a finite number", ["--pair-temp", "inf"]),
        "teacher": ("invalid choice: 'both'", ["--teacher", "both"]),
        "batch size": ("--batch-size must be in [1, inf], got 0", ["--batch-size", "0"]),
        "accumulation": ("--accum-steps must be in [1, inf], got 0", ["--accum-steps", "0"]),
        "unknown preset": ("invalid choice: 'huge'", ["--preset", "huge"]),
        "unknown flag": ("unrecognized arguments: --epoch", ["--epoch", "3"]),
        "not a number": ("invalid int value: 'two'", ["--epochs", "two"]),
        "ema of 1": ("--ema must be in [0, 0.999999], got 1.0", ["--ema", "1"]),
        "drop-path of 1": ("--drop-path must be in [0, 0.999], got 1.0", ["--drop-path", "1"]),
        "negative lr": ("--lr-vit must be in [0, inf], got -1.0", ["--lr-vit", "-1"]),
        "unknown device": ("invalid choice: 'tpu'", ["--device", "tpu"]),
        "randaug beyond its scale": ("--randaug must be in [0, 10], got 11", ["--randaug", "11"]),
        "lr of NaN": ("--lr-vit must be a finite number", ["--lr-vit", "nan"]),
        "warm-up of NaN": ("--warmup-epochs must be a finite number", ["--warmup-epochs", "nan"]),
        "seed beyond 32 bits": ("--seed must be in [0, 4294967295]", ["--seed", "99999999999999999999"]),
        "no val images": ("--demo-val must be in [1, inf], got 0", ["--demo-val", "0"]),
        "negative train images": ("--demo-train must be in [1, inf], got -5", ["--demo-train", "-5"]),
        "size not a multiple of the patch": ("--img-size 30 must be a multiple of the ViT's patch size (4)",
                                             ["--img-size", "30"]),
        "no cuda": ("--device cuda: no CUDA device is available" if not torch.cuda.is_available() else
                    "--epochs must be in [1, inf], got -1",
                    ["--device", "cuda"] if not torch.cuda.is_available() else ["--epochs", "-1"]),
        "train split below one batch": ("the train split (16 images) is smaller than one global batch (32)",
                                        ["--demo-train", "16"]),
        "init from a file that is no checkpoint": ("vpl.py: not a readable checkpoint", ["--init-vit", VPL]),
        "init from a text file": ("a_file: not a readable checkpoint", ["--init-vit", str(d / "a_file")]),
        "init from a tensor": ("holds a Tensor, not a dict of weights", ["--init-cnn", str(d / "tensor" / "last.pt")]),
        "init from nowhere": ("nowhere.pt: no such checkpoint", ["--init-cnn", str(d / "nowhere.pt")]),
        "init a CNN from a ViT": (f"--init-cnn {other / 'vit.pt'}: weights do not fit the branch",
                                  ["--init-cnn", str(other / "vit.pt")]),
        "init a ViT from a ResNet": (f"--init-vit {other / 'cnn.pt'}: weights do not fit the branch",
                                     ["--init-vit", str(other / "cnn.pt")]),
        "out is a file": ("cannot make that folder", ["--out", str(d / "a_file")]),
        "fresh run over a checkpoint": (f"{other / 'last.pt'} exists: pass --resume", ["--out", str(other)]),
        "eval-only without checkpoint": ("last.pt: no checkpoint to evaluate", ["--eval-only", "--out", str(d / "empty")]),
        "resume a foreign checkpoint": ("foreign/last.pt: not a checkpoint of vpl.py",
                                        ["--resume", "--out", str(d / "foreign")]),
        "resume a tensor": ("holds a Tensor", ["--resume", "--out", str(d / "tensor")]),
        "resume other models": ("made with cnn resnet_tiny, not vit_tiny",
                                ["--resume", "--out", str(other), "--cnn", "vit_tiny"]),
        "resume at another size": ("made with img size 32, not 64",
                                   ["--resume", "--out", str(other), "--img-size", "64"]),
        "evaluate at another size": ("made with img size 32, not 64",
                                     ["--eval-only", "--out", str(other), "--img-size", "64"]),
        "resume on other classes": ("made with classes 10, not 2", ["--data", str(d / "two_classes"),
                                    "--preset", "demo", "--resume", "--out", str(other)]),
        "resume another global batch": ("made with global batch 32, not 16",
                                        ["--resume", "--out", str(other), "--batch-size", "16"]),
        "resume with another data order": ("made with repeat aug 1, not 2",
                                           ["--resume", "--out", str(other), "--repeat-aug", "2"]),
        "resume with another seed": ("made with seed 0, not 3", ["--resume", "--out", str(other), "--seed", "3"]),
        "resume on fewer demo images": ("made with train images 384, not 200",
                                        ["--resume", "--out", str(other), "--demo-train", "200"]),
        "resume in another number of processes": ("made with world 2, not 1",
                                                  ["--resume", "--out", str(d / "two_processes")]),
        "resume with fewer epochs": ("last.pt has trained 24 steps, more than --epochs 1 hold (12)",
                                     ["--resume", "--out", str(other), "--epochs", "1"]),
        "resume past --max-steps": ("last.pt has trained 24 steps, reaching --max-steps 5",
                                    ["--resume", "--out", str(other), "--max-steps", "5"]),
    }
    # each after TINY and --max-steps 1, so that a check that let its case through costs one tiny step, and in
    # a --out of its own, so that such a step does not change the next case
    runs = {name: vpl_main(*TINY, "--max-steps", "1", *args,
                           *([] if "--out" in args else ["--out", str(d / "outs" / str(i))]), check=False)
            for i, (name, (_, args)) in enumerate(cases.items())}
    return cases, runs, other


def test_bad_input_gives_one_line_and_exit_code_2(bad_input, reference_run):
    cases, runs, other = bad_input
    failures = []  # all of them, not the first only
    for name, (message, _) in cases.items():
        lines = [line for line in runs[name].stderr.splitlines() if line.strip()]
        if not (runs[name].returncode == 2 and len(lines) == 1 and lines[0].startswith("vpl: error: ")
                and message in lines[0]):
            failures.append((name, runs[name].returncode, runs[name].stderr[-1000:]))
    assert failures == []
    assert (other / "last.pt").read_bytes() == open(os.path.join(reference_run[0], "last.pt"), "rb").read()
    assert read_log(str(other)) == read_log(reference_run[0])


@pytest.mark.parametrize("poisoned,terms", [
    ("vit", "vit_ce, vit_kd, cnn_kd"),  # the ViT's logits, and through them the CNN's teacher
    ("vit,cnn,pair", "vit_ce, vit_kd, cnn_ce, cnn_kd, pair_ce")])  # every term, each named
def test_a_nonfinite_loss_stops_naming_its_terms_and_keeps_the_checkpoint(reference_run, tmp_path, monkeypatch,
                                                                           poisoned, terms):
    out = str(tmp_path / "run")
    shutil.copytree(reference_run[0], out)
    before = {name: open(os.path.join(out, name), "rb").read() for name in os.listdir(out)}
    forward, calls = vpl.PairLoss.forward, []

    def nan_on_second_call(self, outputs, target, a):  # the second step after the resume, step 26
        calls.append(1)
        if len(calls) == 2:
            outputs = {k: v * float("nan") if k in poisoned.split(",") else v for k, v in outputs.items()}
        return forward(self, outputs, target, a)
    monkeypatch.setattr(vpl.PairLoss, "forward", nan_on_second_call)
    result = vpl_main(*TINY, "--out", out, "--resume", "--epochs", "3", check=False)
    assert result.returncode == 3 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (f"vpl: error: non-finite loss ({terms}) by step 26: lower the "
                                                      "lr, or use --amp bf16 or --clip-grad, then --resume")
    assert "stopped at" not in result.stdout and "| step 27/" not in result.stdout
    assert {name: open(os.path.join(out, name), "rb").read() for name in os.listdir(out)} == before


def test_a_failed_log_write_is_one_line_keeps_the_previous_checkpoint_and_gives_the_signal_handlers_back(
        tmp_path, monkeypatch):
    out = str(tmp_path)
    appends = []

    def disk_full_at_the_second_record(name, mode="r", *args, **kwargs):  # vpl's open: a disk that fills up
        if str(name).endswith("log.jsonl") and mode == "a":
            appends.append(1)
            if len(appends) == 2:
                raise OSError(28, "No space left on device")
        return builtins.open(name, mode, *args, **kwargs)
    monkeypatch.setattr(vpl, "open", disk_full_at_the_second_record, raising=False)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    result = vpl_main("--demo-train", "64", "--demo-val", "8", "--batch-size", "32", "--epochs", "2", "--workers", "0",
                      "--out", out, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"vpl: error: cannot write {out}/log.jsonl (No space left on device)"]
    assert checkpoint(out)["step"] == 2 and [h["epoch"] for h in read_log(out)] == [0]  # the first epoch's
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers


def test_mixup_rarely_pairs_an_image_with_its_repeated_copy(tmp_path, monkeypatch):
    # MixUp pairs neighbours in the batch, and on one process --repeat-aug's copies are neighbours: a target
    # of one class would then be the rule (lam * y + (1 - lam) * y), not the chance of two images sharing one
    forward, targets = vpl.PairLoss.forward, []

    def recording(self, outputs, target, a):
        targets.append(target)
        return forward(self, outputs, target, a)
    monkeypatch.setattr(vpl.PairLoss, "forward", recording)
    vpl_main(*TINY, "--repeat-aug", "3", "--mixup", "0.8", "--label-smoothing", "0", "--max-steps", "6",
             "--out", str(tmp_path))
    targets = torch.cat(targets)
    assert targets.shape == (6 * 32, 10)  # probabilities: every batch was mixed
    assert (targets.max(1).values > 0.999).float().mean().item() < 0.3  # 10 classes: ~0.1 by chance; paired, ~0.7


def test_a_crash_with_data_workers_ends_the_process(tmp_path):
    # the workers ignore SIGTERM (the main process handles a scheduler's): after a crash, the interpreter's
    # exit must still end them, not wait for them forever
    crashed = run_script(ON_CALL, "optimizer_step", "3", "0", "crash", *TINY, "--workers", "2", "--out",
                         str(tmp_path), timeout=120)
    assert crashed.returncode == 1 and "RuntimeError: a simulated crash" in crashed.stderr, crashed.stderr[-3000:]


def test_data_workers_ignore_a_foreign_sigterm_and_end_with_a_script_holding_them(tmp_path):
    # a SIGTERM from another process (a scheduler's) leaves the workers working, also where Python's default
    # start method is not fork; the interpreter's exit ends them
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


# vpl.main with torch.save patched: the writes of last.pt are counted over restarts in the file $WRITES; a
# write whose number is in $KILL_AT stops half way, notes what --out holds, and SIGKILLs its process (a
# preempted node)
KILL_MID_WRITE = f"""
import io, json, os, signal, sys, torch
sys.path.insert(0, {HERE!r})
import vpl
save, count = torch.save, os.environ["WRITES"]
def half_then_kill(obj, f):
    name = getattr(f, "name", "")
    if os.path.basename(name) == "last.pt.tmp":
        n = int(open(count).read()) + 1 if os.path.exists(count) else 1
        open(count, "w").write(str(n))
        if str(n) in os.environ["KILL_AT"].split(","):
            whole = io.BytesIO()
            save(obj, whole)
            f.write(whole.getvalue()[:len(whole.getvalue()) // 2])
            f.flush()
            last = os.path.join(os.path.dirname(name), "last.pt")
            step = torch.load(last, weights_only=True)["step"] if os.path.exists(last) else None
            json.dump({{"files": sorted(os.listdir(os.path.dirname(name))), "step": step}}, open(f"{{count}}.{{n}}", "w"))
            os.kill(os.getpid(), signal.SIGKILL)
    return save(obj, f)
torch.save = half_then_kill
vpl.main(sys.argv[1:])
"""


def test_torchrun_restarts_workers_killed_during_checkpoint_writes_and_the_run_ends_bit_identically(
        reference_run, tmp_path):
    # the first write of last.pt (after epoch 0, logged) is killed half way: no last.pt, so the restart starts
    # afresh, moving the log aside; its second write (after epoch 1, logged) is killed too: the restart resumes
    # from the first, drops the log's epoch 1 and ends as the uninterrupted run did
    out, writes, script = str(tmp_path / "run"), str(tmp_path / "writes"), tmp_path / "kill_mid_write.py"
    script.write_text(KILL_MID_WRITE)
    result = torchrun("--max-restarts=2", str(script), *TINY, "--out", out, "--resume", nproc=1,
                      env={"WRITES": writes, "KILL_AT": "1,3"})
    assert open(writes).read() == "4"
    first, second = (json.load(open(f"{writes}.{n}")) for n in (1, 3))
    assert first == {"files": ["cnn.pt", "last.pt.tmp", "log.jsonl", "vit.pt"], "step": None}
    assert second["step"] == 12 and "last.pt.tmp" in second["files"]
    assert result.stdout.count("resumed from") == 1 and f"resumed from {out}/last.pt at step 12" in result.stdout
    assert not [name for name in os.listdir(out) if ".tmp" in name]
    assert_same_checkpoint(out, reference_run[0])
    assert_same_log(out, reference_run[0])
    # the killed first attempt's log, moved aside by the fresh start: its epoch 0 is the reference's
    assert [without(h, TIMINGS) for h in read_log(out, "log.jsonl.old")] == \
        [without(read_log(reference_run[0])[0], TIMINGS)]


# ------------------------------------------------------------------------------------------- bench
def test_bench_prints_every_figure(capsys, tmp_path):
    with torch.random.fork_rng(devices=[]):
        vpl.main(["--bench", "--batch-size", "4"])
    printed = capsys.readouterr().out
    rows = {m[0]: [float(v) for v in m[1:]] for m in re.findall(
        r"^ *(ViT|CNN|pair): +([\d.e+]+) img/s \(spread ([\d.e+]+)-([\d.e+]+)\), ([\d.e+-]+) GFLOP/img", printed, re.M)}
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
    assert re.search(r"^pair overhead vs ViT \+ CNN alone: [+-]\d+\.\d%$", printed, re.M), printed
    write_image_folder(tmp_path, 12)  # with --data, the input pipeline alone too
    with torch.random.fork_rng(devices=[]):
        vpl.main(["--bench", "--data", str(tmp_path), *FOLDER_ARGS, "--batch-size", "4"])
    assert re.search(r"^input pipeline: [\d.]+ img/s, 0 workers$", capsys.readouterr().out, re.M)
