"""Samplers for the flow-matching generators, following the spec's time convention.

Time runs from t = 1 (noise) to t = 0 (data); the linear path is x_t = (1 - t) x_0 + t eps and
the model predicts v = eps - x_0. The state is kept in float64 as in the reference samplers;
the model sees its own dtype.

Classifier-free guidance runs the conditional and null inputs as one batch of 2B, and only
while t_cur is inside the guidance interval; outside it the null branch is skipped.

``on_step(step, steps, x, x0)`` (optional) is called after each step with the state of the
rows still sampled. It returns None to go on, or the indices of the rows to keep: the others
leave the loop at once (a caller that gave up on them), the rest continue unchanged (every
sample has its own noise and guidance scale), and the result holds only the kept rows.
``x0`` is a zero-argument callable giving the loop's current estimate of the data x_0 for
those rows (``x0_from_velocity`` of the step's last velocity evaluation); it computes only
when called and only until on_step returns, so a callback that ignores it (or calls it once
in a while, as the service's previews do) costs nothing more. The call is the only cost when
it returns None, so a cheap callback does not slow the loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial

import torch

SAMPLERS = ("euler", "heun", "euler-maruyama")

# Sampling settings when nothing else names them (the service's /generate defaults). A
# generator's config.json may name its own in a "sampling" block (``sampling_settings``).
DEFAULT_SETTINGS = {
    "steps": 50,
    "sampler": "euler",
    "cfg_scale": 1.0,
    "guidance_interval": [0.0, 1.0],
}


def sampling_settings(raw) -> dict:
    """A config.json "sampling" block (None or a dict naming any of DEFAULT_SETTINGS' keys),
    checked, completed with DEFAULT_SETTINGS; ValueError when malformed."""
    raw = {} if raw is None else raw
    bad = ValueError(
        '"sampling" must be an object with steps (int >= 1), sampler (one of'
        f" {list(SAMPLERS)}), cfg_scale (>= 0) and guidance_interval ([lo, hi] in [0, 1]),"
        f" each optional; got {raw!r}"
    )
    if not isinstance(raw, dict) or set(raw) - set(DEFAULT_SETTINGS):
        raise bad
    out = {**DEFAULT_SETTINGS, **raw}
    steps, sampler, cfg, gi = (out[k] for k in DEFAULT_SETTINGS)
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
    if not (
        isinstance(steps, int)
        and not isinstance(steps, bool)
        and steps >= 1
        and sampler in SAMPLERS
        and number(cfg)
        and cfg >= 0
        and isinstance(gi, (list, tuple))
        and len(gi) == 2
        and all(number(v) for v in gi)
        and 0 <= gi[0] <= gi[1] <= 1
    ):
        raise bad
    return {
        "steps": steps,
        "sampler": sampler,
        "cfg_scale": float(cfg),
        "guidance_interval": [float(v) for v in gi],
    }


PATHS = ("linear", "cosine")

# on_step(step, steps, x, x0) -> None (go on) or indices of the rows of x to keep; x0() is
# the current estimate of the data for the rows of x.
StepCallback = Callable[
    [int, int, torch.Tensor, Callable[[], torch.Tensor]], "Sequence[int] | torch.Tensor | None"
]


def path_coefficients(t: torch.Tensor, path: str):
    """alpha_t, d alpha/dt, sigma_t, d sigma/dt for x_t = alpha_t x_0 + sigma_t eps."""
    if path == "linear":
        return 1 - t, -torch.ones_like(t), t, torch.ones_like(t)
    if path == "cosine":
        h = math.pi / 2
        return torch.cos(h * t), -h * torch.sin(h * t), torch.sin(h * t), h * torch.cos(h * t)
    raise ValueError(f"unknown path {path!r}; expected one of {PATHS}")


def score_from_velocity(
    v: torch.Tensor, x: torch.Tensor, t: torch.Tensor, path: str
) -> torch.Tensor:
    """Score of p_t from the velocity; for the linear path (-(1 - t) v - x) / t."""
    t = t.reshape(-1, *([1] * (x.ndim - 1)))
    alpha, d_alpha, sigma, d_sigma = path_coefficients(t, path)
    ratio = alpha / d_alpha
    var = sigma**2 - ratio * d_sigma * sigma
    return (ratio * v - x) / var


def x0_from_velocity(v: torch.Tensor, x: torch.Tensor, t, path: str) -> torch.Tensor:
    """The data x_0 implied by the velocity v at (x, t): with x = alpha x_0 + sigma eps and
    v = d_alpha x_0 + d_sigma eps, eliminating eps gives
    x_0 = (sigma v - d_sigma x) / (sigma d_alpha - d_sigma alpha); for the linear path
    x - t v (an Euler jump to t = 0), for the cosine path the denominator is -pi/2."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    t = t.reshape(-1, *([1] * (x.ndim - 1))) if t.ndim else t
    alpha, d_alpha, sigma, d_sigma = path_coefficients(t, path)
    return (sigma * v - d_sigma * x) / (sigma * d_alpha - d_sigma * alpha)


def _randn_like(x: torch.Tensor, generators: Sequence[torch.Generator] | None) -> torch.Tensor:
    """Noise for each sample from its own generator, so a sample's randomness does not depend
    on its batch. Generators may live on the CPU; the noise is moved to x's device."""
    if generators is None:
        return torch.randn_like(x)
    if len(generators) != x.shape[0]:
        raise ValueError(f"{len(generators)} generators for a batch of {x.shape[0]}")
    draws = [
        torch.randn(x.shape[1:], generator=g, dtype=x.dtype, device=g.device) for g in generators
    ]
    return torch.stack(draws).to(x.device)


class GuidedVelocity:
    """The velocity (or SDE drift) with guidance applied per sample.

    ``cfg_scale`` may be a float or a (B,) tensor so requests with different scales can share
    a batch; samples whose scale is <= 1 never run the null branch.
    """

    def __init__(self, model, labels: torch.Tensor, cfg_scale, interval: tuple[float, float]):
        self.model = model
        self.labels = labels
        B = labels.shape[0]
        scale = torch.as_tensor(cfg_scale, dtype=torch.float64, device=labels.device)
        self.scale = scale.expand(B) if scale.ndim == 0 else scale
        if self.scale.shape != (B,):
            raise ValueError(f"cfg_scale must be a float or have shape ({B},)")
        self.guided = self.scale > 1.0  # (B,) which samples use guidance at all
        self.any_guided = bool(self.guided.any())
        self.lo, self.hi = interval
        self.null = torch.full_like(labels, model.num_classes)
        # The model's output and guided rows of the last transformed call (the SDE's): its
        # guided plain velocity is computed from them only if asked for (``last_velocity``).
        self._last: tuple[torch.Tensor, int, torch.Tensor | None] | None = None

    def subset(self, keep: torch.Tensor) -> GuidedVelocity:
        """The same guidance for the rows ``keep`` only."""
        return GuidedVelocity(self.model, self.labels[keep], self.scale[keep], (self.lo, self.hi))

    def use_guidance(self, t_cur: float) -> bool:
        return self.any_guided and self.lo <= t_cur <= self.hi

    def __call__(self, x: torch.Tensor, t_model: float, t_guide: float, transform=None):
        """x (B, ...) float64 -> guided output (B, ...) float64.

        ``t_model`` is the time fed to the model; ``t_guide`` decides whether guidance is on
        (the reference checks t_cur also for Heun's second evaluation). ``transform(v, x, t)``
        turns a velocity into what is guided (the SDE's drift); identity by default.
        """
        dtype = self.model.dtype
        guide = self.use_guidance(t_guide)
        idx = self.guided.nonzero().squeeze(1) if guide else None
        if guide:
            # Only the guided samples get a null-branch row: one forward of B + B_guided.
            model_x = torch.cat([x, x[idx]])
            model_y = torch.cat([self.labels, self.null[idx]])
        else:
            model_x, model_y = x, self.labels
        t = torch.full((model_x.shape[0],), t_model, dtype=torch.float64, device=x.device)
        v = self.model(model_x.to(dtype), t.to(dtype), model_y).to(torch.float64)
        if transform is not None:
            self._last = (v, x.shape[0], idx)
            v = transform(v, model_x, t)
        return self._guide(v, x.shape[0], idx)

    def _guide(self, v: torch.Tensor, B: int, idx: torch.Tensor | None) -> torch.Tensor:
        """Rows 0..B of the model's output, the guided ones (idx) combined with their null
        rows B.. ."""
        out = v[:B]
        if idx is not None:
            cond, uncond = out[idx], v[B:]
            s = self.scale[idx].reshape(-1, *([1] * (v.ndim - 1)))
            out = out.clone()
            out[idx] = uncond + s * (cond - uncond)
        return out

    def last_velocity(self) -> torch.Tensor:
        """The guided velocity (not its transform) of the last transformed call."""
        v, B, idx = self._last
        return self._guide(v, B, idx)


def check_sampling_inputs(gen, noise, labels, steps, sampler, path) -> None:
    """Raise ValueError for anything sample() cannot honour; nothing is broadcast."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
    path_coefficients(torch.zeros(1), path)  # validates the path name
    if not 1 <= int(steps):
        raise ValueError("steps must be >= 1")
    if labels.shape != (noise.shape[0],):
        raise ValueError(f"labels must have shape ({noise.shape[0]},), got {tuple(labels.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= gen.num_classes):
        raise ValueError(f"class ids must be in [0, {gen.num_classes}), got {labels.tolist()}")


@torch.no_grad()
def sample(
    gen,
    noise: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
    sampler: str = "euler",
    cfg_scale: float | torch.Tensor = 1.0,
    guidance_interval: tuple[float, float] = (0.0, 1.0),
    path: str = "linear",
    generators: Sequence[torch.Generator] | None = None,
    t_start: float = 1.0,
    on_step: StepCallback | None = None,
) -> torch.Tensor:
    """Integrate from noise (t = 1) to data (t = 0).

    noise (B, L, D) (or (B, C, H, W) for a 2-D model), labels (B,) -> normalised latents of
    noise's shape, in noise's dtype. ``generators`` (one per sample) drive the SDE's noise.
    ``t_start`` < 1 (ODE samplers only): ``noise`` is a partly noised x_t at that time (the
    evaluation's diagnostic of which noise levels a generator can undo).
    ``on_step``: see the module docstring; rows it drops are missing from the result.
    """
    check_sampling_inputs(gen, noise, labels, steps, sampler, path)
    if t_start != 1.0 and (sampler == "euler-maruyama" or not 0.0 < t_start < 1.0):
        raise ValueError("t_start must be in (0, 1] and needs an ODE sampler (euler, heun)")
    velocity = GuidedVelocity(gen, labels, cfg_scale, guidance_interval)
    x = noise.to(torch.float64)
    if sampler == "euler-maruyama":
        x = _euler_maruyama(velocity, x, steps, path, generators, on_step)
    else:
        x = _ode(
            velocity, x, steps, heun=sampler == "heun", t_start=t_start, on_step=on_step, path=path
        )
    return x.to(noise.dtype)


def _estimate(v, x: torch.Tensor, t: float, path: str) -> torch.Tensor:
    return x0_from_velocity(v() if callable(v) else v, x, t, path)


class _Rows:
    """The loop's per-row state, narrowed when ``on_step`` drops rows."""

    def __init__(
        self, velocity: GuidedVelocity, generators, on_step: StepCallback | None, path: str
    ):
        self.velocity, self.generators, self.on_step = velocity, generators, on_step
        self.path = path

    def after(self, step: int, steps: int, x: torch.Tensor, x_at, v_at, t_at) -> torch.Tensor:
        """After a step to ``x``: tell on_step, whose x0 estimate comes from the velocity
        ``v_at`` (a tensor, or a callable giving it) evaluated at (``x_at``, ``t_at``)."""
        if self.on_step is None:
            return x
        keep = self.on_step(step, steps, x, partial(_estimate, v_at, x_at, t_at, self.path))
        if keep is None:
            return x
        keep = torch.as_tensor(keep, dtype=torch.long).reshape(-1)
        self.velocity = self.velocity.subset(keep.to(self.velocity.labels.device))
        if self.generators is not None:
            self.generators = [self.generators[i] for i in keep.tolist()]
        return x[keep.to(x.device)]


def _ode(
    velocity: GuidedVelocity,
    x: torch.Tensor,
    steps: int,
    heun: bool,
    t_start: float = 1.0,
    on_step: StepCallback | None = None,
    path: str = "linear",
) -> torch.Tensor:
    rows = _Rows(velocity, None, on_step, path)
    grid = torch.linspace(t_start, 0, steps + 1, dtype=torch.float64).tolist()
    for i, (t_cur, t_next) in enumerate(zip(grid[:-1], grid[1:])):
        if x.shape[0] == 0:
            break  # every row was dropped
        d_cur = rows.velocity(x, t_cur, t_cur)
        x_next = x + (t_next - t_cur) * d_cur
        if heun and i < steps - 1:
            d_prime = rows.velocity(x_next, t_next, t_cur)
            x_new = x + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
            # the estimate from the newest evaluation: at (x_next, t_next)
            x = rows.after(i + 1, steps, x_new, x_next, d_prime, t_next)
        else:
            x = rows.after(i + 1, steps, x_next, x, d_cur, t_cur)
    return x


def _euler_maruyama(
    velocity: GuidedVelocity,
    x: torch.Tensor,
    steps: int,
    path: str,
    generators: Sequence[torch.Generator] | None,
    on_step: StepCallback | None = None,
) -> torch.Tensor:
    rows = _Rows(velocity, generators, on_step, path)
    grid = torch.cat(
        [torch.linspace(1.0, 0.04, steps, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)]
    )
    grid = grid.tolist()

    def drift_at(t_cur: float):
        w = 2.0 * t_cur  # diffusion coefficient w(t) = 2t

        def drift(v, xm, t):
            return v - 0.5 * w * score_from_velocity(v, xm, t, path)

        return drift, w

    for i, (t_cur, t_next) in enumerate(zip(grid[:-2], grid[1:-1])):
        if x.shape[0] == 0:
            return x  # every row was dropped
        dt = t_next - t_cur
        drift, w = drift_at(t_cur)
        eps = _randn_like(x, rows.generators)
        d = rows.velocity(x, t_cur, t_cur, transform=drift)
        x_next = x + d * dt + math.sqrt(w) * math.sqrt(abs(dt)) * eps
        # x0 from the plain velocity (not the drift), computed only if asked for
        x = rows.after(i + 1, steps, x_next, x, rows.velocity.last_velocity, t_cur)
    if x.shape[0] == 0:
        return x
    # Last step (0.04 -> 0): the drift alone, no noise.
    t_cur, t_next = grid[-2], grid[-1]
    drift, _ = drift_at(t_cur)
    x_next = x + (t_next - t_cur) * rows.velocity(x, t_cur, t_cur, transform=drift)
    return rows.after(steps, steps, x_next, x, rows.velocity.last_velocity, t_cur)
