"""Random-weight models at the sizes of the speed comparison (speed does not depend on the
weights): the benchmark suite (loadtests/) times them offline and the service's compare
profile (service/compare.py) serves them side by side, from this one table.

    cpu: every network at 1/4 of its real width (SiT-XL 1152 -> 288, SoftVQ-B's ViT 768 -> 192,
         SD-VAE channels (128, 256, 512, 512) -> (32, 64, 128, 128)), SiT cut to 6 blocks;
    gpu: the real sizes: SiT-XL (28 x 1152), SoftVQ-L (ViT-L decoder, 64 tokens) and SoftVQ-B
         (ViT-B, 32 tokens), full SD-VAE, bfloat16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sit import GeneratorConfig, SiTBackbone, build_generator
from .tokenizer import SoftVQTokenizer, TokenizerConfig


@dataclass(frozen=True)
class ReferenceSizes:
    dtype: str
    sit: tuple[int, int, int]  # (depth, hidden, heads), shared by the 1-D and 2-D generators
    vit_1d: dict[int, tuple[int, int, int, int]]  # tokens -> (width, depth, heads, token dim)
    sd_width_scale: float
    image_size: int = 256
    latent_side: int = 32  # SD-VAE latents of a 256 px image
    num_classes: int = 1000


SIZES = {
    "cpu": ReferenceSizes(
        dtype="float32",
        sit=(6, 288, 4),
        vit_1d={32: (192, 12, 3, 64), 64: (192, 12, 3, 32)},
        sd_width_scale=0.25,
    ),
    "gpu": ReferenceSizes(
        dtype="bfloat16",
        sit=(28, 1152, 16),
        vit_1d={32: (768, 12, 12, 64), 64: (1024, 24, 16, 32)},
        sd_width_scale=1.0,
    ),
}


def random_softvq(
    image_size: int, tokens: int, token_dim: int, vit: tuple[int, int, int], seed: int = 0
) -> SoftVQTokenizer:
    width, depth, heads = vit
    shape = {"embed_dim": width, "depth": depth, "num_heads": heads}
    cfg = TokenizerConfig(
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
    tok = SoftVQTokenizer(cfg)
    tok.initialize_weights()
    return tok.eval()


def random_sit_1d(
    tokens: int, token_dim: int, sit: tuple[int, int, int], num_classes: int = 1000
) -> SiTBackbone:
    depth, hidden, heads = sit
    cfg = GeneratorConfig(
        input_size=tokens,
        in_channels=token_dim,
        hidden_size=hidden,
        depth=depth,
        num_heads=heads,
        num_classes=num_classes,
    )
    return _init(build_generator(cfg))


def random_sit_2d(
    latent_side: int, sit: tuple[int, int, int], num_classes: int = 1000
) -> SiTBackbone:
    """SiT/2 over (4, side, side) latents, (side/2)^2 tokens (256 at 32x32), in the released
    SiT-XL/2's layout: learned sigma, the SiT authors' time convention."""
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
        learn_sigma=True,
        time_convention="noise_at_0",
    )
    return _init(build_generator(cfg))


def _init(gen: SiTBackbone) -> SiTBackbone:
    if next(gen.parameters()).is_meta:  # shapes only (tests of the gpu sizes, no memory)
        return gen.eval()
    torch.manual_seed(0)
    gen.initialize_weights()
    # adaLN-Zero init makes every block an identity; random modulation keeps the math honest.
    with torch.no_grad():
        for p in gen.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return gen.eval()
