"""Random-weight models of the benchmark sizes (speed does not depend on the weights)."""

from __future__ import annotations

import torch

import model
from model.sit import GeneratorConfig

from .sd_decoder import SDDecoder


def softvq(
    image_size: int, tokens: int, token_dim: int, vit: tuple[int, int, int], seed: int = 0
) -> model.SoftVQTokenizer:
    width, depth, heads = vit
    shape = {"embed_dim": width, "depth": depth, "num_heads": heads}
    cfg = model.TokenizerConfig(
        image_size=image_size,
        enc_patch_size=16,
        dec_patch_size=16,
        num_latent_tokens=tokens,
        codebook_embed_dim=token_dim,
        codebook_size=8192,
        num_codebooks=4,
        tiny_overrides={"enc": dict(shape), "dec": dict(shape)},
    )
    torch.manual_seed(seed)
    tok = model.SoftVQTokenizer(cfg)
    tok.initialize_weights()
    return tok.eval()


def sit_1d(
    tokens: int, token_dim: int, sit: tuple[int, int, int], num_classes: int = 1000
) -> model.SiT:
    depth, hidden, heads = sit
    cfg = GeneratorConfig(
        input_size=tokens,
        in_channels=token_dim,
        hidden_size=hidden,
        depth=depth,
        num_heads=heads,
        num_classes=num_classes,
    )
    return _init(model.build_generator(cfg))


def sit_2d(latent_side: int, sit: tuple[int, int, int], num_classes: int = 1000) -> model.SiT2D:
    """Patch-2 SiT over (4, side, side) latents: (side/2)^2 tokens (256 at 32x32)."""
    depth, hidden, heads = sit
    cfg = GeneratorConfig(
        input_size=latent_side,
        in_channels=4,
        hidden_size=hidden,
        depth=depth,
        num_heads=heads,
        num_classes=num_classes,
        patch_size=2,
        vae_1d=False,
    )
    return _init(model.build_generator(cfg))


def _init(gen):
    torch.manual_seed(0)
    gen.initialize_weights()
    # adaLN-Zero init makes every block an identity; random modulation keeps the math honest.
    with torch.no_grad():
        for p in gen.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return gen.eval()


def sd_decoder(width_scale: float, blocks_per_level: int = 3) -> SDDecoder:
    torch.manual_seed(0)
    return SDDecoder(width_scale=width_scale, blocks_per_level=blocks_per_level).eval()
