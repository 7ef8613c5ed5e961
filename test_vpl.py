"""Promises vpl.py keeps, one per test. CPU only, tiny configurations, nothing downloaded.
Run: python -m pytest -q test_vpl.py"""
import argparse  # noqa: F401  (imports the unit tests below share)
import builtins
import collections  # noqa: F401
import contextlib
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
import urllib.error
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
# A tiny demo run: 10 classes, 12 steps per epoch, 2 epochs, the three stages all visited.
TINY = ["--demo-classes", "10", "--demo-train", "384", "--demo-val", "100", "--batch-size", "32", "--epochs", "2",
        "--workers", "0", "--log-every", "1", "--stages", "0.25,0.75", "--ramp", "0.1"]
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
    """Every part of the two last.pt bit for bit: weights, optimizers, scaler, EMA, step, every rank's RNG
    state, what it was made with; all but the config, whose --resume and --max-steps differ, and the epoch
    records, which hold timings: those must be the records of its log.jsonl (assert_same_log compares them)."""
    a, b = checkpoint(out), checkpoint(reference)
    assert a["history"] == read_log(out)
    assert_same(*({k: v for k, v in c.items() if k not in ("config", "history")} for c in (a, b)))


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


def test_demo_train_labels_are_redrawn_at_their_share_and_val_labels_stay_true():
    for classes in (10, 20):  # 20: the default
        images, labels = vpl.make_demo(2500, 0, 32, classes)
        assert labels.unique().tolist() == list(range(classes))
        for noise in (0.0, 0.3):
            flags = ["--demo-train", "2000", "--demo-val", "500", "--demo-noise", str(noise)]
            flags += ["--demo-classes", "10"] if classes == 10 else []
            train, val, k = vpl.build_datasets(vpl.parse_config(flags))
            assert k == classes and torch.equal(train.base.tensors[0], images[:2000])
            assert torch.equal(val.base.tensors[1], labels[2000:])
            assert train.base.tensors[1].unique().tolist() == list(range(classes))  # redrawn among all classes
            wrong = (train.base.tensors[1] != labels[:2000]).float().mean().item()
            assert abs(wrong - noise * (1 - 1 / classes)) < 0.03  # a redrawn label is the true one 1 time in k


def test_run_logs_every_field_and_draws_the_chart(reference_run):
    out, stdout = reference_run
    log = read_log(out)
    assert [h["epoch"] for h in log] == [0, 1]
    keys = {"epoch", "stage", "pair_weight", "world_size", "val_images", "bad_images", *TIMINGS}
    keys |= {f"val_{m}_top{k}" for m in ("vit", "cnn", "pair", "ens") for k in (1, 5)}
    keys |= {f"train_{t}" for t in ("total", "vit_ce", "vit_kd", "vit_taught", "cnn_ce", "cnn_kd", "cnn_taught", "pair_ce")}
    assert all(h.keys() == keys for h in log), log  # no val_bad_images: every image was read
    assert log[0]["val_images"] == 100 and log[0]["world_size"] == 1 and log[0]["bad_images"] == 0
    # stages 0.25,0.75 of 24 steps, ramp 0.1: each record has its epoch's last step's stage and pair weight
    assert [(h["stage"], h["pair_weight"]) for h in log] == [(2, pytest.approx(0.5)), (3, 0.0)]
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
                            "repeat_aug": 1, "train_images": 384, "global_batch": 32, "world": 1, "demo_val": 100, "demo_noise": 0.15}
    assert ckpt["step"] == 24 and len(ckpt["rng"]) == 1 and "ema" not in ckpt


def test_a_stop_asked_at_the_last_step_ends_the_run_as_usual(tmp_path):
    # the run is done: the end's report and the EMA's exports follow, not "continue with --resume"
    with on_call(vpl, "optimizer_step", 24):
        result = vpl_main(*TINY, "--ema", "0.9", "--out", str(tmp_path))
    assert "stopped at" not in result.stdout and "best val top-1" in result.stdout
    assert checkpoint(str(tmp_path))["step"] == 24 and [h["epoch"] for h in read_log(str(tmp_path))] == [0, 1]
    assert os.path.exists(tmp_path / "vit_ema.pt") and os.path.exists(tmp_path / "cnn_ema.pt")


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
    # the chart and the best accuracies cover the epoch before the resume too: last.pt holds its record
    def chart_and_best(stdout):  # what follows the last epoch's line, but for the output folder
        return stdout[stdout.index("\n", stdout.rindex("| img_per_s")):].split("; weights in")[0]
    assert "epoch (last digit)" in chart_and_best(resumed.stdout)
    assert chart_and_best(resumed.stdout) == chart_and_best(reference_run[1])


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
    vpl_main(*TINY, "--demo-train", "192", "--demo-val", "20", "--demo-noise", "0", "--batch-size", "16", "--accum-steps",
             "2", "--out", out)  # the labels as make_demo draws them

    def lr(step, peak, final):
        if step < 6:
            return peak * (step + 1) / 6
        return final + (peak - final) * 0.5 * (1 + math.cos(math.pi * (step - 6) / 6))

    def pair_weight(step):  # stages 0.25,0.75 of 12 steps, ramp 0.1, --pair-weight 0.5
        return 0.5 * min(1.0, (step / 12 - 0.25) / 0.1) if 0.25 <= step / 12 < 0.75 else 0.0
    assert len(steps) == 12 and len(criterion) == 24
    for step, (vit, head, cnn) in enumerate(steps):
        assert vit + head == pytest.approx([lr(step, 4e-3 * 32 / 512, 1e-5)] * (len(vit) + len(head)))
        assert cnn == pytest.approx([lr(step, 2.0 * 32 / 1024, 0.0)] * len(cnn))
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


def test_a_resume_may_add_an_ema_keep_its_decay_without_the_flag_change_weight_decay_and_start_fp16s_scaler_afresh(
        reference_run, tmp_path):
    # fp32's scaler state is empty (scale 1): loaded into an fp16 run, small fp16 gradients would flush to zero
    out = str(tmp_path / "run")
    shutil.copytree(reference_run[0], out)  # made with --amp off, without EMA
    vpl_main(*TINY, "--out", out, "--resume", "--epochs", "3", "--max-steps", "25", "--ema", "0.5", "--amp", "fp16",
             "--wd-vit", "0.3", "--wd-cnn", "0.001")
    resumed, after = model_state(reference_run[0]), checkpoint(out)
    assert after["step"] == 25 and after["scaler"]["scale"] >= 2.0 ** 10
    for key, ema in after["ema"].items():  # one step of decay 0.5: halfway from the resumed to the new weights
        if ema.is_floating_point():
            assert torch.allclose(ema, (resumed[key] + after["model"][key]) / 2, atol=1e-6), key
    for name, decay in (("opt_vit", 0.3), ("opt_pair", 0.3), ("opt_cnn", 0.001)):  # the new flags, the old moments
        assert [g["weight_decay"] for g in after[name]["param_groups"]] == [decay, 0.0], name
    assert after["opt_vit"]["state"][0]["step"] == 25
    for steps in (26, 27):  # each resume without --ema goes on with the checkpoint's decay
        before = checkpoint(out)
        vpl_main(*TINY, "--out", out, "--resume", "--epochs", "3", "--max-steps", str(steps), "--amp", "fp16")
        last = checkpoint(out)
        for key, ema in last["ema"].items():
            if ema.is_floating_point():
                assert torch.allclose(ema, (before["ema"][key] + last["model"][key]) / 2, atol=1e-6), key


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


def test_a_run_starts_its_branches_from_the_init_files_and_a_resume_does_not_read_them_again(reference_run, tmp_path):
    ref = reference_run[0]  # at lr 0 a step leaves every weight where it started (BatchNorm's statistics move)
    # the ViT from its export, the CNN from the pair in a vpl last.pt
    out, init_vit = str(tmp_path / "run"), str(tmp_path / "init_vit.pt")
    shutil.copy(os.path.join(ref, "vit.pt"), init_vit)
    args = [*TINY, "--init-vit", init_vit, "--init-cnn", os.path.join(ref, "last.pt"), "--lr-vit", "0",
            "--lr-cnn", "0", "--out", out]
    vpl_main(*args, "--max-steps", "1")
    state = model_state(out)
    os.remove(init_vit)  # a resumed run has its weights in last.pt: the init files are not read again
    vpl_main(*args, "--max-steps", "2", "--resume")
    assert checkpoint(out)["step"] == 2
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
    printed = vpl_main(*args, "--accum-steps", "4", "--out", one).stdout  # a ViT partner gets AdamW and its lr
    assert re.search(r"lr: vit_tiny \S+ \(AdamW, 0.04 per 512\), vit_tiny \S+ \(AdamW, 0.04 per 512\)", printed)
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
        "val classes differ": ("the class folders of train and val differ (only in train: ['bee'], only in val: "
                               "['wasp'])", ["--data", str(d / "mismatch")]),
        "pair weight": ("--pair-weight must be in [0, 1], got 1.5", ["--pair-weight", "1.5"]),
        "stages": ("--stages must satisfy 0 <= S1 <= S2 <= 1", ["--stages", "0.9,0.1"]),
        "stages not two numbers": ("--stages must be two fractions", ["--stages", "0.5"]),
        "temperature": ("--pair-temp must be ", ["--pair-temp", "0"]),
        "infinite temperature": ("--pair-temp must be a finite number", ["--pair-temp", "inf"]),
        "teacher": ("invalid choice: 'both'", ["--teacher", "both"]),
        "batch size": ("--batch-size must be in [2, inf], got 1", ["--batch-size", "1"]),  # BatchNorm needs 2
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
        "one demo class": ("--demo-classes must be in [2, inf], got 1", ["--demo-classes", "1"]),
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
        "init torchvision on other models": ("--init torchvision holds a ViT-B/16 and a ResNet-50: it needs --vit "
                                             "vit_b_16 --cnn resnet50", ["--init", "torchvision"]),
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
        "evaluate the demo of another seed": ("made with seed 0, not 3",  # another seed draws other classes
                                              ["--eval-only", "--out", str(other), "--seed", "3"]),
        "resume on fewer demo images": ("made with train images 384, not 200",
                                        ["--resume", "--out", str(other), "--demo-train", "200"]),
        "resume on more demo classes": ("made with classes 10, not 20",
                                        ["--resume", "--out", str(other), "--demo-classes", "20"]),
        "resume on other demo labels": ("made with demo noise 0.15, not 0.3",
                                        ["--resume", "--out", str(other), "--demo-noise", "0.3"]),
        "resume on another demo val split": ("made with demo val 100, not 50",  # it redraws the train images
                                             ["--resume", "--out", str(other), "--demo-val", "50"]),
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


def test_init_torchvision_without_network_is_one_line(tmp_path, monkeypatch):
    def offline(**kwargs):  # what torch.hub raises on a compute node without network
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torchvision.models, "vit_b_16", offline)
    result = vpl_main(*TINY, "--vit", "vit_b_16", "--cnn", "resnet50", "--init", "torchvision", "--out",
                      str(tmp_path), check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == ("vpl: error: --init torchvision: cannot download the weights (<urlopen error "
                                     "no network>); download them once where there is network (into $TORCH_HOME)")


@pytest.mark.parametrize("poisoned,terms", [
    ("vit", "vit_ce, vit_kd"),  # the ViT's logits; its teacher, the pair head, reads detached features
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
    # afresh, writing over the log; its second write (after epoch 1, logged) is killed too: the restart resumes
    # from the first, drops the log's epoch 1 and ends as the uninterrupted run did
    out, writes, script = str(tmp_path / "run"), str(tmp_path / "writes"), tmp_path / "kill_mid_write.py"
    script.write_text(KILL_MID_WRITE)
    result = torchrun("--max-restarts=2", str(script), *TINY, "--out", out, "--resume", nproc=1,
                      env={"WRITES": writes, "KILL_AT": "1,3", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})
    assert open(writes).read() == "4"
    first, second = (json.load(open(f"{writes}.{n}")) for n in (1, 3))
    assert first == {"files": ["cnn.pt", "last.pt.tmp", "log.jsonl", "vit.pt"], "step": None}
    assert second["step"] == 12 and "last.pt.tmp" in second["files"]
    assert result.stdout.count("resumed from") == 1 and f"resumed from {out}/last.pt at step 12" in result.stdout
    assert not [name for name in os.listdir(out) if ".tmp" in name]
    assert_same_checkpoint(out, reference_run[0])
    assert_same_log(out, reference_run[0])  # the fresh start wrote over the killed attempt's log


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


# ------------------------------------------------------------------------------------ the branches
def quick(make, **kwargs):
    """make(**kwargs) with nn.init.trunc_normal_ drawing a plain normal: on the CPU the truncated one takes seconds
    for ViT-B's 86M weights. For tests that count the weights or load others over them."""
    trunc_normal = nn.init.trunc_normal_
    nn.init.trunc_normal_ = lambda tensor, mean=0.0, std=1.0, a=-2.0, b=2.0, generator=None: nn.init.normal_(tensor, mean, std)
    try:
        return make(**kwargs)
    finally:
        nn.init.trunc_normal_ = trunc_normal


def on_meta(make, **kwargs):  # shapes without weights: torchvision's models, at no cost
    with torch.device("meta"):
        return make(**kwargs)


def test_parameter_counts_equal_torchvision():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(quick(vpl.vit_b_16)) == count(on_meta(torchvision.models.vit_b_16)) == 86_567_656
    assert count(vpl.resnet50()) == count(on_meta(torchvision.models.resnet50)) == 25_557_032


def test_vit_parameter_names_are_timm_and_deit_names():
    names = set(quick(vpl.vit_b_16).state_dict())
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
        expected = reference(x)
        assert (ours.eval()(x) - expected).abs().max() < 1e-4
        # channels_last gives the same logits up to float rounding (other kernels, other summation order)
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
    ours = quick(vpl.vit_b_16)
    ours.load_state_dict(vpl.vit_from_torchvision(reference.state_dict()), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = reference(x)
        assert (ours.eval()(x) - expected).abs().max() < 1e-5 * expected.abs().max()
    assert_same(vpl.vit_to_torchvision(ours.state_dict()), reference.state_dict())  # and back, every name and weight


def test_position_embedding_resize_keeps_cls_and_the_grids_function():
    torch.manual_seed(0)  # a narrow ViT at DeiT's sizes: trained at 224 px (14 x 14 patches), fine-tuned at 384 (24 x 24)
    base = vpl.ViT(img_size=224, patch_size=16, dim=32, depth=1, heads=2)
    big = vpl.ViT(img_size=384, patch_size=16, dim=32, depth=1, heads=2)
    vpl.load_branch_weights(big, base.state_dict())  # resized on the way in
    assert big.pos_embed.shape == (1, 1 + 24 * 24, 32)
    assert torch.equal(big.pos_embed[:, 0], base.pos_embed[:, 0])
    assert torch.equal(big.pos_embed, vpl.resize_pos_embed(base.pos_embed, 24))
    assert_same({k: v for k, v in big.state_dict().items() if k != "pos_embed"},
                {k: v for k, v in base.state_dict().items() if k != "pos_embed"})  # the rest as it was
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
    target = quick(vpl.vit_b_16, num_classes=5, img_size=256)
    head_before = target.head.weight.clone()
    vpl.load_branch_weights(target, {"model": source.state_dict()})  # DeiT nests weights under "model"
    assert torch.equal(target.blocks[3].attn.qkv.weight, source.encoder.layers[3].self_attention.in_proj_weight)
    assert torch.equal(target.head.weight, head_before)  # 1000 -> 5 classes: the head starts afresh
    assert torch.equal(target.pos_embed, vpl.resize_pos_embed(source.encoder.pos_embedding, 16))  # 14 -> 16 patches
    # the MLP's older names, which torchvision itself still reads (files saved before torchvision renamed them)
    old = {k.replace("mlp.0", "mlp.linear_1").replace("mlp.3", "mlp.linear_2"): v for k, v in source.state_dict().items()}
    on_meta(torchvision.models.vit_b_16).load_state_dict(old, strict=True, assign=True)
    fresh = quick(vpl.vit_b_16)
    vpl.load_branch_weights(fresh, old)
    assert torch.equal(fresh.blocks[5].mlp.fc2.weight, source.encoder.layers[5].mlp[3].weight)
    # a checkpoint of DeiT's, timm's or torchvision's trainers also holds their argparse arguments
    small = vpl.vit_tiny()
    torch.save({"model": small.state_dict(), "args": argparse.Namespace(lr=5e-4, model="deit")}, tmp_path / "deit.pth")
    copy = vpl.vit_tiny(drop_path=0.0)
    vpl.load_branch_weights(copy, vpl.load_checkpoint(str(tmp_path / "deit.pth")))
    assert_same(copy.state_dict(), small.state_dict())
    cnn = vpl.resnet50(num_classes=5)
    reference = torchvision.models.resnet50()
    vpl.load_branch_weights(cnn, reference.state_dict())
    assert torch.equal(cnn.layer3[2].conv2.weight, reference.layer3[2].conv2.weight) and cnn.fc.out_features == 5
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


def test_weights_of_another_architecture_are_refused_in_one_line(tmp_path):
    with pytest.raises(vpl.UserError, match="weights do not fit the branch"):  # same names, other shapes
        vpl.load_branch_weights(vpl.resnet50(num_classes=5), vpl.resnet_tiny().state_dict())
    with pytest.raises(vpl.UserError, match=r"unexpected \['layer3\.6"):  # a ResNet-101 holds every ResNet-50 key
        vpl.load_branch_weights(vpl.resnet50(), torchvision.models.resnet101().state_dict())
    with pytest.raises(vpl.UserError, match="weights do not fit the branch"):  # another width
        vpl.load_branch_weights(quick(vpl.vit_b_16), vpl.vit_tiny(img_size=224).state_dict())
    with pytest.raises(vpl.UserError, match="weights do not fit the branch"):  # a CNN's weights given to the ViT
        vpl.load_branch_weights(vpl.vit_tiny(), vpl.resnet_tiny().state_dict())
    distilled = {**vpl.vit_tiny().state_dict(), "dist_token": torch.zeros(1, 1, 128)}  # DeiT's distilled ViT:
    distilled["pos_embed"] = torch.zeros(1, 2 + 64, 128)  # two tokens before the 8 x 8 grid
    with pytest.raises(vpl.UserError, match="weights do not fit the branch .*not 1 \\+ a square grid"):
        vpl.load_branch_weights(vpl.vit_tiny(), distilled)
    torch.save(vpl.resnet_tiny().state_dict(), tmp_path / "cnn.pt")
    with pytest.raises(vpl.UserError, match=f"^--init-vit {re.escape(str(tmp_path))}/cnn.pt: weights do not fit"):
        vpl.load_initial_weights(vpl.Config(init_vit=str(tmp_path / "cnn.pt")),
                                 vpl.PairModel(vpl.vit_tiny(), vpl.resnet_tiny(), 10))


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
        features = copied.forward_features(x)
        assert torch.equal(copied.forward_head(features, pre_logits=True),
                           original.forward_head(original.forward_features(x), pre_logits=True))
    if name == "ViT":  # the copy can take weights made at another image size
        assert torch.equal(namespace["resize_pos_embed"](copied.pos_embed, 12), vpl.resize_pos_embed(original.pos_embed, 12))


def test_the_pair_loss_and_schedule_work_copied_alone_with_only_torch_imported():
    namespace = {"math": math, "torch": torch, "nn": nn, "F": F}
    for part in ("kd_loss", "teacher_is_better", "PairLoss", "PairSchedule"):
        exec(inspect.getsource(getattr(vpl, part)), namespace)
    out = {k: torch.randn(4, 10) for k in ("vit", "cnn", "pair")}
    target = torch.randint(10, (4,))
    copied = namespace["PairLoss"](2.0, "pair", 0.1)(out, target, 0.3)
    original = vpl.PairLoss(2.0, "pair", 0.1)(out, target, 0.3)
    assert_same(copied, original)
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


def test_forward_is_features_then_head_as_timms():
    # timm's contract: forward_features gives every token after the final norm (ViT) or the last feature map
    # (CNN); forward_head pools (cls token, average) and classifies; pre_logits=True gives the pooled feature
    torch.manual_seed(0)
    vit, cnn = vpl.vit_tiny().eval(), vpl.resnet_tiny().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens, fmap = vit.forward_features(x), cnn.forward_features(x)
        assert tokens.shape == (2, 1 + 8 * 8, vit.num_features) and vit.num_features == 128
        assert fmap.shape == (2, cnn.num_features, 2, 2) and cnn.num_features == 256  # 32 x width 8; 32 px / 16
        normed = (tokens - vit.norm.bias) / vit.norm.weight  # every token, not only cls, went through the norm
        assert normed.mean(-1).abs().max() < 1e-4 and (normed.var(-1, unbiased=False) - 1).abs().max() < 1e-3
        for model, features, pooled in ((vit, tokens, tokens[:, 0]), (cnn, fmap, fmap.mean((2, 3)))):
            assert torch.equal(model.forward_head(features), model(x))
            assert torch.allclose(model.forward_head(features, pre_logits=True), pooled, atol=1e-6)
            assert model.forward_head(features, pre_logits=True).shape == (2, model.num_features)
        pair = vpl.PairModel(vit, cnn, 10).eval()  # the pair head reads the pooled features
        out = pair(x)
        expected = pair.pair_head(vit.forward_head(tokens, pre_logits=True), cnn.forward_head(fmap, pre_logits=True))
        assert torch.allclose(out["pair"], expected, atol=1e-5) and torch.allclose(out["cnn"], cnn(x), atol=1e-5)
        assert torch.equal(out["vit"], vit(x))



def test_the_pair_head_reads_timms_pre_logits_width_where_a_head_has_a_hidden_layer():
    # timm's models with a hidden head layer (MobileNetV3, say) give pre_logits of head_hidden_size, not num_features
    class HiddenHead(nn.Module):  # a stand-in of that contract: 6 features, a 12-wide hidden layer, 10 classes
        num_features, head_hidden_size = 6, 12

        def __init__(self):
            super().__init__()
            self.conv, self.hidden, self.fc = nn.Conv2d(3, 6, 3), nn.Linear(6, 12), nn.Linear(12, 10)

        def forward_features(self, x):
            return self.conv(x)

        def forward_head(self, x, pre_logits=False):
            x = self.hidden(x.mean((2, 3)))
            return x if pre_logits else self.fc(x)

    pair = vpl.PairModel(vpl.vit_tiny(), HiddenHead(), 10)
    assert pair.pair_head.fc.in_features == 128 + 12
    assert pair(torch.randn(2, 3, 32, 32))["pair"].shape == (2, 10)


# ------------------------------------------------------------------------------- pair learning
def softmax_by_hand(row, T=1.0):
    z = sum(math.exp(v / T) for v in row)
    return [math.exp(v / T) / z for v in row]


def kd_by_hand(student, teacher, T, weights=None):
    """T^2 * mean over samples of weight * sum_k p_t log(p_t / p_s), with plain Python floats."""
    total = 0.0
    for i, (s_row, t_row) in enumerate(zip(student, teacher)):
        kl = sum(p_t * math.log(p_t / p_s)
                 for p_s, p_t in zip(softmax_by_hand(s_row, T), softmax_by_hand(t_row, T)))
        total += kl * (1.0 if weights is None else weights[i])
    return T * T * total / len(student)


def better_by_hand(student, teacher, target):
    """1.0 for each sample where the teacher's softmax gives the target more mass than the student's."""
    mass = lambda row, y: sum(p * q for p, q in zip(softmax_by_hand(row), y))  # noqa: E731
    return [float(mass(t, y) > mass(s, y)) for s, t, y in zip(student, teacher, target)]


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_kd_loss_matches_hand_computation(T):
    student, teacher = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]], [[0.5, 2.5, 0.0], [1.0, 1.0, 1.0]]
    got = vpl.kd_loss(torch.tensor(student), torch.tensor(teacher), T).item()
    assert got == pytest.approx(kd_by_hand(student, teacher, T), rel=1e-5)
    assert vpl.kd_loss(torch.tensor(student), torch.tensor(student), T).item() == pytest.approx(0.0, abs=1e-7)
    weighted = vpl.kd_loss(torch.tensor(student), torch.tensor(teacher), T, torch.tensor([0.0, 1.0])).item()
    assert weighted == pytest.approx(kd_by_hand(student, teacher, T, [0.0, 1.0]), rel=1e-5)


def test_a_teacher_is_better_where_it_gives_the_label_more_probability_for_hard_and_mixed_labels():
    torch.manual_seed(0)
    student, teacher = torch.randn(64, 5), torch.randn(64, 5)
    hard = torch.randint(5, (64,))
    mixed = 0.7 * F.one_hot(hard, 5) + 0.3 * F.one_hot(torch.randint(5, (64,)), 5)  # as MixUp makes
    for target in (hard, mixed):
        dense = F.one_hot(target, 5).tolist() if target.ndim == 1 else target.tolist()
        got = vpl.teacher_is_better(student, teacher, target)
        assert got.tolist() == better_by_hand(student.tolist(), teacher.tolist(), dense)
        assert 0 < got.sum() < 64  # random logits: either branch wins somewhere
    assert vpl.teacher_is_better(student, student, hard).sum() == 0  # a tie teaches nothing


def tiny_pair(drop_path=0.0):
    torch.manual_seed(0)
    return vpl.PairModel(vpl.vit_tiny(drop_path=drop_path), vpl.resnet_tiny(), 10).train()


def grads(loss, params):
    return [torch.zeros_like(p) if g is None else g
            for p, g in zip(params, torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True))]


def pair_backward(model, images, targets, a, amp_dtype=None, loss=None):
    """The loop's forward, loss and one backward, by hand: returns the total and every term."""
    with vpl.autocast(images.device, amp_dtype):
        out = model(images)
    total, terms = (loss or vpl.PairLoss())(out, targets, a)
    total.backward()
    return {"total": total.detach(), **{k: v.detach() for k, v in terms.items()}}


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
    total, t = vpl.PairLoss(2.0, teacher, 0.1, teach="always")(out, torch.randint(10, (8,)), a)
    own = {"vit": t["vit_ce"] + a * t["vit_kd"], "cnn": t["cnn_ce"] + a * t["cnn_kd"]}
    for branch in ("vit", "cnn"):
        params = list(getattr(pair, branch).parameters())
        for g_total, g_own in zip(grads(total, params), grads(own[branch], params)):
            assert torch.allclose(g_total, g_own, atol=1e-6)


@pytest.mark.parametrize("teacher", ["partner", "pair"])
@pytest.mark.parametrize("teach", ["better", "always", "ahead"])
def test_pair_loss_terms_and_total_match_hand_computation(teacher, teach):
    torch.manual_seed(0)
    out = {k: torch.randn(16, 10) for k in ("vit", "cnn", "pair")}
    target, a, T = torch.randint(10, (16,)), 0.3, 2.0
    total, terms = vpl.PairLoss(T, teacher, 0.1, teach)(out, target, a)
    by = {"vit": "cnn", "cnn": "vit"} if teacher == "partner" else {"vit": "pair", "cnn": "pair"}
    onehot = F.one_hot(target, 10).tolist()
    ce = {b: F.cross_entropy(out[b], target, label_smoothing=0.1, reduction="none").tolist()
          for b in ("vit", "cnn", "pair")}
    gates = {"always": lambda b: [1.0] * 16,
             "better": lambda b: better_by_hand(out[b].tolist(), out[by[b]].tolist(), onehot),
             "ahead": lambda b: [float(sum(ce[by[b]]) < sum(ce[b]))] * 16}  # the whole batch, or none of it
    taught = {b: gates[teach](b) for b in ("vit", "cnn")}
    if teach == "ahead" and teacher == "partner":  # of two partners, exactly one is ahead: it teaches
        assert sorted([sum(taught["vit"]), sum(taught["cnn"])]) == [0.0, 16.0]
    kd = {b: kd_by_hand(out[b].tolist(), out[by[b]].tolist(), T, taught[b]) for b in ("vit", "cnn")}
    for b in ("vit", "cnn"):
        assert terms[f"{b}_kd"].item() == pytest.approx(kd[b], rel=1e-5)
        assert terms[f"{b}_ce"].item() == pytest.approx(sum(ce[b]) / 16, rel=1e-5)
        assert terms[f"{b}_taught"].item() == pytest.approx(sum(taught[b]) / 16)
    assert teach != "better" or 0 < sum(taught["vit"]) < 16  # the gate both keeps and drops samples
    # per sample: CE + a g KD, g the gate; a sample not taught learns from its label alone
    by_hand = sum(c + a * g * kd_by_hand([s], [t], T)
                  for b in ("vit", "cnn")
                  for g, c, s, t in zip(taught[b], ce[b], out[b].tolist(), out[by[b]].tolist())) / 16
    by_hand += sum(ce["pair"]) / 16
    assert total.item() == pytest.approx(by_hand, rel=1e-5)


def test_lr_warms_up_linearly_then_follows_the_cosine_and_scales_with_the_global_batch():
    lr = lambda step: vpl.lr_at(step, 110, 10, 1.0, 0.1)  # noqa: E731  (110 steps, 10 of warm-up, peak 1, end 0.1)
    assert [lr(0), lr(4), lr(9)] == pytest.approx([0.1, 0.5, 1.0])
    assert [lr(10), lr(60), lr(110)] == pytest.approx([1.0, 0.55, 0.1])  # cosine: peak, halfway, end
    (_, peak_vit, end_vit), (_, peak_head, end_head), (_, peak_cnn, end_cnn) = vpl.build_optimizers(
        vpl.Config(), tiny_pair(), 2048, False)
    assert (peak_vit, end_vit, peak_cnn, end_cnn) == pytest.approx((4e-3 * 4, 1e-5, 2.0 * 2, 0.0))
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


def test_fp16_optimizer_step_clips_each_optimizers_true_gradient_to_its_own_norm_and_updates_the_scale_once():
    # AMP's recipe for several optimizers: unscale each, clip each, step each, update the scale once at the end
    torch.manual_seed(0)
    a, b = nn.Linear(4, 2), nn.Linear(4, 2)
    params, x = [*a.parameters(), *b.parameters()], torch.randn(3, 4) * 10
    optimizers = [torch.optim.SGD(m.parameters(), lr=1.0) for m in (a, b)]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    loss = a(x).sum() + 3 * b(x).sum()
    true = torch.autograd.grad(loss, params, retain_graph=True)
    before = [p.detach().clone() for p in params]
    scaler.scale(loss).backward()
    vpl.optimizer_step(optimizers, scaler, 1.0)
    norms = [torch.cat([g.flatten() for g in true[part]]).norm().item() for part in (slice(0, 2), slice(2, 4))]
    assert min(norms) > 1.0 and abs(norms[0] - norms[1]) > 1.0  # each is clipped, and by another factor
    for part, norm in zip((slice(0, 2), slice(2, 4)), norms):  # SGD at lr 1: p - g / |g|, by hand
        for p, p0, g in zip(params[part], before[part], true[part]):
            assert torch.allclose(p, p0 - g / norm, atol=1e-5)
    assert all(p.grad is None for p in params) and scaler.get_scale() == 2.0 ** 16
    # a non-finite gradient in the first: it is skipped, the second steps with its own true gradient (unclipped, so
    # that a scale updated before its step would show: twice the step), and the scale halves once, after the last step
    scaler.scale((a(x) * float("nan")).sum() + 3 * b(x).sum()).backward()
    true_b = torch.autograd.grad(3 * b(x).sum(), list(b.parameters()))
    before = [p.detach().clone() for p in params]
    vpl.optimizer_step(optimizers, scaler, 0.0)
    assert all(torch.equal(p, p0) for p, p0 in zip(params[:2], before[:2]))
    for p, p0, g in zip(b.parameters(), before[2:], true_b):
        assert torch.allclose(p, p0 - g, atol=1e-4)
    assert scaler.get_scale() == 2.0 ** 15


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
    assert ema.state_dict()["1.num_batches_tracked"].item() == 1


def test_stage_and_weight_at_exact_points():
    schedule = vpl.PairSchedule("0.1,0.8", pair_weight=0.5, ramp=0.05)
    expected = [(0.0, 1, 0.0), (0.1, 2, 0.0), (0.125, 2, 0.25), (0.15, 2, 0.5), (0.5, 2, 0.5), (0.8, 3, 0.0), (1.0, 3, 0.0)]
    for progress, stage, weight in expected:
        assert schedule(progress) == (stage, pytest.approx(weight)), progress
    no_ramp = vpl.PairSchedule("0.1,0.8", pair_weight=0.5, ramp=0.0)  # the full weight from S1 on
    assert [no_ramp(p) for p in (0.0999, 0.1, 0.7999, 0.8)] == [(1, 0.0), (2, 0.5), (2, 0.5), (3, 0.0)]


def test_the_pair_overfits_one_batch():
    # the smoke check of every trainer: with the three optimizers and the pair loss wired as in training,
    # 60 steps on one batch of 16 must drive every loss term to ~0 (measured: 0.008) and memorize every label.
    # KD at T = 1 on every sample, which two branches that both memorize can also drive to 0; SGD lr 0.8 per 1024
    torch.manual_seed(0)
    cfg = vpl.Config(drop_path=0.0, lr_cnn=0.8)
    pair = vpl.build_pair(cfg, 10)
    optimizers = [optimizer for optimizer, _, _ in vpl.build_optimizers(cfg, pair, 512, False)]
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    images, labels = vpl.make_demo(16, seed=3)
    images = (images.float() / 255 - 0.5) / 0.25
    for _ in range(60):
        terms = pair_backward(pair, images, labels, 0.2, loss=vpl.PairLoss(1.0, teach="always"))
        vpl.optimizer_step(optimizers, scaler, 0.0)
    assert all(value < 0.02 for name, value in terms.items() if not name.endswith("taught")), terms
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
    soft_ce = lambda z: -(soft * z.log_softmax(-1)).sum(-1).mean()  # noqa: E731
    assert vpl.PairLoss()(out, soft, 0.0)[0].item() == pytest.approx(sum(soft_ce(out[k]) for k in out).item(), rel=1e-6)


def test_at_pair_weight_zero_a_nan_vit_leaves_the_cnns_gradient_finite():
    pair, target = tiny_pair(), torch.randint(10, (4,))
    with torch.no_grad():
        pair.vit.head.weight.fill_(float("nan"))
    cnn = list(pair.cnn.parameters())
    for a, finite in ((0.0, True), (0.2, False)):  # with a > 0 the ViT teaches the CNN: NaN is passed on
        total, _ = vpl.PairLoss(teacher="partner")(pair(torch.randn(4, 3, 32, 32)), target, a)
        assert all(g.isfinite().all() for g in grads(total, cnn)) == finite, a


def test_at_pair_weight_zero_each_part_is_clipped_by_its_own_gradient_norm():
    # the ViT, the pair head and the CNN each clip their own gradient, so that at a = 0 each trains as it would alone
    cfg, clip = vpl.Config(drop_path=0.0), 0.05
    pair = tiny_pair()
    optimizers = [optimizer for optimizer, _, _ in vpl.build_optimizers(cfg, pair, 64, False)]
    parts = {"vit": list(pair.vit.parameters()), "pair_head": list(pair.pair_head.parameters()),
             "cnn": list(pair.cnn.parameters())}
    before = {name: [p.detach().clone() for p in params] for name, params in parts.items()}
    torch.manual_seed(1)
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(10, (8,))
    total, _ = vpl.PairLoss()(pair(images), labels, 0.0)
    g = {name: grads(total, params) for name, params in parts.items()}
    norm = {name: torch.cat([t.flatten() for t in g[name]]).norm().item() for name in parts}
    total.backward()
    vpl.optimizer_step(optimizers, torch.amp.GradScaler("cpu", enabled=False), clip)
    scale = {name: min(1.0, clip / n) for name, n in norm.items()}
    whole = clip / math.sqrt(sum(n ** 2 for n in norm.values()))  # one clip of all parts together would give this
    assert all(s < 1 and abs(s - whole) > 0.1 * whole for s in scale.values()), (scale, whole)
    for name in ("vit", "pair_head"):  # AdamW's first step is lr * sign(g) where |g| >> eps: its second moment shows g
        state = optimizers[0 if name == "vit" else 1].state
        for p, grad in zip(parts[name], g[name]):
            assert torch.allclose(state[p]["exp_avg_sq"], (1 - 0.999) * (scale[name] * grad) ** 2, rtol=1e-4, atol=1e-12)
    wd = {id(p): group["weight_decay"] for group in optimizers[2].param_groups for p in group["params"]}
    for p, p0, grad in zip(parts["cnn"], before["cnn"], g["cnn"]):  # SGD's first momentum buffer: g + wd * p
        assert torch.allclose(optimizers[2].state[p]["momentum_buffer"], scale["cnn"] * grad + wd[id(p)] * p0,
                              rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("progress", [0.0, 0.3, 0.9])
def test_every_parameter_gets_a_gradient_in_every_stage(progress):
    pair = tiny_pair(drop_path=0.1)
    _, a = vpl.PairSchedule("0.1,0.8", 0.5, 0.05)(progress)
    pair_backward(pair, torch.randn(8, 3, 32, 32), torch.randint(10, (8,)), a)
    missing = [n for n, p in pair.named_parameters() if p.grad is None]
    assert not missing  # so DDP never needs find_unused_parameters


@pytest.mark.parametrize("stages", ["0.9,0.1", "half", "0.5,1.5"])
def test_invalid_stages_raise_value_error_naming_the_flag(stages):
    with pytest.raises(ValueError, match="--stages"):
        vpl.PairSchedule(stages)


# ---------------------------------------------------------------------------------- data
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


def test_small_images_train_as_pad_and_crop_never_mirrored_for_the_demos_chiral_glyphs():
    train, val = vpl.build_transforms(vpl.Config(data="demo"), from_files=False)
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
    assert seen["shifted"] > 80 and seen["plain"] == 100  # a mirrored glyph would be another class's shape
    assert torch.allclose(val(image) * std + mean, image / 255, atol=1e-5)  # val: the image as it is


def test_each_draw_of_an_image_is_augmented_anew_and_the_same_draw_alike():
    train, _, _ = vpl.build_datasets(vpl.Config(demo_train=64, demo_val=8))
    assert all(torch.equal(train[0, i][0], train[0, i][0]) for i in range(64))  # a function of (draw, image)
    differ = sum(not torch.equal(train[0, i][0], train[1, i][0]) for i in range(64))
    assert differ >= 58  # 81 crop positions: the same crop twice by chance about 1 time in 81


def test_epoch_sampler_is_distributed_samplers_order_and_repeats_each_image_with_its_own_seeds():
    from torch.utils.data import DistributedSampler
    data = list(range(61))
    for rank in (0, 1):  # no repeats: torch's own sampler (shuffled, whole shares only)
        ours, torchs = vpl.EpochSampler(61, 2, rank, 5), DistributedSampler(data, 2, rank, True, 5, drop_last=True)
        ours.set_epoch(3), torchs.set_epoch(3)
        assert list(ours) == [(3, i) for i in torchs] and len(ours) == len(torchs) == 30
        whole = list(ours)
        ours.set_epoch(3, start=7)  # a resumed epoch: the same order, from its 8th sample on
        assert list(ours) == whole[7:] and len(ours) == 23
    shares = []
    for rank in (0, 1):  # 3 repeats: as many draws per rank, a third of the images, each 3 times
        sampler = vpl.EpochSampler(61, 2, rank, 5, repeats=3)
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
    assert pair.training and result["val_images"] == 37 and "val_bad_images" not in result
    items = [val_set[(0, i)] for i in range(37)]  # (image, label, unreadable)
    images, labels = torch.stack([image for image, _, _ in items]), torch.tensor([label for _, label, _ in items])
    with torch.no_grad():
        out = pair.eval()(images)
    out["ens"] = (out["vit"].softmax(-1) + out["cnn"].softmax(-1)) / 2
    for name in ("vit", "cnn", "pair", "ens"):
        ranked = out[name].argsort(dim=1, descending=True)
        assert result[f"val_{name}_top1"] == pytest.approx(100 * (ranked[:, 0] == labels).float().mean().item())
        assert result[f"val_{name}_top5"] == pytest.approx(100 * (ranked[:, :5] == labels[:, None]).any(1).float().mean().item())


def ddp_rank(rank, world, images, targets, result_dir):
    store = f"file://{os.path.join(result_dir, 'store')}"  # a file, not a port that another run may hold
    torch.distributed.init_process_group("gloo", init_method=store, rank=rank, world_size=world)
    model = torch.nn.parallel.DistributedDataParallel(tiny_pair())
    half = len(images) // world
    pair_backward(model, images[rank * half:(rank + 1) * half], targets[rank * half:(rank + 1) * half], 0.0)
    torch.save([p.grad for p in model.module.vit.parameters()], os.path.join(result_dir, f"grad{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_ddp_step_gives_the_single_process_gradient(tmp_path):
    # the ViT has no BatchNorm and, without drop-path, nothing random: the mean of two halves' gradients is the whole's
    torch.manual_seed(1)
    images, targets = torch.randn(16, 3, 32, 32), torch.randint(10, (16,))
    mp.spawn(ddp_rank, args=(2, images, targets, str(tmp_path)), nprocs=2)
    single = tiny_pair()
    pair_backward(single, images, targets, 0.0)
    for rank in (0, 1):
        for g_ddp, p in zip(torch.load(tmp_path / f"grad{rank}.pt"), single.vit.parameters()):
            assert torch.allclose(g_ddp, p.grad, atol=1e-6)


def test_an_unreadable_image_or_one_its_transform_fails_on_is_replaced_by_the_next_one(capsys):
    from PIL import Image
    class Images(torch.utils.data.Dataset):  # image i is i pixels wide; ImageFolder's `targets`
        targets = list(range(40))
        def __len__(self):
            return 40
        def __getitem__(self, i):
            if i in (3, 20):
                raise OSError("truncated\nfile")
            return Image.new("RGB", (i + 1, 8)), i
    def transform(image):  # fails on wide images, as Resize runs out of memory on a very thin one
        if image.width > 20 and image.height == 8:
            raise MemoryError
        return torch.tensor(image.width)
    data = vpl.Augmented(Images(), transform, seed=0)
    assert data[0, 2] == (3, 2, 0)
    assert data[0, 3] == (5, 4, 1)      # unreadable: the next image, flagged
    assert "vpl: warning: unreadable image 3 (OSError: truncated file); skipped\n" in capsys.readouterr().err  # 1 line
    assert data[0, 39] == (1, 0, 1)     # its transform fails: the next image (the first), flagged
    image, label, flagged = data[0, 24]  # 24..39 all fail: a black 32 px stand-in, flagged, with image 24's label
    assert (image.item(), label, flagged) == (32, 24, 1)


def test_a_stand_in_image_is_augmented_with_its_own_seed_and_leaves_the_global_rng_alone():
    class Unreadable(torch.utils.data.Dataset):
        targets = [7] * 20
        def __len__(self):
            return 20
        def __getitem__(self, i):
            raise OSError("truncated file")
    train, _ = vpl.build_transforms(vpl.Config(), from_files=False)  # random crops of the stand-in
    data = vpl.Augmented(Unreadable(), lambda image: train(image) + torch.rand(()), seed=0)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    first = data[2, 5]
    assert torch.equal(state, torch.get_rng_state())  # drop-path masks must not depend on the data
    second = data[2, 5]
    assert first[1:] == (7, 1) and torch.equal(first[0], second[0])  # (draw, image) decides, as for any image


def image_tree(root, per_class):
    """An ImageFolder root: train/ and val/, classes 'ant' and 'bee', random 40 px PNGs."""
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for c in ("ant", "bee"):
            os.makedirs(os.path.join(root, split, c), exist_ok=True)
            for i in range(per_class if split == "train" else 4):
                pixels = (torch.rand(40, 40, 3, generator=g) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(os.path.join(root, split, c, f"{i}.png"))


def test_image_folders_accept_images_in_subfolders_as_image_folder_does(tmp_path):
    image_tree(tmp_path, 2)
    for split in ("train", "val"):  # the Tiny-ImageNet layout: train/<class>/images/*.png
        for c in ("ant", "bee"):
            folder = tmp_path / split / c
            (folder / "images").mkdir()
            for image in folder.glob("*.png"):
                image.rename(folder / "images" / image.name)
    train, val = vpl.image_folders(str(tmp_path))
    for split, ours, size in (("train", train, 4), ("val", val, 8)):
        reference = torchvision.datasets.ImageFolder(str(tmp_path / split))
        assert ours.classes == reference.classes == ["ant", "bee"] and ours.samples == reference.samples
        assert len(ours) == size and all(os.sep + "images" + os.sep in path for path, _ in ours.samples)


# ---------------------------------------------------------------------------------- the command line
def test_help_gives_each_flags_default_and_the_imagenet_presets_where_it_differs(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping: argparse's textwrap would also break at hyphens
    with pytest.raises(SystemExit):
        vpl.parse_config(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the lines
    assert "image side, pixels (default 32, imagenet 224)" in text
    assert "images per process per micro-step (default 128) " in text  # the preset's is the same: said once
    for f in vpl.Config.__dataclass_fields__.values():
        if isinstance(f.default, bool) or f.default == "":
            continue
        preset = vpl.PRESETS["imagenet"].get(f.name, f.default)
        said = f"(default {f.default!r}" + (f", imagenet {preset!r})" if preset != f.default else ")")
        assert " ".join(f"{f.metadata['help']} {said}".split()) in text, f.name


def test_auto_precision_on_the_cpu_is_fp32_and_eager():
    assert vpl.choose_precision(vpl.Config(), torch.device("cpu")) == (None, False)  # bf16 is slow on most CPUs
    assert vpl.choose_precision(vpl.Config(amp="bf16", compile="on"), torch.device("cpu")) == (torch.bfloat16, True)


@pytest.mark.parametrize("capability,dtype", [((7, 0), torch.float16), ((8, 0), torch.bfloat16)])
def test_gpus_without_bf16_units_fall_back_to_fp16(monkeypatch, capsys, capability, dtype):
    # a V100 (7.0) has no bf16 units (is_bf16_supported() still says yes: emulation); an A100 (8.0) has
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert vpl.choose_precision(vpl.Config(), torch.device("cuda")) == (dtype, True)  # on CUDA: compiled too
    warned = capsys.readouterr().err
    assert ("no bf16" in warned) == (dtype == torch.float16) and warned.count("\n") == (dtype == torch.float16)


def test_compiled_bf16_step_matches_eager_and_lowers_the_loss():
    eager, pair = tiny_pair(), tiny_pair()
    with torch.no_grad():  # BatchNorm weights away from the ResNet's zero init, so that every gradient is non-zero
        for m in eager.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
    pair.load_state_dict(eager.state_dict())  # the same weights
    compiled = torch.compile(pair)
    opt = torch.optim.AdamW(pair.parameters(), lr=1e-3)
    torch.manual_seed(0)
    images, targets = torch.randn(16, 3, 32, 32), torch.randint(10, (16,))
    want = pair_backward(eager, images, targets, 0.5, torch.bfloat16)
    got = pair_backward(compiled, images, targets, 0.5, torch.bfloat16)
    for name, value in want.items():  # bf16 rounds differently once kernels are fused: a bf16 tolerance
        assert got[name].item() == pytest.approx(value.item(), rel=5e-3, abs=1e-4), name
    for part in ("vit", "cnn", "pair_head"):  # each part's whole gradient (bf16 noise is large on single tensors)
        g_eager, g_compiled = (torch.cat([p.grad.flatten() for p in getattr(m, part).parameters()]) for m in (eager, pair))
        assert F.cosine_similarity(g_eager, g_compiled, dim=0) > 0.97, part  # measured: 1.000, 0.990, 1.000
        assert g_compiled.norm().item() == pytest.approx(g_eager.norm().item(), rel=0.05), part
    opt.zero_grad()
    losses = []
    for _ in range(6):
        losses.append(pair_backward(compiled, images, targets, 0.5, torch.bfloat16)["total"].item())
        opt.step()
        opt.zero_grad()
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]


NUMERIC = {f.name: f.metadata["bounds"] for f in vpl.fields(vpl.Config) if type(f.default) in (int, float)}


@pytest.mark.parametrize("name", list(NUMERIC))
def test_a_setting_out_of_its_range_is_refused_naming_its_flag(name):
    # e.g. a negative --clip-grad flips the gradients; --label-smoothing 1 makes every target uniform
    (low, high), kind = NUMERIC[name], type(getattr(vpl.Config(), name))
    flag, high = "--" + name.replace("_", "-"), None if high in (None, math.inf) else high  # None or inf: open
    def refusal(value):
        try:
            vpl.check_config(vpl.Config(**{name: value}))
        except vpl.UserError as e:
            return str(e)
        return ""
    below = low - 1 if kind is int else math.nextafter(low, -math.inf)  # just outside
    assert refusal(kind(below)) == f"{flag} must be in [{low}, {'inf' if high is None else high}], got {kind(below)}"
    assert not refusal(kind(low)).startswith(f"{flag} must be")  # the bounds themselves are in range
    if high is not None:
        above = high + 1 if kind is int else math.nextafter(high, math.inf)
        assert refusal(kind(above)).startswith(f"{flag} must be in [") and refusal(kind(high)) == ""
    if kind is float:  # NaN passes every comparison: refused on its own
        assert refusal(math.nan) == f"{flag} must be a finite number, got nan"
        assert refusal(math.inf).startswith(f"{flag} must be a finite number")


def test_text_chart_marks_stages_and_both_branches():
    history = [{"val_vit_top1": 10.0 * e, "val_cnn_top1": 20.0 + 5 * e} for e in range(10)]
    chart = vpl.text_chart(history, (0.2, 0.8), 10, height=5).splitlines()
    assert chart[0].strip().startswith("90.0") and chart[4].strip().startswith("0.0")
    assert chart[0].endswith("v")          # ViT at the top in the last epoch
    assert chart[4].split()[1][0] == "v"   # ... and at the bottom in the first
    assert chart[5].count("|") == 2        # two stage boundaries: epochs 2 and 8
    assert sorted(line[7:].replace("|", "")[4] for line in chart[:5]) == [" "] * 4 + ["*"]  # both at 40 in epoch 4


def test_a_failed_checkpoint_write_is_one_line_and_keeps_the_old_file_and_no_partial_one(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pt")
    vpl.save_atomic({"step": 1}, path)

    class FillsUp(io.FileIO):  # a disk that fills up 1 kB into the file: torch.save then raises a RuntimeError
        def write(self, data):
            if self.tell() + len(data) > 1000:
                raise OSError(28, "No space left on device")
            return super().write(data)
    monkeypatch.setattr(vpl, "open", lambda name, mode: io.BufferedWriter(FillsUp(name, mode)), raising=False)
    with pytest.raises(vpl.UserError, match=f"^cannot write {re.escape(path)} \\(No space left on device\\)"):
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
