"""An SD-VAE-sized convolutional decoder with random weights: the 2-D baseline's decoder.

The Stable Diffusion VAE decoder layout (written here from its published configuration,
so the benchmark needs no extra package): 4-channel latents at 1/8 resolution ->
conv_in -> mid block (ResNet, single-head spatial self-attention, ResNet) -> four levels
with block channels (512, 512, 256, 128) from the coarsest, each with 3 ResNet blocks
(layers_per_block + 1 = 3 in the decoder) and a nearest x2 upsample + conv after every level
but the last -> GroupNorm(32), SiLU, conv_out to RGB. ``width_scale`` shrinks every channel
count (the CPU preset runs it at 1/4, like its ViT decoders).

    dec = SDDecoder()                       # full SD size, ~49M parameters
    images = dec(latents)                   # (B, 4, h, w) -> (B, 3, 8h, 8w)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SD_CHANNELS = (128, 256, 512, 512)  # finest to coarsest, as in the SD config
SD_SCALING = 0.18215


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, c, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all h*w positions (the SD mid-block attention)."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = _norm(c)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, 1, C, H * W).transpose(-1, -2).unbind(1)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C)
        return x + self.proj(h.transpose(-1, -2).reshape(B, C, H, W))


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class SDDecoder(nn.Module):
    def __init__(
        self, latent_channels: int = 4, width_scale: float = 1.0, blocks_per_level: int = 3
    ):
        super().__init__()
        chans = [max(32, int(c * width_scale)) for c in SD_CHANNELS][::-1]  # coarsest first
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1)
        self.conv_in = nn.Conv2d(latent_channels, chans[0], 3, padding=1)
        self.mid = nn.Sequential(
            ResnetBlock(chans[0], chans[0]), AttnBlock(chans[0]), ResnetBlock(chans[0], chans[0])
        )
        layers: list[nn.Module] = []
        cin = chans[0]
        for i, c in enumerate(chans):
            for _ in range(blocks_per_level):
                layers.append(ResnetBlock(cin, c))
                cin = c
            if i < len(chans) - 1:
                layers.append(Upsample(c))
        self.up = nn.Sequential(*layers)
        self.norm_out = _norm(cin)
        self.conv_out = nn.Conv2d(cin, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (B, 4, h, w) -> (B, 3, 8h, 8w)
        x = self.conv_in(self.post_quant_conv(z))
        x = self.up(self.mid(x))
        return self.conv_out(F.silu(self.norm_out(x)))

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Sampler output (normalised latents) -> images, undoing SD's latent scaling."""
        return self(latents / SD_SCALING)
