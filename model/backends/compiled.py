"""``compile``: ``torch.compile``; on CUDA one static graph per batch bucket, on the CPU one
graph for a batch of one and one for every other batch size.

On CUDA the mode is ``max-autotune``, which also captures each bucket's graph in a CUDA graph:
shapes must be static, so each batch is padded up to the smallest bucket that holds it (larger
batches run in chunks of the largest) and only one graph per bucket is ever built.

On the CPU inductor's C++ code fuses the elementwise work between the GEMMs, and nothing needs
static shapes, so the batch axis is dynamic and batches are not padded (as ONNX on the CPU):
dynamo specialises a batch of one, so two graphs per model function instead of one per bucket.
Measured on the demo models (BENCHMARKS.md, "compile on the CPU with a dynamic batch axis"):
proving compile at the five default buckets took 2.3x less time, at the same seconds per call
at bucket sizes and fewer off them (no padding rows).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch
from torch import nn

from ..sit import SiTBackbone
from ..tokenizer import SoftVQTokenizer
from .runner import DecodeGraph, EncodeGraph, GeneratorRunner, TokenizerRunner

# Dynamo's default of 8 compiled variants per code object (torch._dynamo.config).
_DYNAMO_DEFAULT_LIMIT = 8


class CompiledGraph:
    """A compiled module (static buckets, or a dynamic batch axis), whose recompile limit
    always admits its graphs.

    Why not set ``torch._dynamo.config.recompile_limit`` once: its user overrides are
    thread-local (a ContextVar), so a limit set in the thread that builds the runner does not
    hold in the model thread where warm-up and batches run. And dynamo's cache and its limit
    are per *code object*: every instance of one class (two tokenizers' ``DecodeGraph.forward``,
    two generators' ``SiT.forward``) shares one, so 2 models x 5 buckets overran the default 8
    and, with ``fullgraph=True``, failed hard in warm-up (issue #12).

    So the limit is applied at call time, in whichever thread calls (``config.patch`` is
    thread-local too), and sized from what the process actually compiles: every distinct batch
    size any compiled graph has been called with (bounded by models x buckets for static
    graphs, which are only called at bucket sizes; a generous count for a dynamic batch axis,
    which compiles at most two per model), twice over for the grad modes a graph may be
    guarded on, plus dynamo's own default as slack. No model can hit the limit because another
    was compiled first, whatever the number of models or the bucket list.
    """

    _lock = threading.Lock()
    _variants = 0  # distinct (graph, batch size) pairs called so far, process-wide

    def __init__(self, module: nn.Module, device: torch.device, dynamic_batch: bool | None):
        self.batch_sizes: set[int] = set()
        # Static buckets where CUDA graphs need them, a dynamic batch axis everywhere else.
        self.dynamic_batch = device.type != "cuda" if dynamic_batch is None else dynamic_batch
        # Static on CUDA: max-autotune, Triton GEMM autotuning plus CUDA graphs (one per
        # shape). Dynamic: dynamic=None with the batch axis marked at each call (below), so
        # only that axis is symbolic and every other size stays baked into the kernels. On
        # the CPU inductor's C++/OpenMP codegen fuses the elementwise work around the GEMMs
        # (weight freezing measured no faster on the benchmark machine; BENCHMARKS.md).
        autotune = device.type == "cuda" and not self.dynamic_batch
        self.fn = torch.compile(
            module,
            mode="max-autotune" if autotune else None,
            dynamic=None if self.dynamic_batch else False,
            fullgraph=True,
        )

    def __call__(self, *inputs: torch.Tensor):
        batch = int(inputs[0].shape[0])
        if batch not in self.batch_sizes:
            with CompiledGraph._lock:
                self.batch_sizes.add(batch)
                CompiledGraph._variants += 1
        import torch._dynamo  # here, not at import: ~150 MiB that eager-only processes never need

        if self.dynamic_batch and batch > 1:
            for x in inputs:
                torch._dynamo.maybe_mark_dynamic(x, 0)
        limit = _DYNAMO_DEFAULT_LIMIT + 2 * CompiledGraph._variants
        with torch._dynamo.config.patch(
            recompile_limit=limit, accumulated_recompile_limit=max(256, 2 * limit)
        ):
            return self.fn(*inputs)


class CompiledTokenizerRunner(TokenizerRunner):
    """dynamic_batch: None = the device's default (static on CUDA, dynamic elsewhere)."""

    backend = "compile"

    def __init__(
        self,
        tok: SoftVQTokenizer,
        buckets: Sequence[int] | None = None,
        dynamic_batch: bool | None = None,
    ):
        super().__init__(tok, buckets)
        self._encode = CompiledGraph(EncodeGraph(self.tok), self.device, dynamic_batch)
        self._decode = CompiledGraph(DecodeGraph(self.tok), self.device, dynamic_batch)
        self.fixed_shapes = not self._decode.dynamic_batch  # static graphs: pad to a bucket


class CompiledGeneratorRunner(GeneratorRunner):
    """dynamic_batch: as CompiledTokenizerRunner's."""

    backend = "compile"

    def __init__(
        self,
        gen: SiTBackbone,
        buckets: Sequence[int] | None = None,
        dynamic_batch: bool | None = None,
    ):
        super().__init__(gen, buckets)
        self._velocity = CompiledGraph(self.gen, self.device, dynamic_batch)
        self.fixed_shapes = not self._velocity.dynamic_batch
