"""Class-conditional generation end to end: seeds -> noise -> sample -> de-normalise -> decode."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .fast_sampling import sample_graphed
from .sampling import sample
from .sit import SiT
from .tokenizer import SoftVQTokenizer


def seeded_noise(
    seeds: Sequence[int], shape: tuple[int, ...], device=None
) -> tuple[torch.Tensor, list[torch.Generator]]:
    """One CPU generator per seed: noise (B, *shape) float32 that is the same on any device and
    in any batch. The generators are returned (already advanced) to drive SDE noise."""
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    noise = torch.stack([torch.randn(shape, generator=g) for g in generators])
    return noise.to(device), generators


def check_compatible(tok, gen: SiT) -> None:
    """``tok``: a SoftVQ tokenizer for a 1-D SiT, or an SD-VAE (model.sd_vae) for SiT/2."""
    if hasattr(tok, "scaling_factor"):  # an SD-VAE
        if gen.config.vae_1d or gen.latent_shape[0] != tok.latent_channels:
            raise ValueError(
                f"the SD-VAE decodes {tok.latent_channels}-channel 2-D latents; the generator"
                f" samples {tuple(gen.latent_shape)}"
            )
        return
    if gen.config.vae_1d is False:
        raise ValueError("a 2-D generator needs an SD-VAE to decode its latents, not a tokenizer")
    if (gen.num_tokens, gen.token_dim) != (tok.num_tokens, tok.token_dim):
        raise ValueError(
            f"generator works on ({gen.num_tokens}, {gen.token_dim}) tokens but the tokenizer "
            f"makes ({tok.num_tokens}, {tok.token_dim})"
        )


@torch.no_grad()
def sample_latents(
    gen: SiT,
    labels: Sequence[int] | torch.Tensor,
    seeds: Sequence[int],
    steps: int = 50,
    sampler: str = "euler",
    cfg_scale: float | Sequence[float] | torch.Tensor = 1.0,
    guidance_interval: tuple[float, float] = (0.0, 1.0),
    path: str = "linear",
    cuda_graphs: bool = False,
    on_step=None,
) -> torch.Tensor:
    """Normalised latents (B, L, D) (2-D models: (B, C, H, W)) in float32, each drawn from
    its own seed. A generator with a class prior (``gen.prior``, model.class_prior) samples
    whitened coordinates; they are mapped to normalised latents here, the one place the
    service and ``generate`` share.

    ``on_step(step, steps, x, x0)``: progress, row dropping and the x0 estimate, see
    ``model.sampling``.

    ``cuda_graphs``: on CUDA with an eager runner, replay the whole Euler / Heun step loop as
    one CUDA graph (``model.fast_sampling``); everywhere else it changes nothing."""
    device = gen.device
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if len(seeds) != labels.shape[0]:
        raise ValueError(f"{len(seeds)} seeds for {labels.shape[0]} labels")
    shape = gen.input_shape() if hasattr(gen, "input_shape") else gen.latent_shape
    noise, generators = seeded_noise(seeds, tuple(shape), device)
    if not isinstance(cfg_scale, (int, float)):
        cfg_scale = torch.as_tensor(cfg_scale, dtype=torch.float64)
    cfg = cfg_scale if isinstance(cfg_scale, (int, float)) else cfg_scale.to(device)
    run = sample_graphed if cuda_graphs else sample
    prior = getattr(gen, "prior", None)
    if prior is not None and on_step is not None:
        on_step = _through_prior(on_step, prior, labels)
    z = run(
        gen,
        noise,
        labels.to(device),
        steps,
        sampler=sampler,
        cfg_scale=cfg,
        guidance_interval=guidance_interval,
        path=path,
        generators=generators,
        on_step=on_step,
    )
    if prior is None:
        return z
    rows = getattr(on_step, "rows", slice(None))  # the rows on_step kept, if it dropped any
    return prior.to_latents(z, labels[rows]).to(z.device)


def _through_prior(on_step, prior, labels: torch.Tensor):
    """on_step seeing x0 estimates as normalised latents, for a generator that samples the
    whitened coordinates of a class prior. Follows the rows the callback drops, so each row
    keeps its own class's map; ``wrapped.rows`` holds the surviving rows."""

    def wrapped(step, steps, x, x0=None):
        rows = wrapped.rows
        est = None if x0 is None else (lambda: prior.to_latents(x0(), labels[rows]))
        keep = on_step(step, steps, x, est)
        if keep is not None:
            wrapped.rows = rows[torch.as_tensor(keep, dtype=torch.long)]
        return keep

    wrapped.rows = torch.arange(labels.shape[0])
    return wrapped


@torch.no_grad()
def generate(
    tok: SoftVQTokenizer,
    gen: SiT,
    labels: Sequence[int] | torch.Tensor,
    seeds: Sequence[int],
    steps: int = 50,
    sampler: str = "euler",
    cfg_scale: float | Sequence[float] | torch.Tensor = 1.0,
    guidance_interval: tuple[float, float] = (0.0, 1.0),
    path: str = "linear",
) -> torch.Tensor:
    """Images (B, 3, S, S), unclamped, for class ``labels[i]`` from seed ``seeds[i]``.
    ``tok`` decodes the latents: the SoftVQ tokenizer, or for SiT/2 an SD-VAE (its latents
    divided by the scaling factor first)."""
    check_compatible(tok, gen)
    z = sample_latents(gen, labels, seeds, steps, sampler, cfg_scale, guidance_interval, path)
    if hasattr(tok, "scaling_factor"):
        return tok.decode(z.to(tok.dtype) / tok.scaling_factor)
    return tok.decode(z.float() * tok.vq_std + tok.vq_mean)
