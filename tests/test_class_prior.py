"""The class prior under the flow (model/class_prior.py) and its path through sampling."""

from __future__ import annotations

import pytest
import torch

import model
from model.class_prior import ClassPrior
from model.pipeline import sample_latents, seeded_noise

C, L, D = 3, 4, 6  # N = 24


def correlated_latents(n_per_class: int = 3000, rank: int = 3, seed: int = 0):
    """Per class: its own mean, per-element scale and a rank-``rank`` correlation + noise."""
    g = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for c in range(C):
        mean = torch.randn(L * D, generator=g) * 2
        scale = torch.rand(L * D, generator=g) + 0.5
        mix = torch.randn(L * D, rank, generator=g)
        z = torch.randn(n_per_class, rank, generator=g) @ mix.T
        z = z + 0.3 * torch.randn(n_per_class, L * D, generator=g)
        xs.append((mean + scale * z).view(n_per_class, L, D))
        ys.append(torch.full((n_per_class,), c))
    return torch.cat(xs), torch.cat(ys)


def test_whitening_is_the_inverse_of_the_map():
    latents, labels = correlated_latents()
    prior = ClassPrior(C, L, D, rank=3).fit(latents, labels)
    w = torch.randn(50, L, D)
    y = torch.arange(50) % C
    x = prior.to_latents(w, y)
    assert torch.allclose(prior.from_latents(x, y), w, atol=1e-4)
    # and the other way round, on real training latents
    back = prior.to_latents(prior.from_latents(latents[:100], labels[:100]), labels[:100])
    assert torch.allclose(back, latents[:100], atol=1e-4)


def test_samples_have_each_class_mean_and_covariance():
    """N(0, I) through the map lands on each class's own Gaussian: a wrong class index, a
    transposed basis or a missing scale would fail."""
    latents, labels = correlated_latents()
    prior = ClassPrior(C, L, D, rank=3).fit(latents, labels, shrink=0.0)
    for c in range(C):
        real = latents[labels == c].flatten(1)
        y = torch.full((4000,), c)
        fake = prior.to_latents(
            torch.randn(4000, L, D, generator=torch.Generator().manual_seed(c)), y
        )
        fake = fake.flatten(1)
        err = (fake.mean(0) - real.mean(0)).abs() / (real.std(0) / len(fake) ** 0.5)
        assert float(err.max()) < 5  # standard errors
        cov_r, cov_f = torch.cov(real.T), torch.cov(fake.T)
        assert float((cov_f - cov_r).norm() / cov_r.norm()) < 0.1, c
        other = torch.cov(latents[labels == (c + 1) % C].flatten(1).T)
        assert float((cov_f - other).norm() / other.norm()) > 0.5


def test_full_rank_prior_whitens_the_training_latents():
    latents, labels = correlated_latents()
    prior = ClassPrior(C, L, D, rank=L * D).fit(latents, labels, shrink=0.0)
    w = prior.from_latents(latents, labels)
    for c in range(C):
        cov = torch.cov(w[labels == c].flatten(1).T)
        assert torch.allclose(cov, torch.eye(L * D), atol=1e-3)


def test_bad_ranks_and_empty_classes_are_refused():
    with pytest.raises(ValueError, match="rank"):
        ClassPrior(C, L, D, rank=0)
    with pytest.raises(ValueError, match="rank"):
        ClassPrior(C, L, D, rank=L * D + 1)
    latents, labels = correlated_latents(n_per_class=10)
    with pytest.raises(ValueError, match="class 2"):
        ClassPrior(C, L, D, rank=2).fit(latents[labels < 2], labels[labels < 2])


def prior_generator(tmp_path) -> model.SiT:
    """A saved and reloaded SiT with a fitted prior whose velocity is zero (zero-init output
    layer): every sampler leaves the noise as it is, so the result is the prior's map of the
    seed's noise and nothing else."""
    latents, labels = correlated_latents()
    cfg = model.GeneratorConfig(
        input_size=L,
        in_channels=D,
        hidden_size=32,
        depth=1,
        num_heads=2,
        num_classes=C,
        prior_rank=3,
    )
    gen = model.SiT(cfg)
    gen.initialize_weights()
    gen.prior.fit(latents, labels)
    model.save_generator(gen, tmp_path / "gen")
    return model.load_generator(tmp_path / "gen")


def test_sampling_maps_through_the_saved_prior(tmp_path):
    gen = prior_generator(tmp_path)
    assert gen.config.prior_rank == 3 and float(gen.prior.sqrt_eig.max()) > 1
    labels, seeds = [0, 1, 2, 1], [5, 6, 7, 8]
    z = sample_latents(gen, labels, seeds, steps=4)
    noise, _ = seeded_noise(seeds, (L, D))
    assert torch.allclose(z, gen.prior.to_latents(noise, torch.tensor(labels)), atol=1e-5)


def test_dropped_rows_and_previews_keep_their_own_class(tmp_path):
    """on_step drops row 1 after the first step; previews (x0 estimates) and the result are
    in latent space, each row mapped with its own class."""
    gen = prior_generator(tmp_path)
    labels, seeds = [0, 1, 2, 0], [5, 6, 7, 8]
    noise, _ = seeded_noise(seeds, (L, D))
    mapped = gen.prior.to_latents(noise, torch.tensor(labels))
    previews = []

    def on_step(step, steps, x, x0=None):
        previews.append(x0())
        return [0, 2, 3] if step == 1 else None

    z = sample_latents(gen, labels, seeds, steps=3, on_step=on_step)
    assert torch.allclose(previews[0], mapped, atol=1e-5)
    assert torch.allclose(previews[1], mapped[[0, 2, 3]], atol=1e-5)
    assert torch.allclose(z, mapped[[0, 2, 3]], atol=1e-5)


@pytest.mark.parametrize("backend", ["eager", "onnx"])
def test_backend_runners_sample_through_the_prior(tmp_path, backend):
    """The service samples with a backend runner, not the module: the runner must carry the
    prior (ONNX exports only the velocity graph; the map runs in torch)."""
    from model import backends
    from tests.tiny_models import randomize

    gen = randomize(prior_generator(tmp_path), seed=3, std=0.1)
    runner = backends.make_generator_runner(gen, backend, cache_dir=tmp_path / "cache")
    assert runner.prior is gen.prior
    labels, seeds = [0, 1, 2], [1, 2, 3]
    want = sample_latents(gen, labels, seeds, steps=5, cfg_scale=2.0)
    got = sample_latents(runner, labels, seeds, steps=5, cfg_scale=2.0)
    assert torch.allclose(got, want, atol=1e-4)
    noise, _ = seeded_noise(seeds, (L, D))
    assert not torch.allclose(want, gen.prior.to_latents(noise, torch.tensor(labels)), atol=1e-2)


def test_prior_stays_float32_when_the_model_moves_to_bfloat16(tmp_path):
    gen = prior_generator(tmp_path)
    want = sample_latents(gen, [0, 2], [1, 2], steps=2)
    gen = gen.to(torch.bfloat16)
    assert gen.dtype == torch.bfloat16 and gen.prior.basis.dtype == torch.float32
    got = sample_latents(gen, [0, 2], [1, 2], steps=2)
    assert torch.allclose(got, want, atol=1e-5)  # zero velocity: only the map counts
