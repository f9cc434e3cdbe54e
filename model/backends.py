"""Execution backends: how a loaded model is run (eager PyTorch for now).

The service talks to models only through these runners, so compiled and ONNX backends can
replace eager without touching the batching code.

    runner = make_tokenizer_runner(tok, backend="eager")
    tokens, indices = runner.encode(images)   # (B, 3, S, S) -> (B, L, D), (B, G, L/G)
    images = runner.decode(tokens)            # (B, L, D) -> (B, 3, S, S)
    velocity = make_generator_runner(gen, backend="eager")   # callable like gen(x, t, y)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .sit import SiTBackbone
from .tokenizer import SoftVQTokenizer

BACKENDS = ("eager",)


class EagerTokenizerRunner:
    backend = "eager"

    def __init__(self, tok: SoftVQTokenizer):
        self.tok = tok

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tok.encode(images.to(self.tok.device), return_indices=True)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tok.decode(tokens.to(self.tok.device))

    def warmup(self, buckets: Sequence[int]) -> None:
        S, L, D = self.tok.image_size, self.tok.num_tokens, self.tok.token_dim
        for b in buckets:
            self.decode(self.encode(torch.zeros(b, 3, S, S))[0])


class EagerGeneratorRunner:
    """Callable like the generator itself; exposes what the samplers read."""

    backend = "eager"

    def __init__(self, gen: SiTBackbone):
        self.gen = gen
        self.num_classes = gen.num_classes
        self.num_tokens = gen.num_tokens
        self.token_dim = getattr(gen, "token_dim", None)

    @property
    def dtype(self) -> torch.dtype:
        return self.gen.dtype

    @property
    def device(self) -> torch.device:
        return self.gen.device

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.gen(x, t, y)

    def warmup(self, buckets: Sequence[int]) -> None:
        for b in buckets:
            x = torch.zeros(b, self.num_tokens, self.token_dim, dtype=self.dtype, device=self.device)
            t = torch.ones(b, dtype=self.dtype, device=self.device)
            self(x, t, torch.zeros(b, dtype=torch.long, device=self.device))


def make_tokenizer_runner(tok: SoftVQTokenizer, backend: str = "eager", **options):
    if backend != "eager":
        raise ValueError(f"unknown backend {backend!r}; available: {BACKENDS}")
    return EagerTokenizerRunner(tok)


def make_generator_runner(gen: SiTBackbone, backend: str = "eager", **options):
    if backend != "eager":
        raise ValueError(f"unknown backend {backend!r}; available: {BACKENDS}")
    return EagerGeneratorRunner(gen)
