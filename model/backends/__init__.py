"""Execution backends: how a loaded model is run.

The service talks to models only through these runners, so the batching code never knows
which backend is underneath.

    runner = make_tokenizer_runner(tok, "compile", buckets=[1, 2, 4, 8, 16])
    tokens, indices = runner.encode(images)   # (B, 3, S, S) -> (B, L, D), (B, G, L/G)
    images = runner.decode(tokens)            # (B, L, D) -> (B, 3, S, S)
    velocity = make_generator_runner(gen, "onnx")   # callable like gen(x, t, y)
    runner.warmup()                           # builds / compiles every batch bucket

One module per concern:

- ``bucketing``: batch buckets and the padding rule (only fixed-shape backends pad);
- ``runner``: the graphs every backend runs and the runner base classes;
- ``eager`` / ``compiled`` / ``onnxrt``: the backends (``RUNNERS`` below is their table);
- ``auto``: proving a backend against eager, timing, the on-disk decision cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..sit import SiTBackbone
from ..tokenizer import SoftVQTokenizer
from .auto import AUTO_DEFAULTS, Choice, available_backends, choose_backend
from .bucketing import DEFAULT_BUCKETS, bucket_for, normalize_buckets, run_bucketed
from .compiled import CompiledGeneratorRunner, CompiledTokenizerRunner
from .eager import EagerGeneratorRunner, EagerTokenizerRunner
from .onnxrt import ONNX_OPSET, OnnxGeneratorRunner, OnnxTokenizerRunner, model_hash
from .runner import GeneratorRunner, TokenizerRunner

# backend -> (tokenizer runner, generator runner). "auto" is not a runner: it chooses one.
RUNNERS: dict[str, tuple[type[TokenizerRunner], type[GeneratorRunner]]] = {
    "eager": (EagerTokenizerRunner, EagerGeneratorRunner),
    "compile": (CompiledTokenizerRunner, CompiledGeneratorRunner),
    "onnx": (OnnxTokenizerRunner, OnnxGeneratorRunner),
}
BACKENDS = (*RUNNERS, "auto")
KINDS = {"tokenizer": 0, "generator": 1}  # index into a RUNNERS entry

__all__ = [
    "AUTO_DEFAULTS",
    "BACKENDS",
    "DEFAULT_BUCKETS",
    "ONNX_OPSET",
    "RUNNERS",
    "Choice",
    "GeneratorRunner",
    "TokenizerRunner",
    "available_backends",
    "bucket_for",
    "build_runner",
    "choose_backend",
    "make_generator_runner",
    "make_tokenizer_runner",
    "model_hash",
    "normalize_buckets",
    "run_bucketed",
]


def build_runner(
    kind: str,
    module: SoftVQTokenizer | SiTBackbone,
    backend: str,
    *,
    buckets=None,
    cache_dir: str | Path | None = None,
    fused_kernels: bool | None = None,
) -> Any:
    """One concrete runner (not warmed up). kind: tokenizer | generator."""
    if backend not in RUNNERS:
        raise ValueError(f"unknown backend {backend!r}; available: {BACKENDS}")
    cls = RUNNERS[backend][KINDS[kind]]
    if backend == "eager":
        return cls(module, buckets, fused_kernels=fused_kernels)
    if backend == "onnx":
        return cls(module, buckets, cache_dir=cache_dir)
    return cls(module, buckets)


def _make(
    kind: str,
    module,
    backend: str,
    *,
    buckets=None,
    cache_dir: str | Path | None = None,
    fused_kernels: bool | None = None,
    measure: bool = True,
):
    if backend != "auto":
        return build_runner(
            kind, module, backend, buckets=buckets, cache_dir=cache_dir, fused_kernels=fused_kernels
        )
    eager = build_runner(kind, module, "eager", buckets=buckets, fused_kernels=fused_kernels)
    eager.warmup()
    choice = choose_backend(
        kind,
        type(module).__name__,
        eager,
        "auto",
        lambda b: build_runner(kind, module, b, buckets=buckets, cache_dir=cache_dir),
        cache_dir=cache_dir,
        measure=measure,
    )
    choice.runner.auto_timings = choice.timings or None
    return choice.runner


def make_tokenizer_runner(tok: SoftVQTokenizer, backend: str = "eager", **options):
    """A tokenizer runner. options: buckets (batch sizes), cache_dir (ONNX exports, backend
    decisions), fused_kernels (eager; default on CUDA), measure (auto; default True). ``auto``
    proves and times the backends here, synchronously (the service does it in the background:
    service/registry.py)."""
    return _make("tokenizer", tok, backend, **options)


def make_generator_runner(gen: SiTBackbone, backend: str = "eager", **options):
    """A generator runner; same options as make_tokenizer_runner."""
    return _make("generator", gen, backend, **options)
