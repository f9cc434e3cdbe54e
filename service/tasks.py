"""The tasks the service runs, one object each: ``TASKS[name]``.

A task owns everything that differs between tokenize, decode, reconstruct and generate; the
executor (service/executor.py), the batcher (service/batcher.py), ``registry.streams()`` and
the API's gauges are generic over it:

- ``family``: the models it runs on ("tokenizer" or "generator"): ``models(registry)``,
  ``entry(registry, name)``;
- ``validate(job, registry)``: the payload checks, per job, before anything is batched;
- ``cost(job)``: batch slots a job takes (a guided generate item counts twice: its null
  branch doubles the forward);
- ``key(job)``: jobs batch together only when their keys are equal;
- ``policy(settings, model)``: ``max_batch_size`` and ``max_wait_ms`` of its batches
  (``SOFTVQ_BATCH_POLICY`` per task or per model and task, the global settings otherwise);
- ``collate(jobs)`` -> the batch's inputs; ``run(registry, model, inputs)`` -> outputs over
  the batch (numpy, first axis = items); ``split(jobs, outputs)`` -> one result per job;
- ``record(registry, model, items)``: its throughput counters.

Images travel as uint8 (n, 3, S, S) pixels, 1/4 of the bytes of float32 (service/codec.py
decodes them in the API); ``unit_range`` maps them to [-1, 1] here, so the same code runs
embedded and in Redis workers. float32 images in [-1, 1] (jobs queued by an API of before
this change) are still accepted. Tokens travel as float32.

Adding a task (or a model family) is a subclass and an entry in ``TASKS``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from model.images import psnr, tensor_to_uint8
from model.pipeline import sample_latents
from model.sampling import PATHS, SAMPLERS

from . import metrics
from .jobs import InvalidJob, Job
from .progress import BatchProgress

# --- batching policy --------------------------------------------------------------------


@dataclass(frozen=True)
class BatchPolicy:
    """How one (model, task) group batches: it runs once it holds ``max_batch_size`` slots
    or its oldest job has waited ``max_wait_ms``."""

    max_batch_size: int
    max_wait_ms: float

    @property
    def max_wait_s(self) -> float:
        return self.max_wait_ms / 1000.0


def resolve_policy(settings, model: str, task: str) -> BatchPolicy:
    """The global ``max_batch_size`` / ``max_wait_ms``, overridden field by field by
    ``batch_policy[task]`` and then by ``batch_policy["model/task"]``."""
    size, wait = settings.max_batch_size, settings.max_wait_ms
    overrides = getattr(settings, "batch_policy", None) or {}
    for key in (task, f"{model}/{task}"):
        o = overrides.get(key)
        if o is None:
            continue
        if o.max_batch_size is not None:
            size = o.max_batch_size
        if o.max_wait_ms is not None:
            wait = o.max_wait_ms
    return BatchPolicy(int(size), float(wait))


def largest_batch(settings) -> int:
    """The largest ``max_batch_size`` of any policy (for bounds on jobs held)."""
    sizes = [o.max_batch_size for o in (getattr(settings, "batch_policy", None) or {}).values()]
    return max([settings.max_batch_size, *[s for s in sizes if s is not None]])


def params_key(job: Job) -> str:
    return json.dumps(job.params, sort_keys=True)


# --- the tasks ------------------------------------------------------------------------------


class Task:
    name: ClassVar[str]
    family: ClassVar[str]  # "tokenizer" | "generator": which registry models it runs on
    images_per_item: ClassVar[int] = 1  # softvq_images_processed_total per item

    # -- models
    def models(self, registry) -> list[str]:
        raise NotImplementedError

    def entry(self, registry, model: str):
        raise NotImplementedError

    # -- batching
    def cost(self, job: Job) -> int:
        return job.size

    def key(self, job: Job) -> tuple[str, str, str]:
        return job.model, job.task, params_key(job)

    def policy(self, settings, model: str) -> BatchPolicy:
        return resolve_policy(settings, model, self.name)

    # -- running
    def validate(self, job: Job, registry) -> None:
        raise NotImplementedError

    def collate(self, jobs: list[Job]) -> Any:
        raise NotImplementedError

    def run(self, registry, model: str, inputs: Any) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def run_tracked(
        self, registry, model: str, inputs: Any, progress: BatchProgress | None
    ) -> dict[str, np.ndarray]:
        """``run`` with a batch's progress: a task with a step loop (generate) reports its
        steps to it and drops the rows of jobs cancelled meanwhile (their outputs are
        zeros). Other tasks take a moment and ignore it."""
        return self.run(registry, model, inputs)

    def split(self, jobs: list[Job], outputs: dict[str, np.ndarray]) -> list[dict]:
        results, start = [], 0
        for job in jobs:
            end = start + job.size
            results.append({k: v[start:end] for k, v in outputs.items()})
            start = end
        return results

    def record(self, registry, model: str, items: int) -> None:
        labels = {"model": model, "task": self.name}
        metrics.IMAGES.labels(**labels).inc(items * self.images_per_item)
        metrics.TOKENS.labels(**labels).inc(items * self.entry(registry, model).num_tokens)


class TokenizerTask(Task):
    family = "tokenizer"

    def models(self, registry) -> list[str]:
        return list(registry.tokenizers)

    def entry(self, registry, model: str):
        return registry.tokenizer(model)


class GeneratorTask(Task):
    family = "generator"

    def models(self, registry) -> list[str]:
        return list(registry.generators)

    def entry(self, registry, model: str):
        return registry.generator(model)


class ImageTask(TokenizerTask):
    """Images in: uint8 (n, 3, S, S) pixels (or float32 in [-1, 1])."""

    def validate(self, job: Job, registry) -> None:
        S = registry.tokenizer(job.model).image_size
        check_images(job.payload.get("images"), (job.size, 3, S, S))

    def collate(self, jobs: list[Job]) -> torch.Tensor:
        return torch.cat([unit_range(j.payload["images"]) for j in jobs])


class Tokenize(ImageTask):
    name = "tokenize"

    def run(
        self, registry, model: str, images: torch.Tensor, progress=None
    ) -> dict[str, np.ndarray]:
        tokens, indices = registry.tokenizer(model).runner.encode(images)
        return {
            "tokens": tokens.float().cpu().numpy(),
            "indices": indices.to(torch.int64).cpu().numpy(),
        }


class Reconstruct(ImageTask):
    name = "reconstruct"
    images_per_item = 2  # encoded and decoded

    def run(
        self, registry, model: str, images: torch.Tensor, progress=None
    ) -> dict[str, np.ndarray]:
        runner = registry.tokenizer(model).runner
        tokens, _ = runner.encode(images)
        rec = runner.decode(tokens).float().cpu()
        return {
            "images": tensor_to_uint8(rec),
            "psnr": np.asarray(psnr(rec, images.float()), dtype=np.float64),
        }

    def split(self, jobs: list[Job], outputs: dict[str, np.ndarray]) -> list[dict]:
        results = super().split(jobs, outputs)
        for r in results:
            r["psnr"] = [float(x) for x in r["psnr"]]
        return results


class Decode(TokenizerTask):
    name = "decode"

    def validate(self, job: Job, registry) -> None:
        t = registry.tokenizer(job.model)
        tokens = check_array(
            job.payload.get("tokens"), "tokens", (job.size, t.num_tokens, t.token_dim)
        )
        if not np.isfinite(tokens).all():
            raise InvalidJob("tokens hold NaN or Inf")

    def collate(self, jobs: list[Job]) -> torch.Tensor:
        return torch.from_numpy(np.concatenate([j.payload["tokens"] for j in jobs]))

    def run(
        self, registry, model: str, tokens: torch.Tensor, progress=None
    ) -> dict[str, np.ndarray]:
        return {"images": tensor_to_uint8(registry.tokenizer(model).runner.decode(tokens))}


@dataclass
class GenerateInputs:
    labels: list[int]
    seeds: list[int]
    cfg_scale: torch.Tensor  # (items,) float64, per sample
    params: dict[str, Any]
    jobs: list[Job]  # whose rows these are, in order


class Generate(GeneratorTask):
    name = "generate"

    @staticmethod
    def guided(job: Job) -> bool:
        return float(job.payload.get("cfg_scale", 1.0)) > 1.0

    def cost(self, job: Job) -> int:
        return job.size * (2 if self.guided(job) else 1)

    def validate(self, job: Job, registry) -> None:
        p, n = job.payload, job.size
        g = registry.generator(job.model)
        max_steps = getattr(registry.settings, "max_steps", 1000)
        labels, seeds = p.get("labels"), p.get("seeds")
        if not (_int_list(labels, n) and _int_list(seeds, n)):
            raise InvalidJob(f"labels and seeds must be {n} integers each")
        if any(not 0 <= s < 2**63 for s in seeds):
            raise InvalidJob("seeds must lie in [0, 2**63)")  # torch.Generator's range
        if any(not 0 <= y < g.num_classes for y in labels):
            raise InvalidJob(f"class ids must be in [0, {g.num_classes}), got {labels}")
        cfg = p.get("cfg_scale", 1.0)
        if not isinstance(cfg, (int, float)) or not np.isfinite(cfg):
            raise InvalidJob("cfg_scale must be a finite number")
        q = job.params
        if not (isinstance(q.get("steps"), int) and 1 <= q["steps"] <= max_steps):
            raise InvalidJob(f"steps must be an integer in [1, {max_steps}]")
        if q.get("sampler", "euler") not in SAMPLERS:
            raise InvalidJob(f"unknown sampler {q.get('sampler')!r}; expected one of {SAMPLERS}")
        if q.get("path", "linear") not in PATHS:
            raise InvalidJob(f"unknown path {q.get('path')!r}")
        lo, hi = q.get("guidance_interval", (0.0, 1.0))
        if not (0.0 <= float(lo) <= float(hi) <= 1.0):
            raise InvalidJob("guidance_interval must be [lo, hi] with 0 <= lo <= hi <= 1")

    def collate(self, jobs: list[Job]) -> GenerateInputs:
        # Per-sample guidance scale: jobs with different cfg_scale share the batch (only the
        # guided samples run a null branch).
        cfg = [float(j.payload.get("cfg_scale", 1.0)) for j in jobs for _ in range(j.size)]
        return GenerateInputs(
            labels=[y for j in jobs for y in j.payload["labels"]],
            seeds=[s for j in jobs for s in j.payload["seeds"]],
            cfg_scale=torch.tensor(cfg, dtype=torch.float64),
            params=jobs[0].params,
            jobs=jobs,
        )

    def run(self, registry, model: str, inputs: GenerateInputs) -> dict[str, np.ndarray]:
        return self.run_tracked(registry, model, inputs, None)

    def run_tracked(
        self, registry, model: str, inputs: GenerateInputs, progress: BatchProgress | None
    ) -> dict[str, np.ndarray]:
        gen = registry.generator(model)
        decoder = registry.latent_decoder(gen.tokenizer)  # a SoftVQ tokenizer or an SD-VAE
        q = inputs.params
        lo, hi = q.get("guidance_interval", (0.0, 1.0))

        def decode(z: torch.Tensor) -> torch.Tensor:
            return decoder.runner.decode(z.float() * decoder.vq_std + decoder.vq_mean).float()

        if progress is not None:
            progress.decode = decode  # previews of the x0 estimate (service/progress.py)
        z = sample_latents(
            gen.runner,
            inputs.labels,
            inputs.seeds,
            steps=int(q["steps"]),
            sampler=q.get("sampler", "euler"),
            cfg_scale=inputs.cfg_scale,
            guidance_interval=(float(lo), float(hi)),
            path=q.get("path", "linear"),
            cuda_graphs=registry.settings.cuda_graphs,
            on_step=progress.on_step if progress is not None else None,
        )
        S = gen.image_size
        out = np.zeros((len(inputs.labels), S, S, 3), dtype=np.uint8)
        if z.shape[0]:  # rows of cancelled jobs left the loop: their images stay zero
            images = decode(z)
            rows = progress.kept_rows(inputs.jobs) if progress is not None else slice(None)
            out[rows] = tensor_to_uint8(images)
        return {"images": out}


TASKS: dict[str, Task] = {t.name: t for t in (Tokenize(), Decode(), Reconstruct(), Generate())}


# --- what the batcher asks of any job -----------------------------------------------------


def job_cost(job: Job) -> int:
    """Batch slots a job takes: its items, twice over when guidance adds a null branch."""
    task = TASKS.get(job.task)
    return task.cost(job) if task is not None else job.size


def group_key(job: Job) -> tuple[str, str, str]:
    """Jobs batch together only when model, task and params are equal."""
    task = TASKS.get(job.task)
    return task.key(job) if task is not None else (job.model, job.task, params_key(job))


def guided(job: Job) -> bool:
    return job.task == Generate.name and Generate.guided(job)


# --- payload checks and conversion ----------------------------------------------------------


def check_array(x, name: str, shape: tuple[int, ...], dtypes=(np.float32,)) -> np.ndarray:
    if not isinstance(x, np.ndarray) or x.dtype not in dtypes:
        kinds = " or ".join(np.dtype(d).name for d in dtypes)
        raise InvalidJob(f"{name} must be a {kinds} array")
    if x.shape != shape:
        raise InvalidJob(f"{name} must have shape {list(shape)}, got {list(x.shape)}")
    return x


def check_images(x, shape: tuple[int, ...]) -> np.ndarray:
    """uint8 pixels, or float32 in [-1, 1] (finite) from an API of before uint8 payloads."""
    images = check_array(x, "images", shape, dtypes=(np.uint8, np.float32))
    if images.dtype == np.float32 and not np.isfinite(images).all():
        raise InvalidJob("images hold NaN or Inf")
    return images


def unit_range(images: np.ndarray) -> torch.Tensor:
    """uint8 pixels -> float32 in [-1, 1], exactly as model.images.pil_to_tensor maps them;
    float32 passes through."""
    x = torch.from_numpy(images)
    if x.dtype == torch.uint8:
        return x.to(torch.float32).div_(127.5).sub_(1.0)
    return x


def _int_list(x, n: int) -> bool:
    return (
        isinstance(x, list)
        and len(x) == n
        and all(isinstance(v, int) and not isinstance(v, bool) for v in x)
    )
