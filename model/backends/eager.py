"""``eager``: the PyTorch modules as they are, any batch size. On CUDA the Triton kernels of
``model.kernels`` replace the soft quantizer and the adaLN modulate + LayerNorm."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..sit import SiTBackbone
from ..tokenizer import SoftVQTokenizer
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
