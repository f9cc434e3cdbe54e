"""SiT (Scalable Interpolant Transformer) generators, named like DiT's ``models.py``.

``SiT`` works on the tokenizer's 1-D tokens (patch size 1): x (B, L, D), t (B,), y (B,)
-> velocity (B, L, D). ``SiT2D`` is the 2-D baseline of the speed comparison: the same blocks
over a patch-2 grid of 4-channel latents, x (B, 4, H, W) -> velocity (B, 4, H, W); it loads
the SiT authors' released SiT-XL/2 as it is (learned-sigma output, their time convention).

Every generator's ``forward`` speaks the samplers' convention (model.sampling: t = 1 noise,
t = 0 data, v = noise - data). A checkpoint trained the other way round (the SiT authors':
t = 0 noise, t = 1 data, predicting data - noise) keeps its own output in ``native`` and is
seen by the samplers as v(x, t) = -native(x, 1 - t, y).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .class_prior import ClassPrior
from .vit import Attention, Mlp

# Published sizes: name -> (depth, hidden, heads).
SIT_SIZES: dict[str, tuple[int, int, int]] = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}


@dataclass
class GeneratorConfig:
    """Fields of a SiT ``config.json``. ``input_size`` is L, ``in_channels`` is D for 1-D
    models; for the 2-D baseline they are the latent side and channels."""

    input_size: int = 64
    in_channels: int = 32
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    num_classes: int = 1000
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    patch_size: int = 1
    vae_1d: bool = True
    tokenizer: str | None = None  # name of the tokenizer this generator samples for
    # The output holds a variance half after the velocity (DiT/SiT ``learn_sigma``); only the
    # first ``in_channels`` are the velocity.
    learn_sigma: bool = False
    # "noise_at_1" (SoftVQ's SiT, the samplers' own) or "noise_at_0" (the SiT authors').
    time_convention: str = "noise_at_1"
    # > 0: a Gaussian per class under the flow (model.class_prior) of this rank; the model
    # samples whitened coordinates that ``prior.to_latents`` maps to normalised latents.
    prior_rank: int = 0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GeneratorConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in d.items() if k in known}
        if "vae_1d" not in d and int(d.get("patch_size", 1)) > 1:
            fields["vae_1d"] = False  # DiT/SiT configs have no vae_1d: patches mean 2-D
        if "time_convention" in d:
            fields["time_convention"] = parse_time_convention(d["time_convention"])
        return cls(**fields)

    @property
    def noise_at_zero(self) -> bool:
        return self.time_convention == "noise_at_0"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["null_class"] = self.num_classes
        return d


TIME_CONVENTIONS = ("noise_at_1", "noise_at_0")


def parse_time_convention(value: str) -> str:
    """``noise_at_1`` / ``noise_at_0``, or a config's sentence that starts by saying where
    the noise is ("t=0 noise, t=1 data; ..." as the official fixtures write it)."""
    v = str(value).strip().lower().replace(" ", "")
    if v in TIME_CONVENTIONS:
        return v
    if v.startswith(("t=0noise", "t=1data")):
        return "noise_at_0"
    if v.startswith(("t=1noise", "t=0data")):
        return "noise_at_1"
    raise ValueError(
        f"time_convention {value!r}: expected one of {TIME_CONVENTIONS} or a sentence that"
        " starts 't=0 noise' / 't=1 noise'"
    )


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """Interleaved sinusoid: pe[n, 2i] = sin(n w_i), pe[n, 2i+1] = cos(n w_i)."""
    w = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = positions.double()[:, None] * w[None]
    return torch.stack([angles.sin(), angles.cos()], dim=-1).reshape(len(positions), dim)


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """DiT's 2-D embedding: half the channels for rows, half for columns ([sin, cos] halves)."""

    def half(d: int, pos: torch.Tensor) -> torch.Tensor:
        w = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2.0))
        a = pos.double()[:, None] * w[None]
        return torch.cat([a.sin(), a.cos()], dim=1)

    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.cat([half(dim // 2, xs.flatten()), half(dim // 2, ys.flatten())], dim=1)


class TimestepEmbedder(nn.Module):
    """Raw t in [0, 1] -> 256 frequency features [cos, sin] -> MLP -> (B, H)."""

    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def frequency_features(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(
            -math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        )
        args = t.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        w = self.mlp[0].weight
        return self.mlp(self.frequency_features(t).to(w.dtype))


class LabelEmbedder(nn.Module):
    """Class ids -> (B, H). Row ``num_classes`` is the null class used for guidance."""

    def __init__(self, num_classes: int, hidden: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, y: torch.Tensor, train: bool = False) -> torch.Tensor:
        if train and self.dropout_prob > 0:
            drop = torch.rand(y.shape[0], device=y.device) < self.dropout_prob
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return self.embedding_table(y)


class SiTBlock(nn.Module):
    """adaLN-Zero block: LayerNorm without affine, modulated by the conditioning c."""

    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, num_heads)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden, int(hidden * mlp_ratio), approximate="tanh")
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(
            c
        ).chunk(6, dim=-1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, out_dim: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class SiTBackbone(nn.Module):
    """What 1-D and 2-D SiT share: conditioning, blocks, final layer, weight init."""

    def __init__(self, cfg: GeneratorConfig, num_positions: int, token_in: int, token_out: int):
        super().__init__()
        self.config = cfg
        H = cfg.hidden_size
        self.t_embedder = TimestepEmbedder(H)
        self.y_embedder = LabelEmbedder(cfg.num_classes, H, cfg.class_dropout_prob)
        self.register_buffer("pos_embed", torch.zeros(1, num_positions, H), persistent=True)
        self.blocks = nn.ModuleList(
            SiTBlock(H, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth)
        )
        self.final_layer = FinalLayer(H, token_out)

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def dtype(self) -> torch.dtype:
        return self.final_layer.linear.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.final_layer.linear.weight.device

    def initialize_weights(self) -> None:
        """DiT's init: xavier linears, zeroed adaLN and output (adaLN-Zero)."""

        def basic(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

        self.apply(basic)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def run(self, tokens: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """tokens (B, N, H) already embedded -> (B, N, out)."""
        x = tokens + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, train=self.training)
        for block in self.blocks:
            x = block(x, c)
        return self.final_layer(x, c)

    def check_labels(self, y: torch.Tensor) -> None:
        # num_classes itself is allowed: it is the null class used by guidance.
        if y.numel() and (int(y.min()) < 0 or int(y.max()) > self.num_classes):
            raise ValueError(f"class ids must be in [0, {self.num_classes}), got {y.tolist()}")


class SiT(SiTBackbone):
    """SiT over 1-D tokens: x (B, L, D), t (B,), y (B,) -> velocity (B, L, D).

    With ``prior_rank`` > 0, x lives in the whitened coordinates of ``prior`` (a Gaussian per
    class, model.class_prior); ``model.pipeline.sample_latents`` maps samples back."""

    def __init__(self, cfg: GeneratorConfig):
        if cfg.patch_size != 1:
            raise ValueError("1-D SiT uses patch size 1")
        super().__init__(cfg, cfg.input_size, cfg.in_channels, cfg.in_channels)
        self.x_embedder = nn.Linear(cfg.in_channels, cfg.hidden_size)
        pe = sincos_1d(cfg.hidden_size, torch.arange(cfg.input_size))
        self.pos_embed.copy_(pe[None].float())
        self.prior = (
            ClassPrior(cfg.num_classes, cfg.input_size, cfg.in_channels, cfg.prior_rank)
            if cfg.prior_rank
            else None
        )

    @property
    def num_tokens(self) -> int:
        return self.config.input_size

    @property
    def token_dim(self) -> int:
        return self.config.in_channels

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """One sample's x: (L, D)."""
        return (self.config.input_size, self.config.in_channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.run(self.x_embedder(x), t, y)


class PatchEmbed2D(nn.Module):
    def __init__(self, channels: int, patch: int, hidden: int):
        super().__init__()
        self.proj = nn.Conv2d(channels, hidden, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, N, hidden)
        return self.proj(x).flatten(2).transpose(1, 2)


class SiT2D(SiTBackbone):
    """SiT/p over a (C, side, side) latent grid: the 2-D baseline (SiT-XL/2 on SD-VAE latents).

    Key names are those of the SiT authors' ``models.py``, so their released checkpoints load
    as they are. With ``learn_sigma`` the final layer predicts 2C channels (velocity, then a
    variance the flow samplers do not use).
    """

    def __init__(self, cfg: GeneratorConfig):
        p, side = cfg.patch_size, cfg.input_size
        if side % p:
            raise ValueError("latent side must be a multiple of the patch size")
        self.grid = side // p
        self.out_channels = cfg.in_channels * (2 if cfg.learn_sigma else 1)
        super().__init__(cfg, self.grid**2, cfg.in_channels, p * p * self.out_channels)
        self.x_embedder = PatchEmbed2D(cfg.in_channels, p, cfg.hidden_size)
        self.pos_embed.copy_(sincos_2d(cfg.hidden_size, self.grid)[None].float())

    @property
    def num_tokens(self) -> int:
        return self.grid**2

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """One sample's x: (C, side, side)."""
        c = self.config
        return (c.in_channels, c.input_size, c.input_size)

    def native(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The checkpoint's own output, (B, out_channels, H, W), in its own time convention
        (DiT's ``unpatchify``)."""
        out = self.run(self.x_embedder(x), t, y)  # (B, N, p*p*C_out)
        B, p, C, g = x.shape[0], self.config.patch_size, self.out_channels, self.grid
        out = out.reshape(B, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(B, C, g * p, g * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Velocity (B, C, H, W) in the samplers' convention (t = 1 noise, noise - data)."""
        C = self.config.in_channels
        if self.config.noise_at_zero:
            return -self.native(x, 1 - t, y)[:, :C]
        return self.native(x, t, y)[:, :C]


def build_generator(cfg: GeneratorConfig) -> SiTBackbone:
    return SiT(cfg) if cfg.vae_1d else SiT2D(cfg)
