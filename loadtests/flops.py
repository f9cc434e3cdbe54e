"""FLOP counting and the machine's matmul rate: the yardsticks every ratio is held to.

FLOPs are counted by running the function once under torch's FlopCounterMode (matmuls,
convolutions, attention; 2 FLOPs per multiply-add). Elementwise work is not counted: it is
memory-bound, and a "fraction of matmul peak" is only meaningful for the GEMM work.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


def _sdpa_cpu_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    # FlopCounterMode passes shapes. The CPU SDPA kernel is not in torch's own table.
    return sdpa_flop_count(query, key, value)


CUSTOM = {}
if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
    CUSTOM[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_cpu_flops


@torch.inference_mode()
def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of fn (run eagerly once, on whatever device its tensors live)."""
    with FlopCounterMode(display=False, custom_mapping=CUSTOM) as counter:
        fn()
    return int(counter.get_total_flops())


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device, reps: int = 3, warm: int = 1) -> float:
    """Best-of-reps seconds per call (min is the least disturbed by the other jobs sharing
    the machine); ``warm`` untimed calls first."""
    for _ in range(warm):
        fn()
    sync(device)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


@torch.inference_mode()
def matmul_rate(device, dtype: torch.dtype, sizes=(1024, 2048), reps: int = 5) -> float:
    """Best measured FLOP/s of a square matmul on this device and dtype."""
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        s = time_call(lambda a=a, b=b: a @ b, device, reps=reps, warm=2)
        best = max(best, 2 * n**3 / s)
    return best
