"""Samplers: exactness where the answer is known, batch invariance, validation."""

import math

import pytest
import torch

import model
import model.images
from tests.tiny_models import make_generator, make_tokenizer


class GaussianVelocity:
    """The exact velocity field when the data is N(mu, s^2) per coordinate (linear path).

    x_t = (1 - t) x0 + t eps, so with var_t = (1 - t)^2 s^2 + t^2:
    E[x0 | x_t] = mu + (1 - t) s^2 (x_t - (1 - t) mu) / var_t,
    E[eps | x_t] = t (x_t - (1 - t) mu) / var_t, and v = E[eps | x_t] - E[x0 | x_t].
    Samplers fed this field must turn N(0, 1) into N(mu, s^2).
    """

    num_classes = 1
    dtype = torch.float64
    device = torch.device("cpu")

    def __init__(self, mu: float, s: float):
        self.mu, self.s = mu, s

    def __call__(self, x, t, y):
        t = t.reshape(-1, *([1] * (x.ndim - 1)))
        var = (1 - t) ** 2 * self.s**2 + t**2
        centred = x - (1 - t) * self.mu
        e_x0 = self.mu + (1 - t) * self.s**2 * centred / var
        e_eps = t * centred / var
        return e_eps - e_x0


@pytest.mark.parametrize("sampler,steps", [("euler", 200), ("heun", 50), ("euler-maruyama", 250)])
def test_gaussian_target_is_reached(sampler, steps):
    mu, s = 1.5, 0.5
    field = GaussianVelocity(mu, s)
    noise = torch.randn(4000, 4, 2, generator=torch.Generator().manual_seed(0))
    gens = [torch.Generator().manual_seed(i) for i in range(noise.shape[0])]
    labels = torch.zeros(noise.shape[0], dtype=torch.long)
    out = model.sample(field, noise.double(), labels, steps, sampler=sampler, generators=gens)
    # 32000 draws: the mean's standard error is ~0.003, the std's ~0.002.
    assert out.mean().item() == pytest.approx(mu, abs=0.02)
    assert out.std().item() == pytest.approx(s, abs=0.02)


def test_sde_differs_from_ode_but_matches_in_distribution():
    field = GaussianVelocity(0.0, 2.0)
    noise = torch.randn(2000, 8, generator=torch.Generator().manual_seed(1)).double()
    labels = torch.zeros(2000, dtype=torch.long)
    gens = [torch.Generator().manual_seed(100 + i) for i in range(2000)]
    ode = model.sample(field, noise, labels, 50, sampler="heun")
    sde = model.sample(field, noise, labels, 100, sampler="euler-maruyama", generators=gens)
    # The ODE is a deterministic map (x -> 2x here); the SDE injects fresh noise.
    assert torch.allclose(ode, 2 * noise, rtol=1e-3)
    assert (sde - ode).abs().mean() > 0.1
    assert sde.std().item() == pytest.approx(2.0, rel=0.05)


def test_cosine_path_score_reduces_to_known_form():
    # For the cosine path at t, x = alpha x0 + sigma eps; check the score of a point mass at 0
    # (x0 = 0): x ~ N(0, sigma^2) so score = -x / sigma^2, and v = d_sigma * eps.
    t = torch.tensor([0.3, 0.6], dtype=torch.float64)
    x = torch.tensor([[0.7], [-0.4]], dtype=torch.float64)
    alpha, d_alpha, sigma, d_sigma = model.sampling.path_coefficients(t, "cosine")
    eps = x / sigma[:, None]
    v = d_sigma[:, None] * eps
    score = model.sampling.score_from_velocity(v, x, t, "cosine")
    assert torch.allclose(score, -x / sigma[:, None] ** 2)


@pytest.mark.parametrize("sampler", ["euler", "heun", "euler-maruyama"])
def test_batch_invariant_seeding(sampler):
    gen = make_generator(seed=3)
    seeds, labels = list(range(40, 56)), [i % 10 for i in range(16)]
    kw = dict(steps=6, sampler=sampler, cfg_scale=2.0, guidance_interval=(0.0, 0.7))
    batch = model.sample_latents(gen, labels, seeds, **kw)
    for i in (0, 7, 15):
        alone = model.sample_latents(gen, [labels[i]], [seeds[i]], **kw)
        assert torch.allclose(alone[0], batch[i], atol=1e-5), i
    again = model.sample_latents(gen, labels, seeds, **kw)
    assert torch.equal(again, batch)


def test_generate_images_are_batch_invariant():
    tok, gen = make_tokenizer(), make_generator()
    labels, seeds = [1, 2, 3, 4], [7, 8, 9, 10]
    batch = model.generate(tok, gen, labels, seeds, steps=4, cfg_scale=1.5)
    alone = model.generate(tok, gen, [3], [9], steps=4, cfg_scale=1.5)
    assert batch.shape == (4, 3, tok.image_size, tok.image_size)
    u8 = model.images.tensor_to_uint8
    assert abs(u8(batch[2:3]).astype(int) - u8(alone).astype(int)).max() <= 1


def test_per_sample_cfg_scale_equals_separate_runs():
    gen = make_generator(seed=5)
    both = model.sample_latents(gen, [1, 2], [0, 1], steps=4, cfg_scale=[1.0, 3.0])
    a = model.sample_latents(gen, [1], [0], steps=4, cfg_scale=1.0)
    b = model.sample_latents(gen, [2], [1], steps=4, cfg_scale=3.0)
    assert torch.allclose(both[0], a[0], atol=1e-5)
    assert torch.allclose(both[1], b[0], atol=1e-5)


class CountingModel:
    """Wraps a generator and counts the rows it is asked for: guidance must cost one batched
    forward of 2B inside the interval and B outside it (never the reference script's 4x)."""

    def __init__(self, gen):
        self.gen, self.rows, self.calls = gen, 0, 0
        self.num_classes, self.dtype, self.device = gen.num_classes, gen.dtype, gen.device
        self.num_tokens, self.token_dim = gen.num_tokens, gen.token_dim
        self.latent_shape = gen.latent_shape

    def __call__(self, x, t, y):
        self.rows += x.shape[0]
        self.calls += 1
        return self.gen(x, t, y)


def test_guidance_cost():
    counter = CountingModel(make_generator())
    noise = torch.randn(3, 8, 8)
    labels = torch.tensor([0, 1, 2])
    model.sample(counter, noise, labels, 10, cfg_scale=2.0, guidance_interval=(0.0, 0.5))
    # grid 1.0, 0.9, ..., 0.1: t_cur <= 0.5 on 5 of the 10 steps.
    assert counter.calls == 10
    assert counter.rows == 5 * 3 + 5 * 6


def test_validation():
    gen = make_generator()
    noise = torch.randn(2, 8, 8)
    with pytest.raises(ValueError, match="class ids"):
        model.sample(gen, noise, torch.tensor([0, 10]), 2)
    with pytest.raises(ValueError, match="class ids"):
        model.sample(gen, noise, torch.tensor([-1, 0]), 2)
    with pytest.raises(ValueError, match="sampler"):
        model.sample(gen, noise, torch.tensor([0, 1]), 2, sampler="ddim")
    with pytest.raises(ValueError, match="path"):
        model.sample(gen, noise, torch.tensor([0, 1]), 2, path="vp")
    with pytest.raises(ValueError, match="labels must have shape"):
        model.sample(gen, noise, torch.tensor([0]), 2)
    with pytest.raises(ValueError, match="steps"):
        model.sample(gen, noise, torch.tensor([0, 1]), 0)
    with pytest.raises(ValueError, match="seeds"):
        model.sample_latents(gen, [0, 1], [0], steps=2)
    with pytest.raises(ValueError, match="t_start"):
        model.sample(gen, noise, torch.tensor([0, 1]), 2, sampler="euler-maruyama", t_start=0.5)
    with pytest.raises(ValueError, match="t_start"):
        model.sample(gen, noise, torch.tensor([0, 1]), 2, t_start=0.0)


def test_partial_ode_from_t_start_is_the_tail_of_the_full_grid():
    """Euler from t_start = 0.5 in 2 steps takes exactly the last 2 of 4 steps from t = 1."""
    gen, labels = make_generator(), torch.tensor([3, 7])
    x = torch.randn(2, 8, 8, dtype=torch.float64)
    v = model.sampling.GuidedVelocity(gen, labels, 1.0, (0.0, 1.0))
    want = x
    for t_cur, t_next in ((0.5, 0.25), (0.25, 0.0)):
        want = want + (t_next - t_cur) * v(want, t_cur, t_cur)
    got = model.sample(gen, x, labels, 2, t_start=0.5)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_time_embedding_uses_raw_t():
    gen = make_generator()
    f = gen.t_embedder.frequency_features(torch.tensor([0.5]))
    k = torch.arange(128, dtype=torch.float32)
    freqs = torch.exp(-math.log(10000) * k / 128)
    assert torch.allclose(f[0, :128], torch.cos(0.5 * freqs))
    assert torch.allclose(f[0, 128:], torch.sin(0.5 * freqs))


@pytest.mark.parametrize("sampler", ["euler", "heun", "euler-maruyama"])
def test_on_step_reports_every_step_and_dropped_rows_leave_the_loop(sampler):
    """on_step sees steps 1..N; rows it drops stop costing forwards at once, and the rows
    kept come out as they would have without the drop (per-sample noise and guidance)."""
    gen = make_generator(seed=3)
    counter = CountingModel(gen)
    labels, seeds, cfg = [1, 2, 3], [10, 11, 12], [1.0, 3.0, 2.0]
    full = model.sample_latents(counter, labels, seeds, steps=6, sampler=sampler, cfg_scale=cfg)
    rows_full = counter.rows
    seen = []

    def on_step(step, steps, x, x0):
        seen.append((step, steps, x.shape[0]))
        return [0, 2] if step == 2 else None  # drop the middle sample after step 2

    counter.rows = 0
    kept = model.sample_latents(
        counter, labels, seeds, steps=6, sampler=sampler, cfg_scale=cfg, on_step=on_step
    )
    assert [s for s, _, _ in seen] == list(range(1, 7))
    assert all(n == 6 for _, n, _ in seen)
    assert [b for _, _, b in seen] == [3, 3, 2, 2, 2, 2]
    assert kept.shape[0] == 2
    assert counter.rows < rows_full  # the dropped row cost nothing after step 2
    assert torch.allclose(kept, full[[0, 2]], atol=1e-5)

    def drop_all(step, steps, x, x0):
        return [] if step == 1 else None

    assert model.sample_latents(gen, labels, seeds, steps=6, on_step=drop_all).shape[0] == 0


class PointMassVelocity:
    """The exact velocity when all the data is one point x0 (every row, conditional or null,
    the same): eps = (x - alpha x0) / sigma and v = d_alpha x0 + d_sigma eps, for the linear
    or the cosine path."""

    num_classes = 2
    dtype = torch.float64
    device = torch.device("cpu")

    def __init__(self, x0: torch.Tensor, path: str):
        self.x0, self.path = x0, path

    def __call__(self, x, t, y):
        t = t.reshape(-1, *([1] * (x.ndim - 1)))
        alpha, d_alpha, sigma, d_sigma = model.sampling.path_coefficients(t, self.path)
        return d_alpha * self.x0 + d_sigma * (x - alpha * self.x0) / sigma


@pytest.mark.parametrize("path", ["linear", "cosine"])
@pytest.mark.parametrize("sampler", ["euler", "heun", "euler-maruyama"])
def test_x0_estimate_is_exact_for_an_exact_velocity(sampler, path):
    """With the true velocity of a point mass at x0, the estimate on_step is given equals x0
    at every step (guidance included: both branches agree), for either path; the SDE's is
    the velocity's estimate, not the drift's."""
    target = torch.randn(1, 4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    field = PointMassVelocity(target, path)
    noise = torch.randn(3, 4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    estimates = []

    def on_step(step, steps, x, x0):
        estimates.append(x0())

    model.sample(
        field,
        noise,
        torch.tensor([0, 1, 0]),
        8,
        sampler=sampler,
        cfg_scale=torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64),
        path=path,
        generators=gens,
        on_step=on_step,
    )
    assert len(estimates) == 8
    for est in estimates:
        torch.testing.assert_close(est, target.expand(3, 4, 2), rtol=1e-9, atol=1e-9)


def test_x0_from_velocity_matches_the_linear_form_and_is_lazy():
    x = torch.randn(2, 3, dtype=torch.float64)
    v = torch.randn(2, 3, dtype=torch.float64)
    t = torch.tensor([0.3, 0.8], dtype=torch.float64)
    got = model.sampling.x0_from_velocity(v, x, t, "linear")
    torch.testing.assert_close(got, x - t[:, None] * v)
    # an estimate nobody asks for is never computed: the loop's cost is the forwards alone
    counter = CountingModel(make_generator())
    model.sample(counter, torch.randn(2, 8, 8), torch.tensor([0, 1]), 4, on_step=lambda *a: None)
    assert counter.calls == 4
