"""Quality of a tokenizer / generator pair, on the built-in set or a folder of images.

- reconstruction: mean PSNR (8-bit pixels) over held-out images (the built-in set: a seed
  never trained on; a folder: its held-out split, ``data.ImageFolderSet``);
- generation: class accuracy of generated images (with guidance) as judged by the separately
  trained classifier; and diversity: mean pairwise RMS distance between samples of one class,
  divided by the same for real held-out images of that class (about 1 = as varied as the data,
  near 0 = copies);
- a PNG grid with a row per class.

Where a function takes ``real`` (a data set of held-out images), None means the built-in set's
held-out images.
"""

from __future__ import annotations

import itertools
import statistics
from dataclasses import dataclass

import torch

from ..images import make_grid, psnr, to_pil
from ..pipeline import generate
from ..sampling import sample
from .data import HELD_OUT_SEED, ProceduralShapes
from .shape_fit import outline_iou


@dataclass(frozen=True)
class QualityBars:
    """What a tokenizer / generator pair must reach (issue #14's bars for the demo models)."""

    psnr: float  # dB, mean over held-out reconstructions
    reconstruction_accuracy: float  # judged share of those reconstructions
    accuracy: float  # judged share of generated images, with the generator's defaults
    diversity_min: float = 0.8  # the lowest class's diversity ratio (about 1 = as varied as data)


# Per tokenizer of the bundled pairs. tests/test_demo_quality.py holds the bundle to them on
# small samples; `softvq evaluate-demo` reads full-size numbers against them.
DEMO_BARS = {
    "softvq-demo-64": QualityBars(psnr=26.0, reconstruction_accuracy=0.90, accuracy=0.85),
    "softvq-demo-32": QualityBars(psnr=24.0, reconstruction_accuracy=0.85, accuracy=0.75),
}


def missed_bars(result: dict, bars: QualityBars) -> list[str]:
    """The bars an ``evaluate_pair`` result falls below, each as "what value < bar"."""
    checks = [
        ("PSNR", result["psnr_mean"], bars.psnr, "{:.2f} dB"),
        (
            "judged reconstructions",
            result["reconstruction_accuracy"],
            bars.reconstruction_accuracy,
            "{:.1%}",
        ),
        ("judged generated images", result["accuracy"], bars.accuracy, "{:.1%}"),
        ("lowest class diversity", result["diversity_ratio_min"], bars.diversity_min, "{:.2f}"),
    ]
    # Rounded first: shares are float32 means (190 / 200 comes out as 0.94999999).
    return [
        f"{what} {fmt.format(value)} < {fmt.format(bar)}"
        for what, value, bar, fmt in checks
        if round(value, 6) < bar
    ]


@dataclass
class GenerationSettings:
    steps: int = 25
    sampler: str = "heun"
    cfg_scale: float = 3.0
    guidance_interval: tuple[float, float] = (0.0, 1.0)


@torch.no_grad()
def reconstruction_psnr(
    tok, count: int = 500, seed: int = HELD_OUT_SEED, batch_size: int = 100, real=None
):
    """Per-image PSNR of decode(encode(x)) on ``count`` held-out images."""
    return reconstruction_quality(tok, None, count, seed, batch_size, real)[0]


@torch.no_grad()
def reconstruction_quality(
    tok, judge, count: int = 500, seed: int = HELD_OUT_SEED, batch_size: int = 100, real=None
):
    """(per-image PSNR, judged accuracy) of decode(encode(x)) on ``count`` held-out images
    (at most all of ``real``); the accuracy (the judge naming the reconstruction's class) is
    None without a judge. It is the ceiling for generated images, which are decoded through
    the same decoder."""
    data = real if real is not None else ProceduralShapes(count, seed, tok.image_size)
    count = min(count, len(data))
    values: list[float] = []
    correct = 0
    for start in range(0, count, batch_size):
        images, labels = data.batch(range(start, min(count, start + batch_size)))
        recon = tok.decode(tok.encode(images))
        values += psnr(recon, images)
        if judge is not None:
            correct += int((judge.predict(recon) == labels).sum())
    return values, (correct / count if judge is not None else None)


@torch.no_grad()
def generate_per_class(
    tok, gen, per_class: int, settings: GenerationSettings, seed: int = 0, batch_size: int = 50
):
    """Images (C * per_class, 3, S, S) ordered class by class, and their labels."""
    labels = torch.arange(gen.num_classes).repeat_interleave(per_class)
    seeds = [seed * 100_000 + i for i in range(len(labels))]
    out = []
    for start in range(0, len(labels), batch_size):
        out.append(
            generate(
                tok,
                gen,
                labels[start : start + batch_size],
                seeds[start : start + batch_size],
                steps=settings.steps,
                sampler=settings.sampler,
                cfg_scale=settings.cfg_scale,
                guidance_interval=settings.guidance_interval,
            ).clamp(-1, 1)
        )
    return torch.cat(out), labels


@torch.no_grad()
def accuracy_from_noised_latents(
    tok,
    gen,
    judge,
    noise_levels=(0.0, 0.3, 0.6, 0.8, 1.0),
    count: int = 200,
    settings: GenerationSettings | None = None,
    seed: int = HELD_OUT_SEED + 2,
    real=None,
) -> dict[float, float]:
    """Where generation loses the class: held-out images are encoded, their normalised
    latents noised along the training path to time t (x_t = (1 - t) x_0 + t eps), integrated
    back to t = 0 by the generator (the sampler of ``settings``, guided with the true class),
    decoded and judged.
    t = 0 is the judge's accuracy on reconstructions (the ceiling for generated images),
    t = 1 is generation from pure noise; the drop in between shows which noise levels the
    generator cannot undo."""
    settings = settings or GenerationSettings()
    data = real if real is not None else ProceduralShapes(count, seed, tok.image_size)
    images, labels = data.batch(range(min(count, len(data))))
    z0 = (tok.encode(images) - tok.vq_mean) / tok.vq_std
    prior = getattr(gen, "prior", None)  # the generator's own coordinates (model.class_prior)
    z0 = (z0 if prior is None else prior.from_latents(z0, labels)).double()
    eps = torch.randn(z0.shape, generator=torch.Generator().manual_seed(seed), dtype=z0.dtype)
    out = {}
    for t0 in noise_levels:
        x = (1 - t0) * z0 + t0 * eps
        if t0 > 0:
            x = sample(
                gen,
                x,
                labels,
                settings.steps,
                settings.sampler,
                settings.cfg_scale,
                settings.guidance_interval,
                t_start=t0,
            )
        z = x.float() if prior is None else prior.to_latents(x, labels)
        decoded = tok.decode(z * tok.vq_std + tok.vq_mean).clamp(-1, 1)
        out[float(t0)] = float((judge.predict(decoded) == labels).float().mean())
    return out


def mean_pairwise_distance(images: torch.Tensor) -> float:
    """Mean RMS pixel distance over all pairs of (B, 3, S, S) images."""
    flat = images.flatten(1).double()
    d = [float(((a - b) ** 2).mean().sqrt()) for a, b in itertools.combinations(flat, 2)]
    return statistics.mean(d)


def diversity(
    generated: torch.Tensor, labels: torch.Tensor, real_seed: int = HELD_OUT_SEED + 1, real=None
):
    """Per class: (mean pairwise distance of samples, of as many real images, ratio). With
    ``real`` (a folder's held-out split) a class is compared with the held-out images it has,
    and left out when it has fewer than two."""
    size = generated.shape[-1]
    out = {}
    for c in labels.unique().tolist():
        samples = generated[labels == c]
        n = len(samples)
        real_set = real
        if real_set is None:
            real_set = ProceduralShapes(n * int(labels.max() + 1), seed=real_seed, image_size=size)
        idx = [i for i in range(len(real_set)) if real_set.label(i) == c][:n]
        if len(idx) < 2:
            continue
        g, r = mean_pairwise_distance(samples), mean_pairwise_distance(real_set.batch(idx)[0])
        out[c] = (g, r, g / r)
    return out


@torch.no_grad()
def outline_quality(tok, generated: torch.Tensor, labels: torch.Tensor) -> dict:
    """Per class, the median outline IoU (``shape_fit.outline_iou``) of the generated images
    and of the tokenizer's reconstructions of as many held-out real images: how clean a shape
    a person sees, against the decoder's own ceiling."""
    data = ProceduralShapes(len(labels), seed=HELD_OUT_SEED, image_size=tok.image_size)
    real, real_labels = data.batch(range(len(labels)))
    recon = tok.decode(tok.encode(real)).clamp(-1, 1)
    out = {}
    for name, images, y in (
        ("generated", generated, labels),
        ("reconstructed", recon, real_labels),
    ):
        iou, _ = outline_iou(images, y)
        out[name] = [round(float(iou[y == c].median()), 3) for c in range(int(y.max()) + 1)]
    return out


def class_grid(images: torch.Tensor, per_class: int, columns: int | None = None):
    """Images ordered class by class -> one PIL grid, one row per class."""
    cols = columns or per_class
    rows = [images[i * per_class : i * per_class + cols] for i in range(len(images) // per_class)]
    return make_grid(to_pil(torch.cat(rows)), columns=cols)


def evaluate_pair(
    tok,
    gen,
    judge,
    psnr_images: int = 500,
    per_class: int = 20,
    settings: GenerationSettings | None = None,
    seed: int = 0,
    real=None,
) -> dict:
    """All numbers for one tokenizer / generator pair (and the generated images), on
    held-out images: the built-in set's, or ``real`` (``data.held_out_set``)."""
    settings = settings or GenerationSettings()
    p, recon_acc = reconstruction_quality(tok, judge, psnr_images, real=real)
    images, labels = generate_per_class(tok, gen, per_class, settings, seed=seed)
    pred = judge.predict(images)
    per_class_acc = [float((pred[labels == c] == c).float().mean()) for c in range(gen.num_classes)]
    div = diversity(images, labels, real=real)
    if not div:
        raise ValueError("no class has two held-out images to measure diversity on")
    return {
        "psnr_mean": statistics.mean(p),
        "psnr_min": min(p),
        "psnr_images": len(p),
        "reconstruction_accuracy": recon_acc,
        "accuracy": float((pred == labels).float().mean()),
        "accuracy_per_class": per_class_acc,
        "generated_images": len(labels),
        "diversity_ratio_mean": statistics.mean(v[2] for v in div.values()),
        "diversity_ratio_min": min(v[2] for v in div.values()),
        "diversity_per_class": {c: [round(x, 4) for x in v] for c, v in div.items()},
        "settings": settings.__dict__,
        "_images": images,
        "_labels": labels,
    }
