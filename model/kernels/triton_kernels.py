"""Triton kernels for what PyTorch leaves unfused on the hot path.

Imported only on demand (``model.kernels`` does it on CUDA, tests do it under
``TRITON_INTERPRET=1``): Triton decides at decoration time whether ``@triton.jit`` compiles
for the GPU or runs in its NumPy interpreter, so the environment must be set first.

- ``soft_quantize``: per token, normalise z, logits against its group's codebook, softmax
  over tau, weighted sum of codewords and argmax, in one pass over the codebook with an
  online softmax (flash-attention style), so the (tokens x K) probability matrix never
  reaches memory. PyTorch runs this as normalize, einsum, softmax, cast, einsum, argmax.
- ``modulated_layer_norm``: LayerNorm (no affine) and adaLN's ``* (1 + scale) + shift`` in
  one read and one write of x instead of three.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _soft_quantize_kernel(
    z_ptr,
    cb_ptr,
    out_ptr,
    idx_ptr,
    n_tokens,
    K,
    D,
    G,
    inv_tau,
    L2_NORM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Program (m, bg): tokens [m * BLOCK_M, +BLOCK_M) of row bg = b * G + g of z (B*G, n, D).
    pid_m = tl.program_id(0)
    bg = tl.program_id(1)
    g = bg % G
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < n_tokens
    col_ok = cols < D
    z_offs = bg * n_tokens * D + rows[:, None] * D + cols[None, :]
    z = tl.load(z_ptr + z_offs, mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    if L2_NORM:
        # F.normalize: z / max(||z||, 1e-12)
        norm = tl.sqrt(tl.sum(z * z, axis=1))
        z = z / tl.maximum(norm, 1e-12)[:, None]

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)  # running max of logits / tau
    l_i = tl.zeros((BLOCK_M,), tl.float32)  # running sum of exp
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)  # running weighted sum of codewords
    best = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    best_idx = tl.zeros((BLOCK_M,), tl.int64)
    ks = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + ks) < K
        cb_offs = g * K * D + (k0 + ks)[:, None] * D + cols[None, :]
        # The codebook arrives already normalised (it is a weight: done once per call, G*K*D).
        cb = tl.load(cb_ptr + cb_offs, mask=k_ok[:, None] & col_ok[None, :], other=0.0).to(
            tl.float32
        )
        s = tl.dot(z, tl.trans(cb), input_precision="ieee") * inv_tau  # (BLOCK_M, BLOCK_K)
        s = tl.where(k_ok[None, :], s, float("-inf"))
        blk_max = tl.max(s, axis=1)
        blk_arg = tl.argmax(s, axis=1).to(tl.int64) + k0
        better = blk_max > best  # strict: the first maximum wins, like torch.argmax
        best_idx = tl.where(better, blk_arg, best_idx)
        best = tl.where(better, blk_max, best)
        m_new = tl.maximum(m_i, blk_max)
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p, cb, input_precision="ieee")
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(
        out_ptr + z_offs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :]
    )
    tl.store(idx_ptr + bg * n_tokens + rows, best_idx, mask=row_ok)


def soft_quantize(z: torch.Tensor, codebook: torch.Tensor, tau: float, l2_norm: bool = True):
    """z (B, G, n, D), codebook (G, K, D) -> z_q (B, G, n, D) in z's dtype, indices (B, G, n).

    Differs from the PyTorch path only in rounding: everything is float32 inside and z_q
    is rounded once at the end.
    """
    B, G, n, D = z.shape
    K = codebook.shape[1]
    z = z.contiguous()
    cb = codebook.float()
    if l2_norm:
        cb = torch.nn.functional.normalize(cb, dim=-1)
    cb = cb.contiguous()
    out = torch.empty_like(z)
    idx = torch.empty(B, G, n, dtype=torch.int64, device=z.device)
    BLOCK_D = max(16, triton.next_power_of_2(D))
    BLOCK_M = max(16, min(64, triton.next_power_of_2(n)))
    BLOCK_K = 64 if BLOCK_D <= 64 else 32
    grid = (triton.cdiv(n, BLOCK_M), B * G)
    _soft_quantize_kernel[grid](
        z,
        cb,
        out,
        idx,
        n,
        K,
        D,
        G,
        1.0 / tau,
        L2_NORM=l2_norm,
        BLOCK_M=BLOCK_M,
        BLOCK_K=BLOCK_K,
        BLOCK_D=BLOCK_D,
    )
    return out, idx


@triton.jit
def _modulated_layer_norm_kernel(
    x_ptr,
    shift_ptr,
    scale_ptr,
    out_ptr,
    N,
    H,
    mod_stride,
    eps,
    BLOCK_H: tl.constexpr,
):
    # One program per token row r of x (B*N, H); its sample is b = r // N.
    r = tl.program_id(0)
    b = r // N
    cols = tl.arange(0, BLOCK_H)
    ok = cols < H
    x = tl.load(x_ptr + r * H + cols, mask=ok, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / H
    xc = tl.where(ok, x - mean, 0.0)
    var = tl.sum(xc * xc, axis=0) / H
    y = xc * tl.rsqrt(var + eps)
    shift = tl.load(shift_ptr + b * mod_stride + cols, mask=ok, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + b * mod_stride + cols, mask=ok, other=0.0).to(tl.float32)
    y = y * (1.0 + scale) + shift
    tl.store(out_ptr + r * H + cols, y.to(out_ptr.dtype.element_ty), mask=ok)


def modulated_layer_norm(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
):
    """x (B, N, H); shift, scale (B, H) (views of the adaLN chunk are fine: row stride is
    read) -> LayerNorm(x) * (1 + scale) + shift, (B, N, H) in x's dtype."""
    B, N, H = x.shape
    x = x.contiguous()
    if shift.stride(-1) != 1 or scale.stride(-1) != 1 or shift.stride(0) != scale.stride(0):
        shift, scale = shift.contiguous(), scale.contiguous()
    out = torch.empty_like(x)
    BLOCK_H = triton.next_power_of_2(H)
    _modulated_layer_norm_kernel[(B * N,)](
        x,
        shift,
        scale,
        out,
        N,
        H,
        shift.stride(0),
        eps,
        BLOCK_H=BLOCK_H,
        num_warps=4 if BLOCK_H <= 1024 else 8,
    )
    return out
