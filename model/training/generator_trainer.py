"""Train a class-conditional SiT on a tokenizer's normalised latents.

Flow matching on the linear path of the spec (section 4): t = 1 is noise, t = 0 is data,
x_t = (1 - t) x_0 + t eps, and the model regresses the velocity v = eps - x_0 (MSE).
t is drawn "lognormal": t = sigmoid(n), n ~ N(0, 1). Labels are replaced by the null class
(id = num_classes) with probability ``class_dropout`` so classifier-free guidance works.

The latents x_0 = (z_q - vq_mean) / vq_std of the training images are computed once with the
tokenizer (vq_mean / vq_std come from its config.json, measured on its training latents) and
cached next to the checkpoint, so each training step costs only the SiT.

Generator-side alignment (REPA, off unless ``repa_weight`` > 0 and a ``teacher`` is given):
the hidden states after block ``repa_block`` go through a training-only MLP (``projection``,
not saved) and are pulled, by negative cosine similarity, towards the frozen teacher's patch
features of the clean training image, pooled to one feature per latent token (token i: the
mean over its share of the patches, as the tokenizer's "repeat" alignment pairs them). The
teacher features are computed once at start (not cached on disk).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..loading import (
    CheckpointError,
    load_into,
    load_tokenizer,
    read_generator_config,
    read_state_dict,
    save_generator,
)
from ..sit import GeneratorConfig, SiT
from ..tokenizer import SoftVQTokenizer
from .data import data_set_meta, open_source
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
from .teacher import alignment_loss, load_teacher, pool_to, projector


@dataclass
class GeneratorTrainConfig:
    out: str  # model directory written at the end
    tokenizer: str  # tokenizer directory
    data: str = "shapes"
    hidden_size: int = 128
    depth: int = 4
    num_heads: int = 4
    class_dropout: float = 0.1
    time_dist: str = "lognormal"  # "lognormal" (t = sigmoid(n), n ~ N(0, 1)) or "uniform"
    steps: int = 4000
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: int = 200
    ema_decay: float = 0.999
    train_size: int = 20_000  # images of the built-in set encoded once (folders: all images)
    seed: int = 0
    ckpt: str | None = None  # default: <out>.ckpt.pt; the latent cache sits beside it
    ckpt_every: int = 500
    teacher: str | None = None  # teacher directory (softvq train-teacher)
    repa_weight: float = 0.0
    repa_block: int = 0  # hidden states after this many blocks; 0: depth // 2 (at least 1)
    repa_proj_dim: int = 256
    # > 0: fit a Gaussian per class (model.class_prior, this rank) to the cached latents and
    # train on their whitened coordinates; the prior ships inside the generator.
    class_prior_rank: int = 0
    class_prior_shrink: float = 0.1
    # A generator directory to start from (fine-tune, or train a finished one longer): its
    # weights replace the random initialisation and its width, depth and heads replace the
    # ones above; a checkpoint of this run, when there is one, still wins (resume).
    init_from: str | None = None

    def checkpoint_path(self) -> Path:
        return Path(self.ckpt) if self.ckpt else Path(str(self.out).rstrip("/") + ".ckpt.pt")

    def latents_path(self) -> Path:
        return self.checkpoint_path().with_suffix(".latents.safetensors")


@torch.no_grad()
def encode_dataset(tok: SoftVQTokenizer, dataset, batch_size: int = 100, quiet: bool = False):
    """All images -> normalised latents (N, L, D) float32 and labels (N,), on the CPU
    (encoded wherever ``tok`` is)."""
    device = device_of(tok)
    xs, ys = [], []
    bar = progress(len(dataset), 0, "encoding latents", quiet)
    for start in range(0, len(dataset), batch_size):
        images, labels = dataset.batch(range(start, min(len(dataset), start + batch_size)))
        xs.append(((tok.encode(images.to(device)) - tok.vq_mean) / tok.vq_std).cpu())
        ys.append(labels)
        bar.update(len(labels))
    bar.close()
    return torch.cat(xs).float(), torch.cat(ys).long()


TIME_DISTS = ("lognormal", "uniform")


def sample_time(batch: int, dist: str = "lognormal", device=None) -> torch.Tensor:
    """Training times in (0, 1). "lognormal": t = sigmoid(n), n ~ N(0, 1) (i.e. t = s / (1 + s),
    s = exp(n)), which puts few samples near t = 1; "uniform": SiT's default."""
    if dist == "lognormal":
        return torch.sigmoid(torch.randn(batch, device=device))
    if dist == "uniform":
        return torch.rand(batch, device=device)
    raise ValueError(f"unknown time distribution {dist!r}; expected one of {TIME_DISTS}")


def flow_matching_loss(
    gen: SiT, x0: torch.Tensor, y: torch.Tensor, time_dist: str = "lognormal"
) -> torch.Tensor:
    """x0 (B, L, D) normalised latents, y (B,) labels -> MSE to the velocity eps - x0."""
    B = x0.shape[0]
    t = sample_time(B, time_dist, x0.device)
    eps = torch.randn_like(x0)
    tb = t[:, None, None]
    x_t = (1 - tb) * x0 + tb * eps
    return F.mse_loss(gen(x_t, t, y), eps - x0)


def repa_block_index(cfg: GeneratorTrainConfig, depth: int) -> int:
    k = cfg.repa_block or max(1, depth // 2)
    if not 1 <= k <= depth:
        raise ValueError(f"repa_block must be in [1, {depth}], got {k}")
    return k


def generator_loss(gen: SiT, x0, y, target=None, cfg=None):
    """Flow matching, plus REPA when ``target`` (B, L, C) teacher features are given: the
    hidden states after block ``cfg.repa_block`` through ``gen.projection``.
    Returns (total, parts)."""
    time_dist = cfg.time_dist if cfg is not None else "lognormal"
    if target is None:
        fm = flow_matching_loss(gen, x0, y, time_dist)
        return fm, {"fm": fm.item()}
    captured = []
    block = gen.blocks[repa_block_index(cfg, len(gen.blocks)) - 1]
    hook = block.register_forward_hook(lambda m, i, o: captured.append(o))
    try:
        fm = flow_matching_loss(gen, x0, y, time_dist)
    finally:
        hook.remove()
    a = alignment_loss(gen.projection(captured[0]), target)
    return fm + cfg.repa_weight * a, {"fm": fm.item(), "repa": a.item()}


@torch.no_grad()
def teacher_targets(teacher, dataset, num_tokens: int, batch_size: int = 100, quiet=False):
    """The teacher's patch features of every training image, pooled to (N, L, C), on the CPU
    (computed wherever ``teacher`` is)."""
    device = device_of(teacher)
    out = []
    bar = progress(len(dataset), 0, "teacher features", quiet)
    for start in range(0, len(dataset), batch_size):
        images, _ = dataset.batch(range(start, min(len(dataset), start + batch_size)))
        out.append(pool_to(teacher.patch_features(images.to(device)), num_tokens).cpu())
        bar.update(len(images))
    bar.close()
    return torch.cat(out)


def check_start_fits(start: GeneratorConfig, path: str, wanted: tuple[int, int, int, int]):
    """Refuse ``init_from`` (config ``start``) unless it was trained for this run's
    (tokens, token width, classes, class prior rank): one clear line, before any encoding."""
    theirs = (start.input_size, start.in_channels, start.num_classes, start.prior_rank)
    if theirs != wanted:
        raise CheckpointError(
            f"{path}: trained for {theirs[0]} x {theirs[1]} latents, {theirs[2]}"
            f" classes, class prior rank {theirs[3]}; this run has {wanted[0]} x {wanted[1]},"
            f" {wanted[2]} classes, rank {wanted[3]}"
        )


def train_generator(
    cfg: GeneratorTrainConfig,
    quiet: bool = False,
    stop_after: int | None = None,
    on_step: Callable[[], None] | None = None,
    device: str | torch.device = "cpu",
):
    """Train (or resume) and save the EMA generator to ``cfg.out``; returns [(step, loss)].
    ``on_step`` is called after every step (train-demo: ``CoreShare.rebalance``); ``device``:
    see ``loop.training_device``."""
    device = training_device(device)
    start = read_generator_config(cfg.init_from)[0] if cfg.init_from else None
    if start is not None:  # the starting model's shape replaces the configured one
        cfg = dataclasses.replace(
            cfg, hidden_size=start.hidden_size, depth=start.depth, num_heads=start.num_heads
        )
    torch.manual_seed(cfg.seed)
    tok = load_tokenizer(cfg.tokenizer).to(device)
    source = open_source(cfg.data, tok.image_size, size=cfg.train_size, seed=cfg.seed)
    if start is not None:
        wanted = (tok.num_tokens, tok.token_dim, source.num_classes, cfg.class_prior_rank)
        check_start_fits(start, cfg.init_from, wanted)
    cache = cfg.latents_path()
    if cache.is_file():
        saved = load_file(str(cache))
        latents, labels = saved["latents"], saved["labels"]
    else:
        latents, labels = encode_dataset(tok, source.dataset, quiet=quiet)
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_file({"latents": latents, "labels": labels}, str(cache))
    del tok
    targets = None
    if cfg.repa_weight:
        if not cfg.teacher:
            raise ValueError("repa_weight needs a teacher directory")
        teacher = load_teacher(cfg.teacher).to(device)
        if teacher.config.image_size != source.image_size:
            raise ValueError("the teacher was trained on another image size")
        targets = teacher_targets(teacher, source.dataset, latents.shape[1], quiet=quiet)
        del teacher
    gcfg = GeneratorConfig(
        input_size=latents.shape[1],
        in_channels=latents.shape[2],
        hidden_size=cfg.hidden_size,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        num_classes=source.num_classes,
        class_dropout_prob=cfg.class_dropout,
        tokenizer=Path(cfg.tokenizer).name,
        prior_rank=cfg.class_prior_rank,
    )
    gen = SiT(gcfg)
    gen.initialize_weights()
    if start is not None:
        load_into(gen, read_state_dict(cfg.init_from), cfg.init_from)
    if gen.prior is not None:
        gen.prior.fit(latents, labels, cfg.class_prior_shrink)
        latents = gen.prior.from_latents(latents, labels)
    if targets is not None:
        repa_block_index(cfg, cfg.depth)
        gen.projection = projector(cfg.hidden_size, cfg.repa_proj_dim, targets.shape[-1])
        targets = targets.to(device)
    # Initialised on the CPU (the same draws anywhere); the training set lives on the device.
    gen.to(device).train()
    latents, labels = latents.to(device), labels.to(device)
    ema = EMA(gen, cfg.ema_decay)
    opt = make_optimizer(gen, cfg.lr, cfg.weight_decay)
    ckpt = cfg.checkpoint_path()
    step, history = 0, []
    if ckpt.is_file():
        step, extra = load_checkpoint(ckpt, gen, ema, opt)
        history = [tuple(h) for h in extra.get("history", [])]
        if not quiet:
            print(f"resuming {ckpt} at step {step}")
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    bar = progress(cfg.steps, step, f"generator {Path(cfg.out).name}", quiet)
    t0 = time.time()
    n = latents.shape[0]
    while step < end:
        # The batch order depends only on (seed, step), so a resumed run sees the same data.
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        idx = torch.randint(0, n, (cfg.batch_size,), generator=g).to(device)
        set_lr(opt, lr_at(step, cfg.steps, cfg.lr, cfg.warmup))
        target = None if targets is None else targets[idx]
        loss, parts = generator_loss(gen, latents[idx], labels[idx], target, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(gen.parameters(), 1.0)
        opt.step()
        ema.update(gen)
        step += 1
        history.append((step, loss.item()))
        bar.update(1)
        bar.set_postfix({k: f"{v:.4f}" for k, v in parts.items()}, refresh=False)
        if on_step is not None:
            on_step()
        if step % cfg.ckpt_every == 0 or step == end:
            save_checkpoint(ckpt, step, gen, ema, opt, {"history": history})
    bar.close()
    if step >= cfg.steps:
        release = ema.model.cpu()
        if hasattr(release, "projection"):  # the REPA head is training-only
            del release.projection
        save_generator(release, cfg.out)
        # The class names travel with the weights: GET /models lists them and /generate
        # takes them in place of ids (the model's config ignores the key).
        config_path = Path(cfg.out) / "config.json"
        config = json.loads(config_path.read_text())
        config["class_names"] = list(source.classes)
        config_path.write_text(json.dumps(config, indent=1) + "\n")
        meta = {
            "trained_with": dataclasses.asdict(cfg),
            "classes": list(source.classes),
            "data_set": data_set_meta(cfg.data),
            "last_session_seconds": round(time.time() - t0, 1),
        }
        write_training_json(cfg.out, meta, device)
        if not quiet:
            print(f"saved {cfg.out}")
    return history
