"""SoftVQ-VAE: ViT encoder with learned latent tokens, soft vector quantizer, ViT decoder.

Shapes at the boundaries (S image size, p patch size, N = (S/p)^2, L tokens, D token width,
G codebooks, K codewords):

    image (B, 3, S, S) in [-1, 1]
      -> encoder            (B, L, D)   pre-quantisation latents
      -> quantize           (B, L, D)   z_q, and code indices (B, G, L/G)
      -> decoder            (B, 3, S, S) unclamped
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .vit import DINOV2_WIDTHS, VisionTransformer


@dataclass
class TokenizerConfig:
    """The fields of a released ``config.json`` that define the architecture.

    Unknown fields of a config file are ignored. ``_tiny_overrides`` replaces the width,
    depth and heads of the named ViTs (the fixtures and the project's own small models use it).
    """

    image_size: int = 256
    enc_patch_size: int = 16
    dec_patch_size: int = 16
    encoder_model: str = "vit_base_patch14_dinov2.lvd142m"
    decoder_model: str = "vit_base_patch14_dinov2.lvd142m"
    num_latent_tokens: int = 64
    codebook_embed_dim: int = 32
    codebook_size: int = 8192
    num_codebooks: int = 4
    codebook_l2_norm: bool = True
    tau: float = 0.07
    vq_mean: float = 0.0
    vq_std: float = 1.0
    # The decoder's head from patch tokens to pixels: "linear" (the released models': one
    # Linear C' -> p*p*3 per patch) or "conv" (the reference code's other option: a 1x1 conv to
    # 128 channels, then log2(p) nearest x2 upsamplings with 3x3 convs halving the channels,
    # the last one to RGB). A linear head maps a C'-wide token to p*p*3 values (rank C'), which
    # at p = 8 and a narrow decoder drops detail; the conv head does not have that limit.
    to_pixel: str = "linear"
    tiny_overrides: dict[str, dict[str, int]] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TokenizerConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        if "_tiny_overrides" in d:
            kwargs["tiny_overrides"] = d["_tiny_overrides"]
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        overrides = d.pop("tiny_overrides")
        if overrides:
            d["_tiny_overrides"] = overrides
        return d

    def vit_shape(self, side: str) -> tuple[int, int, int]:
        """(width, depth, heads) of the encoder ("enc") or decoder ("dec")."""
        name = self.encoder_model if side == "enc" else self.decoder_model
        if name not in DINOV2_WIDTHS:
            raise ValueError(f"unknown {side}oder model {name!r}; known: {sorted(DINOV2_WIDTHS)}")
        dim, depth, heads = DINOV2_WIDTHS[name]
        o = self.tiny_overrides.get(side, {})
        return o.get("embed_dim", dim), o.get("depth", depth), o.get("num_heads", heads)


class SoftVQEncoder(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        dim, depth, heads = cfg.vit_shape("enc")
        L = cfg.num_latent_tokens
        self.model = VisionTransformer(cfg.image_size, cfg.enc_patch_size, dim, depth, heads)
        self.latent_tokens = nn.Parameter(torch.zeros(1, L, dim))
        self.latent_pos_embed = nn.Parameter(torch.zeros(1, L, dim))
        self.num_latent_tokens = L

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) -> (B, L, C)
        x = self.model.add_cls_and_pos(self.model.patch_embed(images))  # (B, 1+N, C)
        latents = (self.latent_tokens + self.latent_pos_embed).expand(x.shape[0], -1, -1)
        x = self.model.run_blocks(torch.cat([x, latents], dim=1))
        return x[:, -self.num_latent_tokens :]


class SoftVectorQuantizer(nn.Module):
    """Soft VQ: each token becomes a softmax(cos / tau)-weighted sum of its group's codewords.

    Tokens are split along the sequence into G contiguous groups; group g uses codebook g.
    """

    def __init__(self, num_codebooks: int, codebook_size: int, dim: int, tau: float, l2_norm: bool):
        super().__init__()
        self.embedding = nn.Parameter(torch.zeros(num_codebooks, codebook_size, dim))
        self.num_codebooks = num_codebooks
        self.tau = tau
        self.l2_norm = l2_norm

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, D) -> z_q (B, L, D), code indices (B, G, L/G)."""
        B, L, D = z.shape
        G = self.num_codebooks
        z = z.reshape(B, G, L // G, D)
        codebook = self.embedding
        if self.l2_norm:
            z = F.normalize(z, dim=-1)
            codebook = F.normalize(codebook, dim=-1)
        logits = torch.einsum("bgnd,gkd->bgnk", z, codebook)
        probs = torch.softmax(logits.float() / self.tau, dim=-1).to(z.dtype)
        z_q = torch.einsum("bgnk,gkd->bgnd", probs, codebook)
        return z_q.reshape(B, L, D), probs.argmax(dim=-1)


def reference_index_layout(indices: torch.Tensor) -> torch.Tensor:
    """The reference implementation's layout of code indices.

    ``encode(..., return_indices=True)`` returns indices[b, g, n] = code of image b's token
    g * L/G + n (batch-invariant). The reference computes a (G, B, L/G) array and views its
    memory as (B, G, L/G), which mixes images whenever B > 1; this reproduces that exactly
    (the parity test uses it). For B = 1 the two layouts are identical.
    """
    B, G, n = indices.shape
    return indices.permute(1, 0, 2).reshape(B, G, n)


class SoftVQDecoder(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        dim, depth, heads = cfg.vit_shape("dec")
        self.patch_size = cfg.dec_patch_size
        self.model = VisionTransformer(cfg.image_size, cfg.dec_patch_size, dim, depth, heads)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.latent_pos_embed = nn.Parameter(torch.zeros(1, cfg.num_latent_tokens, dim))
        self.to_pixel = make_to_pixel(cfg.to_pixel, dim, cfg.dec_patch_size)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (B, L, C') -> (B, 3, S, S)
        B = z.shape[0]
        N = self.model.num_patches
        x = self.model.add_cls_and_pos(self.mask_token.expand(B, N, -1))  # (B, 1+N, C')
        x = self.model.run_blocks(torch.cat([x, z + self.latent_pos_embed], dim=1))
        return self.to_pixel(x[:, 1 : 1 + N], self.model.grid)


def make_to_pixel(kind: str, dim: int, patch_size: int) -> nn.Module:
    if kind == "linear":
        return ToPixel(dim, patch_size)
    if kind == "conv":
        return ConvToPixel(dim, patch_size)
    raise ValueError(f"to_pixel must be 'linear' or 'conv', got {kind!r}")


class ToPixel(nn.Module):
    def __init__(self, dim: int, patch_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.model = nn.Linear(dim, patch_size * patch_size * 3)

    def forward(self, x: torch.Tensor, grid: int) -> torch.Tensor:  # (B, N, C') -> (B, 3, S, S)
        p = self.patch_size
        x = self.model(x).reshape(x.shape[0], grid, grid, p, p, 3)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(x.shape[0], 3, grid * p, grid * p)


class ConvToPixel(nn.Module):
    """Patch tokens as a (C', S/p, S/p) map -> 1x1 conv to 128 -> log2(p) x [nearest x2,
    3x3 conv] with channels 128 -> 64 -> ... and the last conv to 3 (GELU between)."""

    WIDTH = 128

    def __init__(self, dim: int, patch_size: int):
        super().__init__()
        stages = patch_size.bit_length() - 1
        if patch_size < 2 or 1 << stages != patch_size:
            raise ValueError(f"the conv to_pixel head needs a power-of-two patch, got {patch_size}")
        layers: list[nn.Module] = [nn.Conv2d(dim, self.WIDTH, 1)]
        width = self.WIDTH
        for i in range(stages):
            out = 3 if i == stages - 1 else width // 2
            layers += [nn.GELU(), nn.Upsample(scale_factor=2.0, mode="nearest")]
            layers.append(nn.Conv2d(width, out, 3, padding=1))
            width = out
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, grid: int) -> torch.Tensor:  # (B, N, C') -> (B, 3, S, S)
        B, N, C = x.shape
        return self.model(x.transpose(1, 2).reshape(B, C, grid, grid))


class SoftVQTokenizer(nn.Module):
    """The whole tokenizer. ``encode`` and ``decode`` are the public API."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        if cfg.num_latent_tokens % cfg.num_codebooks:
            raise ValueError("num_latent_tokens must be a multiple of num_codebooks")
        self.config = cfg
        enc_dim, dec_dim = cfg.vit_shape("enc")[0], cfg.vit_shape("dec")[0]
        D = cfg.codebook_embed_dim
        self.encoder = SoftVQEncoder(cfg)
        self.quant_conv = nn.Linear(enc_dim, D)
        self.quantize = SoftVectorQuantizer(
            cfg.num_codebooks, cfg.codebook_size, D, cfg.tau, cfg.codebook_l2_norm
        )
        self.post_quant_conv = nn.Linear(D, dec_dim)
        self.decoder = SoftVQDecoder(cfg)

    # --- properties the service reads -------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return self.config.num_latent_tokens

    @property
    def token_dim(self) -> int:
        return self.config.codebook_embed_dim

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def num_codebooks(self) -> int:
        return self.config.num_codebooks

    @property
    def vq_mean(self) -> float:
        return float(self.config.vq_mean)

    @property
    def vq_std(self) -> float:
        return float(self.config.vq_std)

    @property
    def dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.quant_conv.weight.device

    # --- the math -------------------------------------------------------------------
    def encode_pre_quant(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, L, D), before quantisation."""
        return self.quant_conv(self.encoder(images))

    def encode(self, images: torch.Tensor, return_indices: bool = False):
        """(B, 3, S, S) float in [-1, 1] -> quantized tokens (B, L, D)
        (and code indices (B, G, L/G) with ``return_indices``)."""
        self.check_images(images)
        tokens, indices = self.quantize(self.encode_pre_quant(images.to(self.dtype)))
        return (tokens, indices) if return_indices else tokens

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L, D) -> images (B, 3, S, S), unclamped."""
        self.check_tokens(tokens)
        return self.decoder(self.post_quant_conv(tokens.to(self.dtype)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(images))

    def initialize_weights(self) -> None:
        """Fresh weights for training: timm's ViT init (truncated-normal linears, LayerScale
        1e-5 already) and a unit-normal codebook."""

        def basic(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

        self.apply(basic)
        for vit in (self.encoder.model, self.decoder.model):
            nn.init.trunc_normal_(vit.pos_embed, std=0.02)
            nn.init.normal_(vit.cls_token, std=1e-6)
            for block in vit.blocks:
                nn.init.constant_(block.ls1.gamma, 1e-5)
                nn.init.constant_(block.ls2.gamma, 1e-5)
        for p in (
            self.encoder.latent_tokens,
            self.encoder.latent_pos_embed,
            self.decoder.latent_pos_embed,
            self.decoder.mask_token,
        ):
            nn.init.trunc_normal_(p, std=0.02)
        nn.init.normal_(self.quantize.embedding)

    # --- validation: nothing is silently broadcast ---------------------------------------
    def check_images(self, images: torch.Tensor) -> None:
        S = self.image_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, S, S):
            raise ValueError(f"images must have shape (B, 3, {S}, {S}), got {tuple(images.shape)}")

    def check_tokens(self, tokens: torch.Tensor) -> None:
        L, D = self.num_tokens, self.token_dim
        if tokens.ndim != 3 or tuple(tokens.shape[1:]) != (L, D):
            raise ValueError(f"tokens must have shape (B, {L}, {D}), got {tuple(tokens.shape)}")
        if not torch.isfinite(tokens).all():
            raise ValueError("tokens hold NaN or Inf")
