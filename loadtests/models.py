"""Random-weight models of the benchmark sizes (speed does not depend on the weights); the
builders live in model/speed_reference.py, shared with the service's compare profile."""

from __future__ import annotations

from model.sd_vae import SDVAE, random_sd_vae
from model.speed_reference import random_sit_1d as sit_1d
from model.speed_reference import random_sit_2d as sit_2d
from model.speed_reference import random_softvq as softvq

__all__ = ["sd_vae", "sit_1d", "sit_2d", "softvq"]


def sd_vae(width_scale: float, layers_per_block: int = 2) -> SDVAE:
    """SD's VAE (diffusers AutoencoderKL), every channel count times ``width_scale``."""
    return random_sd_vae(width_scale=width_scale, layers_per_block=layers_per_block)
