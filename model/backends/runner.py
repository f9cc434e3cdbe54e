"""What every backend shares: the pure graphs it runs and the runner interface the service
calls.

    tokens, indices = runner.encode(images)   # (B, 3, S, S) -> (B, L, D), (B, G, L/G)
    images = runner.decode(tokens)            # (B, L, D) -> (B, 3, S, S)
    velocity = runner(x, t, y)                # generator runners: like gen(x, t, y)
    runner.warmup([1, 2, 4, 8, 16])           # builds / compiles every batch bucket

A backend subclass implements ``_encode`` / ``_decode`` (or ``_velocity``): one call on
validated tensors of the model's device and dtype. It says whether it needs fixed shapes: if
so the runner pads each batch to a bucket (``model.backends.bucketing``) before that call; if
not it never pads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..sit import SiTBackbone
from ..tokenizer import SoftVQTokenizer
from .bucketing import normalize_buckets, run_bucketed


# --- the pure math each backend runs (no validation, no data-dependent Python) --------------
class EncodeGraph(nn.Module):
    """images (B, 3, S, S) -> tokens (B, L, D), indices (B, G, L/G)."""

    def __init__(self, tok: SoftVQTokenizer):
        super().__init__()
        self.tok = tok

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tok.quantize(self.tok.encode_pre_quant(images))


class DecodeGraph(nn.Module):
    """tokens (B, L, D) -> images (B, 3, S, S)."""

    def __init__(self, tok: SoftVQTokenizer):
        super().__init__()
        self.tok = tok

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tok.decoder(self.tok.post_quant_conv(tokens))


class Runner:
    """Buckets and the padding rule, for tokenizer and generator runners alike."""

    backend = "eager"
    # True: every call runs at a bucket's batch size (padded / chunked by the runner).
    fixed_shapes = False

    def __init__(self, buckets: Sequence[int] | None):
        self.buckets = normalize_buckets(buckets)

    def _run(
        self,
        fn: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]],
        inputs: Sequence[torch.Tensor],
        fills: Sequence[torch.Tensor | None] | None = None,
    ):
        """fn on inputs: padded to a bucket only when this backend needs fixed shapes."""
        if not self.fixed_shapes:
            return fn(*inputs)
        return run_bucketed(fn, inputs, self.buckets, fills)


class TokenizerRunner(Runner):
    """Validates, moves to the model's device and dtype, then calls the backend's graphs."""

    def __init__(self, tok: SoftVQTokenizer, buckets: Sequence[int] | None = None):
        super().__init__(buckets)
        self.tok = tok.eval()

    @property
    def dtype(self) -> torch.dtype:
        return self.tok.dtype

    @property
    def device(self) -> torch.device:
        return self.tok.device

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.tok.check_images(images)
        return self._run(self._encode, [images.to(self.device, self.dtype)])

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        self.tok.check_tokens(tokens)
        return self._run(self._decode, [tokens.to(self.device, self.dtype)])

    def warmup(self, buckets: Sequence[int] | None = None) -> None:
        """Run (and so build / compile) every bucket once; the given buckets become the
        runner's buckets."""
        if buckets is not None:
            self.buckets = normalize_buckets(buckets)
        S, L, D = self.tok.image_size, self.tok.num_tokens, self.tok.token_dim
        for b in self.buckets:
            self.encode(torch.zeros(b, 3, S, S))
            self.decode(torch.zeros(b, L, D))

    def _encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _decode(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class GeneratorRunner(Runner):
    """Callable like the generator itself (x, t, y) -> v; exposes what the samplers read."""

    def __init__(self, gen: SiTBackbone, buckets: Sequence[int] | None = None):
        super().__init__(buckets)
        self.gen = gen.eval()
        self.num_classes = gen.num_classes
        self.num_tokens = gen.num_tokens
        self.token_dim = getattr(gen, "token_dim", None)
        # Whitened sampling space -> normalised latents (model.class_prior); None: identity.
        self.prior = getattr(gen, "prior", None)

    @property
    def dtype(self) -> torch.dtype:
        return self.gen.dtype

    @property
    def device(self) -> torch.device:
        return self.gen.device

    def input_shape(self) -> tuple[int, ...]:
        """One sample's x: (L, D) for 1-D SiT, (C, H, W) for the 2-D baseline."""
        return tuple(self.gen.latent_shape)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x (B, L, D), t (B,), y (B,) long -> velocity (B, L, D) in the model's dtype.

        Labels are not checked here (that would sync the GPU every step): sample() and the
        API validate them once per request. Padding rows (fixed-shape backends) take the
        null class."""
        dev = self.device
        x, t, y = x.to(dev, self.dtype), t.to(dev, self.dtype), y.to(dev, torch.long)
        null = torch.tensor(self.num_classes, device=dev)
        return self._run(self._velocity, [x, t, y], fills=[None, None, null])

    def warmup(self, buckets: Sequence[int] | None = None) -> None:
        if buckets is not None:
            self.buckets = normalize_buckets(buckets)
        for b in self.buckets:
            x = torch.zeros(b, *self.input_shape())
            self(x, torch.ones(b), torch.zeros(b, dtype=torch.long))

    def _velocity(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError
