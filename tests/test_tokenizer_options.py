"""Tokenizer options added for the demo models (issue #14): the reference code's conv
to-pixel head, and decoder training on noised latents."""

from __future__ import annotations

import pytest
import torch

from model.loading import load_tokenizer, save_tokenizer
from model.tokenizer import ConvToPixel, SoftVQTokenizer, TokenizerConfig
from model.training.tokenizer_trainer import (
    TokenizerTrainConfig,
    build_for_training,
    tokenizer_loss,
)
from tests.test_training import tok_config

VIT = {"embed_dim": 32, "depth": 1, "num_heads": 2}


def config(**kw) -> TokenizerConfig:
    base = dict(
        image_size=32,
        enc_patch_size=8,
        dec_patch_size=8,
        num_latent_tokens=8,
        codebook_embed_dim=4,
        codebook_size=16,
        tiny_overrides={"enc": VIT, "dec": VIT},
    )
    return TokenizerConfig(**{**base, **kw})


def test_conv_head_upsamples_with_halving_channels_to_rgb():
    head = ConvToPixel(32, 8)  # 1x1 to 128, then 3 x (nearest x2, 3x3 conv): 128 -> 64 -> 32 -> 3
    convs = [m for m in head.model if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (32, 128, (1, 1)),
        (128, 64, (3, 3)),
        (64, 32, (3, 3)),
        (32, 3, (3, 3)),
    ]
    x = torch.randn(2, 16, 32)  # (B, N, C') on a 4 x 4 grid
    assert head(x, 4).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="power-of-two"):
        ConvToPixel(32, 6)


def test_conv_head_tokenizer_round_trips_through_its_config(tmp_path):
    tok = SoftVQTokenizer(config(to_pixel="conv")).eval()
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    save_tokenizer(tok, tmp_path / "t")
    loaded = load_tokenizer(tmp_path / "t")
    assert loaded.config.to_pixel == "conv"
    assert isinstance(loaded.decoder.to_pixel, ConvToPixel)
    with torch.no_grad():
        assert torch.equal(loaded(images), tok(images))
    # the released layout stays the linear head
    assert isinstance(SoftVQTokenizer(config()).decoder.to_pixel.model, torch.nn.Linear)
    with pytest.raises(ValueError, match="to_pixel"):
        SoftVQTokenizer(config(to_pixel="deconv"))


def test_latent_noise_changes_the_loss_and_is_off_by_default():
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    losses = {}
    for noise in (0.0, 0.5):
        cfg = tok_config("unused", latent_noise=noise)
        torch.manual_seed(0)
        tok, _ = build_for_training(cfg)
        torch.manual_seed(1)
        losses[noise] = [tokenizer_loss(tok, images, cfg)[0].item() for _ in range(2)]
    assert losses[0.0][0] == losses[0.0][1]  # deterministic without noise
    assert losses[0.5][0] != losses[0.5][1] and losses[0.5][0] != losses[0.0][0]
    assert TokenizerTrainConfig(out="x").latent_noise == 0.0
