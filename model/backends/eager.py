"""``eager``: the PyTorch modules as they are, any batch size. On CUDA the Triton kernels of
``model.kernels`` replace the soft quantizer and the adaLN modulate + LayerNorm."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..sit import SiTBackbone
from ..tokenizer import SoftVQTokenizer
from .bucketing import normalize_buckets
from .runner import DecodeGraph, EncodeGraph, GeneratorRunner, TokenizerRunner


def _maybe_fuse(module: nn.Module, fused_kernels: bool | None) -> None:
    """Fused kernels by default on CUDA (they replace submodules in place)."""
    device = next(module.parameters()).device
    if fused_kernels if fused_kernels is not None else device.type == "cuda":
        from ..kernels import install_fused_kernels

        install_fused_kernels(module)


class EagerTokenizerRunner(TokenizerRunner):
    backend = "eager"

    def __init__(
        self,
        tok: SoftVQTokenizer,
        buckets: Sequence[int] | None = None,
        *,
        fused_kernels: bool | None = None,
    ):
        super().__init__(tok, buckets)
        _maybe_fuse(self.tok, fused_kernels)
        self.encode_graph, self.decode_graph = EncodeGraph(self.tok), DecodeGraph(self.tok)

    def _encode(self, images):
        return self.encode_graph(images)

    def _decode(self, tokens):
        return self.decode_graph(tokens)


class EagerGeneratorRunner(GeneratorRunner):
    backend = "eager"

    def __init__(
        self,
        gen: SiTBackbone,
        buckets: Sequence[int] | None = None,
        *,
        fused_kernels: bool | None = None,
    ):
        super().__init__(gen, buckets)
        _maybe_fuse(self.gen, fused_kernels)

    def _velocity(self, x, t, y):
        return self.gen(x, t, y)


class EagerVAERunner:
    """The SD-VAE decoder of the 2-D baseline, as the PyTorch module (eager only: the speed
    comparison measures the baseline as people run it). ``decode`` takes the VAE's own
    latents (B, C, h, w) and returns images (B, 3, 8h, 8w)."""

    backend = "eager"

    def __init__(self, vae, buckets: Sequence[int] | None = None):
        self.vae = vae.eval()
        self.buckets = normalize_buckets(buckets)

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.dtype

    @property
    def device(self) -> torch.device:
        return self.vae.device

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if latents.ndim != 4 or latents.shape[1] != self.vae.latent_channels:
            raise ValueError(
                f"latents must be (B, {self.vae.latent_channels}, h, w), got {tuple(latents.shape)}"
            )
        return self.vae.decode(latents.to(self.device, self.dtype))

    def warmup(self, buckets: Sequence[int] | None = None, sides: Sequence[int] = ()) -> None:
        """Decode every bucket once at each latent side its generators sample."""
        if buckets is not None:
            self.buckets = normalize_buckets(buckets)
        for side in sides:
            for b in self.buckets:
                self.decode(torch.zeros(b, self.vae.latent_channels, side, side))
