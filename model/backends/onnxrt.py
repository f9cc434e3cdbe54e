"""``onnx``: encoder, decoder and the SiT velocity function exported with
``torch.onnx.export`` and run by ONNX Runtime (the CPU provider, or TensorRT / CUDA where
onnxruntime-gpu is installed).

Exports are cached on disk, keyed by model hash, bucket and dtype. On the CPU one export with
a dynamic batch axis serves every batch size (no padding); on GPU providers each bucket gets
its own static-shape export (TensorRT builds engines for fixed shapes), so the runner pads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..sit import SiTBackbone
from ..tokenizer import SoftVQTokenizer
from .runner import DecodeGraph, EncodeGraph, GeneratorRunner, TokenizerRunner


def tmp_suffix() -> str:
    """A temporary file's suffix no other writer of a shared cache directory uses: the pid
    alone is not enough when containers share the directory (a volume), since each
    container's service runs as pid 1."""
    return f".tmp{os.getpid()}-{os.urandom(4).hex()}"


log = logging.getLogger(__name__)

ONNX_OPSET = 17


def default_cache_dir() -> Path:
    """Where exports and backend decisions live: SOFTVQ_CACHE_DIR or ~/.cache/softvq."""
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


def onnx_dtype_check(dtype: torch.dtype, device: torch.device) -> str:
    """The dtype's name when ONNX Runtime can run it here; ValueError otherwise."""
    if dtype == torch.float32 or (dtype == torch.float16 and device.type == "cuda"):
        return str(dtype).removeprefix("torch.")
    raise ValueError(
        f"backend 'onnx' runs float32 (and float16 on cuda); the model is {dtype}. "
        "Use backend 'eager' or 'compile' for bfloat16."
    )


def onnx_usable(dtype: torch.dtype, device: torch.device) -> bool:
    """onnxruntime installed, with a provider for the device, and the dtype supported."""
    try:
        import onnxruntime  # noqa: F401

        onnx_dtype_check(dtype, device)
        onnx_providers(device)
    except (ImportError, ValueError):
        return False
    return True


class OnnxGraph:
    """One exported graph and its ONNX Runtime session.

    The module is exported only when ``path`` is not already cached. Inputs are torch
    tensors; outputs come back as torch tensors on ``device``.
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
            tmp = path.with_suffix(tmp_suffix())
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


class OnnxRunnerMixin:
    """Exports lazily: one dynamic-batch graph on the CPU, one static graph per bucket on GPU
    providers."""

    def _onnx_init(self, module: nn.Module, cache_dir: str | Path | None) -> None:
        self.dtype_name = onnx_dtype_check(self.dtype, self.device)
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.hash = model_hash(module)
        self.fixed_shapes = self.device.type == "cuda"
        self.graphs: dict[tuple[str, int | str], OnnxGraph] = {}

    def _graph_path(self, kind: str, bucket: int | str) -> Path:
        torch_ver = torch.__version__.split("+")[0]
        name = f"{kind}-{self.hash}-b{bucket}-{self.dtype_name}-opset{ONNX_OPSET}-torch{torch_ver}.onnx"
        return self.cache_dir / "onnx" / name

    def _graph(self, kind: str, module: nn.Module, inputs, names, outputs) -> OnnxGraph:
        batch = inputs[0].shape[0]
        key = (kind, batch if self.fixed_shapes else "dyn")
        if key not in self.graphs:
            example = [x[:1].expand(batch, *x.shape[1:]).contiguous() for x in inputs]
            self.graphs[key] = OnnxGraph(
                module,
                example,
                names,
                outputs,
                self._graph_path(kind, key[1]),
                not self.fixed_shapes,
                self.device,
            )
        return self.graphs[key]


class OnnxTokenizerRunner(OnnxRunnerMixin, TokenizerRunner):
    backend = "onnx"

    def __init__(
        self,
        tok: SoftVQTokenizer,
        buckets: Sequence[int] | None = None,
        *,
        cache_dir: str | Path | None = None,
    ):
        TokenizerRunner.__init__(self, tok, buckets)
        self._onnx_init(tok, cache_dir)
        self.encode_graph, self.decode_graph = EncodeGraph(self.tok), DecodeGraph(self.tok)

    def _encode(self, images):
        names = (["images"], ["tokens", "indices"])
        return self._graph("encode", self.encode_graph, [images], *names)(images)

    def _decode(self, tokens):
        return self._graph("decode", self.decode_graph, [tokens], ["tokens"], ["images"])(tokens)


class OnnxGeneratorRunner(OnnxRunnerMixin, GeneratorRunner):
    backend = "onnx"

    def __init__(
        self,
        gen: SiTBackbone,
        buckets: Sequence[int] | None = None,
        *,
        cache_dir: str | Path | None = None,
    ):
        GeneratorRunner.__init__(self, gen, buckets)
        self._onnx_init(gen, cache_dir)

    def _velocity(self, x, t, y):
        graph = self._graph("velocity", self.gen, [x, t, y], ["x", "t", "y"], ["v"])
        return graph(x, t, y)
