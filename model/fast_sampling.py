"""The ODE samplers with the whole step loop captured in one CUDA graph.

``model.sampling.sample`` already runs guidance as one batched forward and skips the null
branch outside the guidance interval; what it still pays on a GPU is Python and kernel
launches: a SiT-XL step is ~28 x 15 kernels, launched one by one, and at small batches the
GPU waits on the CPU. Here every step (model forward, guidance, update) of a fixed
(batch, steps, sampler, interval) is recorded once into a CUDA graph and replayed with one
call per batch.

    z = sample_graphed(runner, noise, labels, steps, cfg_scale=4.0, guidance_interval=(0, .7))

What changes against ``sample``: inside the guidance interval the graph runs the null
branch for every sample (static shapes), and samples with scale <= 1 take the conditional
velocity exactly as ``sample`` gives it; the result is the same up to floating-point
summation order. The SDE sampler (per-sample generators drawn on the host) and CPU tensors
go to ``model.sampling.sample`` unchanged.

``GraphedODESampler(..., capture=False)`` runs the very same loop without a graph: that is
how the loop's math is tested on a CPU.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from .backends.bucketing import bucket_for, pad_rows
from .sampling import check_sampling_inputs, sample

GRAPH_SAMPLERS = ("euler", "heun")
MAX_CACHED_GRAPHS = 8


class GraphedODESampler:
    """Euler / Heun from t = 1 to 0 for one batch size and step count, optionally captured.

    Static inputs: noise (B, ...), labels (B,), per-sample guidance scale (B,) float64.
    """

    def __init__(
        self,
        model,
        batch: int,
        sample_shape: tuple[int, ...],
        steps: int,
        sampler: str = "euler",
        guidance_interval: tuple[float, float] = (0.0, 1.0),
        guided: bool = False,
        capture: bool = True,
    ):
        if sampler not in GRAPH_SAMPLERS:
            raise ValueError(f"graphed sampling supports {GRAPH_SAMPLERS}, not {sampler!r}")
        dev = model.device
        self.model, self.steps, self.heun = model, int(steps), sampler == "heun"
        self.lo, self.hi = guidance_interval
        self.guided = guided
        self.noise = torch.zeros(batch, *sample_shape, dtype=torch.float64, device=dev)
        self.labels = torch.zeros(batch, dtype=torch.long, device=dev)
        self.scale = torch.ones(batch, dtype=torch.float64, device=dev)
        self.null = torch.full((batch,), model.num_classes, dtype=torch.long, device=dev)
        self.grid = torch.linspace(1, 0, self.steps + 1, dtype=torch.float64).tolist()
        self.graph = None
        self.out = None
        if capture:
            self._capture()

    def _velocity(self, x: torch.Tensor, t_model: float, t_guide: float) -> torch.Tensor:
        """Guided velocity (B, ...) float64; the guidance decision is fixed per step."""
        B, dtype = x.shape[0], self.model.dtype
        if self.guided and self.lo <= t_guide <= self.hi:
            t = torch.full((2 * B,), t_model, dtype=dtype, device=x.device)
            v = self.model(
                torch.cat([x, x]).to(dtype), t, torch.cat([self.labels, self.null])
            ).double()
            cond, uncond = v[:B], v[B:]
            s = self.scale.reshape(-1, *([1] * (x.ndim - 1)))
            use = (self.scale > 1.0).reshape_as(s)
            return torch.where(use, uncond + s * (cond - uncond), cond)
        t = torch.full((B,), t_model, dtype=dtype, device=x.device)
        return self.model(x.to(dtype), t, self.labels).double()

    def _loop(self) -> torch.Tensor:
        """The same update as model.sampling._ode, on the static inputs."""
        x = self.noise
        for i, (t_cur, t_next) in enumerate(zip(self.grid[:-1], self.grid[1:])):
            d_cur = self._velocity(x, t_cur, t_cur)
            x_next = x + (t_next - t_cur) * d_cur
            if self.heun and i < self.steps - 1:
                d_prime = self._velocity(x_next, t_next, t_cur)
                x_next = x + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
            x = x_next
        return x

    def _capture(self) -> None:
        # Warm up on a side stream first: Triton / cuBLAS pick and compile their kernels
        # here, and nothing of that may happen during capture.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.inference_mode():
            self._loop()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.inference_mode():
            self.out = self._loop()

    @torch.inference_mode()
    def __call__(
        self, noise: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor
    ) -> torch.Tensor:
        """noise (B, ...), labels (B,), scale (B,) -> latents (B, ...) in noise's dtype."""
        self.noise.copy_(noise)
        self.labels.copy_(labels)
        self.scale.copy_(scale)
        if self.graph is None:
            return self._loop().to(noise.dtype)
        self.graph.replay()
        return self.out.to(noise.dtype)  # a copy: the next replay overwrites self.out


_cache: OrderedDict[tuple, GraphedODESampler] = OrderedDict()


@torch.no_grad()
def sample_graphed(
    gen,
    noise: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
    sampler: str = "euler",
    cfg_scale: float | torch.Tensor = 1.0,
    guidance_interval: tuple[float, float] = (0.0, 1.0),
    path: str = "linear",
    generators=None,
    on_step=None,
) -> torch.Tensor:
    """Like model.sampling.sample; on CUDA the ODE samplers replay a cached CUDA graph.

    A replayed graph runs every step in one call, so ``on_step`` is called once, after the
    last step (rows it drops are then dropped from the result; at t = 0 the state is its own
    x0 estimate).

    Graphs are cached per (model, batch, shape, steps, sampler, interval, guided), at most
    MAX_CACHED_GRAPHS of them (each holds its own memory pool).
    """
    # A `compile` runner captures its own CUDA graphs (max-autotune); graphs do not nest.
    eager = getattr(gen, "backend", "eager") == "eager"
    if not (noise.is_cuda and eager and sampler in GRAPH_SAMPLERS and torch.cuda.is_available()):
        return sample(
            gen,
            noise,
            labels,
            steps,
            sampler,
            cfg_scale,
            guidance_interval,
            path,
            generators,
            on_step=on_step,
        )
    check_sampling_inputs(gen, noise, labels, steps, sampler, path)
    n = noise.shape[0]
    scale = torch.as_tensor(cfg_scale, dtype=torch.float64, device=noise.device).expand(n)
    # A captured graph has a fixed batch: pad to the runner's bucket (null class, no
    # guidance) so one graph per bucket serves every batch size, as compiled backends do.
    buckets = getattr(gen, "buckets", None)
    B = bucket_for(n, buckets) if buckets and n <= max(buckets) else n
    if B > n:
        noise = pad_rows(noise, B - n)
        labels = pad_rows(labels, B - n, torch.tensor(gen.num_classes))
        scale = pad_rows(scale, B - n, torch.tensor(1.0, dtype=torch.float64))
    guided = bool((scale > 1.0).any())
    key = (
        id(gen),
        B,
        tuple(noise.shape[1:]),
        int(steps),
        sampler,
        tuple(guidance_interval),
        guided,
    )
    graphed = _cache.get(key)
    if graphed is None:
        graphed = GraphedODESampler(
            gen, B, tuple(noise.shape[1:]), steps, sampler, guidance_interval, guided
        )
        _cache[key] = graphed
        while len(_cache) > MAX_CACHED_GRAPHS:
            _cache.popitem(last=False)
    _cache.move_to_end(key)
    x = graphed(noise, labels, scale)[:n]
    keep = on_step(int(steps), int(steps), x, lambda: x) if on_step is not None else None
    return x if keep is None else x[torch.as_tensor(keep, dtype=torch.long, device=x.device)]
