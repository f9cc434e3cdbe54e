"""Batch buckets: the fixed batch sizes that shape-specialised backends are built for.

A backend that needs fixed shapes (``compile`` on CUDA, whose CUDA graphs are static; ONNX
Runtime on GPU providers, whose TensorRT engines are) runs every batch padded up to the
smallest bucket that holds it, and batches above the largest bucket in chunks of it. Only the
runner pads (``TokenizerRunner.fixed_shapes``): a backend with a dynamic batch axis (eager,
``compile`` and ONNX on the CPU) sees the batch as it is and pays for no zero rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

DEFAULT_BUCKETS = (1, 2, 4, 8, 16)


def normalize_buckets(buckets: Sequence[int] | None) -> tuple[int, ...]:
    """Sorted, unique, positive; ``None`` -> DEFAULT_BUCKETS."""
    b = tuple(sorted({int(x) for x in (buckets or DEFAULT_BUCKETS)}))
    if not b or b[0] < 1:
        raise ValueError(f"batch buckets must be positive, got {buckets}")
    return b


def bucket_for(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= n. ValueError when n exceeds the largest bucket: such a batch
    runs in chunks of the largest (run_bucketed), never as one padded call."""
    for b in sorted(buckets):
        if b >= n:
            return b
    raise ValueError(f"batch {n} is larger than the largest bucket {max(buckets)}")


def pad_rows(x: torch.Tensor, n: int, fill: torch.Tensor | None = None) -> torch.Tensor:
    """Append n rows to x: copies of ``fill`` (one row) or of x's last row."""
    if n == 0:
        return x
    row = x[-1:] if fill is None else fill.reshape(1, *x.shape[1:]).to(x)
    return torch.cat([x, row.expand(n, *x.shape[1:])])


def run_bucketed(
    fn: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]],
    inputs: Sequence[torch.Tensor],
    buckets: Sequence[int],
    fills: Sequence[torch.Tensor | None] | None = None,
):
    """Run fn on inputs (all with batch B) padded to a bucket; outputs cut back to B.

    Batches larger than the largest bucket run in chunks of it. Padding rows copy the last
    real row unless ``fills`` gives one (e.g. the null class for labels). Outputs are cloned
    so a CUDA graph's static output buffers are never handed out (the next replay would
    overwrite them).
    """
    B = inputs[0].shape[0]
    if B == 0:
        return fn(*inputs)
    fills = fills or [None] * len(inputs)
    top = max(buckets)
    pieces = []
    for start in range(0, B, top):
        chunk = [x[start : start + top] for x in inputs]
        n = chunk[0].shape[0]
        pad = bucket_for(n, buckets) - n
        out = fn(*[pad_rows(x, pad, f) for x, f in zip(chunk, fills)])
        outs = out if isinstance(out, tuple) else (out,)
        pieces.append(tuple(o[:n].clone() for o in outs))
    merged = tuple(torch.cat(parts) for parts in zip(*pieces))
    return merged if isinstance(out, tuple) else merged[0]
