"""Train a SoftVQ tokenizer from scratch.

Loss = L1 + L2 on pixels
     + ``grad_weight`` * L1 between the image gradients (finite differences) of the
       reconstruction and the target: a cheap high-frequency term that sharpens edges
       without any downloaded network
     + ``entropy_weight`` * (mean per-token assignment entropy - entropy of the mean
       assignment): the quantizer's entropy regularisation (confident tokens, used codebooks)
     + ``align_weight`` * negative cosine similarity between the latent tokens (through a
       training-only MLP ``projection``, each token repeated over its share of the teacher's
       patches) and a frozen teacher's patch features of the image (SoftVQ's ``repa``)
     + ``perceptual_weight`` * distance between the teacher's feature maps of the
       reconstruction and of the image (our LPIPS stand-in).
The teacher (``teacher.py``, trained by ``softvq train-teacher``) can also initialise the
encoder (``init_from_teacher``; a vit teacher of the encoder's shape).

AdamW, warm-up + cosine learning rate, EMA weights (the EMA model is what gets saved), a
checkpoint every ``ckpt_every`` steps that resumes exactly. At the end the latent statistics
vq_mean / vq_std are measured on training images and stored in the saved config.json.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..loading import save_tokenizer
from ..sit import sincos_2d
from ..tokenizer import SoftVQTokenizer, TokenizerConfig
from .data import batches, data_set_meta, open_source
from .ema import EMA
from .loop import (
    load_checkpoint,
    lr_at,
    make_optimizer,
    progress,
    save_checkpoint,
    set_lr,
    training_device,
    write_training_json,
)
from .teacher import (
    alignment_loss,
    init_encoder_from_teacher,
    load_teacher,
    perceptual_distance,
    projector,
    repeat_to,
)


@dataclass
class TokenizerTrainConfig:
    out: str  # model directory written at the end (config.json + model.safetensors)
    data: str = "shapes"  # "shapes" or a folder of class sub-folders
    image_size: int = 64
    num_tokens: int = 64
    token_dim: int = 16
    codebook_size: int = 256
    num_codebooks: int = 4
    tau: float = 0.07  # soft-VQ temperature: higher = smoother (less code-like) latents
    patch_size: int = 8
    dec_patch_size: int | None = None  # default: patch_size
    to_pixel: str = "linear"  # the decoder's head: "linear" or "conv" (model/tokenizer.py)
    enc: dict[str, int] = field(
        default_factory=lambda: {"embed_dim": 128, "depth": 4, "num_heads": 4}
    )
    dec: dict[str, int] = field(
        default_factory=lambda: {"embed_dim": 128, "depth": 4, "num_heads": 4}
    )
    steps: int = 3000
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: int = 200
    ema_decay: float = 0.999
    grad_weight: float = 0.5
    # Decoder robustness: the decoder sees z_q + s * std(z_q) * noise, s ~ U(0, latent_noise)
    # per image, so that images stay where a generator's slightly-off latents land (0: off).
    latent_noise: float = 0.0
    entropy_weight: float = 0.002
    train_size: int = 200_000  # images of the built-in set to draw from (ignored for folders)
    seed: int = 0
    ckpt: str | None = None  # default: <out>.ckpt.pt
    ckpt_every: int = 250
    stats_images: int = 2000  # training images used to measure vq_mean / vq_std
    # LayerScale start value. timm's 1e-5 (right for deep ViTs fine-tuned for days) leaves a
    # shallow ViT nearly an identity map for the first thousand steps; short runs need more.
    layerscale_init: float = 0.5
    # "random": timm's std-0.02 patch position embeddings. "sincos" (the bundled demo
    # weights'): MAE's 2-D sin-cos table at init (unit amplitude, still learned).
    # With random ones, patch tokens carry almost no position next to their content, so the
    # latents cannot say where things are and a short run sits at the "mean colour" plateau;
    # in pilots sincos left it after ~500 steps (20.4 vs 17.0 dB at step 1000, 32 tokens).
    pos_init: str = "sincos"
    # Teacher-driven terms (all off without a teacher directory).
    teacher: str | None = None
    align_weight: float = 0.0
    align_proj_dim: int = 256
    perceptual_weight: float = 0.0
    init_from_teacher: bool = False

    def checkpoint_path(self) -> Path:
        return Path(self.ckpt) if self.ckpt else Path(str(self.out).rstrip("/") + ".ckpt.pt")

    def model_config(self) -> TokenizerConfig:
        return TokenizerConfig(
            image_size=self.image_size,
            enc_patch_size=self.patch_size,
            dec_patch_size=self.dec_patch_size or self.patch_size,
            to_pixel=self.to_pixel,
            num_latent_tokens=self.num_tokens,
            codebook_embed_dim=self.token_dim,
            codebook_size=self.codebook_size,
            num_codebooks=self.num_codebooks,
            tau=self.tau,
            tiny_overrides={"enc": dict(self.enc), "dec": dict(self.dec)},
        )


def init_for_small_widths(
    tok: SoftVQTokenizer, layerscale: float, pos_init: str = "random"
) -> None:
    """Fresh weights scaled for narrow ViTs.

    ``initialize_weights`` is timm's recipe for 768+ wide models: std-0.02 linears and
    LayerScale 1e-5. At width 64-128 std 0.02 shrinks every branch about 6x and the blocks
    start as near-identities; in pilot runs a 64-wide tokenizer learned several times slower
    than with xavier-uniform linears (fan-in/out scaled, as DiT uses) and LayerScale 0.5.
    """
    tok.initialize_weights()
    for m in tok.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.xavier_uniform_(m.weight)
    for vit in (tok.encoder.model, tok.decoder.model):
        for block in vit.blocks:
            torch.nn.init.constant_(block.ls1.gamma, layerscale)
            torch.nn.init.constant_(block.ls2.gamma, layerscale)
        if pos_init == "sincos":
            with torch.no_grad():
                vit.pos_embed.zero_()  # slot 0 (class token) stays zero
                vit.pos_embed[0, 1:] = sincos_2d(vit.embed_dim, vit.grid).float()
        elif pos_init != "random":
            raise ValueError(f"pos_init must be 'random' or 'sincos', got {pos_init!r}")


def soft_assignments(tok: SoftVQTokenizer, z: torch.Tensor) -> torch.Tensor:
    """The quantizer's softmax over codewords for pre-quant latents z (B, L, D):
    (B, G, L/G, K). Same math as ``SoftVectorQuantizer.forward``; needed for the entropy term."""
    q = tok.quantize
    B, L, D = z.shape
    z = z.reshape(B, q.num_codebooks, L // q.num_codebooks, D)
    codebook = q.embedding
    if q.l2_norm:
        z, codebook = F.normalize(z, dim=-1), F.normalize(codebook, dim=-1)
    return torch.softmax(torch.einsum("bgnd,gkd->bgnk", z, codebook) / q.tau, dim=-1)


def entropy_loss(probs: torch.Tensor) -> torch.Tensor:
    """Per-token entropy (pushed down: confident assignments) minus the entropy of the
    batch-average assignment per codebook (pushed up: all codewords used)."""
    eps = 1e-8
    per_token = -(probs * (probs + eps).log()).sum(-1).mean()
    avg = probs.mean(dim=(0, 2))  # (G, K)
    codebook = -(avg * (avg + eps).log()).sum(-1).mean()
    return per_token - codebook


def gradient_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    dx = lambda a: a[..., :, 1:] - a[..., :, :-1]  # noqa: E731
    dy = lambda a: a[..., 1:, :] - a[..., :-1, :]  # noqa: E731
    return F.l1_loss(dx(x), dx(y)) + F.l1_loss(dy(x), dy(y))


def tokenizer_loss(
    tok: SoftVQTokenizer, images: torch.Tensor, cfg: TokenizerTrainConfig, teacher=None
):
    """images (B, 3, S, S) -> (total loss, dict of parts for logging). ``teacher`` (frozen)
    drives the alignment and perceptual terms; the alignment head is ``tok.projection``."""
    z = tok.encode_pre_quant(images)
    z_q, _ = tok.quantize(z)
    z_dec = z_q
    if cfg.latent_noise:
        s = torch.rand(z_q.shape[0], 1, 1, device=z_q.device) * cfg.latent_noise
        z_dec = z_q + s * z_q.detach().std() * torch.randn_like(z_q)
    recon = tok.decoder(tok.post_quant_conv(z_dec))
    l1 = F.l1_loss(recon, images)
    l2 = F.mse_loss(recon, images)
    total = l1 + l2
    parts = {"l1": l1.item(), "l2": l2.item()}
    if cfg.grad_weight:
        g = gradient_loss(recon, images)
        total = total + cfg.grad_weight * g
        parts["grad"] = g.item()
    if cfg.entropy_weight:
        e = entropy_loss(soft_assignments(tok, z))
        total = total + cfg.entropy_weight * e
        parts["ent"] = e.item()
    if teacher is not None and cfg.align_weight:
        with torch.no_grad():
            target = teacher.patch_features(images)
        projected = repeat_to(tok.projection(z_q), target.shape[1])
        a = alignment_loss(projected, target)
        total = total + cfg.align_weight * a
        parts["align"] = a.item()
    if teacher is not None and cfg.perceptual_weight:
        p = perceptual_distance(teacher, recon, images)
        total = total + cfg.perceptual_weight * p
        parts["perc"] = p.item()
    return total, parts


def build_for_training(cfg: TokenizerTrainConfig):
    """(tokenizer with fresh weights, frozen teacher or None). With alignment on, the
    tokenizer gets a training-only ``projection`` head (dropped when saved)."""
    tok = SoftVQTokenizer(cfg.model_config())
    init_for_small_widths(tok, cfg.layerscale_init, cfg.pos_init)
    teacher = None
    if cfg.align_weight or cfg.perceptual_weight or cfg.init_from_teacher:
        if not cfg.teacher:
            raise ValueError("alignment, perceptual loss and encoder init need a teacher")
        teacher = load_teacher(cfg.teacher)
        if cfg.init_from_teacher:
            init_encoder_from_teacher(tok, teacher)
        if cfg.align_weight:
            tok.projection = projector(cfg.token_dim, cfg.align_proj_dim, teacher.feature_dim)
    return tok, teacher


def without_projection(tok: SoftVQTokenizer) -> SoftVQTokenizer:
    """The release: the alignment head is training-only."""
    if hasattr(tok, "projection"):
        del tok.projection
    return tok


@torch.no_grad()
def measure_latent_stats(tok: SoftVQTokenizer, dataset, count: int, batch_size: int = 100):
    """Scalar mean and std of the quantized tokens z_q over ``count`` training images."""
    n = min(count, len(dataset))
    total, total_sq, elems = 0.0, 0.0, 0
    for start in range(0, n, batch_size):
        images, _ = dataset.batch(range(start, min(n, start + batch_size)))
        z = tok.encode(images).double()
        total += float(z.sum())
        total_sq += float((z**2).sum())
        elems += z.numel()
    mean = total / elems
    std = max(total_sq / elems - mean**2, 1e-12) ** 0.5
    return mean, std


def train_tokenizer(
    cfg: TokenizerTrainConfig,
    quiet: bool = False,
    stop_after: int | None = None,
    device: str | torch.device = "cpu",
):
    """Train (or resume) and save the EMA tokenizer to ``cfg.out``. ``stop_after`` ends the run
    early after that many total steps without saving the model (used to test resuming).
    ``device``: see ``loop.training_device``. Returns the list of (step, loss) logged."""
    device = training_device(device)
    torch.manual_seed(cfg.seed)
    source = open_source(cfg.data, cfg.image_size, size=cfg.train_size, seed=cfg.seed)
    tok, teacher = build_for_training(cfg)  # initialised on the CPU: the same draws anywhere
    tok.to(device).train()
    if teacher is not None:
        teacher.to(device)
    ema = EMA(tok, cfg.ema_decay)
    opt = make_optimizer(tok, cfg.lr, cfg.weight_decay)
    ckpt = cfg.checkpoint_path()
    step, history = 0, []
    if ckpt.is_file():
        step, extra = load_checkpoint(ckpt, tok, ema, opt)
        history = [tuple(h) for h in extra.get("history", [])]
        if not quiet:
            print(f"resuming {ckpt} at step {step}")
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    bar = progress(cfg.steps, step, f"tokenizer {Path(cfg.out).name}", quiet)
    data = batches(source.dataset, cfg.batch_size, cfg.seed, start_step=step)
    t0 = time.time()
    while step < end:
        images, _ = next(data)  # drawn on the CPU
        set_lr(opt, lr_at(step, cfg.steps, cfg.lr, cfg.warmup))
        loss, parts = tokenizer_loss(tok, images.to(device), cfg, teacher)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tok.parameters(), 1.0)
        opt.step()
        ema.update(tok)
        step += 1
        history.append((step, loss.item()))
        bar.update(1)
        bar.set_postfix({k: f"{v:.4f}" for k, v in parts.items()}, refresh=False)
        if step % cfg.ckpt_every == 0 or step == end:
            save_checkpoint(ckpt, step, tok, ema, opt, {"history": history})
    bar.close()
    if step >= cfg.steps:
        release = without_projection(ema.model).cpu()
        finish(cfg, release, source, time.time() - t0, quiet, device)
    return history


def finish(
    cfg: TokenizerTrainConfig,
    tok: SoftVQTokenizer,
    source,
    seconds: float,
    quiet: bool,
    device: torch.device | None = None,
):
    """Measure the latent statistics (on the CPU, where the model is released) and save."""
    mean, std = measure_latent_stats(tok, source.dataset, cfg.stats_images)
    tok.config.vq_mean, tok.config.vq_std = mean, std
    save_tokenizer(tok, cfg.out)
    meta = {
        "trained_with": dataclasses.asdict(cfg),
        "classes": list(source.classes),
        "data_set": data_set_meta(cfg.data),
        "last_session_seconds": round(seconds, 1),
    }
    write_training_json(cfg.out, meta, device)
    if not quiet:
        print(f"saved {cfg.out} (vq_mean {mean:.5f}, vq_std {std:.5f})")
