"""Fused kernels for the hot path, with a dispatch the model uses on CUDA only.

    z_q, idx = soft_quantize(z, codebook, tau)          # z (B, G, n, D), codebook (G, K, D)
    y = modulated_layer_norm(x, shift, scale)           # x (B, N, H), shift/scale (B, H)
    install_fused_kernels(model)                        # swap in the fused modules

Each call goes to the Triton kernel when the tensor is on CUDA and Triton is installed,
otherwise to the PyTorch reference (``reference.py``). ``SOFTVQ_TRITON_KERNELS=0`` turns the
Triton path off; ``=1`` forces it (with ``TRITON_INTERPRET=1`` that runs the kernels in
Triton's CPU interpreter, which is how CI tests them). Inside ``torch.compile`` the
reference is used, so inductor sees plain ops it can fuse itself.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from . import reference

__all__ = ["install_fused_kernels", "modulated_layer_norm", "soft_quantize", "use_triton"]


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def use_triton(t: torch.Tensor) -> bool:
    if torch.compiler.is_compiling():  # first: nothing below needs tracing by dynamo
        return False
    mode = os.environ.get("SOFTVQ_TRITON_KERNELS", "")
    if mode == "0" or not triton_available():
        return False
    return mode == "1" or t.is_cuda


def soft_quantize(z: torch.Tensor, codebook: torch.Tensor, tau: float, l2_norm: bool = True):
    """z (B, G, n, D), codebook (G, K, D) -> z_q (B, G, n, D), indices (B, G, n)."""
    if use_triton(z):
        from . import triton_kernels  # imported lazily: see the module docstring

        return triton_kernels.soft_quantize(z, codebook, tau, l2_norm)
    return reference.soft_quantize(z, codebook, tau, l2_norm)


def modulated_layer_norm(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
):
    """LayerNorm(x) * (1 + scale) + shift; x (B, N, H), shift/scale (B, H)."""
    if use_triton(x):
        from . import triton_kernels

        return triton_kernels.modulated_layer_norm(x, shift, scale, eps)
    return reference.modulated_layer_norm(x, shift, scale, eps)


def install_fused_kernels(module: torch.nn.Module) -> int:
    """Replace the soft quantizer, SiT blocks and final layer inside ``module`` by versions
    that call the fused kernels (same parameters, shared, not copied). Returns how many
    modules were replaced; a second call replaces nothing."""
    from .modules import fused_replacement

    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            new = fused_replacement(child)
            if new is not None:
                setattr(parent, name, new)
                count += 1
    return count
