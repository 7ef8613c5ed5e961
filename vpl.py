"""vpl.py - Vision Pair Learning (VPL, arXiv 2112.00965) in one file.

A ViT-B/16 and a ResNet-50 train side by side on the same batches. A pair learning module lets each
branch learn from its partner during the middle stage of training, so that both end better than alone
(the paper's claim).
Written here from scratch: both branches, the pair loss and the staged schedule; around them the
training loop, on torchvision's transforms and PyTorch's DDP, with a CUDA fast path. Beyond the paper's
abstract the method is our reconstruction (README, "The method"); every choice is a flag. Measured
(README): the CPU demo ends at ViT 89.9% / CNN 85.8% val top-1 in under 3 minutes on 2 cores; the README's
ablation tests whether pairing helps, and its "Performance" gives throughput against torchvision's
models on a CPU and on one H100.

    python vpl.py                                          # CPU demo: tiny branches, built-in data
    torchrun --nproc_per_node=8 vpl.py --data /imagenet    # the real job: ViT-B/16 + ResNet-50
    python vpl.py --bench --preset imagenet                # training throughput against torchvision
"""
import argparse
import collections
import contextlib
import copy
import datetime
import itertools
import json
import math
import os
import signal
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset


# ----------------------------------------------------------------------------------------- config
def option(default, help, choices=None):
    """A Config field that becomes a command-line flag with this help text."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class Config:
    """Every knob of a run. The defaults are the CPU demo; PRESETS override them; flags override both."""
    preset: str = option("", "demo or imagenet (default: imagenet when --data is a folder, else demo)",
                       ["", "demo", "imagenet"])
    # data
    data: str = option("demo", "'demo' (built in), 'cifar10', 'cifar100', or an ImageFolder root with train/ and val/")
    data_root: str = option("./data", "where CIFAR is downloaded to")
    demo_train: int = option(5000, "images in the demo's train split")
    demo_val: int = option(1000, "images in the demo's val split")
    img_size: int = option(32, "image side, pixels")
    workers: int = option(2, "data loading processes of each process (each GPU)")
    # models
    vit: str = option("vit_tiny", "transformer branch", ["vit_tiny", "vit_b_16"])
    cnn: str = option("resnet_tiny", "partner branch (a ViT here gives the ViT+ViT ablation)",
                    ["resnet_tiny", "resnet50", "vit_tiny", "vit_b_16"])
    drop_path: float = option(0.1, "stochastic depth rate of each ViT's last block")
    init: str = option("", "'torchvision': start both branches from torchvision's ImageNet weights", ["", "torchvision"])
    init_vit: str = option("", "ViT checkpoint to start from (timm/DeiT or torchvision format, or a vpl last.pt)")
    init_cnn: str = option("", "ResNet checkpoint to start from (torchvision format, or a vpl last.pt)")
    # optimization
    epochs: int = option(10, "training epochs")
    batch_size: int = option(128, "images per process per micro-step")
    accum_steps: int = option(1, "micro-steps per optimizer step")
    lr_vit: float = option(4e-3, "AdamW peak lr per 512 images of global batch")
    lr_cnn: float = option(0.8, "SGD peak lr per 1024 images of global batch")
    min_lr_vit: float = option(1e-5, "AdamW lr at the end of the cosine")
    wd_vit: float = option(0.05, "AdamW weight decay")
    wd_cnn: float = option(5e-5, "SGD weight decay")
    warmup_epochs: float = option(1.0, "linear lr warm-up, epochs")
    clip_grad: float = option(0.0, "max gradient norm of each branch and of the pair head (0: off)")
    label_smoothing: float = option(0.1, "label smoothing of every cross-entropy")
    mixup: float = option(0.0, "MixUp alpha (0: off)")
    cutmix: float = option(0.0, "CutMix alpha (0: off)")
    randaug: int = option(0, "RandAugment magnitude, 0-10 as DeiT's 'rand-m9' (0: off)")
    repeat_aug: int = option(1, "repeated augmentation: an epoch takes 1/N of the images, N copies of each (1: off)")
    reprob: float = option(0.0, "RandomErasing probability")
    ema: float = option(0.0, "EMA decay per step of the whole pair, pair head included (0: off)")
    # pair learning
    pair_weight: float = option(0.2, "a: weight of the partner loss in stage 2, in [0, 1]")
    pair_temp: float = option(1.0, "T: distillation temperature, > 0")
    teacher: str = option("partner", "who teaches each branch", ["partner", "pair"])
    stages: str = option("0.1,0.8", "S1,S2: stage 2 spans [S1, S2) of training, fractions")
    ramp: float = option(0.05, "fraction of training over which a ramps up at the start of stage 2")
    # system
    device: str = option("auto", "cuda: this process's GPU (LOCAL_RANK); auto: cuda if there is one", ["auto", "cpu", "cuda"])
    amp: str = option("auto", "autocast dtype (auto: bf16 on CUDA, off on the CPU)", ["auto", "off", "bf16", "fp16"])
    compile: str = option("auto", "torch.compile the pair (auto: on CUDA)", ["auto", "on", "off"])
    sync_bn: bool = option(False, "SyncBatchNorm in the CNN (CUDA, several GPUs)")
    seed: int = option(0, "seed of everything: data, init, augmentation")
    out: str = option("", "output folder (default runs/<preset>)")
    resume: bool = option(False, "continue from <out>/last.pt (which must exist)")
    auto_resume: bool = option(False, "continue from <out>/last.pt if it exists (elastic restarts)")
    eval_only: bool = option(False, "evaluate <out>/last.pt and exit")
    bench: bool = option(False, "measure training throughput on synthetic batches and exit")
    log_every: int = option(50, "optimizer steps between progress lines (and one at each epoch's last step)")
    max_steps: int = option(0, "stop (and save) after this many optimizer steps in all (0: no limit)")
    max_bad_steps: int = option(5, "consecutive non-finite steps before the run stops")


PRESETS = {
    "demo": {},
    # ViT: DeiT-B (arXiv 2012.12877); ResNet: torchvision's current recipe; data as DeiT.
    "imagenet": dict(vit="vit_b_16", cnn="resnet50", img_size=224, epochs=300, batch_size=128,
                     workers=10, lr_vit=5e-4, lr_cnn=0.5, wd_cnn=2e-5, warmup_epochs=5.0,
                     mixup=0.8, cutmix=1.0, randaug=9, reprob=0.25, repeat_aug=3, log_every=100),
}
DATASETS = ("demo", "cifar10", "cifar100")


class UserError(Exception):
    """Bad input: printed as one line, exit code 2, no traceback."""


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are UserErrors: main() reports a bad flag in one line, without the usage text."""

    def error(self, message):
        raise UserError(message)


def parse_config(argv=None):
    """Flags from Config's fields; the preset fills what the command line leaves out."""
    parser = OneLineParser(description=__doc__.split("\n")[0], argument_default=argparse.SUPPRESS, allow_abbrev=False)
    for f in fields(Config):
        name, meta = "--" + f.name.replace("_", "-"), f.metadata
        if isinstance(f.default, bool):
            parser.add_argument(name, action=argparse.BooleanOptionalAction, help=meta["help"])
        else:
            imagenet = PRESETS["imagenet"].get(f.name, f.default)
            imagenet = f", imagenet preset {imagenet!r}" if imagenet != f.default else ""
            default = f" (default {f.default!r}{imagenet})" if f.default != "" else ""  # '' is told in the help
            parser.add_argument(name, type=type(f.default), choices=meta["choices"], help=meta["help"] + default)
    given = vars(parser.parse_args(argv))
    preset = given.get("preset") or ("demo" if given.get("data", "demo") in DATASETS else "imagenet")
    cfg = Config(**{**PRESETS[preset], **given, "preset": preset})
    cfg.out = cfg.out or os.path.join("runs", preset)
    check_config(cfg)
    return cfg


def check_config(cfg):
    """Raises UserError naming the first flag (or group of flags) whose value makes no sense."""
    for f in fields(cfg):  # NaN would slip through the checks below (any comparison with it is False), and inf too
        if isinstance(getattr(cfg, f.name), float) and not math.isfinite(getattr(cfg, f.name)):
            raise UserError(f"--{f.name.replace('_', '-')} must be a finite number, got {getattr(cfg, f.name)}")
    if not 0 <= cfg.seed < 2 ** 32:
        raise UserError(f"--seed must be in [0, 2^32), got {cfg.seed}")
    for name in ("batch_size", "accum_steps", "epochs", "log_every", "img_size", "max_bad_steps", "demo_train",
                 "demo_val", "repeat_aug"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    for name in ("max_steps", "workers", "warmup_epochs", "clip_grad", "mixup", "cutmix", "randaug",
                 "lr_vit", "lr_cnn", "min_lr_vit", "wd_vit", "wd_cnn"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if cfg.randaug > 10:
        raise UserError(f"--randaug must be at most 10 (the scale of DeiT's rand-m9), got {cfg.randaug}")
    if not 0 <= cfg.ema < 1 or not 0 <= cfg.reprob <= 1 or not 0 <= cfg.label_smoothing < 1 or not 0 <= cfg.drop_path < 1:
        raise UserError("--ema, --label-smoothing and --drop-path must be in [0, 1), --reprob in [0, 1]")
    patch = max(4 if "tiny" in arch else 16 for arch in (cfg.vit, cfg.cnn) if arch.startswith("vit"))
    if cfg.img_size % patch:
        raise UserError(f"--img-size {cfg.img_size} must be a multiple of the ViT's patch size ({patch})")
    stride = {"resnet50": 32, "resnet_tiny": 8}.get(cfg.cnn)  # the ResNet's last feature map: img_size / stride
    if stride and cfg.batch_size == 1 and cfg.img_size <= stride and not cfg.eval_only:
        raise UserError(f"--batch-size 1 at {cfg.img_size} px leaves BatchNorm one value per channel in the ResNet's "
                        "last stage: use 2 or more")
    if cfg.data.startswith("cifar") and cfg.img_size != 32:
        raise UserError(f"--data {cfg.data} holds 32 px images: use --img-size 32 (the demo preset)")
    try:
        PairSchedule(cfg.stages, cfg.pair_weight, cfg.ramp)  # built here only to check the options
        PairLoss(cfg.pair_temp, cfg.teacher)
    except ValueError as e:
        raise UserError(str(e)) from None


# --------------------------------------------------------------------------------------- ViT-B/16
# "An Image is Worth 16x16 Words", arXiv 2010.11929; training recipe and names of DeiT, arXiv 2012.12877.
class DropPath(nn.Module):
    """Stochastic depth (arXiv 1603.09382): while training, drop a residual branch for whole samples."""

    def __init__(self, p=0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)  # rescale so that the expected output is unchanged


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection and PyTorch's fused SDPA kernel."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        # (B, N, 3C) -> (3, B, heads, N, C // heads)
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v, without attention dropout (DeiT)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))  # (B, heads, N, d) -> (B, N, C)


class Mlp(nn.Module):
    """The transformer block's feed-forward part: Linear, GELU, Linear."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim, heads, mlp_ratio=4.0, drop_path=0.0):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Cuts the image into patches and projects each one to a token, as one strided convolution."""

    def __init__(self, patch_size, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, 3, H, W) -> (B, C, H/p, W/p) -> (B, N, C)


def resize_pos_embed(pos_embed, grid):
    """Bicubic resize of a (1, 1 + g*g, C) position embedding to a grid x grid one; the cls slot is kept."""
    cls, patches = pos_embed[:, :1], pos_embed[:, 1:]
    old = int(math.sqrt(patches.shape[1]))
    if old * old != patches.shape[1]:
        raise RuntimeError(f"position embedding of {patches.shape[1]} patches is not a square grid (a distilled DeiT?)")
    patches = patches.reshape(1, old, old, -1).permute(0, 3, 1, 2)  # (1, N, C) -> (1, C, g, g)
    patches = F.interpolate(patches.float(), size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([cls, patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(cls.dtype)], dim=1)


class ViT(nn.Module):
    """Vision Transformer with a cls token, learned position embedding and pre-norm blocks.
    Parameter names follow timm/DeiT, so their checkpoints load with strict=True."""

    def __init__(self, img_size=224, patch_size=16, dim=768, depth=12, heads=12, mlp_ratio=4.0,
                 drop_path=0.0, num_classes=1000):
        super().__init__()
        self.grid, self.num_features = img_size // patch_size, dim
        self.patch_embed = PatchEmbed(patch_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid ** 2, dim))
        rates = torch.linspace(0, drop_path, depth).tolist()  # deeper blocks are dropped more often
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio, r) for r in rates])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def _load_from_state_dict(self, state_dict, prefix, *args):
        key = prefix + "pos_embed"  # a checkpoint made at another resolution: resize its grid to ours
        if key in state_dict and state_dict[key].shape != self.pos_embed.shape:
            state_dict[key] = resize_pos_embed(state_dict[key], self.grid)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def forward_features(self, x):
        x = self.patch_embed(x)                                            # (B, N, C)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1)   # (B, 1 + N, C)
        x = self.norm(self.blocks(x + self.pos_embed))
        return x[:, 0]                                                     # cls token: (B, C)

    def forward_head(self, f):
        return self.head(f)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def vit_b_16(num_classes=1000, img_size=224, drop_path=0.1):
    """ViT-B/16 (DeiT-B): 86,567,656 parameters with 1000 classes at 224 px."""
    return ViT(img_size, 16, 768, 12, 12, 4.0, drop_path, num_classes)


def vit_tiny(num_classes=10, img_size=32, drop_path=0.1):
    """A 4-block, 128-wide ViT with 4 px patches, for 32 px images on the CPU."""
    return ViT(img_size, 4, 128, 4, 4, 2.0, drop_path, num_classes)


# torchvision's vit_b_16 names -> this file's (timm/DeiT), applied in order to each key
VIT_TORCHVISION_NAMES = [("class_token", "cls_token"), ("conv_proj", "patch_embed.proj"),
                         ("encoder.pos_embedding", "pos_embed"), ("encoder.ln.", "norm."), ("heads.head", "head"),
                         ("encoder.layers.encoder_layer_", "blocks."), ("ln_1", "norm1"), ("ln_2", "norm2"),
                         ("self_attention.in_proj_", "attn.qkv."), ("self_attention.out_proj", "attn.proj"),
                         ("mlp.0", "mlp.fc1"), ("mlp.3", "mlp.fc2")]


def rename_keys(state_dict, renames):
    """A state dict with each (old, new) substring replaced in every key, in order."""
    for old, new in renames:
        state_dict = {key.replace(old, new): value for key, value in state_dict.items()}
    return state_dict


def vit_from_torchvision(state_dict):
    """Renames a torchvision vit_b_16 state dict to this file's (timm/DeiT) parameter names."""
    older = [("mlp.linear_1", "mlp.fc1"), ("mlp.linear_2", "mlp.fc2")]  # older MLP names, which torchvision still reads
    return rename_keys(state_dict, VIT_TORCHVISION_NAMES + older)


def vit_to_torchvision(state_dict):
    """Renames this file's ViT state dict (vit.pt) to torchvision's vit_b_16 names: the inverse of the above."""
    return rename_keys(state_dict, [(new, old) for old, new in VIT_TORCHVISION_NAMES])


# -------------------------------------------------------------------------------------- ResNet-50
# "Deep Residual Learning", arXiv 1512.03385; v1.5 and names as torchvision's, so its weights load.
def conv3x3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


def conv1x1(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 1, stride, bias=False)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand, plus the shortcut. v1.5: the stride sits on the 3x3 conv, not the
    first 1x1, which costs a little speed for about +0.5% top-1 (torchvision, NVIDIA)."""
    expansion = 4

    def __init__(self, cin, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1, self.bn1 = conv1x1(cin, planes), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = conv3x3(planes, planes, stride), nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = conv1x1(planes, planes * self.expansion), nn.BatchNorm2d(planes * self.expansion)
        self.relu, self.downsample = nn.ReLU(inplace=True), downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity  # in place, as torchvision: backward needs BatchNorm's input, not its output
        return self.relu(out)


class ResNet(nn.Module):
    """ResNet of Bottleneck blocks. `small_stem` swaps the 7x7/2 conv and max-pool for one 3x3/1 conv
    (for 32 px images); `width` is the channels of the stem (64 in ResNet-50)."""

    def __init__(self, layers=(3, 4, 6, 3), num_classes=1000, width=64, small_stem=False):
        super().__init__()
        self.conv1 = conv3x3(3, width) if small_stem else nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1, self.relu = nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if small_stem else nn.MaxPool2d(3, 2, 1)
        self.inplanes = width
        self.layer1 = self._make_layer(width, layers[0], 1)
        self.layer2 = self._make_layer(width * 2, layers[1], 2)
        self.layer3 = self._make_layer(width * 4, layers[2], 2)
        self.layer4 = self._make_layer(width * 8, layers[3], 2)
        self.num_features = width * 8 * Bottleneck.expansion
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.num_features, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, Bottleneck):  # each block's residual branch starts at zero (arXiv 1706.02677)
                nn.init.zeros_(m.bn3.weight)

    def _make_layer(self, planes, blocks, stride):
        downsample, out = None, planes * Bottleneck.expansion
        if stride != 1 or self.inplanes != out:  # the shortcut must change shape too
            downsample = nn.Sequential(conv1x1(self.inplanes, out, stride), nn.BatchNorm2d(out))
        layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = out
        layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_features(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))             # (B, w, H/4, W/4); small stem: H, W
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))       # (B, 32w, H/32, W/32); small stem: H/8
        return torch.flatten(self.avgpool(x), 1)                         # (B, 32w)

    def forward_head(self, f):
        return self.fc(f)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def resnet50(num_classes=1000):
    """ResNet-50 v1.5: 25,557,032 parameters with 1000 classes."""
    return ResNet((3, 4, 6, 3), num_classes)


def resnet_tiny(num_classes=10):
    """A narrow ResNet of the same Bottleneck, one block per stage, 3x3 stem: for 32 px on the CPU."""
    return ResNet((1, 1, 1, 1), num_classes, width=8, small_stem=True)


def build_branch(name, num_classes, img_size, drop_path):
    """One branch by its --vit/--cnn name; only a ViT takes the image size and drop-path rate."""
    if name.startswith("vit"):
        return {"vit_b_16": vit_b_16, "vit_tiny": vit_tiny}[name](num_classes, img_size=img_size, drop_path=drop_path)
    return {"resnet50": resnet50, "resnet_tiny": resnet_tiny}[name](num_classes)


# ---------------------------------------------------------------------------------- pair learning
# The pair learning module (PLM): a pair head, the partner losses and the three-stage schedule.
class PairHead(nn.Module):
    """The pair's own prediction: LayerNorm on each branch's feature, concatenate, one Linear.
    Its input is detached, so it learns to combine the branches and never pulls on them."""

    def __init__(self, dim_a, dim_b, num_classes):
        super().__init__()
        self.norm_a, self.norm_b = nn.LayerNorm(dim_a), nn.LayerNorm(dim_b)
        self.fc = nn.Linear(dim_a + dim_b, num_classes)

    def forward(self, feat_a, feat_b):
        return self.fc(torch.cat([self.norm_a(feat_a.detach()), self.norm_b(feat_b.detach())], dim=1))


class PairModel(nn.Module):
    """The two branches and the pair head as one module, so that one DDP and one torch.compile cover
    all. Any two modules with forward_features, forward_head and num_features can be the branches."""

    def __init__(self, vit, cnn, num_classes):
        super().__init__()
        self.vit, self.cnn = vit, cnn
        self.pair_head = PairHead(vit.num_features, cnn.num_features, num_classes)

    def forward(self, x):
        f_vit = self.vit.forward_features(x)
        f_cnn = self.cnn.forward_features(x.contiguous(memory_format=torch.channels_last))  # its weights' layout
        return {"vit": self.vit.forward_head(f_vit), "cnn": self.cnn.forward_head(f_cnn),
                "pair": self.pair_head(f_vit, f_cnn)}


def kd_loss(student, teacher, temperature=1.0):
    """Distillation (arXiv 1503.02531): T^2 * KL(softmax(t/T) || softmax(s/T)), summed over classes and
    averaged over the batch ('batchmean', not 'mean', which would also divide by the classes); fp32."""
    log_p_student = F.log_softmax(student.float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher.detach().float() / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature ** 2  # keeps the gradient's scale independent of T


class PairLoss(nn.Module):
    """Per branch (1 - a) * CE(labels) + a * KD(teacher), plus the pair head's own CE.
    teacher='partner': each branch is taught by the other (deep mutual learning, arXiv 1706.00384);
    teacher='pair': the pair head teaches both. Returns the total and a dict of every term."""

    def __init__(self, temperature=1.0, teacher="partner", label_smoothing=0.0):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"--pair-temp must be > 0, got {temperature}")
        if teacher not in ("partner", "pair"):
            raise ValueError(f"--teacher must be 'partner' or 'pair', got {teacher!r}")
        self.temperature, self.teacher, self.label_smoothing = temperature, teacher, label_smoothing

    def forward(self, out, target, a):
        def ce(logits):  # target: class indices, or probabilities after MixUp/CutMix
            return F.cross_entropy(logits.float(), target, label_smoothing=self.label_smoothing)

        vit_teacher, cnn_teacher = (out["cnn"], out["vit"]) if self.teacher == "partner" else (out["pair"],) * 2
        terms = {"vit_ce": ce(out["vit"]), "vit_kd": kd_loss(out["vit"], vit_teacher, self.temperature),
                 "cnn_ce": ce(out["cnn"]), "cnn_kd": kd_loss(out["cnn"], cnn_teacher, self.temperature),
                 "pair_ce": ce(out["pair"])}
        # at a = 0 the partner terms are left out, not multiplied by 0: a branch gone NaN would make 0 * NaN
        kd = a * (terms["vit_kd"] + terms["cnn_kd"]) if a > 0 else 0.0
        return (1 - a) * (terms["vit_ce"] + terms["cnn_ce"]) + kd + terms["pair_ce"], terms


class PairSchedule:
    """The three stages as fractions of training, 'S1,S2': 1 warm-up [0, S1), 2 pair [S1, S2), 3 solo
    [S2, 1]. Called with the progress in [0, 1], gives (stage, a): a is 0 outside stage 2 and rises
    linearly from 0 at S1 to `pair_weight` at S1 + ramp (all fractions of the whole training)."""

    def __init__(self, stages="0.1,0.8", pair_weight=0.2, ramp=0.05):
        try:
            self.s1, self.s2 = (float(s) for s in stages.split(","))
        except ValueError:
            raise ValueError(f"--stages must be two fractions 'S1,S2', got {stages!r}") from None
        if not 0 <= self.s1 <= self.s2 <= 1:
            raise ValueError(f"--stages must satisfy 0 <= S1 <= S2 <= 1, got {stages!r}")
        if not 0 <= pair_weight <= 1:
            raise ValueError(f"--pair-weight must be in [0, 1], got {pair_weight}")
        if not 0 <= ramp <= 1:
            raise ValueError(f"--ramp must be in [0, 1], got {ramp}")
        self.pair_weight, self.ramp = pair_weight, ramp

    def __call__(self, progress):
        if progress < self.s1 or progress >= self.s2:
            return (1 if progress < self.s1 else 3), 0.0
        return 2, self.pair_weight * (min(1.0, (progress - self.s1) / self.ramp) if self.ramp > 0 else 1.0)


# ------------------------------------------------------------------------------------------- data
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, for every dataset


def make_demo(n, seed, img_size=32, classes=10):
    """The built-in data set: class k is a random 5x5 glyph, drawn at a random place, angle, scale and
    colour on a textured background, with noise and a faint distractor glyph. Same seed, same images."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    glyphs = (rand(classes, 1, 5, 5) < 0.5).float()
    labels = torch.randint(classes, (n,), generator=g)

    def draw(glyph_ids, zoom):  # affine-warp each glyph into an image-sized mask: (n, 1, H, W)
        angle, scale = (rand(n) - 0.5) * math.radians(30), zoom * (0.9 + 0.2 * rand(n))
        cos, sin, shift = torch.cos(angle) * scale, torch.sin(angle) * scale, (rand(n, 2) - 0.5) * 0.6
        theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
        grid = F.affine_grid(theta, [n, 1, img_size, img_size], align_corners=False)
        return F.grid_sample(glyphs[glyph_ids], grid, align_corners=False)

    background = 0.45 * rand(n, 3, 1, 1)  # dark grounds, light glyphs: shape, not colour, tells the class
    texture = F.interpolate(rand(n, 3, 4, 4), size=img_size, mode="bilinear", align_corners=False)
    image = background + 0.2 * texture
    distractor = draw(torch.randint(classes, (n,), generator=g), 3.0)  # a smaller, fainter glyph of any class
    image = image + (0.55 + 0.45 * rand(n, 3, 1, 1) - image) * distractor * 0.3
    mask = draw(labels, 1.8)
    image = image + (0.55 + 0.45 * rand(n, 3, 1, 1) - image) * mask
    image = image + 0.05 * torch.randn(image.shape, generator=g)
    return (image.clamp(0, 1) * 255).round().to(torch.uint8), labels


class Augmented(Dataset):
    """Wraps a dataset: item (draw, i) is base[i] transformed with an RNG seeded from (seed, draw, i), so a
    run's augmentation does not depend on workers or on where it resumed. An unreadable image is reported
    (once per worker) and replaced by the next readable one (a black one of its class after 16 unreadable in
    a row); the third output flags that (evaluation leaves it out)."""

    def __init__(self, base, transform, seed):
        self.base, self.transform, self.seed, self.warned = base, transform, seed, set()

    def __len__(self):
        return len(self.base)

    def __getitem__(self, key):
        draw, index = key  # draw: the epoch, or with repeated augmentation the epoch's copy (EpochSampler)
        for attempt in range(16):
            j = (index + attempt) % len(self.base)
            try:
                image, label = self.base[j]
                return self.augment(image, draw, index), int(label), int(attempt > 0)
            except Exception as e:  # PIL's for a corrupt, truncated or oversized (a bomb) file; Resize's for a thin one
                if j not in self.warned:
                    self.warned.add(j)
                    path = self.base.samples[j][0] if hasattr(self.base, "samples") else j
                    reason = " ".join(str(e).split())[:100]  # on one line: PIL's messages can hold newlines
                    print(f"vpl: warning: unreadable image {path} ({type(e).__name__}: {reason}); skipped", file=sys.stderr)
        from PIL import Image  # a broken folder: flagged like the others, so that the run stops with one line
        label = self.base.targets[index] if hasattr(self.base, "targets") else 0
        return self.augment(Image.new("RGB", (32, 32)), draw, index), int(label), 1

    def augment(self, image, draw, index):
        with torch.random.fork_rng(devices=[]):  # the caller's CPU RNG stays untouched; GPUs are not touched
            torch.default_generator.manual_seed(((self.seed * 1_000_003 + draw) * 100_000_007 + index) % 2 ** 63)
            return self.transform(image)


class EpochSampler(Sampler):
    """This rank's share of a shuffled epoch, as (draw, index) keys for Augmented: whole shares only (as
    DistributedSampler with drop_last), from `start` on (resuming mid-epoch). With repeats N (repeated
    augmentation, arXiv 1901.09335, as DeiT's RASampler) an epoch takes 1/N of the images, N copies of each,
    side by side in the global order (so on neighbouring ranks), each copy drawn with its own seed."""

    def __init__(self, dataset, world, rank, seed, repeats=1):
        self.size, self.world, self.rank, self.seed, self.repeats = len(dataset), world, rank, seed, repeats
        self.num_samples, self.epoch, self.start = len(dataset) // world, 0, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        # position p of the epoch, over all ranks, is copy p % repeats of image order[p // repeats]; this rank takes
        # p = rank, rank + world, ..., from its own start-th on
        positions = range(self.rank + self.world * self.start, self.world * self.num_samples, self.world)
        return iter([(self.epoch * self.repeats + p % self.repeats, order[p // self.repeats]) for p in positions])

    def __len__(self):
        return self.num_samples - self.start


def build_transforms(cfg, from_files):
    """Train and val transforms: ImageNet's (RandomResizedCrop / resize-center-crop) for image files,
    pad-and-crop for data already at its size (demo, CIFAR); RandAugment, RandomErasing if asked."""
    from torchvision.transforms import InterpolationMode, v2
    size, bicubic = cfg.img_size, InterpolationMode.BICUBIC
    if from_files:
        train = [v2.RandomResizedCrop(size, interpolation=bicubic, antialias=True), v2.RandomHorizontalFlip()]
        val = [v2.Resize(int(size / 0.875), interpolation=bicubic, antialias=True), v2.CenterCrop(size)]
    else:
        train, val = [v2.RandomCrop(size, padding=size // 8)], []
        if cfg.data != "demo":  # the demo's glyphs are chiral: a mirrored glyph is another shape
            train.append(v2.RandomHorizontalFlip())
    # RandAugment as timm's (DeiT's rand-m9): two ops, each applied with probability 0.5, magnitude 9 of 10
    # (rotation 27 degrees), not torchvision's 9 of 30; the uncovered ground is the mean colour; bicubic as DeiT's
    # on image files, bilinear on the tensors of the demo and CIFAR (bicubic fails on those)
    fill, resample = [round(255 * m) for m in MEAN], bicubic if from_files else InterpolationMode.BILINEAR
    op = v2.RandAugment(1, cfg.randaug, 11, interpolation=resample, fill=fill)
    train += [v2.RandomApply([op], p=0.5), v2.RandomApply([op], p=0.5)] if cfg.randaug else []
    tensor = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]
    erase = [v2.RandomErasing(cfg.reprob, value="random")] if cfg.reprob else []  # noise per pixel, as DeiT
    return v2.Compose(train + tensor + erase), v2.Compose(val + tensor)


def check_image_folder(root):
    """Checks an ImageNet-style root before any heavy work (ImageFolder's own scan later finds a single class
    without images); returns the class names."""
    from torchvision.datasets.folder import IMG_EXTENSIONS
    if not os.path.isdir(root):
        raise UserError(f"--data {root}: " + ("not a folder" if os.path.exists(root) else "no such folder"))
    classes = {}
    for split in ("train", "val"):
        path = os.path.join(root, split)
        if not os.path.isdir(path):
            raise UserError(f"--data {root}: no '{split}' folder (expected {root}/train/<class>/*.jpg and val/)")
        try:
            classes[split] = sorted(d.name for d in os.scandir(path) if d.is_dir())
        except OSError as e:
            raise UserError(f"--data {root}: cannot list {path} ({e.strerror})") from None
        if len(classes[split]) < 2:
            raise UserError(f"--data {root}: {path} has {len(classes[split])} class folders, a classifier needs 2 or more")
        files = (f for c in classes[split] for _, _, fs in os.walk(os.path.join(path, c), followlinks=True) for f in fs)
        if not any(f.lower().endswith(IMG_EXTENSIONS) for f in files):  # in subfolders too, as ImageFolder reads them
            raise UserError(f"--data {root}: {path} has class folders but no images")
    if classes["train"] != classes["val"]:
        extra = sorted(set(classes["train"]) ^ set(classes["val"]))[:3]
        raise UserError(f"--data {root}: val classes differ from train's (e.g. {extra})")
    return classes["train"]


def build_datasets(cfg, rank=0, world=1):
    """(train, val, num_classes) as Augmented datasets, from the demo, CIFAR or an ImageFolder."""
    import torchvision
    if cfg.data == "demo":
        images, labels = make_demo(cfg.demo_train + cfg.demo_val, cfg.seed, cfg.img_size)
        n = cfg.demo_train
        train, val, classes = TensorDataset(images[:n], labels[:n]), TensorDataset(images[n:], labels[n:]), 10
    elif cfg.data in ("cifar10", "cifar100"):
        make = getattr(torchvision.datasets, cfg.data.upper())
        if rank > 0:  # rank 0 downloads, then the others find its files: two writers would corrupt them
            dist.barrier()
        try:
            train, val = make(cfg.data_root, train=True, download=True), make(cfg.data_root, train=False, download=True)
        except (OSError, RuntimeError) as e:
            raise UserError(f"--data {cfg.data}: cannot download to {cfg.data_root} ({e})") from None
        finally:
            if rank == 0 and world > 1:
                dist.barrier()
        classes = len(train.classes)
    else:
        classes = len(check_image_folder(cfg.data))
        splits = []
        for split in ("train", "val"):
            try:
                splits.append(torchvision.datasets.ImageFolder(os.path.join(cfg.data, split)))
            except OSError as e:  # a class folder without images, or one that cannot be read
                raise UserError(f"--data {cfg.data}: {split}: {str(e).split('. Supported')[0]}") from None
        train, val = splits
    train_tf, val_tf = build_transforms(cfg, from_files=cfg.data not in DATASETS)
    return Augmented(train, train_tf, cfg.seed), Augmented(val, val_tf, cfg.seed), classes


def worker_signals(_worker_id):
    """A DataLoader worker ignores Ctrl-C, and SIGTERM from anyone but the main process: a scheduler signals
    the whole process group and the main process alone answers (it finishes the step and saves), while the
    main process's own SIGTERM (the shutdown of its loaders, also at interpreter exit) still ends the worker.
    Where the sender cannot be told (macOS), every SIGTERM does."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):  # macOS (no cluster schedulers either)
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # pending SIGTERMs wait for the thread below

    def obey_main_process():
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != os.getppid():  # the main process forked it
            pass
        os._exit(0)
    threading.Thread(target=obey_main_process, daemon=True).start()


def build_loaders(cfg, train_set, val_set, rank, world, cuda):
    """This rank's train loader (a shuffled shard, whole batches) and val loader (every world-th image)."""
    sampler = EpochSampler(train_set, world, rank, cfg.seed, cfg.repeat_aug)
    # fork: a spawned worker's interpreter starts threads before worker_signals could block SIGTERM in them
    fork = "fork" if cfg.workers > 0 and hasattr(signal, "sigwaitinfo") else None
    common = dict(num_workers=cfg.workers, pin_memory=cuda, persistent_workers=cfg.workers > 0,
                  worker_init_fn=worker_signals, multiprocessing_context=fork)
    train = DataLoader(train_set, cfg.batch_size, sampler=sampler, drop_last=True,
                       generator=torch.Generator().manual_seed(cfg.seed + rank), **common)
    # val: a plain shard per rank, no padding, so that each image is counted exactly once
    val = DataLoader(val_set, cfg.batch_size, sampler=[(0, i) for i in range(rank, len(val_set), world)],
                     generator=torch.Generator().manual_seed(cfg.seed), **common)  # never draws from the global RNG
    return train, val


def build_mix(cfg, num_classes):
    """Batch-level MixUp / CutMix (one of them, at random, per batch), or None."""
    from torchvision.transforms import v2
    mixes = ([v2.MixUp(alpha=cfg.mixup, num_classes=num_classes)] if cfg.mixup else []) + \
            ([v2.CutMix(alpha=cfg.cutmix, num_classes=num_classes)] if cfg.cutmix else [])
    return v2.RandomChoice(mixes) if mixes else None


# ------------------------------------------------------------------------------------ distributed
def setup_distributed(device):
    """Reads torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE); returns (rank, world, device).
    Plain `python vpl.py` is one process without a process group."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available")
        torch.cuda.set_device(local_rank)  # before anything touches CUDA, or every rank lands on GPU 0
        device = f"cuda:{local_rank}"
    shared_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # torchrun's default
    if world > 1 and rank == 0 and shared_store and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0)) > 0:
        print("vpl: warning: a torchrun restart can hang or fail to connect on the store it shares with its first run "
              "(pytorch/pytorch#135712): launch torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 and the c10d "
              "rendezvous (--standalone or --rdzv-backend=c10d; --master-port selects the static one)", file=sys.stderr)
    if world > 1:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return rank, world, torch.device(device)


def all_sum(tensor, world):
    """Sums a tensor over all ranks, in place."""
    if world > 1:
        dist.all_reduce(tensor)
    return tensor


# ------------------------------------------------------------------------ training and evaluation
def param_groups(module, weight_decay):
    """No weight decay on norms, biases and tokens (DeiT, torchvision); decay on the rest."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        (no_decay if p.ndim <= 1 or name.endswith(("cls_token", "pos_embed")) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(arch, module, cfg, global_batch, cuda):
    """AdamW for a ViT (DeiT's lr rule: per 512 images), SGD with momentum for a ResNet (per 1024).
    Returns the optimizer, its peak lr and its final lr."""
    fused = {"fused": True} if cuda else {}
    groups = param_groups(module, cfg.wd_vit if arch.startswith("vit") else cfg.wd_cnn)
    if arch.startswith("vit"):
        peak = cfg.lr_vit * global_batch / 512
        return torch.optim.AdamW(groups, lr=peak, **fused), peak, cfg.min_lr_vit
    peak = cfg.lr_cnn * global_batch / 1024
    return torch.optim.SGD(groups, lr=peak, momentum=0.9, **fused), peak, 0.0


def lr_at(step, total, warmup, peak, final):
    """Linear warm-up over `warmup` steps, then cosine from peak to final: a pure function of the step."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return final + (peak - final) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def amp_context(device, amp_dtype):
    """Autocast to amp_dtype on this device; a no-op when it is None (fp32)."""
    return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)


def train_step(model, criterion, images, targets, a, amp_dtype, scaler, loss_scale=1.0):
    """Forward the pair under autocast, compute the pair loss in fp32, backward once (each branch gets
    the gradient of its own loss: teachers are detached). Returns the loss terms, detached."""
    with amp_context(images.device, amp_dtype):
        out = model(images)
    total, terms = criterion(out, targets, a)  # a: the partner losses' weight now
    scaler.scale(total * loss_scale).backward()
    return {"total": total.detach(), **{k: v.detach() for k, v in terms.items()}}


def make_scaler(device, amp_dtype):
    """One GradScaler for all optimizers. With fp16 it scales the loss; otherwise its scale stays 1 (apply_step
    resets it) and it only skips a step whose gradients are not finite, on the device (fused optimizers read
    its flag)."""
    return torch.amp.GradScaler(device.type, init_scale=2.0 ** 16 if amp_dtype == torch.float16 else 1.0)


def apply_step(optimizers, scaler, clip_grad, fp16):
    """Clips each optimizer's gradient norm, steps each through the scaler and clears the gradients,
    with no host sync on CUDA."""
    for optimizer in optimizers:
        if clip_grad:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], clip_grad)
        scaler.step(optimizer)  # skipped, on the device, if this optimizer's gradients are not finite
        optimizer.zero_grad(set_to_none=True)
    scaler.update(None if fp16 else 1.0)


@torch.no_grad()
def ema_update(ema_tensors, model_tensors, decay):
    """One EMA step over matching lists of state tensors, with no host sync: floating ones (weights and
    BatchNorm statistics) move (1 - decay) of the way to the model's; integer ones are copied."""
    floats = [i for i, t in enumerate(ema_tensors) if t.is_floating_point()]
    torch._foreach_lerp_([ema_tensors[i] for i in floats], [model_tensors[i] for i in floats], 1 - decay)
    for e, m in zip(ema_tensors, model_tensors):
        if not e.is_floating_point():
            e.copy_(m)


class FiniteBuffers:
    """Holds a module's floating buffers (BatchNorm's running statistics) at their last finite values: a
    non-finite forward, whose update the scaler skips, would leave them NaN for good. Call it after each
    optimizer step; it runs on the device, with no host sync."""

    def __init__(self, module):
        self.buffers = [b for b in module.buffers() if b.is_floating_point()]
        self.good = self.flat() if self.buffers else None

    def flat(self):
        return torch.cat([b.flatten() for b in self.buffers])

    def __call__(self):
        if not self.buffers:  # a ViT+ViT pair: LayerNorms hold no statistics
            return
        now = self.flat()
        self.good = torch.where(now.isfinite().all(), now, self.good)
        parts = self.good.split([b.numel() for b in self.buffers])
        torch._foreach_copy_(self.buffers, [p.view_as(b) for p, b in zip(parts, self.buffers)])


def to_host_async(tensor):
    """Starts copying a CUDA tensor to the host; returns a function that waits for the copy and gives a
    list. Read a step late, the GPU never idles waiting for the host."""
    if tensor.device.type != "cuda":
        return tensor.tolist
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    return lambda: (done.synchronize(), host.tolist())[1]


@torch.no_grad()
def evaluate(model, loader, device, amp_dtype, world):
    """Top-1/top-5 (%) of the ViT, the CNN, the pair head and the ensemble (mean of the two branches'
    probabilities), each readable val image counted once over all ranks; the count is checked."""
    if world > 1:  # every rank evaluates (and later saves) rank 0's BatchNorm statistics
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)
    was_training, names = model.training, ("vit", "cnn", "pair", "ens")
    model.eval()
    hits = torch.zeros(len(names), 2, device=device, dtype=torch.float64)  # (model, top-1 / top-5)
    counts = torch.zeros(2, device=device, dtype=torch.float64)  # (images evaluated, unreadable ones)
    for images, targets, replaced in loader:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        read = replaced.to(device, non_blocking=True) == 0  # an unreadable image's stand-in does not count
        with amp_context(device, amp_dtype):
            out = model(images)
        out["ens"] = (out["vit"].float().softmax(-1) + out["cnn"].float().softmax(-1)) / 2
        for i, name in enumerate(names):
            top = out[name].float().topk(min(5, out[name].shape[1]), dim=1).indices == targets[:, None]
            hits[i, 0] += (top[:, 0] & read).sum()
            hits[i, 1] += (top.any(dim=1) & read).sum()
        counts += torch.stack([read.sum(), (~read).sum()])
    (count, unreadable), hits = all_sum(counts, world).long().tolist(), all_sum(hits, world)
    model.train(was_training)
    if count + unreadable != len(loader.dataset):
        raise RuntimeError(f"evaluated {count} val images and skipped {unreadable}, expected {len(loader.dataset)}")
    if count == 0:
        raise UserError(f"none of the {unreadable} val images could be read: check --data")
    result = {"val_images": count, **({"val_bad_images": unreadable} if unreadable else {})}
    for i, name in enumerate(names):
        result[f"val_{name}_top1"], result[f"val_{name}_top5"] = (100 * hits[i] / count).tolist()
    return result


def evaluate_pair(model, ema, loader, device, amp_dtype, world):
    """evaluate() of the pair, and of its EMA (keys 'ema_val_...') if there is one."""
    result = evaluate(model, loader, device, amp_dtype, world)
    if ema is not None:
        result.update({f"ema_{k}": v for k, v in evaluate(ema, loader, device, amp_dtype, world).items()})
    return result


def save_atomic(obj, path):
    """Writes `obj` (bytes, or anything torch.save takes) to a temp file, fsyncs, then renames: a crash at any
    moment leaves the old file whole, and a failed write (a full disk) is a one-line error that leaves it too."""
    partial = f"{path}.tmp{os.getpid()}"
    try:
        with open(partial, "wb") as f:
            if isinstance(obj, bytes):
                f.write(obj)
            else:
                torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError raised over the OSError
        with contextlib.suppress(OSError):
            os.remove(partial)
        error = e if isinstance(e, OSError) else e.__context__
        if not isinstance(error, OSError):
            raise
        raise UserError(f"cannot write {path} ({error.strerror or error}); any previous one is left as it was") from None


def cpu_state(module):
    """A module's state dict on the CPU: an exported branch then loads on any machine, with or without a GPU."""
    return {k: v.cpu().contiguous() for k, v in module.state_dict().items()}  # channels_last: safetensors refuses it


def rng_state(world):
    """Every rank's CPU (and CUDA) RNG state, gathered: drop-path masks differ per rank."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    gathered = [state] * world
    if world > 1:
        dist.all_gather_object(gathered, state)
    return gathered


def load_checkpoint(path):
    """torch.load with weights_only=True of a file that must hold a dict; anything else is a one-line error."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such checkpoint")
    torch.serialization.add_safe_globals([argparse.Namespace])  # the `args` that DeiT's, timm's, torchvision's trainers save
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a file that is not a checkpoint fails in many ways: KeyError, IndexError, ...
        detail = (str(e).splitlines() or [""])[0][:200]
        raise UserError(f"{path}: not a readable checkpoint ({type(e).__name__}: {detail})") from None
    if not isinstance(state, dict):
        raise UserError(f"{path}: holds a {type(state).__name__}, not a dict of weights")
    return state


def load_branch_weights(model, state_dict):
    """Loads a timm/DeiT or torchvision checkpoint, or vpl's vit.pt/cnn.pt, into a branch; a head of another
    class count, or none, leaves the branch's new one (fine-tuning) and a ViT's position grid is resized."""
    for key in ("model", "state_dict"):  # DeiT and some trainers nest the weights
        if key in state_dict and isinstance(state_dict[key], dict):
            state_dict = state_dict[key]
    if "conv_proj.weight" in state_dict:
        state_dict = vit_from_torchvision(state_dict)
    own = model.state_dict()
    heads = [k for k in state_dict if k.split(".")[0] in ("head", "fc") and k in own and state_dict[k].shape != own[k].shape]
    state_dict = {k: v for k, v in state_dict.items() if k not in heads}
    try:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as e:  # shapes differ: another architecture
        raise UserError(f"checkpoint does not fit the branch: {(str(e).splitlines()[1:] or [str(e)])[0].strip()}") from None
    if unexpected or [k for k in missing if k.split(".")[0] not in ("head", "fc")]:
        raise UserError(f"checkpoint does not fit the branch: missing {missing[:3]}, unexpected {unexpected[:3]}")


def load_initial_weights(cfg, pair):
    """Starts the branches from torchvision's ImageNet weights (--init) or from files (--init-vit, --init-cnn):
    a branch's weights, or a vpl last.pt, whose pair gives the branch of the same side."""
    if cfg.init == "torchvision":
        import torchvision
        try:
            weights = {"vit": torchvision.models.vit_b_16(weights="IMAGENET1K_V1").state_dict(),
                       "cnn": torchvision.models.resnet50(weights="IMAGENET1K_V2").state_dict()}
        except (OSError, RuntimeError) as e:
            raise UserError(f"--init torchvision: cannot download the weights ({e})") from None
        load_branch_weights(pair.vit, weights["vit"])
        load_branch_weights(pair.cnn, weights["cnn"])
    for path, branch in ((cfg.init_vit, "vit"), (cfg.init_cnn, "cnn")):
        if path:
            state = load_checkpoint(path)
            pair_state = state.get("model")  # in a vpl last.pt, the whole pair: take this branch of it
            if isinstance(pair_state, dict) and "pair_head.fc.weight" in pair_state:
                state = {k[len(branch) + 1:]: v for k, v in pair_state.items() if k.startswith(branch + ".")}
            try:
                load_branch_weights(getattr(pair, branch), state)
            except UserError as e:
                raise UserError(f"--init-{branch} {path}: {e}") from None


def build_pair(cfg, num_classes):
    """The ViT, the CNN (channels_last: faster convolutions on GPUs) and the pair head, seeded so that
    every rank builds the same initial weights."""
    torch.manual_seed(cfg.seed)
    pair = PairModel(build_branch(cfg.vit, num_classes, cfg.img_size, cfg.drop_path),
                     build_branch(cfg.cnn, num_classes, cfg.img_size, cfg.drop_path), num_classes)
    pair.cnn.to(memory_format=torch.channels_last)
    return pair


def build_optimizers(cfg, pair, global_batch, cuda):
    """[(optimizer, peak lr, final lr)] of the ViT, the pair head (the ViT's kind) and the CNN: each clips and skips
    a non-finite step on its own, so that at a = 0 the branches are independent."""
    return [build_optimizer(cfg.vit, pair.vit, cfg, global_batch, cuda),
            build_optimizer(cfg.vit, pair.pair_head, cfg, global_batch, cuda),
            build_optimizer(cfg.cnn, pair.cnn, cfg, global_batch, cuda)]


def save_checkpoint(path, parts, meta, rank, world):
    """Every part's state dict and `meta` in one file, written by rank 0 while the others wait."""
    state = {**{name: part.state_dict() for name, part in parts.items()}, **meta}
    if rank == 0:
        save_atomic(state, path)
    if world > 1:
        dist.barrier()  # nobody runs ahead (or exits) while rank 0 writes


def resume_from(path, cfg, parts, num_classes, train_images, global_batch, world, rank):
    """Loads each of `parts` from the checkpoint, which must hold them all, after checking that it was made by
    the same setup, and (to train on) this rank's RNG state; returns the checkpoint."""
    ckpt = load_checkpoint(path)
    missing = [key for key in [*parts, "config", "num_classes", "global_batch", "world", "rng"] if key not in ckpt]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}: not a checkpoint of this vpl.py")
    # a key that a checkpoint predates has its default (--repeat-aug 1)
    made = {**asdict(Config()), **ckpt["config"], "classes": ckpt["num_classes"],
            "train images": ckpt.get("train_images", train_images)}
    now = {**asdict(cfg), "classes": num_classes, "train images": train_images}
    demo = ("seed", "demo_train", "demo_val") if made["data"] == now["data"] == "demo" else ()  # the demo's images
    order = () if cfg.eval_only else ("seed", "repeat_aug", "train images")  # the data order, which a resume continues
    for key in ("vit", "cnn", "img_size", "classes", *demo, *order):
        if made[key] != now[key]:
            raise UserError(f"{path} was made with {key.replace('_', '-')} {made[key]}, not {now[key]}")
    if not cfg.eval_only and (ckpt["global_batch"], ckpt["world"]) != (global_batch, world):
        raise UserError(f"{path} was made with global batch {ckpt['global_batch']} on {ckpt['world']} processes; "
                        f"resume with the same (now {global_batch} on {world})")
    for name, part in parts.items():
        part.load_state_dict(ckpt[name])
    if not cfg.eval_only:  # evaluation may run on any number of processes
        torch.set_rng_state(ckpt["rng"][rank]["cpu"])
        if torch.cuda.is_available() and torch.cuda.is_initialized() and "cuda" in ckpt["rng"][rank]:
            torch.cuda.set_rng_state(ckpt["rng"][rank]["cuda"])
    return ckpt


def text_chart(history, stage_bounds, epochs, height=10):
    """A text chart of both branches' val top-1 per epoch ('v' ViT, 'c' CNN, '*' both), stage
    boundaries marked with '|'."""
    if not history:
        return ""
    accs = [h[f"val_{branch}_top1"] for h in history for branch in ("vit", "cnn")]
    lo, span = min(accs), max(max(accs) - min(accs), 1e-9)
    row = lambda acc: round((acc - lo) / span * (height - 1))  # noqa: E731
    bounds = {round(s * epochs) for s in stage_bounds} - {0, epochs}
    lines = []
    for r in range(height - 1, -1, -1):
        cells = []
        for e, h in enumerate(history):
            cells.append("|" if e in bounds else "")
            v, c = row(h["val_vit_top1"]) == r, row(h["val_cnn_top1"]) == r
            cells.append("*" if v and c else "v" if v else "c" if c else " ")
        lines.append(f"{lo + span * r / (height - 1):6.1f} " + "".join(cells))
    return "\n".join(lines + ["       " + "".join(("|" if e in bounds else "") + str(e % 10) for e in range(len(history))),
                              "       epoch (last digit); v ViT, c CNN, * both; | stage boundary"])


# A launched optimizer step: where it was (step counts from 0, step_in_epoch the epoch's steps done with it), its
# pair weight a and lrs, and `read`, which waits for its flags on the host.
Flight = collections.namedtuple("Flight", "step epoch stage a step_in_epoch lrs read")


class Progress:
    """The training loop's bookkeeping, fed each step's flags a step late (the GPU never waits for it):
    mean loss terms, non-finite steps in a row, unreadable images, img/s; prints the progress line."""

    def __init__(self, cfg, rank, world, steps_per_epoch, train_size, ckpt_path, log, cuda, scaler=None):
        self.cfg, self.rank, self.world, self.log, self.cuda, self.scaler = cfg, rank, world, log, cuda, scaler
        self.steps_per_epoch, self.train_size, self.ckpt_path = steps_per_epoch, train_size, ckpt_path
        self.total_steps, self.global_batch = cfg.epochs * steps_per_epoch, cfg.batch_size * world * cfg.accum_steps
        self.names, self.bad_steps = [], 0

    def start_epoch(self, saved=None):
        """Zeroes the epoch's totals, or takes `saved` ones: state() of a checkpoint made inside this epoch."""
        saved = saved or {"names": self.names, "sums": None, "finite_steps": 0, "bad_images": 0}
        self.names, self.sums, self.finite_steps, self.bad_images = (
            saved[k] for k in ("names", "sums", "finite_steps", "bad_images"))
        self.restart_clock()

    def state(self):
        """The epoch's totals so far, so that a run resumed inside the epoch logs its mean losses whole."""
        return {"names": self.names, "sums": self.sums, "finite_steps": self.finite_steps, "bad_images": self.bad_images}

    def restart_clock(self):
        """Throughput counts from here (after the first step, which compiles)."""
        self.t_log = self.t_rate = time.perf_counter()
        self.data_time, self.images_seen, self.rate_steps = 0.0, 0, 0

    def settle(self, flight, quiet=False):
        """Reads a launched step's flags, [*loss terms, bad images, stop request] summed over ranks, and
        logs; returns why the run must stop ('nonfinite', 'bad_images', 'signal') or None."""
        cfg, flags = self.cfg, flight.read()
        values, self.bad_images = [v / self.world for v in flags[:-2]], self.bad_images + int(flags[-2])
        nonfinite = [k for k, v in zip(self.names, values) if not math.isfinite(v)]
        nonfinite = [k for k in nonfinite if k != "total"] or nonfinite  # name the terms, not their sum
        self.bad_steps = self.bad_steps + 1 if nonfinite else 0
        if nonfinite:
            self.log(f"vpl: warning: non-finite loss at step {flight.step + 1} in {', '.join(nonfinite)}: its gradients "
                     f"were not applied ({self.bad_steps}/{cfg.max_bad_steps} in a row)", file=sys.stderr)
        else:
            self.sums = [s + v for s, v in zip(self.sums, values)] if self.sums else values
            self.finite_steps += 1
            if self.rank == 0 and not quiet and ((flight.step + 1) % cfg.log_every == 0
                                                 or flight.step_in_epoch == self.steps_per_epoch):
                self.print_line(flight, values)
        if self.bad_steps >= cfg.max_bad_steps:
            self.log(f"vpl: error: {self.bad_steps} non-finite steps in a row (last in {', '.join(nonfinite)}); "
                     f"stopping. {self.ckpt_path} holds the last good state: lower the lr or try --amp bf16.", file=sys.stderr)
            return "nonfinite"
        if self.bad_images > 0.01 * self.train_size:
            self.log(f"vpl: error: {self.bad_images} unreadable images this epoch (> 1%): check --data; "
                     + (f"this epoch is not saved over {self.ckpt_path}" if os.path.exists(self.ckpt_path) else
                        "no checkpoint was saved yet"), file=sys.stderr)
            return "bad_images"
        return "signal" if flags[-1] else None

    def print_line(self, flight, values):
        now = time.perf_counter()
        rate = self.images_seen * self.world / (now - self.t_log)  # 0 right after a run's first step, not timed
        steps_left = self.total_steps - flight.step - 1
        eta = datetime.timedelta(seconds=round(steps_left * self.global_batch / rate)) if rate else "?"
        self.log(f"stage {flight.stage} | epoch {flight.epoch + 1}/{self.cfg.epochs} | step {flight.step + 1}/"
                 f"{self.total_steps} | " + " ".join(f"{k} {v:.3f}" for k, v in zip(self.names, values))
                 + f" | a {flight.a:.2f} | lr {flight.lrs[0]:.2e}/{flight.lrs[-1]:.2e}"  # ViT/CNN
                 + f" | {rate:.0f} img/s | data {100 * self.data_time / (now - self.t_log):.0f}%"
                 + f" | eta {eta}"
                 + (f" | mem {torch.cuda.max_memory_allocated() / 2**30:.1f}G" if self.cuda else "")
                 + (f" | fp16 scale {self.scaler.get_scale():g}" if self.scaler else "")  # a host wait, once a line
                 + (f" | bad images {self.bad_images}" if self.bad_images else ""), flush=True)
        self.t_log, self.data_time, self.images_seen = now, 0.0, 0

    def summary(self):
        """The epoch's mean loss terms (finite steps only), unreadable images and img/s (of this epoch's steps,
        a run's first step, which compiles, left out)."""
        return {**{f"train_{k}": v / max(1, self.finite_steps) for k, v in zip(self.names, self.sums or [])},
                "bad_images": self.bad_images,
                "img_per_s": self.rate_steps * self.global_batch / (time.perf_counter() - self.t_rate)}


def choose_precision(cfg, device, log):
    """(amp dtype or None, whether to compile), with safe fallbacks for what the device cannot do."""
    cuda = device.type == "cuda"
    amp = cfg.amp if cfg.amp != "auto" else ("bf16" if cuda else "off")
    if amp == "bf16" and cuda and torch.cuda.get_device_capability(device) < (8, 0):  # bf16 units from Ampere (8.0) on
        log("vpl: warning: this GPU has no bf16; using --amp fp16 with a GradScaler", file=sys.stderr)
        amp = "fp16"
    compile_ = cfg.compile == "on" or (cfg.compile == "auto" and cuda)
    if compile_ and not torch._dynamo.is_dynamo_supported():
        log("vpl: warning: torch.compile is not supported on this Python/platform; running eager", file=sys.stderr)
        compile_ = False
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp], compile_


# ------------------------------------------------------------------------------------------ bench
# Dense peak FLOP/s by the vendors' datasheets (bf16/fp16, tf32): the denominators of MFU.
PEAK_FLOPS = {"H100 PCIe": (756e12, 378e12), "H100 NVL": (835e12, 418e12), "H100": (989e12, 495e12),
              "H200": (989e12, 495e12), "A100": (312e12, 156e12)}  # the first name found in the GPU's name counts


def timed(fn, device, calls=3):
    """Seconds per call of fn, averaged over `calls` calls: CUDA events on the GPU (the work queued on it),
    perf_counter on the CPU."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - t0) / calls
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000 / calls


def bench(cfg, device, amp_dtype, compile_, train_loader, num_classes, log):
    """Training-step throughput (img/s) of each branch alone, of the pair step, and of torchvision's models
    for a vit_b_16 + resnet50 pair, timed in turn over 5 rounds (median, spread); compile time reported apart."""
    import gc
    import torchvision
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    cuda, B = device.type == "cuda", cfg.batch_size
    images = torch.randn(B, 3, cfg.img_size, cfg.img_size, device=device)
    targets = torch.randint(num_classes, (B,), device=device)
    scaler, fp16 = make_scaler(device, amp_dtype), amp_dtype == torch.float16
    gpu = torch.cuda.get_device_name() if cuda else ""
    peak = next((v[0 if amp_dtype else 1] for k, v in PEAK_FLOPS.items() if k in gpu), None)

    def prepare(model, arch, pair=False):
        """One model's training step, compiled and warmed up: (step, first step's seconds, FLOPs per image,
        peak memory above what was allocated before, in bytes, on CUDA)."""
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        resident = torch.cuda.memory_allocated() if cuda else 0  # the models prepared before this one
        model = model.to(device).train()
        schedules = build_optimizers(cfg, model, B, cuda) if pair else [build_optimizer(arch, model, cfg, B, cuda)]
        optimizers = [optimizer for optimizer, _, _ in schedules]
        step_model = torch.compile(model) if compile_ else model
        criterion, in_flight = PairLoss(cfg.pair_temp, cfg.teacher, cfg.label_smoothing), []
        keep_finite = FiniteBuffers(model)

        def step():
            if pair:  # as in training: the loss terms go to the host and are read a step late
                terms = train_step(step_model, criterion, images, targets, 0.5, amp_dtype, scaler)
                in_flight.append(to_host_async(torch.stack(list(terms.values()))))
            else:
                with amp_context(device, amp_dtype):
                    loss = F.cross_entropy(step_model(images).float(), targets)
                scaler.scale(loss).backward()
            apply_step(optimizers, scaler, 0.0, fp16)
            if pair:
                keep_finite()
            if len(in_flight) > 1:
                in_flight.pop(0)()
        first = timed(step, device, calls=1)  # compiles, if compiling
        timed(step, device, calls=2)  # warm-up: allocator, cuDNN algorithm choice
        # attention as matmuls: the counter has no formula for the CPU's fused attention kernel and would count 0
        with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
            model(images[:2])  # two images: BatchNorm in training needs two values per channel at any size
        memory = torch.cuda.max_memory_allocated() - resident if cuda else 0
        return step, first, 3 * counter.get_total_flops() / len(images[:2]), memory  # training ~ 3x the forward's

    log(f"bench: {gpu or device}, torch {torch.__version__}, batch {B}, {cfg.img_size} px, amp {amp_dtype or 'off (fp32)'}, compile {compile_}"
        + (f", MFU against {peak / 1e12:.0f} TFLOP/s" if peak else ""))
    models = {"ViT": prepare(build_branch(cfg.vit, num_classes, cfg.img_size, cfg.drop_path), cfg.vit),
              "CNN": prepare(build_branch(cfg.cnn, num_classes, cfg.img_size, cfg.drop_path)
                             .to(memory_format=torch.channels_last), cfg.cnn),
              "pair": prepare(build_pair(cfg, num_classes), cfg.vit, pair=True)}
    if cfg.vit == "vit_b_16" and cfg.cnn == "resnet50":
        models["torchvision ViT"] = prepare(torchvision.models.vit_b_16(num_classes=num_classes, image_size=cfg.img_size), "vit")
        models["torchvision CNN"] = prepare(torchvision.models.resnet50(num_classes=num_classes)
                                            .to(memory_format=torch.channels_last), "resnet")
    # every model steps once per round, in turn: a drift of the machine's speed hits all of them alike
    seconds = {name: [] for name in models}
    for _ in range(5):
        for name, (step, *_) in models.items():
            if cuda:  # untimed: should the models' cached memory not fit together, the allocator frees it here
                step()
            seconds[name].append(timed(step, device))
    for name, (step, first, flops, memory) in models.items():
        rates = [B / s for s in seconds[name]]
        median = statistics.median(rates)
        line = (f"{name:>16}: {median:8.4g} img/s, {1000 * B / median:.0f} ms/step (spread {min(rates):.4g}-{max(rates):.4g}), "
                f"first step {first:.2f} s{' incl. compile' if compile_ else ''}, {flops / 1e9:.3g} GFLOP/img")
        if cuda:
            line += f", peak mem {memory / 2**30:.1f} GiB" + (f", MFU {100 * median * flops / peak:.1f}%" if peak else "")
        log(line)

    def time_ratio(name, others):  # median over rounds of its time over the others' summed, all from one round
        return statistics.median(seconds[name][r] / sum(seconds[o][r] for o in others) for r in range(len(seconds[name])))
    log(f"pair overhead vs ViT + CNN alone: {100 * (time_ratio('pair', ['ViT', 'CNN']) - 1):+.1f}%")
    if "torchvision ViT" in models:
        log(f"time ratio ours / torchvision: ViT {time_ratio('ViT', ['torchvision ViT']):.3f} (ours with drop-path "
            f"{cfg.drop_path}, theirs none), ResNet {time_ratio('CNN', ['torchvision CNN']):.3f}")
    if train_loader is not None:  # the input pipeline alone, after the workers have started
        it = iter(train_loader)
        for _ in range(min(cfg.workers + 1, len(train_loader) - 1)):
            next(it)
        t0, seen = time.perf_counter(), 0
        for images, *_ in itertools.islice(it, 30):
            seen += len(images)
        log(f"input pipeline: {seen / (time.perf_counter() - t0):.1f} img/s decoded and augmented with {cfg.workers} workers "
            f"(the pair step needs {B / statistics.median(seconds['pair']):.1f})")


# ------------------------------------------------------------------------------------------- main
def main(argv=None):
    """The command line: bad input ends in one line on stderr and exit code 2."""
    try:
        run(parse_config(argv))
    except UserError as e:
        print(f"vpl: error: {e}", file=sys.stderr)
        sys.exit(2)


def run(cfg):
    """The whole job, in each process: trains the pair as `cfg` says and returns the per-epoch records
    (with --eval-only: evaluates and returns the result; with --bench: measures and returns None). Exits with
    code 3 when non-finite steps or unreadable images stop it."""
    # STAGE 1: processes, device, precision --------------------------------------------------------
    rank, world, device = setup_distributed(cfg.device)
    cuda, main_rank = device.type == "cuda", rank == 0
    log = print if main_rank else (lambda *a, **k: None)
    torch.manual_seed(cfg.seed + rank)  # the bench's models and batches (training seeds again after building the pair)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # one image size: cuDNN times its algorithms once, keeps the fastest
    amp_dtype, compile_ = choose_precision(cfg, device, log)
    ckpt_path, log_path = os.path.join(cfg.out, "last.pt"), os.path.join(cfg.out, "log.jsonl")

    def ranks_seeing(path):  # how many processes see this file (on node-local folders, some may not)
        return round(all_sum(torch.tensor(float(os.path.exists(path)), device=device), world).item())
    seen = ranks_seeing(ckpt_path)
    if 0 < seen < world:  # all ranks must take the same path, or they wait for each other forever
        raise UserError(f"{ckpt_path} is seen by {seen} of {world} processes: --out must be a folder that all share")
    resume = cfg.resume or cfg.eval_only or (cfg.auto_resume and seen > 0)
    if resume and not seen:
        raise UserError(f"{ckpt_path}: no checkpoint" + ("" if cfg.eval_only else " to resume from (drop --resume to start afresh)"))
    if not resume and not cfg.bench and seen:
        raise UserError(f"{ckpt_path} exists: pass --resume to continue it, or choose another --out")
    if not cfg.bench and not cfg.eval_only:  # before the data and models are built
        try:
            os.makedirs(cfg.out, exist_ok=True)
        except OSError as e:
            raise UserError(f"--out {cfg.out}: cannot make that folder ({e.strerror or e})") from None
        if not os.access(cfg.out, os.W_OK):
            raise UserError(f"--out {cfg.out}: no write access")
        if world > 1 and not resume:  # a node-local --out works until a restart finds last.pt on one node only
            token = all_sum(torch.tensor(os.getpid() if main_rank else 0, device=device), world).item()
            probe = os.path.join(cfg.out, f".probe{token}")
            if main_rank:
                with contextlib.suppress(OSError):  # a full disk: the first checkpoint's write says so, in one line
                    open(probe, "w").close()
            dist.barrier()
            shared = ranks_seeing(probe)
            if 0 < shared < world:
                log(f"vpl: warning: --out {cfg.out} is seen by {shared} of {world} processes: a restart would find "
                    "last.pt on some nodes only and stop; use a folder that all share", file=sys.stderr)
        for name in os.listdir(cfg.out) if main_rank else ():
            stem, _, pid = name.partition(".tmp")
            if pid.isdigit() and stem in ("last.pt", "log.jsonl", "vit.pt", "cnn.pt", "vit_ema.pt", "cnn_ema.pt") or (
                    name.startswith(".probe") and name[6:].isdigit()):
                os.remove(os.path.join(cfg.out, name))  # a write that a kill cut short (save_atomic), or the probe
        if main_rank and not resume and os.path.isfile(log_path):  # of a run whose first last.pt never landed
            os.replace(log_path, log_path + ".old")
            log(f"vpl: warning: {log_path} has no last.pt beside it: moved to log.jsonl.old", file=sys.stderr)

    if cfg.bench and cfg.data in DATASETS:  # synthetic batches: no data set to build
        return bench(cfg, device, amp_dtype, compile_, None, 1000 if cfg.preset == "imagenet" else 10, log)

    # STAGE 2: data ----------------------------------------------------------------------------------
    train_set, val_set, num_classes = build_datasets(cfg, rank, world)
    counts = torch.tensor([len(train_set), len(val_set), num_classes], device=device)
    extremes = torch.cat([counts, -counts])  # after a MAX over ranks: each count's largest, and minus its smallest
    if world > 1:
        dist.all_reduce(extremes, dist.ReduceOp.MAX)
    if (extremes[:3] != -extremes[3:]).any():  # node-local copies of --data that differ: the ranks' steps would part ways
        raise UserError(f"--data {cfg.data}: the processes see different data (train images, val images, classes from "
                        f"{(-extremes[3:]).tolist()} to {extremes[:3].tolist()}): every node needs the same copy")
    train_loader, val_loader = build_loaders(cfg, train_set, val_set, rank, world, cuda)
    global_batch = cfg.batch_size * world * cfg.accum_steps
    steps_per_epoch = len(train_loader) // cfg.accum_steps
    if steps_per_epoch < 1 and not cfg.eval_only:
        raise UserError(f"the train split ({len(train_set)} images) is smaller than one global batch ({global_batch})")
    if cfg.bench:
        return bench(cfg, device, amp_dtype, compile_, train_loader, num_classes, log)
    if cfg.repeat_aug > 1 and global_batch < 2 * cfg.repeat_aug and not cfg.eval_only:  # global_batch / N images
        raise UserError(f"--repeat-aug {cfg.repeat_aug} fills a global batch of {global_batch} with copies of fewer "
                        f"than 2 images: use at most {max(1, global_batch // 2)}, or a larger --batch-size")
    total_steps, warmup_steps = cfg.epochs * steps_per_epoch, round(cfg.warmup_epochs * steps_per_epoch)
    mix = build_mix(cfg, num_classes)

    # STAGE 3: the pair, its loss and three optimizers ------------------------------------------------
    pair = build_pair(cfg, num_classes)
    torch.manual_seed(cfg.seed + rank)  # the same weights on every rank (build_pair), but drop-path masks of its own
    load_initial_weights(cfg, pair)
    if cfg.sync_bn and cuda and world > 1:
        pair.cnn = nn.SyncBatchNorm.convert_sync_batchnorm(pair.cnn)
    pair.to(device)
    criterion = PairLoss(cfg.pair_temp, cfg.teacher, cfg.label_smoothing)
    pair_schedule = PairSchedule(cfg.stages, cfg.pair_weight, cfg.ramp)  # the stage and a at each optimizer step
    schedules = build_optimizers(cfg, pair, global_batch, cuda)
    optimizers = [optimizer for optimizer, _, _ in schedules]
    scaler, fp16 = make_scaler(device, amp_dtype), amp_dtype == torch.float16
    parts = {"model": pair, **dict(zip(("opt_vit", "opt_pair", "opt_cnn"), optimizers)), "scaler": scaler}  # last.pt

    # STAGE 4: resume, the EMA, compile ----------------------------------------------------------------
    to_load = {"model": pair} if cfg.eval_only else parts  # evaluation needs no optimizer
    ckpt = resume_from(ckpt_path, cfg, to_load, num_classes, len(train_set), global_batch, world, rank) if resume else {}
    start_epoch, step, step_in_epoch = ckpt.get("epoch", 0), ckpt.get("step", 0), ckpt.get("step_in_epoch", 0)

    def step_limit_reached():  # --max-steps met inside an epoch (one whose steps are done is evaluated first)
        return cfg.max_steps > 0 and step >= cfg.max_steps and step_in_epoch < steps_per_epoch
    if start_epoch + (step_in_epoch > 0) > cfg.epochs and not cfg.eval_only:
        trained = start_epoch + step_in_epoch / steps_per_epoch
        raise UserError(f"{ckpt_path} has trained {trained:g} epochs, more than --epochs {cfg.epochs}")
    if step_limit_reached() and not cfg.eval_only:
        raise UserError(f"{ckpt_path} has trained {step} steps, reaching --max-steps {cfg.max_steps}: raise it to go on")
    best = ckpt.get("best", {"vit": -1.0, "cnn": -1.0})
    # the pair's EMA, BatchNorm statistics too: the checkpoint's, else a copy of the (resumed) pair
    with_ema = "ema" in ckpt if cfg.eval_only else cfg.ema > 0  # eval-only: whatever the checkpoint holds
    ema = copy.deepcopy(pair).requires_grad_(False) if with_ema else None
    if ema is not None:
        parts["ema"] = ema
        if "ema" in ckpt:
            ema.load_state_dict(ckpt["ema"])
    # state_dict() values share storage with the live tensors (loading copies in place): made once, kept
    ema_tensors = (list(ema.state_dict().values()), list(pair.state_dict().values())) if ema else None
    keep_finite = FiniteBuffers(pair)  # after the resume: its statistics are the last finite ones
    step_model = torch.compile(pair) if compile_ else pair  # compile the plain module, then wrap in DDP
    model = DDP(step_model, device_ids=[device.index] if cuda else None) if world > 1 else step_model
    history = []
    if resume and not cfg.eval_only and main_rank and os.path.exists(log_path):  # drop epochs last.pt lacks
        with open(log_path) as f:
            whole = [json.loads(line) for line in f if line.endswith("}\n")]  # a line torn by a crash is not
            history = [h for h in whole if h["epoch"] < start_epoch]
        save_atomic("".join(json.dumps(h) + "\n" for h in history).encode(), log_path)
    if resume:
        # flags the resumed run changes (more --epochs, say, stretch the schedule and the stages); keys that an older
        # checkpoint lacks were at their defaults
        now, made = asdict(cfg), {**asdict(Config()), **ckpt["config"]}
        changed = [] if cfg.eval_only else [f"--{k.replace('_', '-')} {v!r} -> {now[k]!r}" for k, v in made.items()
                                            if v != now.get(k, v) and k not in ("resume", "auto_resume", "eval_only", "out")]
        log(f"resumed from {ckpt_path}: epoch {start_epoch}, step {step}"
            + (f"; changed: {', '.join(changed)}" if changed else ""))
        if fp16 and scaler.get_scale() == 1.0:  # a bf16 or fp32 run's scaler: scale 1 would flush fp16's gradients
            scaler.load_state_dict(make_scaler(device, amp_dtype).state_dict())
            log(f"the checkpoint's GradScaler was not fp16's (scale 1): it starts afresh at {scaler.get_scale():g}")
    if cfg.eval_only:
        result = evaluate_pair(step_model, ema, val_loader, device, amp_dtype, world)
        log(json.dumps(result))
        if world > 1:
            dist.destroy_process_group()
        return result

    s1, s2 = pair_schedule.s1, pair_schedule.s2
    log(json.dumps(asdict(cfg)))
    log(f"processes {world}, batch {cfg.batch_size} per process x {cfg.accum_steps} accumulation = global batch "
        f"{global_batch}; {steps_per_epoch} steps/epoch, {total_steps} steps; amp {amp_dtype or 'off (fp32)'}, compile {compile_}, "
        f"device {device}")
    log(f"lr rule: ViT-type {cfg.lr_vit} x {global_batch}/512 (AdamW), ResNet-type {cfg.lr_cnn} x {global_batch}/1024 "
        f"(SGD) -> {cfg.vit} {schedules[0][1]:.3g}, {cfg.cnn} {schedules[-1][1]:.3g}; warm-up {warmup_steps} steps, "
        "then cosine")
    if warmup_steps >= total_steps:
        log(f"vpl: warning: the warm-up (--warmup-epochs {cfg.warmup_epochs:g}) spans the whole run: the lr never anneals",
            file=sys.stderr)
    if cfg.min_lr_vit > schedules[0][1]:  # the peak scales with the global batch, the floor does not
        log(f"vpl: warning: --min-lr-vit {cfg.min_lr_vit:g} is above the ViT's peak lr {schedules[0][1]:.3g} at this global "
            "batch: its lr rises after the warm-up; lower --min-lr-vit", file=sys.stderr)
    log(f"stages: 1 warm-up epochs [0, {s1 * cfg.epochs:g}), 2 pair [{s1 * cfg.epochs:g}, {s2 * cfg.epochs:g}) "
        f"with a -> {cfg.pair_weight} over {cfg.ramp * cfg.epochs:g} epochs, 3 solo [{s2 * cfg.epochs:g}, {cfg.epochs}]")

    # STAGE 5: train, evaluate, save, every epoch ---------------------------------------------------------
    stop_signal = threading.Event()  # SIGTERM/SIGINT: finish the step, save, exit
    progress = Progress(cfg, rank, world, steps_per_epoch, len(train_set), ckpt_path, log, cuda, scaler if fp16 else None)
    progress.bad_steps, first_step, stopped = ckpt.get("bad_steps", 0), step, None  # non-finite steps in a row

    def checkpoint(epoch, step_in_epoch):
        meta = {"epoch": epoch, "step": step, "step_in_epoch": step_in_epoch, "best": best, "config": asdict(cfg),
                "num_classes": num_classes, "train_images": len(train_set), "rng": rng_state(world),
                "global_batch": global_batch, "world": world, "bad_steps": progress.bad_steps,
                "epoch_totals": progress.state() if step_in_epoch else None}
        save_checkpoint(ckpt_path, parts, meta, rank, world)

    def saved_and_stopped(reason):
        more = " and a higher --max-steps (or none)" if step_limit_reached() else ""
        log(f"stopped at step {step} ({reason}); saved {ckpt_path}; continue with --resume{more}")
        return reason

    def stop_requested():  # at an epoch's end: did any rank get a signal? All agree, by one all-reduce
        return all_sum(torch.tensor(float(stop_signal.is_set()), device=device), world).item() > 0

    old_handlers = {sig: signal.signal(sig, lambda signum, frame: stop_signal.set())
                    for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for epoch in range(start_epoch, cfg.epochs):
            train_loader.sampler.set_epoch(epoch)  # a new order every epoch, also the first resumed one
            train_loader.sampler.start = step_in_epoch * cfg.accum_steps * cfg.batch_size  # in this rank's images
            progress.start_epoch(ckpt.get("epoch_totals") if epoch == start_epoch else None)
            t_epoch = t_data = time.perf_counter()
            in_flight, bad_since_step = None, 0
            stage, a = pair_schedule((step - 1) / total_steps)  # the last step's, should a resumed epoch have none left
            batches = itertools.islice(train_loader, (steps_per_epoch - step_in_epoch) * cfg.accum_steps)
            for micro, (images, targets, bad) in enumerate(batches):  # whole optimizer steps only
                progress.data_time += time.perf_counter() - t_data
                bad_since_step += int(bad.sum())
                images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
                if mix is not None:
                    with torch.random.fork_rng(devices=[]):  # MixUp/CutMix drawn from (seed, rank, step, micro-step)
                        mix_seed = ((cfg.seed * 1_000_003 + step) * 1009 + micro % cfg.accum_steps) * 1031 + rank
                        torch.default_generator.manual_seed(mix_seed % 2 ** 63)
                        # shuffled first: MixUp/CutMix mix neighbours, and on fewer processes than --repeat-aug's
                        order = torch.randperm(len(images))  # copies, an image's copies are neighbours in a batch
                        order = (order.pin_memory() if cuda else order).to(device, non_blocking=True)
                        images, targets = mix(images[order], targets[order])
                last_micro = (micro + 1) % cfg.accum_steps == 0
                stage, a = pair_schedule(step / total_steps)
                with model.no_sync() if world > 1 and not last_micro else contextlib.nullcontext():
                    terms = train_step(model, criterion, images, targets, a, amp_dtype, scaler, 1 / cfg.accum_steps)
                micro_terms = torch.stack(list(terms.values())) / cfg.accum_steps  # summed: the mean over micro-steps
                step_terms = micro_terms if micro % cfg.accum_steps == 0 else step_terms + micro_terms
                progress.images_seen += len(images)
                if not last_micro:
                    t_data = time.perf_counter()
                    continue
                # launch the step without waiting for it: its flags [*loss terms, bad images, stop request] start
                # for the host, summed over ranks, and the scaler skips non-finite gradients on the device
                host = torch.tensor([float(bad_since_step), float(stop_signal.is_set())])
                host = host.pin_memory() if cuda else host  # a copy from pageable memory would wait for the GPU
                flags = all_sum(torch.cat([step_terms, host.to(device, non_blocking=True)]), world)
                lrs = [lr_at(step, total_steps, warmup_steps, peak, final) for _, peak, final in schedules]
                flight = Flight(step, epoch, stage, a, step_in_epoch + 1, lrs, to_host_async(flags))
                for (optimizer, _, _), lr in zip(schedules, lrs):
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                apply_step(optimizers, scaler, cfg.clip_grad, fp16)
                keep_finite()
                if ema is not None:  # after a skipped step the weights are unchanged, and so averaged again
                    ema_update(*ema_tensors, cfg.ema)
                progress.names, bad_since_step = list(terms), 0
                step, step_in_epoch, progress.rate_steps = step + 1, step_in_epoch + 1, progress.rate_steps + 1
                if step == first_step + 1:  # the first step compiles: wait for it and keep it out of img/s
                    if cuda:
                        torch.cuda.synchronize()
                    progress.restart_clock()
                # the previous step's flags are on the host by now: settle it. The last step of an epoch or run is
                # settled at once, so nothing is in flight at a checkpoint; its line is printed, not the previous one
                last = step_in_epoch == steps_per_epoch or (cfg.max_steps and step >= cfg.max_steps)
                previous, in_flight = in_flight, flight
                stopped = progress.settle(previous, quiet=last) if previous else None
                if not stopped and last:
                    stopped, in_flight = progress.settle(flight), None
                    if not stopped and step_limit_reached():
                        stopped = "max_steps"
                if stopped == "signal" and in_flight is not None:  # the step launched after the one that asked to stop
                    stopped = progress.settle(in_flight, quiet=True) or stopped  # counts too; it may be non-finite
                if stopped in ("signal", "max_steps"):
                    checkpoint(epoch, step_in_epoch)
                    saved_and_stopped(stopped)
                if stopped:
                    break
                t_data = time.perf_counter()
            # a signal after the last step's flags left: save before the evaluation, which may outlast the grace
            # period (torchrun waits 30 s); the resumed run evaluates this epoch first, as its steps are done
            if not stopped and stop_requested():
                checkpoint(epoch, step_in_epoch)
                stopped = saved_and_stopped("signal")
            if stopped:
                break
            step_in_epoch = 0

            # evaluate, log, save ------------------------------------------------------------------------------
            train_stats = progress.summary()
            try:
                result = evaluate_pair(step_model, ema, val_loader, device, amp_dtype, world)
            except UserError as e:  # a damaged val split: keep the steps, and --resume evaluates them once it is fixed
                checkpoint(epoch, steps_per_epoch)
                raise UserError(f"{e}; this epoch's steps are saved in {ckpt_path}: --resume evaluates them") from None
            record = {"epoch": epoch, "stage": stage, "pair_weight": a, "world_size": world, **result, **train_stats,
                      "time_s": time.perf_counter() - t_epoch}
            history.append(record)
            log(" | ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()
                           if k.startswith(("epoch", "val_", "ema_val", "img")) and not k.endswith("top5")))
            for branch in ("vit", "cnn"):
                if result[f"val_{branch}_top1"] > best[branch]:
                    best[branch] = result[f"val_{branch}_top1"]
                    if main_rank:
                        save_atomic(cpu_state(getattr(pair, branch)), os.path.join(cfg.out, f"{branch}.pt"))
            if main_rank:
                try:
                    with open(log_path, "a") as f:
                        f.write(json.dumps(record) + "\n")
                except OSError as e:  # a full disk: say so in one line; last.pt is still the previous epoch's
                    raise UserError(f"cannot write {log_path} ({e.strerror or e}); "
                                    f"{ckpt_path} is left as it was") from None
            checkpoint(epoch + 1, 0)
            if epoch + 1 < cfg.epochs:  # the step limit, or a signal during the evaluation or the saving: stop now
                stopped = "max_steps" if step_limit_reached() else "signal" if stop_requested() else None
                if stopped:
                    saved_and_stopped(stopped)
                    break
    finally:  # also after an error: a caller of run() gets its Ctrl-C back
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)

    # STAGE 6: report and export -----------------------------------------------------------------------
    if stopped is None:
        if ema is not None and main_rank:
            for branch in ("vit", "cnn"):
                save_atomic(cpu_state(getattr(ema, branch)), os.path.join(cfg.out, f"{branch}_ema.pt"))
        log(text_chart(history, (s1, s2), cfg.epochs))
        log(f"best val top-1: ViT {best['vit']:.2f}, CNN {best['cnn']:.2f}; weights in {cfg.out}/vit.pt, cnn.pt")
    if world > 1:  # every rank gets here together; after a crash on one rank, torchrun ends the others
        dist.destroy_process_group()
    if stopped in ("nonfinite", "bad_images"):
        sys.exit(3)
    return history


if __name__ == "__main__":
    main()
