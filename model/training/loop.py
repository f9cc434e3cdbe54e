"""Pieces shared by the trainers: optimiser, learning-rate schedule, resumable checkpoints,
progress bars and thread settings."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from .ema import EMA


def set_threads(threads: int | None) -> None:
    """Default: all cores this process may use, at most 2 (the shared build machine has 2)."""
    if threads is None:
        threads = min(2, len(os.sched_getaffinity(0)))
    torch.set_num_threads(max(1, int(threads)))


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases, norms, embeddings and other 1-D / token parameters."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "embed" not in name and "token" not in name else no_decay).append(
            p
        )
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def lr_at(step: int, total: int, base: float, warmup: int, final_fraction: float = 0.1) -> float:
    """Linear warm-up, then cosine decay to ``final_fraction`` of the base rate."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def save_checkpoint(path: Path, step: int, model: nn.Module, ema: EMA, opt, extra: dict) -> None:
    """Everything needed to continue bit-for-bit: weights, EMA, optimiser, RNG, step.
    Written to a temporary file and renamed, so a kill mid-write leaves the old one intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "step": step,
        "model": model.state_dict(),
        "ema": ema.state_dict(),
        "opt": opt.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "extra": extra,
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, model: nn.Module, ema: EMA, opt) -> tuple[int, dict]:
    """Restore a checkpoint written by ``save_checkpoint``; returns (step, extra)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    ema.load_state_dict(state["ema"])
    opt.load_state_dict(state["opt"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["step"]), state["extra"]


def progress(total: int, start: int, desc: str, quiet: bool = False) -> tqdm:
    return tqdm(
        total=total,
        initial=start,
        desc=desc,
        disable=quiet,
        dynamic_ncols=True,
        mininterval=2.0,
        smoothing=0.05,
    )
