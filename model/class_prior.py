"""A Gaussian per class under the flow: the generator samples whitened coordinates w, and
x = m_y + s_y * A_y w maps them to the tokenizer's normalised latents.

Why: on the demo tokenizers the class lives in class-specific correlations across tokens (a
per-class full-covariance Gaussian of the training latents, sampled and decoded, is named
far more often than a diagonal one, docs/DEMO_MODELS_LOG.md), which a small SiT learns slowly.
Starting every sample from N(m_y, Sigma_y) instead of N(0, I) gives the flow those
correlations for free; the SiT models what the Gaussian misses, in its whitened coordinates.

Per class y, on the latents standardised element by element (u = (x - m_y) / s_y), the
correlation matrix R_y (shrunk towards the identity) is kept as its top ``rank``
eigenvectors V (N, k), eigenvalues lambda (k) and the mean r of the rest:
R_y ~ r I + V (diag(lambda) - r I) V^T. Its symmetric square root
A = sqrt(r) I + V (diag(sqrt(lambda)) - sqrt(r) I) V^T is cheap to apply and to invert, and
stores N k + 2 N + k + 1 numbers per class instead of N^2.

Buffers (names as saved in a generator's safetensors, under ``prior.``):
    mean (C, L, D), std (C, L, D), basis (C, L*D, k), sqrt_eig (C, k), sqrt_rest (C,)
"""

from __future__ import annotations

import torch
from torch import nn


class ClassPrior(nn.Module):
    def __init__(self, num_classes: int, num_tokens: int, token_dim: int, rank: int):
        super().__init__()
        n = num_tokens * token_dim
        if not 0 < rank <= n:
            raise ValueError(f"prior rank must be in [1, {n}], got {rank}")
        self.rank = rank
        self.register_buffer("mean", torch.zeros(num_classes, num_tokens, token_dim))
        self.register_buffer("std", torch.ones(num_classes, num_tokens, token_dim))
        self.register_buffer("basis", torch.zeros(num_classes, n, rank))
        self.register_buffer("sqrt_eig", torch.ones(num_classes, rank))
        self.register_buffer("sqrt_rest", torch.ones(num_classes))

    def _apply(self, fn, recurse: bool = True):
        # The buffers follow the model's device but stay float32 when it moves to bf16 / fp16:
        # a half-precision basis would make the map and its inverse disagree by ~1e-2.
        def keep_float32(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            return t.to(out.device) if out.dtype != t.dtype else out

        return super()._apply(keep_float32, recurse)

    def _parts(self, y: torch.Tensor):
        y = y.to(self.mean.device, torch.long)
        f = lambda b: b[y].float()  # noqa: E731 - the map runs in float32 at any model dtype
        return f(self.mean), f(self.std), f(self.basis), f(self.sqrt_eig), f(self.sqrt_rest)

    def to_latents(self, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Whitened w (B, L, D) of classes y (B,) -> normalised latents (B, L, D), float32."""
        mean, std, V, a, r = self._parts(y)
        u = w.float().flatten(1)
        coef = torch.einsum("bnk,bn->bk", V, u)
        u = r[:, None] * u + torch.einsum("bnk,bk->bn", V, (a - r[:, None]) * coef)
        return mean + std * u.view_as(mean)

    def from_latents(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The inverse: normalised latents (B, L, D) -> whitened w (B, L, D), float32."""
        mean, std, V, a, r = self._parts(y)
        u = ((x.float() - mean) / std).flatten(1)
        coef = torch.einsum("bnk,bn->bk", V, u)
        w = u / r[:, None] + torch.einsum("bnk,bk->bn", V, (1 / a - 1 / r[:, None]) * coef)
        return w.view_as(mean)

    @torch.no_grad()
    def fit(self, latents: torch.Tensor, labels: torch.Tensor, shrink: float = 0.1) -> ClassPrior:
        """Set every class's Gaussian from training latents (N, L, D) and labels (N,).
        ``shrink``: weight of the identity in the correlation matrix (a class has a few
        thousand samples for a matrix of side L*D: the small eigenvalues are noise)."""
        for c in range(self.mean.shape[0]):
            x = latents[labels == c].double()
            if len(x) < 2:
                raise ValueError(f"class {c} has {len(x)} training latents; the prior needs 2+")
            mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
            u = ((x - mean) / std).flatten(1)
            corr = (u.T @ u) / (len(u) - 1)
            corr = (1 - shrink) * corr + shrink * torch.eye(len(corr), dtype=corr.dtype)
            eig, vec = torch.linalg.eigh(corr)  # ascending
            top, rest = eig[-self.rank :].flip(0), eig[: -self.rank]
            rest_mean = rest.mean() if len(rest) else torch.tensor(1.0, dtype=eig.dtype)
            self.mean[c], self.std[c] = mean.float(), std.float()
            self.basis[c] = vec[:, -self.rank :].flip(1).float()
            self.sqrt_eig[c] = top.clamp_min(1e-8).sqrt().float()
            self.sqrt_rest[c] = rest_mean.clamp_min(1e-8).sqrt().float()
        return self
