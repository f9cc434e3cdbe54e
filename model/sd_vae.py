"""The Stable Diffusion VAE, the decoder of the 2-D latent-diffusion baseline.

It is diffusers' ``AutoencoderKL`` (the optional extra ``pip install -e ".[baseline]"``), built
offline from a directory with ``config.json`` + ``diffusion_pytorch_model.safetensors``, so the
released ``sd-vae-ft-ema`` / ``sd-vae-ft-mse`` directories load as they are.

    vae = load_sd_vae("/models/sd-vae-ft-ema", device="cuda", dtype=torch.bfloat16)
    images = vae.decode(z / vae.scaling_factor)   # SiT/2's latents (B, 4, 32, 32) -> (B, 3, 256, 256)

``decode`` takes the VAE's own latents; a 2-D generator samples them multiplied by
``scaling_factor`` (0.18215 for SD), so the caller divides first, exactly as it de-normalises
SoftVQ tokens with ``vq_std`` / ``vq_mean``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

SD_BLOCK_OUT_CHANNELS = (128, 256, 512, 512)  # finest to coarsest, as in the SD config
SD_SCALING = 0.18215
WEIGHTS = "diffusion_pytorch_model.safetensors"


def _autoencoder_kl():
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:
        raise ImportError(
            'the SD-VAE needs diffusers: pip install -e ".[baseline]" (or pip install diffusers)'
        ) from e
    return AutoencoderKL


def is_sd_vae_dir(path: str | Path) -> bool:
    """A diffusers AutoencoderKL directory (its config names the class)."""
    cfg = Path(path) / "config.json"
    try:
        return json.loads(cfg.read_text()).get("_class_name") == "AutoencoderKL"
    except (OSError, ValueError):
        return False


def sd_vae_config(
    width_scale: float = 1.0, layers_per_block: int = 2, sample_size: int = 256
) -> dict:
    """AutoencoderKL's config for SD's VAE, every channel count times ``width_scale`` (the
    benchmark's CPU preset runs it at 1/4, like its ViT decoders)."""
    chans = [max(8, int(c * width_scale)) for c in SD_BLOCK_OUT_CHANNELS]
    return {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": chans,
        "layers_per_block": layers_per_block,
        "norm_num_groups": min(32, chans[0]),
        "sample_size": sample_size,
        "scaling_factor": SD_SCALING,
    }


class SDVAE(nn.Module):
    """AutoencoderKL with what the service reads: latent channels, downsampling factor,
    scaling factor; ``decode`` latents (B, 4, h, w) -> images (B, 3, 8h, 8w) in [-1, 1]
    (unclamped), ``encode`` images -> the posterior's mean."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae
        cfg = vae.config
        self.latent_channels = int(cfg.latent_channels)
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)
        self.scaling_factor = float(getattr(cfg, "scaling_factor", None) or SD_SCALING)

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.dtype

    @property
    def device(self) -> torch.device:
        return self.vae.device

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents).sample

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(images).latent_dist.mean

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decode(latents)


def load_sd_vae(path: str | Path, device=None, dtype=None) -> SDVAE:
    """A diffusers AutoencoderKL directory -> SDVAE in eval mode. Offline (never fetches)
    and safetensors only."""
    path = Path(path)
    if not (path / "config.json").is_file() or not (path / WEIGHTS).is_file():
        raise ValueError(f"{path}: an SD-VAE directory holds config.json and {WEIGHTS}")
    vae = _autoencoder_kl().from_pretrained(
        str(path),
        local_files_only=True,
        use_safetensors=True,
        torch_dtype=dtype,
        low_cpu_mem_usage=False,  # the fast path needs accelerate; this one does not
    )
    return SDVAE(vae.to(device=device or "cpu")).eval().requires_grad_(False)


def random_sd_vae(
    width_scale: float = 1.0, layers_per_block: int = 2, seed: int = 0, sample_size: int = 256
) -> SDVAE:
    """SD's VAE layout with random weights (speed does not depend on the weights)."""
    torch.manual_seed(seed)
    cfg = sd_vae_config(width_scale, layers_per_block, sample_size)
    return SDVAE(_autoencoder_kl().from_config(cfg)).eval().requires_grad_(False)


def save_sd_vae(vae: SDVAE, path: str | Path) -> Path:
    """The released directory layout: config.json + diffusion_pytorch_model.safetensors."""
    vae.vae.save_pretrained(str(path), safe_serialization=True)
    return Path(path)
