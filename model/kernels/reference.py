"""PyTorch versions of the fused kernels: the CPU path and the definition the Triton
kernels are tested against. Same math as model/tokenizer.py and model/sit.py."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_quantize(z: torch.Tensor, codebook: torch.Tensor, tau: float, l2_norm: bool = True):
    """Soft vector quantisation.

    z (B, G, n, D): token n of group g; codebook (G, K, D) raw codewords.
    Returns z_q (B, G, n, D) in z's dtype and indices (B, G, n) int64 (argmax of the weights).
    """
    if l2_norm:
        z = F.normalize(z, dim=-1)
        codebook = F.normalize(codebook, dim=-1)
    logits = torch.einsum("bgnd,gkd->bgnk", z, codebook)
    probs = torch.softmax(logits.float() / tau, dim=-1).to(z.dtype)
    z_q = torch.einsum("bgnk,gkd->bgnd", probs, codebook)
    return z_q, probs.argmax(dim=-1)


def modulated_layer_norm(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
):
    """adaLN: LayerNorm(x) (no affine) * (1 + scale) + shift.

    x (B, N, H); shift, scale (B, H) -> (B, N, H) in x's dtype.
    """
    y = F.layer_norm(x, (x.shape[-1],), eps=eps)
    return y * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
