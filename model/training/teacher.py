"""A small teacher network trained by the project on the same data: our stand-in for DINOv2.

SoftVQ's released tokenizers get three things from a pretrained DINOv2 that cannot be
downloaded here: the encoder's initial weights, a target for aligning the latent tokens
(and, in the generator, an intermediate block's hidden states) with a frozen network's patch
features, and a perceptual loss (LPIPS). This module trains a frozen stand-in on the shapes
set (or a folder of class sub-folders), as a classifier:

- ``arch="vit"``: a ViT of the tokenizer encoder's shape (the project's ``VisionTransformer``
  under ``model.*``, so its weights can initialise ``encoder.model.*``), classifying from the
  mean of its patch tokens. Patch features: the final normed patch tokens (B, N, C).
- ``arch="cnn"``: a plain conv net with GroupNorm (a different design from the judge, and
  trained separately with another seed and stream). Patch features: the stride-4 map as
  (B, (S/4)^2, C); perceptual features: every stage's map.

The teacher is only a training signal. The judge (``classifier.py``) never is: it stays an
independent evaluator.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..sit import sincos_2d
from ..vit import VisionTransformer
from .data import batches, data_set_meta, held_out_set, open_source
from .ema import EMA
from .loop import (
    device_of,
    load_checkpoint,
    lr_at,
    make_optimizer,
    progress,
    save_checkpoint,
    set_lr,
    training_device,
    write_training_json,
)

ARCHS = ("vit", "cnn")
# Stream offset: the teacher never draws the judge's training images (seed + 7919) nor
# the tokenizers' order (seed).
TEACHER_STREAM = 104_651


@dataclass
class TeacherConfig:
    arch: str = "vit"
    image_size: int = 64
    num_classes: int = 10
    patch_size: int = 4  # vit only
    width: int = 96  # vit: embed dim; cnn: channels of the first stage
    depth: int = 2  # vit only
    num_heads: int = 4  # vit only
    classes: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, d: dict) -> TeacherConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        if "classes" in d:
            d["classes"] = tuple(d["classes"])
        return cls(**d)


class _ConvStage(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1)
        self.norm1 = nn.GroupNorm(8, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(8, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.norm1(self.conv1(x)))
        return F.gelu(self.norm2(self.conv2(x)))


class Teacher(nn.Module):
    """images (B, 3, S, S) in [-1, 1] -> logits; ``patch_features`` and ``feature_maps`` for the
    alignment and perceptual losses."""

    def __init__(self, cfg: TeacherConfig):
        super().__init__()
        if cfg.arch not in ARCHS:
            raise ValueError(f"teacher arch must be one of {ARCHS}, got {cfg.arch!r}")
        self.config = cfg
        if cfg.arch == "vit":
            self.model = VisionTransformer(
                cfg.image_size, cfg.patch_size, cfg.width, cfg.depth, cfg.num_heads
            )
            dim = cfg.width
        else:
            w = cfg.width
            if cfg.image_size % 8:
                raise ValueError("the cnn teacher needs an image size divisible by 8")
            # strides 1, 2, 2, 2: maps at S, S/2, S/4 (the patch features), S/8
            self.stages = nn.ModuleList(
                [_ConvStage(3, w, 1), _ConvStage(w, w, 2), _ConvStage(w, 2 * w, 2)]
                + [_ConvStage(2 * w, 4 * w, 2)]
            )
            dim = 4 * w
        self.head = nn.Linear(dim, cfg.num_classes)

    @property
    def feature_dim(self) -> int:
        return self.config.width if self.config.arch == "vit" else 2 * self.config.width

    @property
    def num_patches(self) -> int:
        if self.config.arch == "vit":
            return self.model.num_patches
        return (self.config.image_size // 4) ** 2

    def init_weights(self) -> None:
        if self.config.arch == "vit":
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    nn.init.xavier_uniform_(m.weight)
                    nn.init.zeros_(m.bias)
            for block in self.model.blocks:
                nn.init.constant_(block.ls1.gamma, 0.5)
                nn.init.constant_(block.ls2.gamma, 0.5)
            with torch.no_grad():
                self.model.pos_embed.zero_()
                self.model.pos_embed[0, 1:] = sincos_2d(self.model.embed_dim, self.model.grid)

    def feature_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Every stage's output: vit (B, 1 + N, C) per block (the last one normed), cnn
        (B, C, H, W) per stage."""
        if self.config.arch == "vit":
            vit = self.model
            x = vit.add_cls_and_pos(vit.patch_embed(images))
            out = []
            for i, block in enumerate(vit.blocks):
                x = block(x)
                out.append(vit.norm(x) if i == len(vit.blocks) - 1 else x)
            return out
        out, x = [], images
        for stage in self.stages:
            x = stage(x)
            out.append(x)
        return out

    def patch_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, N, C): one feature per image patch (vit: final patch tokens; cnn: the
        stride-4 map), the alignment target."""
        maps = self.feature_maps(images)
        if self.config.arch == "vit":
            return maps[-1][:, 1:]
        return maps[2].flatten(2).transpose(1, 2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        maps = self.feature_maps(images)
        if self.config.arch == "vit":
            pooled = maps[-1][:, 1:].mean(1)
        else:
            pooled = maps[-1].mean(dim=(2, 3))
        return self.head(pooled)


def perceptual_distance(teacher: Teacher, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """LPIPS-like distance without learned weights: per stage, features normalised over
    channels, squared difference averaged; the stages averaged. y is the target (no grad)."""
    fx = teacher.feature_maps(x)
    with torch.no_grad():
        fy = teacher.feature_maps(y)
    dim = -1 if teacher.config.arch == "vit" else 1
    total = 0.0
    for a, b in zip(fx, fy):
        total = total + (F.normalize(a, dim=dim) - F.normalize(b, dim=dim)).pow(2).sum(dim).mean()
    return total / len(fx)


def repeat_to(tokens: torch.Tensor, n: int) -> torch.Tensor:
    """(B, L, C) -> (B, n, C): token i covers patches [i n/L, (i+1) n/L) in raster order
    ("repeat" alignment); nearest-neighbour when L does not divide n."""
    L = tokens.shape[1]
    if n % L == 0:
        return tokens.repeat_interleave(n // L, dim=1)
    idx = torch.arange(n, device=tokens.device) * L // n
    return tokens[:, idx]


def pool_to(features: torch.Tensor, L: int) -> torch.Tensor:
    """(B, N, C) -> (B, L, C): the mean of each token's patches (the inverse of repeat_to)."""
    B, N, C = features.shape
    if N % L == 0:
        return features.reshape(B, L, N // L, C).mean(2)
    idx = torch.arange(N, device=features.device) * L // N
    out = torch.zeros(B, L, C, dtype=features.dtype, device=features.device)
    out.index_add_(1, idx, features)
    return out / torch.bincount(idx, minlength=L).to(features.dtype)[None, :, None]


def projector(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """The alignment head (training only): a 3-layer MLP as in REPA."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden),
        nn.SiLU(),
        nn.Linear(hidden, hidden),
        nn.SiLU(),
        nn.Linear(hidden, out_dim),
    )


def alignment_loss(projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Negative cosine similarity per token, averaged: (B, n, C) vs (B, n, C)."""
    return -F.cosine_similarity(projected, target, dim=-1).mean()


def save_teacher(
    teacher: Teacher, path: str | Path, meta: dict | None = None, device: torch.device | None = None
) -> None:
    """``device``: where it was trained (training.json's "machine")."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = dataclasses.asdict(teacher.config)
    cfg["classes"] = list(cfg["classes"])
    (path / "config.json").write_text(json.dumps(cfg, indent=1) + "\n")
    state = {k: v.detach().float().contiguous() for k, v in teacher.state_dict().items()}
    save_file(state, str(path / "model.safetensors"))
    if meta is not None:
        write_training_json(path, meta, device)


def load_teacher(path: str | Path) -> Teacher:
    """A teacher directory -> frozen Teacher in eval mode."""
    path = Path(path)
    cfg = TeacherConfig.from_dict(json.loads((path / "config.json").read_text()))
    teacher = Teacher(cfg)
    teacher.load_state_dict(load_file(str(path / "model.safetensors")))
    return teacher.eval().requires_grad_(False)


def init_encoder_from_teacher(tok, teacher: Teacher) -> int:
    """Copy a vit teacher's ``model.*`` into the tokenizer's ``encoder.model.*`` (the paper
    starts its encoder from DINOv2). Returns the number of tensors copied; raises if the
    shapes differ."""
    if teacher.config.arch != "vit":
        raise ValueError("only a vit teacher can initialise the encoder")
    src = teacher.model.state_dict()
    dst = tok.encoder.model.state_dict()
    bad = [k for k in dst if k not in src or src[k].shape != dst[k].shape]
    if bad:
        raise ValueError(f"teacher and encoder differ in shape: {bad[:5]}")
    tok.encoder.model.load_state_dict(src)
    return len(src)


@dataclass
class TeacherTrainConfig:
    out: str
    data: str = "shapes"
    arch: str = "vit"
    image_size: int = 64
    patch_size: int = 4
    width: int = 96
    depth: int = 2
    num_heads: int = 4
    steps: int = 1500
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup: int = 100
    ema_decay: float = 0.998
    train_size: int = 200_000
    seed: int = 0
    ckpt: str | None = None
    ckpt_every: int = 250

    def checkpoint_path(self) -> Path:
        return Path(self.ckpt) if self.ckpt else Path(str(self.out).rstrip("/") + ".ckpt.pt")


def _augment(images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Per image: a random permutation of the colour channels and, half the time, the
    colours negated. Every shape class survives both (a negated ring is still a ring), and the
    teacher's features learn to ignore colour, which the classes do not depend on. Used for
    the built-in set only (a photo's class may depend on its colours)."""
    B = images.shape[0]
    perm = torch.stack([torch.randperm(3, generator=g) for _ in range(B)])
    out = torch.gather(images, 1, perm[:, :, None, None].expand_as(images))
    flip = (torch.rand(B, generator=g) < 0.5)[:, None, None, None]
    return torch.where(flip, -out, out)


@torch.no_grad()
def held_out_accuracy(
    teacher: Teacher, data: str, image_size: int, count: int = 500
) -> tuple[str, float]:
    """(what was measured, accuracy): on ``count`` held-out images of the built-in set, or a
    folder's held-out split (up to ``count``, evenly spread); a folder too small to hold images
    out (``data.HELD_OUT_EVERY``) gets the share of its training images the teacher names:
    whether it learned the classes at all."""
    what = "held-out accuracy"
    try:
        ds = held_out_set(data, image_size, count, seed=2_000_000)
    except ValueError:
        what, ds = "training accuracy", open_source(data, image_size).dataset
    count = min(count, len(ds))
    images, labels = ds.batch(torch.linspace(0, len(ds) - 1, count).long().tolist())
    device = device_of(teacher)
    images, labels = images.to(device), labels.to(device)
    teacher.eval()
    pred = torch.cat([teacher(images[i : i + 100]).argmax(1) for i in range(0, count, 100)])
    return what, float((pred == labels).float().mean())


def train_teacher(
    cfg: TeacherTrainConfig,
    quiet: bool = False,
    stop_after: int | None = None,
    device: str | torch.device = "cpu",
):
    """Train (or resume) the teacher as a classifier; the EMA weights are saved to
    ``cfg.out``. ``device``: see ``loop.training_device``. Returns [(step, loss)]."""
    device = training_device(device)
    torch.manual_seed(cfg.seed)
    train_seed = cfg.seed + TEACHER_STREAM
    source = open_source(cfg.data, cfg.image_size, size=cfg.train_size, seed=train_seed)
    tcfg = TeacherConfig(
        arch=cfg.arch,
        image_size=cfg.image_size,
        num_classes=source.num_classes,
        patch_size=cfg.patch_size,
        width=cfg.width,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        classes=tuple(source.classes),
    )
    teacher = Teacher(tcfg)
    teacher.init_weights()  # on the CPU: the same draws anywhere
    teacher.to(device).train()
    ema = EMA(teacher, cfg.ema_decay)
    opt = make_optimizer(teacher, cfg.lr, cfg.weight_decay)
    ckpt = cfg.checkpoint_path()
    step, history = 0, []
    if ckpt.is_file():
        step, extra = load_checkpoint(ckpt, teacher, ema, opt)
        history = [tuple(h) for h in extra.get("history", [])]
        if not quiet:
            print(f"resuming {ckpt} at step {step}")
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    bar = progress(cfg.steps, step, f"teacher {Path(cfg.out).name}", quiet)
    data = batches(source.dataset, cfg.batch_size, train_seed, start_step=step)
    while step < end:
        images, labels = next(data)
        if cfg.data == "shapes":
            images = _augment(images, torch.Generator().manual_seed(train_seed + step))
        images, labels = images.to(device), labels.to(device)
        set_lr(opt, lr_at(step, cfg.steps, cfg.lr, cfg.warmup))
        loss = F.cross_entropy(teacher(images), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(teacher.parameters(), 1.0)
        opt.step()
        ema.update(teacher)
        step += 1
        history.append((step, loss.item()))
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        if step % cfg.ckpt_every == 0 or step == end:
            save_checkpoint(ckpt, step, teacher, ema, opt, {"history": history})
    bar.close()
    if step >= cfg.steps:
        what, acc = held_out_accuracy(ema.model, cfg.data, cfg.image_size)
        meta = {
            "trained_with": dataclasses.asdict(cfg),
            "data_set": data_set_meta(cfg.data),
            what.replace(" ", "_").replace("-", "_"): acc,
        }
        save_teacher(ema.model.cpu(), cfg.out, meta, device)
        if not quiet:
            print(f"saved {cfg.out} ({what} {acc:.3f})")
    return history
