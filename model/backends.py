"""Execution backends: how a loaded model is run.

The service talks to models only through these runners, so the batching code never knows
which backend is underneath.

    runner = make_tokenizer_runner(tok, backend="compile")
    tokens, indices = runner.encode(images)   # (B, 3, S, S) -> (B, L, D), (B, G, L/G)
    images = runner.decode(tokens)            # (B, L, D) -> (B, 3, S, S)
    velocity = make_generator_runner(gen, backend="onnx")   # callable like gen(x, t, y)
    runner.warmup([1, 2, 4, 8, 16])           # builds / compiles every batch bucket

Backends:

- ``eager``: the PyTorch modules as they are. On CUDA the Triton kernels of
  ``model.kernels`` replace the soft quantizer and the adaLN modulate + LayerNorm.
- ``compile``: ``torch.compile`` with static shapes. Each batch is padded up to the
  smallest batch bucket that holds it (larger batches run in chunks of the largest bucket),
  so only one graph per bucket is ever built. On CUDA the mode is ``max-autotune``, which
  also captures each bucket's graph in a CUDA graph; on CPU inductor's C++ code fuses the
  elementwise work between the GEMMs.
- ``onnx``: encoder, decoder and the SiT velocity function exported with
  ``torch.onnx.export`` and run by ONNX Runtime (the CPU provider, or TensorRT / CUDA where
  onnxruntime-gpu is installed). Exports are cached on disk, keyed by model hash, bucket
  and dtype. On the CPU one export with a dynamic batch axis serves every batch size; on
  GPU providers each bucket gets its own static-shape export.
- ``auto``: times every available backend on the largest bucket and keeps the fastest;
  the decision is cached on disk per model, device and dtype. When measuring is turned off
  (``measure=False``) it uses ``AUTO_DEFAULTS``, the winners measured by the benchmark
  suite (see BENCHMARKS.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from .sit import SiTBackbone
from .tokenizer import SoftVQTokenizer

log = logging.getLogger(__name__)

BACKENDS = ("eager", "compile", "onnx", "auto")
DEFAULT_BUCKETS = (1, 2, 4, 8, 16)
# What `auto` picks without timing (measure=False). cpu: ONNX Runtime was the best or within
# noise of the best tokenizer backend in every CPU benchmark run (BENCHMARKS.md) and builds
# in seconds; it needs float32, so bfloat16 falls back to eager. cuda: not yet measured;
# compile (CUDA graphs, max-autotune) is the expected winner.
AUTO_DEFAULTS = {"cpu": "onnx", "cuda": "compile"}
ONNX_OPSET = 17


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


# --- batch buckets ----------------------------------------------------------------------------
def bucket_for(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= n (n <= max(buckets))."""
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"batch {n} is larger than the largest bucket {buckets[-1]}")


def _pad_rows(x: torch.Tensor, n: int, fill: torch.Tensor | None = None) -> torch.Tensor:
    """Append n rows to x: copies of ``fill`` (one row) or of x's last row."""
    if n == 0:
        return x
    row = x[-1:] if fill is None else fill.reshape(1, *x.shape[1:]).to(x)
    return torch.cat([x, row.expand(n, *x.shape[1:])])


def run_bucketed(
    fn: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]],
    inputs: Sequence[torch.Tensor],
    buckets: Sequence[int] | None,
    fills: Sequence[torch.Tensor | None] | None = None,
):
    """Run fn on inputs (all with batch B) padded to a bucket; outputs cut back to B.

    Batches larger than the largest bucket run in chunks of it. With ``buckets=None`` fn
    sees the batch as it is. Outputs are cloned so a CUDA graph's static output buffers are
    never handed out (the next replay would overwrite them).
    """
    B = inputs[0].shape[0]
    if buckets is None or B == 0:
        return fn(*inputs)
    fills = fills or [None] * len(inputs)
    top = buckets[-1]
    pieces = []
    for start in range(0, B, top):
        chunk = [x[start : start + top] for x in inputs]
        n = chunk[0].shape[0]
        pad = bucket_for(n, buckets) - n
        out = fn(*[_pad_rows(x, pad, f) for x, f in zip(chunk, fills)])
        outs = out if isinstance(out, tuple) else (out,)
        pieces.append(tuple(o[:n].clone() for o in outs))
    merged = tuple(torch.cat(parts) for parts in zip(*pieces))
    return merged if isinstance(out, tuple) else merged[0]


def _normalize_buckets(buckets: Sequence[int] | None) -> tuple[int, ...]:
    b = tuple(sorted({int(x) for x in (buckets or DEFAULT_BUCKETS)}))
    if not b or b[0] < 1:
        raise ValueError(f"batch buckets must be positive, got {buckets}")
    return b


# --- runners --------------------------------------------------------------------------------
class TokenizerRunner:
    """Validates, moves to the model's device and dtype, then calls the backend's graphs.

    Subclasses set ``backend`` and implement ``_encode(images)`` / ``_decode(tokens)`` on
    already-validated tensors of the model's device and dtype.
    """

    backend = "eager"

    def __init__(self, tok: SoftVQTokenizer, buckets: Sequence[int] | None = None):
        self.tok = tok.eval()
        self.buckets = _normalize_buckets(buckets)

    @property
    def dtype(self) -> torch.dtype:
        return self.tok.dtype

    @property
    def device(self) -> torch.device:
        return self.tok.device

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.tok.check_images(images)
        return self._encode(images.to(self.device, self.dtype))

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        self.tok.check_tokens(tokens)
        return self._decode(tokens.to(self.device, self.dtype))

    def warmup(self, buckets: Sequence[int] | None = None) -> None:
        """Run (and so build / compile) every bucket once; the given buckets become the
        runner's buckets."""
        if buckets is not None:
            self.buckets = _normalize_buckets(buckets)
        S, L, D = self.tok.image_size, self.tok.num_tokens, self.tok.token_dim
        for b in self.buckets:
            self.encode(torch.zeros(b, 3, S, S))
            self.decode(torch.zeros(b, L, D))

    def _encode(self, images):
        raise NotImplementedError

    def _decode(self, tokens):
        raise NotImplementedError


class EagerTokenizerRunner(TokenizerRunner):
    backend = "eager"

    def __init__(
        self,
        tok: SoftVQTokenizer,
        buckets: Sequence[int] | None = None,
        fused_kernels: bool | None = None,
    ):
        super().__init__(tok, buckets)
        if fused_kernels if fused_kernels is not None else self.device.type == "cuda":
            from .kernels import install_fused_kernels

            install_fused_kernels(self.tok)
        self.encode_graph, self.decode_graph = EncodeGraph(self.tok), DecodeGraph(self.tok)

    def _encode(self, images):
        return self.encode_graph(images)

    def _decode(self, tokens):
        return self.decode_graph(tokens)


class GeneratorRunner:
    """Callable like the generator itself (x, t, y) -> v; exposes what the samplers read."""

    backend = "eager"

    def __init__(self, gen: SiTBackbone, buckets: Sequence[int] | None = None):
        self.gen = gen.eval()
        self.buckets = _normalize_buckets(buckets)
        self.num_classes = gen.num_classes
        self.num_tokens = gen.num_tokens
        self.token_dim = getattr(gen, "token_dim", None)

    @property
    def dtype(self) -> torch.dtype:
        return self.gen.dtype

    @property
    def device(self) -> torch.device:
        return self.gen.device

    def input_shape(self) -> tuple[int, ...]:
        """One sample's x: (L, D) for 1-D SiT, (C, H, W) for the 2-D baseline."""
        cfg = self.gen.config
        if cfg.vae_1d:
            return (self.num_tokens, self.token_dim)
        return (cfg.in_channels, cfg.input_size, cfg.input_size)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x (B, L, D), t (B,), y (B,) long -> velocity (B, L, D) in the model's dtype.

        Labels are not checked here (that would sync the GPU every step): sample() and the
        API validate them once per request."""
        dev = self.device
        return self._velocity(x.to(dev, self.dtype), t.to(dev, self.dtype), y.to(dev, torch.long))

    def warmup(self, buckets: Sequence[int] | None = None) -> None:
        if buckets is not None:
            self.buckets = _normalize_buckets(buckets)
        for b in self.buckets:
            x = torch.zeros(b, *self.input_shape())
            self(x, torch.ones(b), torch.zeros(b, dtype=torch.long))

    def _velocity(self, x, t, y):
        raise NotImplementedError


class EagerGeneratorRunner(GeneratorRunner):
    backend = "eager"

    def __init__(
        self,
        gen: SiTBackbone,
        buckets: Sequence[int] | None = None,
        fused_kernels: bool | None = None,
    ):
        super().__init__(gen, buckets)
        if fused_kernels if fused_kernels is not None else self.device.type == "cuda":
            from .kernels import install_fused_kernels

            install_fused_kernels(self.gen)

    def _velocity(self, x, t, y):
        return self.gen(x, t, y)


# --- torch.compile ----------------------------------------------------------------------------
def compile_module(module: nn.Module, device: torch.device) -> Callable:
    """torch.compile with static shapes: one graph per batch bucket."""
    import torch._dynamo

    # One graph per bucket (and per module): allow more than dynamo's default of 8.
    limit = (
        "recompile_limit"
        if hasattr(torch._dynamo.config, "recompile_limit")
        else "cache_size_limit"
    )
    setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 64))
    if device.type == "cuda":
        # max-autotune: Triton GEMM autotuning plus CUDA graphs (one per static shape).
        return torch.compile(module, mode="max-autotune", dynamic=False, fullgraph=True)
    # CPU: inductor's C++/OpenMP codegen fuses the elementwise work around the GEMMs.
    # (Weight freezing measured no faster on the benchmark machine; BENCHMARKS.md.)
    return torch.compile(module, dynamic=False, fullgraph=True)


class CompiledTokenizerRunner(TokenizerRunner):
    backend = "compile"

    def __init__(self, tok: SoftVQTokenizer, buckets: Sequence[int] | None = None):
        super().__init__(tok, buckets)
        self.encode_fn = compile_module(EncodeGraph(self.tok), self.device)
        self.decode_fn = compile_module(DecodeGraph(self.tok), self.device)

    def _encode(self, images):
        return run_bucketed(self.encode_fn, [images], self.buckets)

    def _decode(self, tokens):
        return run_bucketed(self.decode_fn, [tokens], self.buckets)


class CompiledGeneratorRunner(GeneratorRunner):
    backend = "compile"

    def __init__(self, gen: SiTBackbone, buckets: Sequence[int] | None = None):
        super().__init__(gen, buckets)
        self.velocity_fn = compile_module(self.gen, self.device)

    def _velocity(self, x, t, y):
        null = torch.tensor(self.num_classes, device=y.device)
        return run_bucketed(self.velocity_fn, [x, t, y], self.buckets, fills=[None, None, null])


# --- ONNX Runtime ------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    root = os.environ.get("SOFTVQ_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "softvq"
    )
    return Path(root)


def model_hash(module: nn.Module) -> str:
    """sha256 of the config and every tensor of the state dict (names, shapes, dtypes, bytes)."""
    h = hashlib.sha256()
    cfg = getattr(module, "config", None)
    if cfg is not None and hasattr(cfg, "to_dict"):
        h.update(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode())
    h.update(type(module).__name__.encode())
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:20]


def onnx_providers(device: torch.device) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device.type == "cuda":
        gpu = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in available]
        if not gpu:
            raise ValueError("backend 'onnx' on cuda needs onnxruntime-gpu (CUDA provider missing)")
        return gpu + ["CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


_NP_TO_TORCH = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64}


class OnnxGraph:
    """One exported graph and its ONNX Runtime session.

    ``export(path, example_inputs)`` is called only when ``path`` is not already cached.
    Inputs are torch tensors; outputs come back as torch tensors on ``device``.
    """

    def __init__(
        self,
        module: nn.Module,
        example: Sequence[torch.Tensor],
        input_names: list[str],
        output_names: list[str],
        path: Path,
        dynamic_batch: bool,
        device: torch.device,
    ):
        import onnxruntime as ort

        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            axes = {n: {0: "batch"} for n in input_names + output_names} if dynamic_batch else None
            log.info("exporting %s to ONNX (%s)", type(module).__name__, path.name)
            # The TorchScript exporter: the dynamo one needs onnxscript and a torch.export-able
            # graph; this one handles SDPA, einsum and argmax at opset 17 as they are.
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                torch.onnx.export(
                    module,
                    tuple(example),
                    str(tmp),
                    input_names=input_names,
                    output_names=output_names,
                    dynamic_axes=axes,
                    opset_version=ONNX_OPSET,
                    dynamo=False,
                )
            os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = torch.get_num_threads()
        self.session = ort.InferenceSession(str(path), opts, providers=onnx_providers(device))
        self.input_names = input_names
        self.device = device

    def __call__(self, *inputs: torch.Tensor):
        feed = {n: x.detach().cpu().numpy() for n, x in zip(self.input_names, inputs)}
        outs = [torch.from_numpy(o).to(self.device) for o in self.session.run(None, feed)]
        return tuple(outs) if len(outs) > 1 else outs[0]


def _onnx_dtype_check(dtype: torch.dtype, device: torch.device) -> str:
    if dtype == torch.float32 or (dtype == torch.float16 and device.type == "cuda"):
        return str(dtype).removeprefix("torch.")
    raise ValueError(
        f"backend 'onnx' runs float32 (and float16 on cuda); the model is {dtype}. "
        "Use backend 'eager' or 'compile' for bfloat16."
    )


class OnnxRunnerMixin:
    """Exports lazily per bucket: one dynamic-batch graph on the CPU, one static graph per
    bucket on GPU providers (TensorRT builds engines for fixed shapes)."""

    def _onnx_init(self, module: nn.Module, cache_dir: str | Path | None):
        self.dtype_name = _onnx_dtype_check(self.dtype, self.device)
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.hash = model_hash(module)
        self.static = self.device.type == "cuda"
        self.graphs: dict[tuple[str, int | str], OnnxGraph] = {}

    def _graph_path(self, kind: str, bucket: int | str) -> Path:
        torch_ver = torch.__version__.split("+")[0]
        name = f"{kind}-{self.hash}-b{bucket}-{self.dtype_name}-opset{ONNX_OPSET}-torch{torch_ver}.onnx"
        return self.cache_dir / "onnx" / name

    def _graph(
        self, kind: str, module: nn.Module, example: list[torch.Tensor], names, outputs, batch: int
    ):
        key = (kind, batch if self.static else "dyn")
        if key not in self.graphs:
            example = [x[:1].expand(batch, *x.shape[1:]).contiguous() for x in example]
            self.graphs[key] = OnnxGraph(
                module,
                example,
                names,
                outputs,
                self._graph_path(kind, key[1]),
                not self.static,
                self.device,
            )
        return self.graphs[key]


class OnnxTokenizerRunner(OnnxRunnerMixin, TokenizerRunner):
    backend = "onnx"

    def __init__(self, tok: SoftVQTokenizer, buckets: Sequence[int] | None = None, cache_dir=None):
        TokenizerRunner.__init__(self, tok, buckets)
        self._onnx_init(tok, cache_dir)
        self.encode_graph, self.decode_graph = EncodeGraph(self.tok), DecodeGraph(self.tok)

    def _run(self, kind, module, x, names, outputs):
        def call(xb):
            return self._graph(kind, module, [xb], names, outputs, xb.shape[0])(xb)

        return run_bucketed(call, [x], self.buckets if self.static else None)

    def _encode(self, images):
        tokens, indices = self._run(
            "encode", self.encode_graph, images, ["images"], ["tokens", "indices"]
        )
        return tokens, indices

    def _decode(self, tokens):
        return self._run("decode", self.decode_graph, tokens, ["tokens"], ["images"])


class OnnxGeneratorRunner(OnnxRunnerMixin, GeneratorRunner):
    backend = "onnx"

    def __init__(self, gen: SiTBackbone, buckets: Sequence[int] | None = None, cache_dir=None):
        GeneratorRunner.__init__(self, gen, buckets)
        self._onnx_init(gen, cache_dir)

    def _velocity(self, x, t, y):
        def call(xb, tb, yb):
            graph = self._graph(
                "velocity", self.gen, [xb, tb, yb], ["x", "t", "y"], ["v"], xb.shape[0]
            )
            return graph(xb, tb, yb)

        null = torch.tensor(self.num_classes, device=y.device)
        buckets = self.buckets if self.static else None
        return run_bucketed(call, [x, t, y], buckets, fills=[None, None, null])


# --- auto: measure, keep the fastest ------------------------------------------------------------
def available_backends(dtype: torch.dtype, device: torch.device) -> list[str]:
    names = ["eager", "compile"]
    try:
        import onnxruntime  # noqa: F401

        _onnx_dtype_check(dtype, device)
        onnx_providers(device)
        names.append("onnx")
    except (ImportError, ValueError):
        pass
    return names


def _time_call(fn: Callable[[], object], device: torch.device, reps: int = 3) -> float:
    """Median seconds of fn() after one untimed call (which builds / compiles)."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _auto(
    kind: str,
    module: nn.Module,
    build: Callable[[str], object],
    bench: Callable[[object], Callable[[], object]],
    buckets,
    measure: bool,
    cache_dir,
):
    """Build the fastest backend for module. ``build(name)`` makes a runner, ``bench(runner)``
    returns a zero-argument call on the largest bucket."""
    p = next(iter(module.parameters()))
    device, dtype = p.device, p.dtype
    candidates = available_backends(dtype, device)
    if not measure:
        name = AUTO_DEFAULTS.get(device.type, "eager")
        runner = build(name if name in candidates else "eager")
        runner.auto_timings = None
        return runner
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    dev_name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu{torch.get_num_threads()}"
    )
    key = f"{kind}-{model_hash(module)}-{dev_name}-{dtype}-b{max(_normalize_buckets(buckets))}"
    decisions_path = cache / "auto_backend.json"
    try:
        decisions = json.loads(decisions_path.read_text())
    except (OSError, ValueError):
        decisions = {}
    if key in decisions and decisions[key]["backend"] in candidates:
        runner = build(decisions[key]["backend"])
        runner.auto_timings = decisions[key]["seconds"]
        return runner
    timings, runners = {}, {}
    for name in candidates:
        try:
            runners[name] = build(name)
            timings[name] = _time_call(bench(runners[name]), device)
        except Exception as e:  # a backend that cannot run this model is simply not chosen
            log.warning("auto: backend %s failed on %s: %s", name, kind, e)
    best = min(timings, key=timings.get)
    log.info("auto: %s -> %s (seconds per call: %s)", kind, best, timings)
    decisions[key] = {"backend": best, "seconds": timings}
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = decisions_path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(decisions, indent=1))
        os.replace(tmp, decisions_path)
    except OSError as e:
        log.warning("auto: could not cache the decision: %s", e)
    runner = runners[best]
    runner.auto_timings = timings
    return runner


# --- public factories ---------------------------------------------------------------------------
def make_tokenizer_runner(tok: SoftVQTokenizer, backend: str = "eager", **options):
    """options: buckets (batch sizes), cache_dir (ONNX exports, auto decisions),
    fused_kernels (eager; default on CUDA), measure (auto; default True)."""
    buckets = options.get("buckets")
    if backend == "eager":
        return EagerTokenizerRunner(tok, buckets, options.get("fused_kernels"))
    if backend == "compile":
        return CompiledTokenizerRunner(tok, buckets)
    if backend == "onnx":
        return OnnxTokenizerRunner(tok, buckets, options.get("cache_dir"))
    if backend == "auto":
        top = max(_normalize_buckets(buckets))

        def bench(r):
            tokens = torch.zeros(top, tok.num_tokens, tok.token_dim)
            return lambda: r.decode(tokens)

        def build(name):
            return make_tokenizer_runner(
                tok, name, **{k: v for k, v in options.items() if k != "measure"}
            )

        return _auto(
            "tokenizer",
            tok,
            build,
            bench,
            buckets,
            options.get("measure", True),
            options.get("cache_dir"),
        )
    raise ValueError(f"unknown backend {backend!r}; available: {BACKENDS}")


def make_generator_runner(gen: SiTBackbone, backend: str = "eager", **options):
    """Same options as make_tokenizer_runner."""
    buckets = options.get("buckets")
    if backend == "eager":
        return EagerGeneratorRunner(gen, buckets, options.get("fused_kernels"))
    if backend == "compile":
        return CompiledGeneratorRunner(gen, buckets)
    if backend == "onnx":
        return OnnxGeneratorRunner(gen, buckets, options.get("cache_dir"))
    if backend == "auto":
        top = max(_normalize_buckets(buckets))

        def bench(r):
            x = torch.zeros(top, *r.input_shape())
            t, y = torch.full((top,), 0.5), torch.zeros(top, dtype=torch.long)
            return lambda: r(x, t, y)

        def build(name):
            return make_generator_runner(
                gen, name, **{k: v for k, v in options.items() if k != "measure"}
            )

        return _auto(
            "generator",
            gen,
            build,
            bench,
            buckets,
            options.get("measure", True),
            options.get("cache_dir"),
        )
    raise ValueError(f"unknown backend {backend!r}; available: {BACKENDS}")
