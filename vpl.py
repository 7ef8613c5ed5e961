"""vpl.py - Vision Pair Learning (VPL, arXiv 2112.00965) in one file.

A ViT-B/16 and a ResNet-50 train side by side on the same batches. A pair learning module lets each
branch learn from its partner (through a pair head that combines both) until the last stage of
training, so that both end better than alone (the paper's claim; beyond its abstract, the method is
our reconstruction: README, "The method").
Read it top to bottom: the config, the two branches, the pair learning module, the data, then the
training loop (`train_epoch`) and the job around it (`run`).

    python vpl.py                                          # CPU demo: tiny branches, built-in data
    torchrun --nproc_per_node=8 vpl.py --data /imagenet    # the real job: ViT-B/16 + ResNet-50
    python vpl.py --bench --preset imagenet                # training throughput against torchvision
"""
import argparse, atexit, contextlib, copy, datetime, json, math, multiprocessing, os  # noqa: E401
import signal, statistics, sys, time  # noqa: E401
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset

# ---------------------------------------------------------------------------------------- config
INF = math.inf

def option(default, help, choices=None, low=0, high=INF):
    """A Config field that becomes a command-line flag; a number must be finite, in [low, high]."""
    return field(default=default, metadata=dict(help=help, choices=choices, bounds=(low, high)))

@dataclass
class Config:
    """Every knob of a run: the defaults are the CPU demo; PRESETS override them; flags both."""
    preset: str = option("", "demo or imagenet (default: imagenet when --data is a folder)",
                         ["", "demo", "imagenet"])
    # data
    data: str = option("demo", "'demo' (built in) or an ImageFolder root with train/ and val/")
    demo_train: int = option(3000, "images in the demo's train split", low=1)
    demo_val: int = option(1000, "images in the demo's val split", low=1)
    demo_classes: int = option(20, "classes of the demo: one random glyph each", low=2)
    demo_noise: float = option(0.15, "share of the demo's train labels redrawn at random, as real "
                               "labels hold errors (val labels stay true)", high=1)
    img_size: int = option(32, "image side, pixels", low=1)
    workers: int = option(2, "data loading workers per training process")
    # models
    vit: str = option("vit_tiny", "transformer branch", ["vit_tiny", "vit_b_16"])
    cnn: str = option("resnet_tiny", "partner branch (a ViT gives the ViT+ViT ablation)",
                      ["resnet_tiny", "resnet50", "vit_tiny", "vit_b_16"])
    drop_path: float = option(0.1, "stochastic depth rate of each ViT's last block", high=0.999)
    init: str = option("", "'torchvision': start from torchvision's ImageNet weights",
                       ["", "torchvision"])
    init_vit: str = option("", "ViT weights to start from (timm/DeiT, torchvision, vpl last.pt)")
    init_cnn: str = option("", "ResNet weights to start from (torchvision, vpl last.pt)")
    # optimization
    epochs: int = option(20, "training epochs", low=1)
    batch_size: int = option(128, "images per process per micro-step", low=2)  # BatchNorm: 2+
    accum_steps: int = option(1, "micro-steps per optimizer step", low=1)
    lr_vit: float = option(4e-3, "AdamW peak lr per 512 images of global batch")
    lr_cnn: float = option(2.0, "SGD peak lr per 1024 images of global batch")
    min_lr_vit: float = option(1e-5, "AdamW lr at the end of the cosine")
    wd_vit: float = option(0.05, "AdamW weight decay")
    wd_cnn: float = option(5e-5, "SGD weight decay")
    warmup_epochs: float = option(1.0, "linear lr warm-up, epochs")
    clip_grad: float = option(0.0, "max gradient norm of each branch and the pair head (0: off)")
    label_smoothing: float = option(0.1, "label smoothing of every cross-entropy", high=0.999)
    mixup: float = option(0.0, "MixUp alpha (0: off)")
    cutmix: float = option(0.0, "CutMix alpha (0: off)")
    randaug: int = option(0, "RandAugment magnitude, 0-10 (DeiT's 'rand-m9' is 9; 0: off)", high=10)
    repeat_aug: int = option(1, "repeated augmentation: N copies of 1/N of the images an epoch",
                             low=1)
    reprob: float = option(0.0, "RandomErasing probability", high=1)
    ema: float = option(0.0, "EMA decay per step of the whole pair (0: off)", high=0.999999)
    # pair learning
    pair_weight: float = option(0.5, "a: weight of the partner loss in stage 2, in [0, 1]",
                               high=1)
    pair_temp: float = option(4.0, "T: distillation temperature, > 0", low=0.01, high=100)
    teacher: str = option("pair", "who teaches each branch: the pair head, which combines both "
                          "branches, or the partner", ["pair", "partner"])
    teach: str = option("always", "which samples a teacher teaches: all; those on which it gives "
                        "the label more probability than its student (better); the whole batch "
                        "if its mean CE is the lower (ahead)", ["always", "better", "ahead"])
    stages: str = option("0,0.8", "S1,S2: stage 2 spans [S1, S2) of training, fractions")
    ramp: float = option(0.05, "fraction of training over which a rises at the start of stage 2",
                         high=1)
    # system
    device: str = option("auto", "auto: cuda if there is one", ["auto", "cpu", "cuda"])
    amp: str = option("auto", "autocast dtype (auto: bf16 on CUDA, off on the CPU)",
                      ["auto", "off", "bf16", "fp16"])
    compile: str = option("auto", "torch.compile the pair (auto: on CUDA)", ["auto", "on", "off"])
    sync_bn: bool = option(False, "SyncBatchNorm in the CNN (several GPUs)")
    seed: int = option(0, "seed of everything: data, init, augmentation", high=2 ** 32 - 1)
    out: str = option("", "output folder (default runs/<preset>)")
    resume: bool = option(False, "continue from <out>/last.pt if there is one (torchrun restarts)")
    eval_only: bool = option(False, "evaluate <out>/last.pt and exit")
    bench: bool = option(False, "measure training throughput on synthetic batches and exit")
    log_every: int = option(50, "optimizer steps between progress lines (host syncs)", low=1)
    max_steps: int = option(0, "stop and save after this many optimizer steps (0: no limit)")

PRESETS = {
    "demo": {},
    # ViT: DeiT-B (arXiv 2012.12877); ResNet: torchvision's current recipe; data as DeiT.
    "imagenet": dict(vit="vit_b_16", cnn="resnet50", img_size=224, epochs=300, workers=10,
                     lr_vit=5e-4, lr_cnn=0.5, wd_cnn=2e-5, warmup_epochs=5.0, mixup=0.8,
                     cutmix=1.0, randaug=9, reprob=0.25, repeat_aug=3),
}

class UserError(Exception):
    """Bad input: main() prints it as one line and exits with code 2, without a traceback."""

class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # one line, without the usage text
        raise UserError(message)

def parse_config(argv=None):
    """Flags from Config's fields; the preset fills in what the command line leaves out."""
    parser = OneLineParser(description=__doc__.split("\n")[0], allow_abbrev=False,
                           argument_default=argparse.SUPPRESS)
    for f in fields(Config):
        name, help = "--" + f.name.replace("_", "-"), f.metadata["help"]
        if isinstance(f.default, bool):
            parser.add_argument(name, action=argparse.BooleanOptionalAction, help=help)
            continue
        if f.default != "":
            imagenet = PRESETS["imagenet"].get(f.name, f.default)
            help += f" (default {f.default!r}" + (f", imagenet {imagenet!r})"
                                                  if imagenet != f.default else ")")
        parser.add_argument(name, type=type(f.default), choices=f.metadata["choices"], help=help)
    given = vars(parser.parse_args(argv))
    preset = given.get("preset") or ("demo" if given.get("data", "demo") == "demo" else "imagenet")
    cfg = Config(**{**PRESETS[preset], **given, "preset": preset})
    cfg.out = cfg.out or os.path.join("runs", preset)
    check_config(cfg)
    return cfg

def check_config(cfg):
    """Raises a UserError naming the first flag whose value makes no sense."""
    for f in fields(Config):
        (low, high), value = f.metadata["bounds"], getattr(cfg, f.name)
        if type(value) not in (int, float):  # a bool or a string has no range
            continue
        flag = "--" + f.name.replace("_", "-")
        if not math.isfinite(value):  # NaN would pass the comparison below
            raise UserError(f"{flag} must be a finite number, got {value}")
        if not low <= value <= high:
            raise UserError(f"{flag} must be in [{low}, {high}], got {value}")
    patch = max(4 if "tiny" in arch else 16 for arch in (cfg.vit, cfg.cnn) if "vit" in arch)
    if cfg.img_size % patch:
        raise UserError(f"--img-size {cfg.img_size} must be a multiple of the ViT's patch size "
                        f"({patch})")
    if cfg.init and (cfg.vit, cfg.cnn) != ("vit_b_16", "resnet50"):
        raise UserError("--init torchvision holds a ViT-B/16 and a ResNet-50: it needs --vit "
                        "vit_b_16 --cnn resnet50")
    try:
        PairSchedule(cfg.stages, cfg.pair_weight, cfg.ramp)  # built here only to check --stages
    except ValueError as e:
        raise UserError(str(e)) from None
# -------------------------------------------------------------------------------------- ViT-B/16
# "An Image is Worth 16x16 Words", arXiv 2010.11929; recipe and parameter names of DeiT (2012.12877)
class DropPath(nn.Module):
    """Stochastic depth (arXiv 1603.09382): in training, drops a residual branch per sample."""
    def __init__(self, p=0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)  # rescaled: the expected output is unchanged

class Attention(nn.Module):
    """Multi-head self-attention: one fused qkv projection and PyTorch's fused SDPA kernel."""
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        # (B, N, 3C) -> (3, B, heads, N, C // heads)
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v; DeiT: no dropout
        return self.proj(x.transpose(1, 2).reshape(B, N, C))  # (B, heads, N, d) -> (B, N, C)

class Mlp(nn.Module):
    """The block's feed-forward part: Linear, GELU, Linear."""
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
    """Cuts the image into patches and projects each to a token: one strided convolution."""
    def __init__(self, patch_size, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, 3, H, W) -> (B, C, g, g) -> (B, N, C)

def resize_pos_embed(pos_embed, grid):
    """Bicubic resize of a (1, 1 + g*g, C) position embedding to grid x grid; the cls slot is kept.
    For weights made at another image size (fine-tuning at 384 px, say)."""
    cls, patches = pos_embed[:, :1], pos_embed[:, 1:]
    old = math.isqrt(patches.shape[1])
    if old * old != patches.shape[1]:  # DeiT's distilled ViTs, say, have a second token
        raise ValueError(f"pos_embed of {pos_embed.shape[1]} tokens is not 1 + a square grid")
    patches = patches.reshape(1, old, old, -1).permute(0, 3, 1, 2)  # (1, N, C) -> (1, C, g, g)
    patches = F.interpolate(patches.float(), size=(grid, grid), mode="bicubic", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)  # back to (1, N, C)
    return torch.cat([cls, patches.to(cls.dtype)], dim=1)

class ViT(nn.Module):
    """Vision Transformer: cls token, learned position embedding, pre-norm blocks. Parameter names
    and forward_features/forward_head follow timm, so DeiT/timm weights load with strict=True."""
    def __init__(self, img_size=224, patch_size=16, dim=768, depth=12, heads=12, mlp_ratio=4.0,
                 drop_path=0.0, num_classes=1000):
        super().__init__()
        self.grid, self.num_features = img_size // patch_size, dim
        self.patch_embed = PatchEmbed(patch_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid ** 2, dim))
        rates = torch.linspace(0, drop_path, depth).tolist()  # deeper blocks dropped more often
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio, r) for r in rates])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward_features(self, x):
        x = self.patch_embed(x)                                            # (B, N, C)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1)   # (B, 1 + N, C)
        return self.norm(self.blocks(x + self.pos_embed))                  # every token, normed

    def forward_head(self, x, pre_logits=False):
        x = x[:, 0]                                                        # cls token: (B, C)
        return x if pre_logits else self.head(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))

def vit_b_16(num_classes=1000, img_size=224, drop_path=0.1):
    """ViT-B/16 (DeiT-B): 86,567,656 parameters with 1000 classes at 224 px."""
    return ViT(img_size, 16, 768, 12, 12, 4.0, drop_path, num_classes)

def vit_tiny(num_classes=10, img_size=32, drop_path=0.1):
    """A 4-block, 128-wide ViT with 4 px patches: for 32 px images on the CPU."""
    return ViT(img_size, 4, 128, 4, 4, 2.0, drop_path, num_classes)

# torchvision's vit_b_16 names -> timm/DeiT's (this file's), applied in order to each key
VIT_TORCHVISION_NAMES = [
    ("class_token", "cls_token"), ("conv_proj", "patch_embed.proj"),
    ("encoder.pos_embedding", "pos_embed"), ("encoder.ln.", "norm."), ("heads.head", "head"),
    ("encoder.layers.encoder_layer_", "blocks."), ("ln_1", "norm1"), ("ln_2", "norm2"),
    ("self_attention.in_proj_", "attn.qkv."), ("self_attention.out_proj", "attn.proj"),
    ("mlp.0", "mlp.fc1"), ("mlp.3", "mlp.fc2"),
    ("mlp.linear_1", "mlp.fc1"), ("mlp.linear_2", "mlp.fc2")]  # older names torchvision still reads

def vit_from_torchvision(state_dict, renames=VIT_TORCHVISION_NAMES):
    """A torchvision vit_b_16 state dict under this file's (timm/DeiT) names: each (old, new)
    substring pair of `renames` replaced in every key, in order."""
    for old, new in renames:
        state_dict = {key.replace(old, new): value for key, value in state_dict.items()}
    return state_dict

def vit_to_torchvision(state_dict):
    """This file's ViT state dict (vit.pt) under torchvision's vit_b_16 names."""
    return vit_from_torchvision(state_dict, [(new, old) for old, new in VIT_TORCHVISION_NAMES[:-2]])

# ------------------------------------------------------------------------------------- ResNet-50
# "Deep Residual Learning", arXiv 1512.03385; v1.5 and names as torchvision's, so its weights load
def conv3x3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)

def conv1x1(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 1, stride, bias=False)

class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand, plus the shortcut. v1.5: the stride sits on the 3x3 conv,
    not the first 1x1: a little slower, about +0.5% top-1 (torchvision, NVIDIA)."""
    expansion = 4

    def __init__(self, cin, planes, stride=1, downsample=None):
        super().__init__()
        out = planes * self.expansion
        self.conv1, self.bn1 = conv1x1(cin, planes), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = conv3x3(planes, planes, stride), nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = conv1x1(planes, out), nn.BatchNorm2d(out)
        self.relu, self.downsample = nn.ReLU(inplace=True), downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity  # in place, as torchvision's: backward needs BatchNorm's input, not output
        return self.relu(out)

class ResNet(nn.Module):
    """ResNet of Bottleneck blocks, with timm's forward_features/forward_head. `small_stem`
    swaps the 7x7/2 conv and max-pool for one 3x3/2 conv (32 px; its maps are twice as large);
    `width`: stem channels (64)."""
    def __init__(self, layers=(3, 4, 6, 3), num_classes=1000, width=64, small_stem=False):
        super().__init__()
        self.conv1 = (conv3x3(3, width, 2) if small_stem
                      else nn.Conv2d(3, width, 7, 2, 3, bias=False))
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
            elif isinstance(m, Bottleneck):  # each residual branch starts at 0 (arXiv 1706.02677)
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
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))      # (B, w, H/4, W/4)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, 32w, H/32, W/32)

    def forward_head(self, x, pre_logits=False):
        x = torch.flatten(self.avgpool(x), 1)                     # (B, 32w)
        return x if pre_logits else self.fc(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))

def resnet50(num_classes=1000):
    """ResNet-50 v1.5: 25,557,032 parameters with 1000 classes."""
    return ResNet((3, 4, 6, 3), num_classes)

def resnet_tiny(num_classes=10):
    """A narrow ResNet (width 8) of the same Bottleneck, one block per stage, 3x3 stem: 32 px."""
    return ResNet((1, 1, 1, 1), num_classes, width=8, small_stem=True)

def build_branch(name, num_classes, img_size, drop_path):
    """One branch by its --vit/--cnn name; only a ViT takes the image size and drop-path rate."""
    if name.startswith("vit"):
        return {"vit_b_16": vit_b_16, "vit_tiny": vit_tiny}[name](num_classes, img_size, drop_path)
    return {"resnet50": resnet50, "resnet_tiny": resnet_tiny}[name](num_classes)

# --------------------------------------------------------------------------------- pair learning
# The pair learning module (PLM): a pair head, the partner losses and the three-stage schedule.
class PairHead(nn.Module):
    """The pair's own prediction: LayerNorm on each branch's feature, concatenate, one Linear.
    Its input is detached: it learns to combine the branches and never pulls on them."""
    def __init__(self, dim_a, dim_b, num_classes):
        super().__init__()
        self.norm_a, self.norm_b = nn.LayerNorm(dim_a), nn.LayerNorm(dim_b)
        self.fc = nn.Linear(dim_a + dim_b, num_classes)

    def forward(self, feat_a, feat_b):
        feats = [self.norm_a(feat_a.detach()), self.norm_b(feat_b.detach())]
        return self.fc(torch.cat(feats, dim=1))

class PairModel(nn.Module):
    """Both branches and the pair head as one module, so that one DDP and one torch.compile cover
    all. Any two timm-style models (forward_features, forward_head, num_features) can pair."""
    def __init__(self, vit, cnn, num_classes):
        super().__init__()
        self.vit, self.cnn = vit, cnn
        # pre_logits' width: timm's head_hidden_size where its head has a hidden layer
        dims = [getattr(m, "head_hidden_size", m.num_features) for m in (vit, cnn)]
        self.pair_head = PairHead(*dims, num_classes)

    def forward(self, x):
        f_vit = self.vit.forward_features(x)
        f_cnn = self.cnn.forward_features(x.contiguous(memory_format=torch.channels_last))
        pooled = self.vit.forward_head(f_vit, pre_logits=True), self.cnn.forward_head(f_cnn, True)
        return {"vit": self.vit.forward_head(f_vit), "cnn": self.cnn.forward_head(f_cnn),
                "pair": self.pair_head(*pooled)}

def kd_loss(student, teacher, temperature=1.0, weight=None):
    """Distillation (arXiv 1503.02531): T^2 * KL(softmax(t/T) || softmax(s/T)), summed over classes,
    averaged over the batch ('batchmean'), each sample times its `weight` if given; in fp32."""
    log_p_student = F.log_softmax(student.float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher.detach().float() / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="none", log_target=True).sum(-1)
    kl = kl if weight is None else kl * weight
    return kl.mean() * temperature ** 2  # T^2 keeps the gradient's scale independent of T

def teacher_is_better(student, teacher, target):
    """Per sample, 1.0 where the teacher gives the label more probability than the student does:
    where it has something to teach. `target`: class indices, or probabilities after MixUp."""
    if target.ndim == 1:
        target = F.one_hot(target, student.shape[-1])
    p_student, p_teacher = (z.detach().float().softmax(-1) for z in (student, teacher))
    return ((p_teacher * target).sum(-1) > (p_student * target).sum(-1)).float()

class PairLoss(nn.Module):
    """Per branch and sample CE(label) + a g * KD(teacher), plus the pair head's CE. With
    teacher='pair' the pair head teaches both (an ensemble teacher, as in arXiv 1806.04606); with
    'partner' each branch is taught by the other (deep mutual learning, arXiv 1706.00384). g = 1
    everywhere ('always'), only where the teacher beats its student on the label ('better'), or on
    this process's batch while the teacher's mean CE on it is lower ('ahead'). -> total, terms"""
    def __init__(self, temperature=4.0, teacher="pair", label_smoothing=0.0, teach="always"):
        super().__init__()
        self.temperature, self.teacher, self.label_smoothing = temperature, teacher, label_smoothing
        self.teach = teach

    def forward(self, out, target, a):
        def ce(logits):  # per sample; target: class indices, or probabilities after MixUp/CutMix
            return F.cross_entropy(logits.float(), target, label_smoothing=self.label_smoothing,
                                   reduction="none")

        by = {"vit": "cnn", "cnn": "vit"} if self.teacher == "partner" else \
            {"vit": "pair", "cnn": "pair"}  # branch taught: its teacher
        ces = {k: ce(z) for k, z in out.items()}
        pair_ce = ces["pair"].mean()
        terms, total = {}, pair_ce
        for b, t in by.items():
            taught = torch.ones_like(ces[b])
            if self.teach == "better":
                taught = teacher_is_better(out[b], out[t], target)
            elif self.teach == "ahead":  # one gate for the batch: who has the lower loss on it
                taught = (ces[t].mean() < ces[b].mean()).float().expand_as(ces[b])
            terms[f"{b}_ce"] = ces[b].mean()
            terms[f"{b}_kd"] = kd_loss(out[b], out[t], self.temperature, taught)
            terms[f"{b}_taught"] = taught.mean()  # the fraction of the batch taught
            total = total + terms[f"{b}_ce"]
            if a > 0:  # added to the label's CE, not in its place: the student keeps it whole
                total = total + a * terms[f"{b}_kd"]  # left out at a = 0: a NaN partner stays out
        terms["pair_ce"] = pair_ce
        return total, terms

class PairSchedule:
    """The three stages as fractions of training, 'S1,S2': 1 warm-up [0, S1) (empty by default),
    2 pair [S1, S2), 3 solo [S2, 1]. Called with the progress in [0, 1], gives (stage, a): a is 0
    outside stage 2 and rises linearly from 0 at S1 to `pair_weight` at S1 + ramp."""
    def __init__(self, stages="0,0.8", pair_weight=0.5, ramp=0.05):
        try:
            self.s1, self.s2 = (float(s) for s in stages.split(","))
        except ValueError:
            raise ValueError(f"--stages must be two fractions 'S1,S2', got {stages!r}") from None
        if not 0 <= self.s1 <= self.s2 <= 1:
            raise ValueError(f"--stages must satisfy 0 <= S1 <= S2 <= 1, got {stages!r}")
        self.pair_weight, self.ramp = pair_weight, ramp

    def __call__(self, progress):
        if progress < self.s1 or progress >= self.s2:
            return (1 if progress < self.s1 else 3), 0.0
        rise = min(1.0, (progress - self.s1) / self.ramp) if self.ramp > 0 else 1.0
        return 2, self.pair_weight * rise

# ------------------------------------------------------------------------------------------ data
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, for every dataset

def make_demo(n, seed, img_size=32, classes=10):
    """The built-in data set: class k is a random 5x5 glyph, drawn at a random place, angle, scale
    and colour on a textured ground, with noise and a faint distractor glyph; a function of seed."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    glyphs = (rand(classes, 1, 5, 5) < 0.5).float()
    labels = torch.randint(classes, (n,), generator=g)

    def draw(glyph_ids, zoom):  # affine-warp each glyph into an image-sized mask: (n, 1, H, W)
        angle, scale = (rand(n) - 0.5) * math.radians(30), zoom * (0.9 + 0.2 * rand(n))
        cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
        shift = (rand(n, 2) - 0.5) * 0.6
        theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                             torch.stack([sin, cos, shift[:, 1]], 1)], 1)
        grid = F.affine_grid(theta, [n, 1, img_size, img_size], align_corners=False)
        return F.grid_sample(glyphs[glyph_ids], grid, align_corners=False)

    background = 0.45 * rand(n, 3, 1, 1)  # dark grounds, light glyphs: the shape is the class
    texture = F.interpolate(rand(n, 3, 4, 4), size=img_size, mode="bilinear", align_corners=False)
    image = background + 0.2 * texture
    distractor = draw(torch.randint(classes, (n,), generator=g), 3.0)  # smaller, fainter, any class
    image = image + (0.55 + 0.45 * rand(n, 3, 1, 1) - image) * distractor * 0.3
    mask = draw(labels, 1.8)  # drawn before the colour below: the order of the draws is the data
    image = image + (0.55 + 0.45 * rand(n, 3, 1, 1) - image) * mask
    image = image + 0.05 * torch.randn(image.shape, generator=g)
    return (image.clamp(0, 1) * 255).round().to(torch.uint8), labels

class Augmented(Dataset):
    """Item (draw, i) is base[i] transformed with an RNG seeded from (seed, draw, i): augmentation
    depends on neither the workers nor where a run resumed. An unreadable image is named in a
    warning and replaced by the next readable one; the third output flags it."""
    def __init__(self, base, transform, seed):
        self.base, self.transform, self.seed = base, transform, seed

    def __len__(self):
        return len(self.base)

    def __getitem__(self, key):
        draw, index = key  # draw: the epoch, or its copy of the image under --repeat-aug
        for attempt in range(16):
            j = (index + attempt) % len(self.base)
            try:
                image, label = self.base[j]
                return self.augment(image, draw, index), int(label), int(attempt > 0)
            except Exception as e:  # PIL's: a corrupt or truncated file, a decompression bomb
                path = self.base.samples[j][0] if hasattr(self.base, "samples") else j
                reason = " ".join(str(e).split())[:100]  # one line: PIL's messages hold newlines
                print(f"vpl: warning: unreadable image {path} ({type(e).__name__}: {reason}); "
                      "skipped", file=sys.stderr)
        from PIL import Image  # 16 unreadable in a row: a black stand-in, flagged as the others
        label = self.base.targets[index] if hasattr(self.base, "targets") else 0
        return self.augment(Image.new("RGB", (32, 32)), draw, index), int(label), 1

    def augment(self, image, draw, index):
        with torch.random.fork_rng(devices=[]):  # the caller's RNG stays untouched
            torch.manual_seed(((self.seed * 1_000_003 + draw) * 100_000_007 + index) % 2 ** 63)
            return self.transform(image)

class EpochSampler(Sampler):
    """This rank's share of a shuffled epoch as (draw, index) keys for Augmented: whole shares
    only, from `start` on (a resumed epoch). With repeats N (repeated augmentation, arXiv
    1901.09335) an epoch takes 1/N of the images, N neighbouring copies of each, each drawn anew."""
    def __init__(self, size, world, rank, seed, repeats=1):
        self.size, self.world, self.rank, self.seed, self.repeats = size, world, rank, seed, repeats
        self.num_samples, self.epoch, self.start = size // world, 0, 0

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start

    def __iter__(self):
        shuffle = torch.Generator().manual_seed(self.seed + self.epoch)  # the same on every rank
        order = torch.randperm(self.size, generator=shuffle)
        # position p of the epoch, over all ranks, is copy p % N of image order[p // N]
        N, end = self.repeats, self.world * self.num_samples
        positions = range(self.rank + self.world * self.start, end, self.world)  # this rank's
        return iter([(self.epoch * N + p % N, order[p // N].item()) for p in positions])

    def __len__(self):
        return self.num_samples - self.start

def build_transforms(cfg, from_files):
    """Train and val transforms: ImageNet's (RandomResizedCrop; resize and center crop) for image
    files, pad-and-crop for the demo's small images; DeiT's extras if asked."""
    from torchvision.transforms import InterpolationMode, v2
    size, bicubic = cfg.img_size, InterpolationMode.BICUBIC
    if from_files:
        train = [v2.RandomResizedCrop(size, interpolation=bicubic, antialias=True),
                 v2.RandomHorizontalFlip()]
        val = [v2.Resize(int(size / 0.875), interpolation=bicubic, antialias=True),
               v2.CenterCrop(size)]
    else:  # no flip: the demo's glyphs are chiral, a mirrored glyph is another shape
        train, val = [v2.RandomCrop(size, padding=size // 8)], []
    # RandAugment close to DeiT's rand-m9-mstd0.5: two ops, each applied with probability 0.5, at
    # magnitude 9 of 10 (torchvision's default scale is 30), without the magnitude noise and timm's
    # own op set; mean-colour fill; bicubic on files, bilinear on tensors
    fill = [round(255 * m) for m in MEAN]
    op = v2.RandAugment(1, cfg.randaug, 11, fill=fill,
                        interpolation=bicubic if from_files else InterpolationMode.BILINEAR)
    train += [v2.RandomApply([op], p=0.5), v2.RandomApply([op], p=0.5)] if cfg.randaug else []
    tensor = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]
    erase = [v2.RandomErasing(cfg.reprob, value="random")] if cfg.reprob else []  # noise, as DeiT
    return v2.Compose(train + tensor + erase), v2.Compose(val + tensor)

def image_folders(root):
    """The train and val ImageFolders of an ImageNet-style root; their problems as one line."""
    import torchvision
    if not os.path.isdir(root):
        raise UserError(f"--data {root}: no such folder")
    splits = []
    for split in ("train", "val"):
        path = os.path.join(root, split)
        if not os.path.isdir(path):
            raise UserError(f"--data {root}: no '{split}' folder (expected {split}/<class>/*.jpg)")
        try:
            splits.append(torchvision.datasets.ImageFolder(path))
        except OSError as e:  # no class folders, a class without images, a folder it cannot read
            raise UserError(f"--data {root}: {split}: {str(e).split('. Supported')[0]}") from None
        if len(splits[-1].classes) < 2:
            raise UserError(f"--data {root}: {split} has 1 class folder, a classifier needs 2")
    train, val = (set(split.classes) for split in splits)
    if train != val:  # ImageNet has 1,000: name the odd ones, a stray folder, say
        raise UserError(f"--data {root}: the class folders of train and val differ (only in train: "
                        f"{sorted(train - val)[:3]}, only in val: {sorted(val - train)[:3]})")
    return splits

def build_datasets(cfg):
    """(train, val, number of classes), as Augmented datasets: the demo or an ImageFolder root."""
    if cfg.data == "demo":
        classes = cfg.demo_classes
        images, labels = make_demo(cfg.demo_train + cfg.demo_val, cfg.seed, cfg.img_size, classes)
        n, g = cfg.demo_train, torch.Generator().manual_seed(cfg.seed + 777)  # a stream of its own
        redrawn = torch.rand(n, generator=g) < cfg.demo_noise  # some land on the true class again
        noisy = torch.where(redrawn, torch.randint(classes, (n,), generator=g), labels[:n])
        train, val = TensorDataset(images[:n], noisy), TensorDataset(images[n:], labels[n:])
    else:
        train, val = image_folders(cfg.data)
        classes = len(train.classes)
    train_tf, val_tf = build_transforms(cfg, from_files=cfg.data != "demo")
    return Augmented(train, train_tf, cfg.seed), Augmented(val, val_tf, cfg.seed), classes

def ignore_stop_signals(_worker_id):
    """In a data worker: Ctrl-C and a scheduler's SIGTERM (sent to the whole process group) are the
    main process's to answer; it finishes its step, saves, and ends the workers."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

def end_data_workers():
    """At exit: ends the data workers, which ignore the SIGTERM of multiprocessing's exit hook."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # DataLoader's handler would call it a failure
    for child in multiprocessing.active_children():
        child.kill()

def build_loaders(cfg, train_set, val_set, rank, world, cuda):
    """This rank's train loader (a shuffled shard, whole batches) and val loader (every world-th
    image, no padding: each image is evaluated once)."""
    common = dict(num_workers=cfg.workers, pin_memory=cuda, persistent_workers=cfg.workers > 0,
                  worker_init_fn=ignore_stop_signals)
    if cfg.workers:  # registered after multiprocessing's own exit hook, so that it runs first
        atexit.unregister(end_data_workers)
        atexit.register(end_data_workers)
    sampler = EpochSampler(len(train_set), world, rank, cfg.seed, cfg.repeat_aug)
    train = DataLoader(train_set, cfg.batch_size, sampler=sampler, drop_last=True,
                       generator=torch.Generator().manual_seed(cfg.seed + rank), **common)
    shard = [(0, i) for i in range(rank, len(val_set), world)]
    val = DataLoader(val_set, cfg.batch_size, sampler=shard,
                     generator=torch.Generator().manual_seed(cfg.seed), **common)
    return train, val

def build_mix(cfg, num_classes):
    """Batch-level MixUp or CutMix (one of them at random per batch), or None."""
    from torchvision.transforms import v2
    mixes = ([v2.MixUp(alpha=cfg.mixup, num_classes=num_classes)] if cfg.mixup else []) + \
            ([v2.CutMix(alpha=cfg.cutmix, num_classes=num_classes)] if cfg.cutmix else [])
    return v2.RandomChoice(mixes) if mixes else None

# ----------------------------------------------------------------------------------- distributed
def setup_distributed(device):
    """Reads torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE): (rank, world, device). Plain
    `python vpl.py` is one process without a process group."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available")
        torch.cuda.set_device(local_rank)  # before anything touches CUDA, or all land on GPU 0
        device = f"cuda:{local_rank}"
    if world > 1:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return rank, world, torch.device(device)

def all_sum(tensor, world):
    """Sums a tensor over all ranks, in place."""
    if world > 1:
        dist.all_reduce(tensor)
    return tensor

def choose_precision(cfg, device):
    """(autocast dtype or None, whether to compile): bf16 and compile on CUDA by default."""
    cuda = device.type == "cuda"
    amp = cfg.amp if cfg.amp != "auto" else ("bf16" if cuda else "off")
    if amp == "bf16" and cuda and torch.cuda.get_device_capability(device) < (8, 0):
        print("vpl: warning: this GPU has no bf16 units (before Ampere): using --amp fp16",
              file=sys.stderr)
        amp = "fp16"
    compile_ = cfg.compile == "on" or (cfg.compile == "auto" and cuda)
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp], compile_

# ------------------------------------------------------------------------- weights and checkpoints
def load_checkpoint(path):
    """torch.load(weights_only=True) of a file that must hold a dict, else a one-line error."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such checkpoint")
    torch.serialization.add_safe_globals([argparse.Namespace])  # DeiT, timm save their `args`
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a file that is no checkpoint fails in many ways
        raise UserError(f"{path}: not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(state, dict):
        raise UserError(f"{path}: holds a {type(state).__name__}, not a dict of weights")
    return state

def load_branch_weights(model, state_dict):
    """Loads timm/DeiT or torchvision weights (or vpl's vit.pt, cnn.pt) into a branch. A classifier
    of another class count, or none, leaves the branch's new one (fine-tuning)."""
    for key in ("model", "state_dict"):  # DeiT's and timm's trainers nest the weights
        state_dict = state_dict[key] if isinstance(state_dict.get(key), dict) else state_dict
    if "conv_proj.weight" in state_dict:
        state_dict = vit_from_torchvision(state_dict)
    own, heads = model.state_dict(), ("head.", "fc.")
    state_dict = {k: v for k, v in state_dict.items()
                  if not (k.startswith(heads) and k in own and v.shape != own[k].shape)}
    try:
        if "pos_embed" in own and "pos_embed" in state_dict and \
                state_dict["pos_embed"].shape != own["pos_embed"].shape:
            resized = resize_pos_embed(state_dict["pos_embed"], model.grid)  # another image size
            state_dict = {**state_dict, "pos_embed": resized}
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
    except (RuntimeError, KeyError, ValueError) as e:  # shapes that differ: another architecture
        detail = str(e).splitlines()[-1].strip()
        raise UserError(f"weights do not fit the branch ({detail})") from None
    if unexpected or [k for k in missing if not k.startswith(heads)]:
        raise UserError(f"weights do not fit the branch: missing {missing[:2]}, unexpected "
                        f"{unexpected[:2]}")

def load_initial_weights(cfg, pair):
    """Starts the branches from torchvision's ImageNet weights (--init) or from files (--init-vit,
    --init-cnn): a branch's weights, or a vpl last.pt, whose pair gives the branch of that side."""
    if cfg.init == "torchvision":
        import torchvision
        try:
            vit, cnn = (torchvision.models.vit_b_16(weights="DEFAULT"),
                        torchvision.models.resnet50(weights="DEFAULT"))
        except OSError as e:  # no network, as on many clusters' compute nodes
            raise UserError(f"--init torchvision: cannot download the weights ({e}); download them "
                            "once where there is network (into $TORCH_HOME)") from None
        load_branch_weights(pair.vit, vit.state_dict())
        load_branch_weights(pair.cnn, cnn.state_dict())
    for path, side in ((cfg.init_vit, "vit"), (cfg.init_cnn, "cnn")):
        if path:
            state = load_checkpoint(path)
            if "pair_head.fc.weight" in state.get("model", {}):  # a vpl last.pt
                state = {k[4:]: v for k, v in state["model"].items() if k.startswith(side + ".")}
            try:
                load_branch_weights(getattr(pair, side), state)
            except (UserError, KeyError) as e:
                raise UserError(f"--init-{side} {path}: {e}") from None

def save_atomic(obj, path):
    """Writes to a temp file, fsyncs and renames: a kill at any moment leaves the old file whole,
    and a failed write (a full disk) is a one-line error that leaves it too."""
    try:
        with open(path + ".tmp", "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
    except (OSError, RuntimeError) as e:  # torch.save raises a RuntimeError over the OSError
        with contextlib.suppress(OSError):
            os.remove(path + ".tmp")
        error = e if isinstance(e, OSError) else e.__context__
        if not isinstance(error, OSError):
            raise
        raise UserError(f"cannot write {path} ({error.strerror or error}); the previous one is "
                        "left as it was") from None

def cpu_state(module):
    """A module's state dict on the CPU, contiguous (safetensors refuses channels_last)."""
    return {k: v.cpu().contiguous() for k, v in module.state_dict().items()}

# ----------------------------------------------------------------------- training and evaluation
def param_groups(module, weight_decay):
    """No weight decay on norms, biases and tokens (DeiT; torchvision's recipe decays biases)."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        (no_decay if p.ndim <= 1 or name.endswith(("cls_token", "pos_embed")) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]

def build_optimizer(arch, module, cfg, global_batch, cuda):
    """(optimizer, peak lr, final lr): AdamW for a ViT (DeiT's lr rule: per 512 images), SGD with
    momentum for a ResNet (per 1024); fused (one kernel for all parameters) on CUDA."""
    fused = {"fused": True} if cuda else {}
    if arch.startswith("vit"):
        peak = cfg.lr_vit * global_batch / 512
        adamw = torch.optim.AdamW(param_groups(module, cfg.wd_vit), lr=peak, **fused)
        return adamw, peak, cfg.min_lr_vit
    peak = cfg.lr_cnn * global_batch / 1024
    sgd = torch.optim.SGD(param_groups(module, cfg.wd_cnn), lr=peak, momentum=0.9, **fused)
    return sgd, peak, 0.0

def build_optimizers(cfg, pair, global_batch, cuda):
    """[(optimizer, peak lr, final lr)] of the ViT, the pair head (the ViT's kind) and the CNN: each
    part clips on its own, so that at a = 0 the branches train exactly as they would alone."""
    return [build_optimizer(cfg.vit, pair.vit, cfg, global_batch, cuda),
            build_optimizer(cfg.vit, pair.pair_head, cfg, global_batch, cuda),
            build_optimizer(cfg.cnn, pair.cnn, cfg, global_batch, cuda)]

def lr_at(step, total, warmup, peak, final):
    """Linear warm-up over `warmup` steps, then cosine from peak to final; a function of step."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return final + (peak - final) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

def autocast(device, amp_dtype):
    """Autocast to amp_dtype (bf16 or fp16) on this device; fp32 when it is None."""
    return torch.autocast(device.type, amp_dtype, enabled=amp_dtype is not None)

def optimizer_step(optimizers, scaler, clip_grad):
    """AMP's recipe for several optimizers: unscale and clip each part's gradient, step each,
    update the scale once. Under fp32 or bf16 the scaler is disabled and passes through."""
    for optimizer in optimizers:
        if clip_grad:
            scaler.unscale_(optimizer)
            params = [p for group in optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, clip_grad)
        scaler.step(optimizer)
        optimizer.zero_grad(set_to_none=True)
    scaler.update()

@torch.no_grad()
def ema_update(ema_tensors, model_tensors, decay):
    """One EMA step over matching lists of state tensors: floating ones (weights and BatchNorm
    statistics) move (1 - decay) of the way to the model's; integer ones are copied."""
    floats = [i for i, t in enumerate(ema_tensors) if t.is_floating_point()]
    torch._foreach_lerp_([ema_tensors[i] for i in floats], [model_tensors[i] for i in floats],
                         1 - decay)
    for e, m in zip(ema_tensors, model_tensors):
        if not e.is_floating_point():
            e.copy_(m)

@dataclass
class Job:
    """What the training loop works with; run() builds it."""
    cfg: Config
    rank: int
    world: int
    device: torch.device
    amp_dtype: torch.dtype     # None: fp32
    pair: PairModel            # the plain pair: evaluated, saved, exported
    criterion: PairLoss
    schedule: PairSchedule
    optimizers: list           # [(optimizer, peak lr, final lr)] of the ViT, pair head, CNN
    scaler: torch.amp.GradScaler
    train_loader: DataLoader
    val_loader: DataLoader
    made: dict                 # what a checkpoint must share with a run that resumes it
    log: object                # print on rank 0, silent elsewhere
    model: nn.Module = None    # the pair as it trains: in DDP, compiled
    ema: PairModel = None
    ema_tensors: list = None   # [the EMA's state tensors, the pair's], in the same order
    mix: object = None         # MixUp/CutMix
    step: int = 0              # optimizer steps done
    stop_asked: bool = False   # by SIGTERM or Ctrl-C

    @property
    def total_steps(self):
        return self.cfg.epochs * self.steps_per_epoch

    @property
    def steps_per_epoch(self):  # whole optimizer steps of whole batches
        return self.train_loader.sampler.num_samples // self.cfg.batch_size // self.cfg.accum_steps

def train_epoch(job, epoch):
    """Trains the pair through `epoch`, from job.step on (a resumed epoch starts inside). Returns
    the epoch's mean losses and why it stopped early: None, 'signal', 'max_steps' or 'error'."""
    cfg, model, spe = job.cfg, job.model, job.steps_per_epoch
    done = job.step - epoch * spe  # steps of this epoch before a resume
    job.train_loader.sampler.set_epoch(epoch, start=done * cfg.accum_steps * cfg.batch_size)
    batches, meter = iter(job.train_loader), Meter(job, epoch)
    while job.step < (epoch + 1) * spe:
        stage, a = job.schedule(job.step / job.total_steps)  # VPL: the stage, the partner weight
        lrs = [lr_at(job.step, job.total_steps, round(cfg.warmup_epochs * spe), peak, final)
               for _, peak, final in job.optimizers]
        for (optimizer, _, _), lr in zip(job.optimizers, lrs):
            for group in optimizer.param_groups:
                group["lr"] = lr
        for micro in range(cfg.accum_steps):
            images, targets = meter.next_batch(batches)
            if job.mix is not None:  # shuffled first: --repeat-aug's copies are neighbours
                order = torch.randperm(len(images), device=job.device)
                images, targets = job.mix(images[order], targets[order])
            syncs = micro == cfg.accum_steps - 1 or job.world == 1  # DDP all-reduces the last one
            with contextlib.nullcontext() if syncs else model.no_sync():
                with autocast(job.device, job.amp_dtype):
                    out = model(images)
                loss, terms = job.criterion(out, targets, a)  # fp32; one backward for all parts
                job.scaler.scale(loss / cfg.accum_steps).backward()
            meter.add(loss, terms)
        optimizer_step([optimizer for optimizer, _, _ in job.optimizers], job.scaler, cfg.clip_grad)
        if job.ema is not None:
            ema_update(*job.ema_tensors, cfg.ema)
        job.step += 1
        limit = 0 < cfg.max_steps <= job.step
        if job.step % cfg.log_every == 0 or job.step % spe == 0 or limit:
            stop = meter.report(stage, a, lrs) or ("max_steps" if limit else None)
            if stop:
                return meter.stats, stop
    return meter.stats, None

class Meter:
    """An epoch's loss terms, summed on the device and read only at log points: one all-reduce of
    [sums, unreadable images, stop request], one .tolist(). Prints the progress line."""
    names = ("total", "vit_ce", "vit_kd", "vit_taught", "cnn_ce", "cnn_kd", "cnn_taught",
             "pair_ce")

    def __init__(self, job, epoch):
        self.job, self.epoch, self.first_step, self.t0 = job, epoch, job.step, time.perf_counter()
        self.sums, self.stats = torch.zeros(len(self.names), device=job.device), {}
        self.unreadable, self.images, self.data_time = 0, 0, 0.0

    def next_batch(self, batches):
        t0 = time.perf_counter()
        images, targets, unreadable = next(batches)
        self.data_time += time.perf_counter() - t0  # the time the loop waited for its input
        self.unreadable += int(unreadable.sum())
        self.images += len(images)
        return (images.to(self.job.device, non_blocking=True),
                targets.to(self.job.device, non_blocking=True))

    def add(self, loss, terms):
        summed = [loss, *(terms[name] for name in self.names[1:])]  # by name, not dict order
        self.sums += torch.stack(summed).detach() / self.job.cfg.accum_steps

    def report(self, stage, a, lrs):
        """Prints the epoch's means so far; returns 'error' for a non-finite loss or too many
        unreadable images, 'signal' if any rank was asked to stop, else None."""
        job, seconds = self.job, time.perf_counter() - self.t0
        steps = job.step - self.first_step
        flags = torch.tensor([self.unreadable, job.stop_asked], device=job.device)
        *sums, unreadable, stop = all_sum(torch.cat([self.sums, flags]), job.world).tolist()
        means = {k: s / steps / job.world for k, s in zip(self.names, sums)}
        rate = self.images * job.world / seconds
        eta = datetime.timedelta(seconds=round((job.total_steps - job.step) * seconds / steps))
        memory = torch.cuda.max_memory_allocated() / 2 ** 30 if job.device.type == "cuda" else 0
        job.log(f"stage {stage} | epoch {self.epoch + 1}/{job.cfg.epochs} | step {job.step}/"
                f"{job.total_steps} | " + " ".join(f"{k} {v:.3f}" for k, v in means.items())
                + f" | a {a:.2f} | lr {lrs[0]:.2e}/{lrs[-1]:.2e} | {rate:.0f} img/s | data "
                f"{100 * self.data_time / seconds:.0f}% | eta {eta}"
                + (f" | mem {memory:.1f}G" if memory else ""), flush=True)
        self.stats = {**{f"train_{k}": v for k, v in means.items()}, "bad_images": int(unreadable),
                      "img_per_s": rate, "time_s": seconds}
        nonfinite = [k for k in self.names[1:] if not math.isfinite(means[k])]  # the terms
        if nonfinite:  # as DeiT does: stop; last.pt holds the last good state
            print(f"vpl: error: non-finite loss ({', '.join(nonfinite)}) by step {job.step}: lower "
                  "the lr, or use --amp bf16 or --clip-grad, then --resume", file=sys.stderr)
            return "error"
        if unreadable > 0.01 * len(job.train_loader.dataset):
            print(f"vpl: error: {unreadable:.0f} unreadable images this epoch (> 1%): check --data",
                  file=sys.stderr)
            return "error"
        return "signal" if stop else None

@torch.no_grad()
def evaluate(model, loader, device, amp_dtype, world):
    """Top-1/top-5 (%) of the ViT, the CNN, the pair head and the ensemble (mean of the branches'
    probabilities), each readable val image counted once over all ranks; the count is checked."""
    if world > 1:  # every rank evaluates (and rank 0 saves) rank 0's BatchNorm statistics
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)
    was_training, names = model.training, ("vit", "cnn", "pair", "ens")
    model.eval()
    hits = torch.zeros(len(names), 2, device=device, dtype=torch.float64)  # (model, top-1/top-5)
    counts = torch.zeros(2, device=device, dtype=torch.float64)  # (read images, unreadable ones)
    for images, targets, unreadable in loader:
        images, targets = images.to(device), targets.to(device)
        read = unreadable.to(device) == 0  # an unreadable image's stand-in does not count
        with autocast(device, amp_dtype):
            out = model(images)
        out["ens"] = (out["vit"].float().softmax(-1) + out["cnn"].float().softmax(-1)) / 2
        for i, name in enumerate(names):
            top = out[name].topk(min(5, out[name].shape[1]), dim=1).indices == targets[:, None]
            hits[i] += torch.stack([(top[:, 0] & read).sum(), (top.any(dim=1) & read).sum()])
        counts += torch.stack([read.sum(), (~read).sum()])
    (count, unreadable), hits = all_sum(counts, world).long().tolist(), all_sum(hits, world)
    model.train(was_training)
    if count + unreadable != len(loader.dataset):
        raise RuntimeError(f"evaluated {count + unreadable} val images of {len(loader.dataset)}")
    if count == 0:
        raise UserError(f"none of the {unreadable} val images could be read: check --data")
    result = {"val_images": count, **({"val_bad_images": unreadable} if unreadable else {})}
    for i, name in enumerate(names):
        result[f"val_{name}_top1"], result[f"val_{name}_top5"] = (100 * hits[i] / count).tolist()
    return result

def evaluate_pair(job):
    """evaluate() of the plain pair, and of its EMA (keys 'ema_val_...') if there is one."""
    result = evaluate(job.pair, job.val_loader, job.device, job.amp_dtype, job.world)
    if job.ema is not None:
        ema = evaluate(job.ema, job.val_loader, job.device, job.amp_dtype, job.world)
        result.update({f"ema_{k}": v for k, v in ema.items()})
    return result

# ------------------------------------------------------------------------------------ checkpoints
# What a checkpoint must share with a run that loads it: the weights' shapes; to train on, also
# the data order and the steps that the resumed run continues.
SAME_WEIGHTS = ("vit", "cnn", "img_size", "classes")
SAME_ORDER = ("seed", "repeat_aug", "train_images", "global_batch", "world", "demo_val",
              "demo_noise")

def save_checkpoint(job, path, history):
    """Every part's state, the run's setup, its epoch records and every rank's RNG state, written
    atomically by rank 0 while the others wait. It loads with torch.load(weights_only=True)."""
    rng = {"cpu": torch.get_rng_state()}
    rng.update({"cuda": torch.cuda.get_rng_state()} if job.device.type == "cuda" else {})
    rngs = [rng] * job.world
    if job.world > 1:  # drop-path masks and MixUp differ per rank
        dist.all_gather_object(rngs, rng)
    if job.rank == 0:
        state = {name: part.state_dict() for name, part in parts_to_save(job).items()}
        save_atomic({**state, "step": job.step, "history": history, "made": job.made, "rng": rngs,
                     "config": asdict(job.cfg)}, path)
    if job.world > 1:
        dist.barrier()  # nobody runs ahead, or exits, while rank 0 writes

def parts_to_save(job):
    """The parts of the job that last.pt holds, by name."""
    optimizers = (optimizer for optimizer, _, _ in job.optimizers)
    return {"model": job.pair, "scaler": job.scaler,
            **({"ema": job.ema} if job.ema is not None else {}),
            **dict(zip(("opt_vit", "opt_pair", "opt_cnn"), optimizers))}

def load_state(job, path, resume):
    """Resumes from `path` if `resume` (the weights; to train on, also the optimizers and this
    rank's RNG state), after checking it fits (SAME_WEIGHTS, SAME_ORDER), else loads the --init
    weights; adds the EMA."""
    ckpt = load_checkpoint(path) if resume else {}
    if not resume:  # --init weights; a resumed run has its own, and the files may be gone
        load_initial_weights(job.cfg, job.pair)
    train = not job.cfg.eval_only
    if resume and "made" not in ckpt:
        raise UserError(f"{path}: not a checkpoint of vpl.py")
    demo = ("seed",) if job.cfg.data == "demo" else ()  # the demo's seed draws its classes
    for key in (SAME_WEIGHTS + (SAME_ORDER if train else demo)) if resume else ():
        made = ckpt["made"].get(key)  # None: a checkpoint older than the check
        if made != job.made[key]:
            raise UserError(f"{path} was made with {key.replace('_', ' ')} {made}, not "
                            f"{job.made[key]}")
    for name, part in parts_to_save(job).items():
        if ckpt.get(name) and (train or name == "model"):  # fp32's GradScaler state is empty
            # an optimizer's saved state with this run's flags (weight decay, fused), set before
            # loading: fused AdamW needs its step counts on the parameters' device
            for saved, own in zip(ckpt[name].get("param_groups", []),
                                  getattr(part, "param_groups", [])):
                saved.update({k: v for k, v in own.items() if k != "params"})
            part.load_state_dict(ckpt[name])
    if "ema" in ckpt or (job.cfg.ema > 0 and train):  # a new EMA starts from the resumed weights
        job.ema = copy.deepcopy(job.pair).requires_grad_(False)
        job.ema.load_state_dict(ckpt.get("ema", job.pair.state_dict()))
        job.ema_tensors = [list(m.state_dict().values()) for m in (job.ema, job.pair)]
        # a resume without --ema keeps the checkpoint's decay; the config then records it
        job.cfg.ema = job.cfg.ema or ckpt["config"]["ema"]
    if resume and train:
        job.step = ckpt["step"]
        torch.set_rng_state(ckpt["rng"][job.rank]["cpu"])
        if "cuda" in ckpt["rng"][job.rank] and job.device.type == "cuda":
            torch.cuda.set_rng_state(ckpt["rng"][job.rank]["cuda"])
    return ckpt

def write_log(out, records, mode="a"):
    """Appends (or with mode 'w', writes) records to <out>/log.jsonl, one JSON object a line."""
    try:
        with open(os.path.join(out, "log.jsonl"), mode) as f:
            f.writelines(json.dumps(record) + "\n" for record in records)
    except OSError as e:  # a full disk: one line; last.pt stays the previous epoch's
        raise UserError(f"cannot write {out}/log.jsonl ({e.strerror or e})") from None

def best_top1(history, branch):
    """A branch's best val top-1 over the epochs logged so far (-1 before the first)."""
    return max((record[f"val_{branch}_top1"] for record in history), default=-1.0)

def finish_epoch(job, epoch, stats, history):
    """Evaluates the epoch, logs it (stdout, log.jsonl), exports each branch at its best and
    appends the epoch's record to history."""
    result = evaluate_pair(job)
    stage, a = job.schedule((job.step - 1) / job.total_steps)  # of the epoch's last step
    record = {"epoch": epoch, "stage": stage, "pair_weight": a, "world_size": job.world, **result,
              **stats}
    shown = [k for k in record if k.startswith(("epoch", "val_", "ema_val", "img"))
             and not k.endswith("top5")]
    job.log(" | ".join(f"{k} {record[k]:.2f}" if isinstance(record[k], float) else
                       f"{k} {record[k]}" for k in shown))
    if job.rank == 0:
        for branch in ("vit", "cnn"):
            if result[f"val_{branch}_top1"] > best_top1(history, branch):
                path = os.path.join(job.cfg.out, f"{branch}.pt")
                save_atomic(cpu_state(getattr(job.pair, branch)), path)
        write_log(job.cfg.out, [record])
    history.append(record)

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
            v, c = row(h["val_vit_top1"]) == r, row(h["val_cnn_top1"]) == r
            mark = "*" if v and c else "v" if v else "c" if c else " "
            cells.append(("|" if e in bounds else "") + mark)
        lines.append(f"{lo + span * r / (height - 1):6.1f} " + "".join(cells))
    axis = "".join(("|" if e in bounds else "") + str(e % 10) for e in range(len(history)))
    legend = "       epoch (last digit); v ViT, c CNN, * both; | stage"
    return "\n".join(lines + ["       " + axis, legend])

# ----------------------------------------------------------------------------------------- bench
# Dense peak FLOP/s by the vendors' datasheets (bf16/fp16, tf32): the denominators of MFU.
PEAK_FLOPS = {"H100 PCIe": (756e12, 378e12), "H100 NVL": (835e12, 418e12), "H100": (989e12, 495e12),
              "H200": (989e12, 495e12), "A100": (312e12, 156e12)}  # the first name found counts

def timed(fn, device, calls=3):
    """Seconds per call of fn, the work it queued on a GPU included."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - t0) / calls

def bench_step(model, optimizers, images, targets, amp_dtype, compile_):
    """One model's training step (a pair's, or a branch's on plain CE), compiled and warmed up:
    (step, FLOPs per image, peak memory in bytes on CUDA)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    scaler = torch.amp.GradScaler(images.device.type, enabled=amp_dtype == torch.float16)
    step_model, pair = torch.compile(model) if compile_ else model, isinstance(model, PairModel)
    if images.is_cuda:
        torch.cuda.reset_peak_memory_stats()

    def step():
        with autocast(images.device, amp_dtype):
            out = step_model(images)
        loss = PairLoss()(out, targets, 0.5)[0] if pair else F.cross_entropy(out.float(), targets)
        scaler.scale(loss).backward()
        optimizer_step(optimizers, scaler, 0.0)
    timed(step, images.device)  # compiles; warms up the allocator and cuDNN's choice of kernels
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):  # countable
        model(images[:2])  # two images: BatchNorm in training needs two values per channel
    memory = torch.cuda.max_memory_allocated() if images.is_cuda else 0
    return step, 3 * counter.get_total_flops() / 2, memory  # training: about 3x the forward

def bench(cfg, device, amp_dtype, compile_, log):
    """Training img/s of each branch alone, of the pair step and (ImageNet pair) of torchvision's
    models, on synthetic batches: median of 5 rounds taken in turn; FLOPs per image; on CUDA,
    peak memory and MFU."""
    import torchvision
    B, cuda = cfg.batch_size, device.type == "cuda"
    classes = 1000 if cfg.preset == "imagenet" else cfg.demo_classes
    images = torch.randn(B, 3, cfg.img_size, cfg.img_size, device=device)
    targets = torch.randint(classes, (B,), device=device)
    branch = lambda arch: build_branch(arch, classes, cfg.img_size, cfg.drop_path)  # noqa: E731
    channels_last = torch.channels_last  # the layout of the CNN's weights, as in training
    models = {"ViT": (branch(cfg.vit), cfg.vit), "pair": (build_pair(cfg, classes), None),
              "CNN": (branch(cfg.cnn).to(memory_format=channels_last), cfg.cnn)}
    if (cfg.vit, cfg.cnn) == ("vit_b_16", "resnet50"):
        models["torchvision ViT"] = (torchvision.models.vit_b_16(image_size=cfg.img_size), "vit")
        models["torchvision CNN"] = (torchvision.models.resnet50().to(memory_format=channels_last),
                                     "resnet")

    gpu = torch.cuda.get_device_name() if cuda else str(device)
    peak = next((v[0 if amp_dtype else 1] for k, v in PEAK_FLOPS.items() if k in gpu), None)
    log(f"bench: {gpu}, torch {torch.__version__}, batch {B}, {cfg.img_size} px, amp "
        f"{amp_dtype or 'off (fp32)'}, compile {compile_}")
    prepared = {}
    for name, (model, arch) in models.items():
        held = torch.cuda.memory_allocated() if cuda else 0  # by the models prepared before
        model = model.to(device)
        optimizers = build_optimizers(cfg, model, B, cuda) if arch is None else \
            [build_optimizer(arch, model, cfg, B, cuda)]
        step, flops, memory = bench_step(model, [o for o, _, _ in optimizers], images, targets,
                                         amp_dtype, compile_)
        prepared[name] = step, flops, memory - held
    seconds = {name: [] for name in prepared}
    for _ in range(5):  # each model in turn: a drift of the machine's speed hits all alike
        for name, (step, _, _) in prepared.items():
            seconds[name].append(timed(step, device))
    for name, (_, flops, memory) in prepared.items():
        rates = [B / s for s in seconds[name]]
        rate = statistics.median(rates)
        log(f"{name:>16}: {rate:8.4g} img/s (spread {min(rates):.4g}-{max(rates):.4g}), "
            f"{flops / 1e9:.3g} GFLOP/img"
            + (f", peak mem {memory / 2 ** 30:.1f} GiB" if cuda else "")
            + (f", MFU {100 * rate * flops / peak:.1f}%" if peak else ""))
    ratios = [p / (v + c) for p, v, c in zip(seconds["pair"], seconds["ViT"], seconds["CNN"])]
    log(f"pair overhead vs ViT + CNN alone: {100 * (statistics.median(ratios) - 1):+.1f}%")
    return 0

# ------------------------------------------------------------------------------------------- main
def main(argv=None):
    """The command line: bad input ends in one line on stderr and exit code 2."""
    try:
        code = run(parse_config(argv))
    except UserError as e:
        print(f"vpl: error: {e}", file=sys.stderr)
        code = 2
    if code:
        sys.exit(code)

def build_pair(cfg, num_classes):
    """The ViT, the CNN (channels_last: faster convolutions on GPUs) and the pair head, seeded so
    that every rank starts from the same weights."""
    torch.manual_seed(cfg.seed)
    pair = PairModel(build_branch(cfg.vit, num_classes, cfg.img_size, cfg.drop_path),
                     build_branch(cfg.cnn, num_classes, cfg.img_size, cfg.drop_path), num_classes)
    pair.cnn.to(memory_format=torch.channels_last)
    return pair

def prepare_out(cfg, rank, world, device):
    """Makes --out; returns (path of last.pt, whether to resume from it). Rank 0 looks for it and
    tells the others; a fresh start never writes over a checkpoint."""
    path = os.path.join(cfg.out, "last.pt")
    found = torch.tensor(float(os.path.isfile(path)), device=device)
    if world > 1:
        dist.broadcast(found, 0)
    found = bool(found.item())  # rank 0's answer, on every rank
    if found and not (cfg.resume or cfg.eval_only):
        raise UserError(f"{path} exists: pass --resume to continue it, or choose another --out")
    if cfg.eval_only and not found:
        raise UserError(f"{path}: no checkpoint to evaluate")
    try:
        os.makedirs(cfg.out, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {cfg.out}: cannot make that folder ({e.strerror or e})") from None
    return path, found

@contextlib.contextmanager
def stop_on_signal(job):
    """SIGTERM or Ctrl-C asks the loop to save and stop at its next log point; a second Ctrl-C
    stops at once. The old handlers come back afterwards."""
    def ask(signum, frame):
        if job.stop_asked and signum == signal.SIGINT:
            raise KeyboardInterrupt
        job.stop_asked = True
    old = {sig: signal.signal(sig, ask) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)

def build_job(cfg, rank, world, device, amp_dtype, train_set, val_set, num_classes, log):
    """The pair (every rank the same weights, its own drop-path masks), its loss, schedule,
    optimizers and gradient scaler, and this rank's loaders."""
    cuda = device.type == "cuda"
    pair = build_pair(cfg, num_classes)
    torch.manual_seed(cfg.seed + rank)
    if cfg.sync_bn and world > 1 and cuda:
        pair.cnn = nn.SyncBatchNorm.convert_sync_batchnorm(pair.cnn)
    global_batch = cfg.batch_size * cfg.accum_steps * world
    made = {"vit": cfg.vit, "cnn": cfg.cnn, "img_size": cfg.img_size, "classes": num_classes,
            "seed": cfg.seed, "repeat_aug": cfg.repeat_aug, "train_images": len(train_set),
            "global_batch": global_batch, "world": world}
    for key in ("demo_val", "demo_noise"):  # the demo draws train and val images in one go
        made[key] = getattr(cfg, key) if cfg.data == "demo" else None
    job = Job(cfg, rank, world, device, amp_dtype, pair.to(device),
              PairLoss(cfg.pair_temp, cfg.teacher, cfg.label_smoothing, cfg.teach),
              PairSchedule(cfg.stages, cfg.pair_weight, cfg.ramp),
              build_optimizers(cfg, pair, global_batch, cuda),
              torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16),
              *build_loaders(cfg, train_set, val_set, rank, world, cuda), made, log,
              mix=build_mix(cfg, num_classes))
    if job.steps_per_epoch < 1 and not cfg.eval_only:
        raise UserError(f"the train split ({len(train_set)} images) is smaller than one global "
                        f"batch ({global_batch})")
    return job

def describe(job, resume):
    """Prints the run's setup: processes, batches, precision, lrs, stages; and its checks."""
    cfg, ((vit_opt, vit_peak, _), _, (cnn_opt, cnn_peak, _)) = job.cfg, job.optimizers
    s1, s2, warmup = job.schedule.s1 * cfg.epochs, job.schedule.s2 * cfg.epochs, cfg.warmup_epochs
    job.log(f"resumed from {cfg.out}/last.pt at step {job.step}" if resume else
            "no checkpoint yet: starting afresh" if cfg.resume else f"training into {cfg.out}")
    if job.step > job.total_steps:
        raise UserError(f"{cfg.out}/last.pt has trained {job.step} steps, more than --epochs "
                        f"{cfg.epochs} hold ({job.total_steps})")
    if 0 < cfg.max_steps <= job.step:
        raise UserError(f"{cfg.out}/last.pt has trained {job.step} steps, reaching --max-steps "
                        f"{cfg.max_steps}")
    job.log(json.dumps(asdict(cfg)))
    job.log(f"processes {job.world}, batch {cfg.batch_size} x {cfg.accum_steps} accumulation = "
            f"global batch {job.made['global_batch']}; {job.steps_per_epoch} steps/epoch; amp "
            f"{job.amp_dtype or 'off (fp32)'}; device {job.device}")
    rules = {"AdamW": f"AdamW, {cfg.lr_vit} per 512", "SGD": f"SGD, {cfg.lr_cnn} per 1024"}
    job.log(f"lr: {cfg.vit} {vit_peak:.3g} ({rules[type(vit_opt).__name__]}), {cfg.cnn} "
            f"{cnn_peak:.3g} ({rules[type(cnn_opt).__name__]}); warm-up {warmup:g} epochs, cosine")
    job.log("stages, in epochs: " + (f"1 warm-up [0, {s1:g}), " if s1 else "") +
            f"2 pair [{s1:g}, {s2:g}) with a -> {cfg.pair_weight}, 3 solo [{s2:g}, {cfg.epochs}]")

def run(cfg):
    """The whole job, in each process. Returns the exit code: 0, or 3 when training cannot go on."""
    # PHASE 1: processes, device, precision ------------------------------------------------------
    rank, world, device = setup_distributed(cfg.device)
    amp_dtype, compile_ = choose_precision(cfg, device)
    log = print if rank == 0 else (lambda *args, **kwargs: None)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True  # one image size: cuDNN picks its fastest kernels once
    try:
        if cfg.bench:
            return bench(cfg, device, amp_dtype, compile_, log)
        ckpt_path, resume = prepare_out(cfg, rank, world, device)
        # PHASE 2: data; the pair, its loss and optimizers; resume ---------------------------------
        train_set, val_set, num_classes = build_datasets(cfg)
        job = build_job(cfg, rank, world, device, amp_dtype, train_set, val_set, num_classes, log)
        history = load_state(job, ckpt_path, resume).get("history", [])  # one record an epoch
        # PHASE 3: DDP, then compile (PyTorch's notes/ddp.html: it splits at DDP's buckets) --------
        job.model = DDP(job.pair, device_ids=[device.index] if device.index is not None else None) \
            if world > 1 else job.pair
        job.model = torch.compile(job.model) if compile_ else job.model
        if cfg.eval_only:
            log(json.dumps(evaluate_pair(job)))  # the plain pair, not the compiled one
            return 0
        # PHASE 4: train, evaluate and save each epoch --------------------------------------------
        describe(job, resume)
        if rank == 0:  # without what a killed run logged after its last checkpoint
            write_log(cfg.out, history, mode="w")
        with stop_on_signal(job):
            for epoch in range(job.step // job.steps_per_epoch, cfg.epochs):
                stats, stop = train_epoch(job, epoch)
                if stop == "error":
                    return 3
                if job.step % job.steps_per_epoch == 0:  # the epoch's steps are done: evaluate
                    finish_epoch(job, epoch, stats, history)
                save_checkpoint(job, ckpt_path, history)
                if stop and job.step < job.total_steps:  # a stop at the last step is the end
                    log(f"stopped at step {job.step} ({stop}); saved {ckpt_path}; continue "
                        "with --resume")
                    return 0
        # PHASE 5: report and export ---------------------------------------------------------------
        log(text_chart(history, (job.schedule.s1, job.schedule.s2), cfg.epochs))
        for branch in ("vit", "cnn") if job.ema is not None and rank == 0 else ():
            path = os.path.join(cfg.out, f"{branch}_ema.pt")
            save_atomic(cpu_state(getattr(job.ema, branch)), path)
        log(f"best val top-1: ViT {best_top1(history, 'vit'):.2f}, CNN "
            f"{best_top1(history, 'cnn'):.2f}; weights in {cfg.out}")
        return 0
    finally:
        if world > 1:
            dist.destroy_process_group()

if __name__ == "__main__":
    main()
