"""Tiny random models for tests, saved in the released directory layout.

Weights are random normal (not the zero-init of training) so every output depends on every
parameter: a test on them can tell a wrong result from a right one.
"""

from __future__ import annotations

from pathlib import Path

import torch

import model


def randomize(module: torch.nn.Module, seed: int, std: float = 0.2) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("pos_embed"):
                continue
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def tiny_tokenizer_config(
    image_size: int = 32, tokens: int = 8, dim: int = 8
) -> model.TokenizerConfig:
    return model.TokenizerConfig(
        image_size=image_size,
        enc_patch_size=8,
        dec_patch_size=8,
        num_latent_tokens=tokens,
        codebook_embed_dim=dim,
        codebook_size=64,
        num_codebooks=4,
        vq_mean=0.01,
        vq_std=0.3,
        tiny_overrides={
            "enc": {"embed_dim": 32, "depth": 1, "num_heads": 2},
            "dec": {"embed_dim": 32, "depth": 1, "num_heads": 2},
        },
    )


def make_tokenizer(seed: int = 0, **kw) -> model.SoftVQTokenizer:
    tok = model.SoftVQTokenizer(tiny_tokenizer_config(**kw))
    tok.initialize_weights()
    return randomize(tok, seed).eval()


def make_generator(
    tokens: int = 8,
    dim: int = 8,
    num_classes: int = 10,
    seed: int = 1,
    tokenizer: str | None = None,
):
    cfg = model.GeneratorConfig(
        input_size=tokens,
        in_channels=dim,
        hidden_size=32,
        depth=1,
        num_heads=2,
        num_classes=num_classes,
        tokenizer=tokenizer,
    )
    gen = model.build_generator(cfg)
    gen.initialize_weights()
    return randomize(gen, seed, std=0.1).eval()


def save_tiny_pair(
    root: Path,
    name: str = "tiny",
    tokens: int = 8,
    dim: int = 8,
    image_size: int = 32,
    seed: int = 0,
) -> tuple[Path, Path]:
    """Write tokenizer ``{name}`` and generator ``sit-{name}`` under root; return their dirs."""
    tok = make_tokenizer(seed, image_size=image_size, tokens=tokens, dim=dim)
    gen = make_generator(tokens, dim, seed=seed + 1, tokenizer=name)
    tok_dir = model.save_tokenizer(tok, root / name)
    gen_dir = model.save_generator(gen, root / f"sit-{name}")
    return tok_dir, gen_dir
