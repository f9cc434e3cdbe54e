"""``compile``: ``torch.compile`` with static shapes, one graph per batch bucket.

Each batch is padded up to the smallest bucket that holds it (larger batches run in chunks of
the largest), so only one graph per bucket is ever built. On CUDA the mode is
``max-autotune``, which also captures each bucket's graph in a CUDA graph; on CPU inductor's
C++ code fuses the elementwise work between the GEMMs.
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
    """A module compiled with static shapes, whose recompile limit always admits its buckets.

    Why not set ``torch._dynamo.config.recompile_limit`` once: its user overrides are
    thread-local (a ContextVar), so a limit set in the thread that builds the runner does not
    hold in the model thread where warm-up and batches run. And dynamo's cache and its limit
    are per *code object*: every instance of one class (two tokenizers' ``DecodeGraph.forward``,
    two generators' ``SiT.forward``) shares one, so 2 models x 5 buckets overran the default 8
    and, with ``fullgraph=True``, failed hard in warm-up (issue #12).

    So the limit is applied at call time, in whichever thread calls (``config.patch`` is
    thread-local too), and sized from what the process actually compiles: every distinct batch
    size any compiled graph has been called with (the runner only calls bucket sizes, so this
    is bounded by models x buckets), twice over for the grad modes a graph may be guarded on,
    plus dynamo's own default as slack. No model can hit the limit because another was
    compiled first, whatever the number of models or the bucket list.
    """

    _lock = threading.Lock()
    _variants = 0  # distinct (graph, batch size) pairs called so far, process-wide

    def __init__(self, module: nn.Module, device: torch.device):
        self.batch_sizes: set[int] = set()
        if device.type == "cuda":
            # max-autotune: Triton GEMM autotuning plus CUDA graphs (one per static shape).
            self.fn = torch.compile(module, mode="max-autotune", dynamic=False, fullgraph=True)
        else:
            # CPU: inductor's C++/OpenMP codegen fuses the elementwise work around the GEMMs.
            # (Weight freezing measured no faster on the benchmark machine; BENCHMARKS.md.)
            self.fn = torch.compile(module, dynamic=False, fullgraph=True)

    def __call__(self, *inputs: torch.Tensor):
        batch = int(inputs[0].shape[0])
        if batch not in self.batch_sizes:
            with CompiledGraph._lock:
                self.batch_sizes.add(batch)
                CompiledGraph._variants += 1
        import torch._dynamo  # here, not at import: ~150 MiB that eager-only processes never need

        limit = _DYNAMO_DEFAULT_LIMIT + 2 * CompiledGraph._variants
        with torch._dynamo.config.patch(
            recompile_limit=limit, accumulated_recompile_limit=max(256, 2 * limit)
        ):
            return self.fn(*inputs)


class CompiledTokenizerRunner(TokenizerRunner):
    backend = "compile"
    fixed_shapes = True

    def __init__(self, tok: SoftVQTokenizer, buckets: Sequence[int] | None = None):
        super().__init__(tok, buckets)
        self._encode = CompiledGraph(EncodeGraph(self.tok), self.device)
        self._decode = CompiledGraph(DecodeGraph(self.tok), self.device)


class CompiledGeneratorRunner(GeneratorRunner):
    backend = "compile"
    fixed_shapes = True

    def __init__(self, gen: SiTBackbone, buckets: Sequence[int] | None = None):
        super().__init__(gen, buckets)
        self._velocity = CompiledGraph(self.gen, self.device)
