"""Drop-in modules that route the quantizer and adaLN through the fused kernels.

They subclass the model's own modules and take over the same submodules and parameters,
so a state dict keeps its names and nothing is copied. Only ``forward`` changes.
"""

from __future__ import annotations

import torch
from torch import nn

from ..sit import FinalLayer, SiTBlock
from ..tokenizer import SoftVectorQuantizer
from . import modulated_layer_norm, soft_quantize


class FusedSoftVectorQuantizer(SoftVectorQuantizer):
    @classmethod
    def from_module(cls, m: SoftVectorQuantizer) -> FusedSoftVectorQuantizer:
        G, K, D = m.embedding.shape
        with torch.device("meta"):
            new = cls(G, K, D, m.tau, m.l2_norm)
        new.embedding = m.embedding
        return new

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, D) -> z_q (B, L, D), code indices (B, G, L/G)."""
        B, L, D = z.shape
        z_q, idx = soft_quantize(
            z.reshape(B, self.num_codebooks, -1, D), self.embedding, self.tau, self.l2_norm
        )
        return z_q.reshape(B, L, D), idx


class FusedSiTBlock(SiTBlock):
    @classmethod
    def from_module(cls, m: SiTBlock) -> FusedSiTBlock:
        H = m.norm1.normalized_shape[0]
        with torch.device("meta"):
            new = cls(H, m.attn.num_heads, m.mlp.fc1.out_features / H)
        new.attn, new.mlp, new.adaLN_modulation = m.attn, m.mlp, m.adaLN_modulation
        new.norm1, new.norm2 = m.norm1, m.norm2
        return new

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(
            c
        ).chunk(6, dim=-1)
        eps = self.norm1.eps
        x = x + gate_msa.unsqueeze(1) * self.attn(
            modulated_layer_norm(x, shift_msa, scale_msa, eps)
        )
        return x + gate_mlp.unsqueeze(1) * self.mlp(
            modulated_layer_norm(x, shift_mlp, scale_mlp, eps)
        )


class FusedFinalLayer(FinalLayer):
    @classmethod
    def from_module(cls, m: FinalLayer) -> FusedFinalLayer:
        H = m.norm_final.normalized_shape[0]
        with torch.device("meta"):
            new = cls(H, m.linear.out_features)
        new.norm_final, new.linear, new.adaLN_modulation = (
            m.norm_final,
            m.linear,
            m.adaLN_modulation,
        )
        return new

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulated_layer_norm(x, shift, scale, self.norm_final.eps))


_FUSED = {
    SoftVectorQuantizer: FusedSoftVectorQuantizer,
    SiTBlock: FusedSiTBlock,
    FinalLayer: FusedFinalLayer,
}


def fused_replacement(m: nn.Module) -> nn.Module | None:
    """The fused version of m (sharing its parameters), or None if m has none or is fused."""
    cls = _FUSED.get(type(m))
    return cls.from_module(m) if cls is not None else None
