"""Runs one batch of jobs on the models: the only place the service touches tensors.

A batch (built by service/batcher.py) holds jobs of one model, task and params. The executor
checks each job's payload, concatenates the payloads, runs the model through its
model.backends runner (which pads to a batch bucket when its backend needs fixed shapes), and
slices the outputs back per job.

Failures stay as small as possible:
- a job whose payload is malformed fails alone with InvalidJob before the batch runs;
- out of memory (CUDA, or a CPU MemoryError / "out of memory" RuntimeError): the batch is
  split in half and each half retried, down to single jobs;
- any other error of a multi-job batch: split the same way, so a poisoned job ends up alone
  and fails alone (ValueError from the model -> InvalidJob, else ``ModelCrashed``, which the
  batcher may retry up to ``max_attempts``) while the rest of the batch completes.

    outcomes = Executor(registry).run(jobs)   # one dict or JobError per job, in order
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from model.images import psnr, tensor_to_uint8
from model.pipeline import sample_latents
from model.sampling import PATHS, SAMPLERS

from . import metrics
from .jobs import InvalidJob, Job, JobError, JobFailed

log = logging.getLogger(__name__)


class ModelCrashed(JobFailed):
    """The model raised on this job alone; worth another attempt (it may be transient)."""


class OutOfMemory(JobFailed):
    """Even a single job does not fit in memory."""


# How allocation failures read: CUDA / MPS ("out of memory") and PyTorch's CPU allocator
# ("DefaultCPUAllocator: can't allocate memory", older builds "not enough memory").
OOM_MESSAGES = ("out of memory", "can't allocate memory", "not enough memory")


def is_oom(e: BaseException) -> bool:
    if isinstance(e, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(e, RuntimeError) and any(m in str(e).lower() for m in OOM_MESSAGES)


def guided(job: Job) -> bool:
    return job.task == "generate" and float(job.payload.get("cfg_scale", 1.0)) > 1.0


def job_cost(job: Job) -> int:
    """Batch slots a job takes: its items, twice over when guidance adds a null branch."""
    return job.size * (2 if guided(job) else 1)


class Executor:
    def __init__(self, registry):
        self.registry = registry
        self.max_steps = getattr(registry.settings, "max_steps", 1000)

    # --- entry point --------------------------------------------------------------------
    def run(self, jobs: list[Job]) -> list[dict | JobError]:
        """Jobs of one (model, task, params) -> one outcome per job, in order. Never raises."""
        outcomes: list[dict | JobError | None] = [None] * len(jobs)
        valid = []
        for i, job in enumerate(jobs):
            try:
                self.validate(job)
                valid.append(i)
            except (InvalidJob, ValueError, KeyError, TypeError) as e:
                outcomes[i] = e if isinstance(e, InvalidJob) else InvalidJob(_message(e))
        if valid:
            with self.registry.lock:
                done = self._run_split([jobs[i] for i in valid])
            for i, out in zip(valid, done, strict=True):
                outcomes[i] = out
        return outcomes

    def _run_split(self, jobs: list[Job]) -> list[dict | JobError]:
        try:
            return self.compute(jobs)
        except Exception as e:  # noqa: BLE001 - every failure is mapped to the jobs it hit
            oom = is_oom(e)
            if len(jobs) == 1:
                job = jobs[0]
                if oom:
                    return [OutOfMemory(f"out of memory on a batch of {job.size} item(s)")]
                if isinstance(e, ValueError):
                    return [InvalidJob(_message(e))]
                log.exception("job %s (%s/%s) crashed the model", job.id, job.model, job.task)
                return [ModelCrashed(f"model error: {_message(e)}")]
            log.warning(
                "%s on a batch of %d jobs; splitting it in half",
                "out of memory" if oom else f"{type(e).__name__}",
                len(jobs),
            )
        # The halves run outside the except block: until it ends, the exception's traceback
        # keeps the failed attempt's frames -- and their tensors -- alive, and the halves
        # would run out of the very memory the split is meant to free.
        if oom and torch.cuda.is_available():
            torch.cuda.empty_cache()
        half = len(jobs) // 2
        return self._run_split(jobs[:half]) + self._run_split(jobs[half:])

    # --- validation (per job, before anything is batched) ----------------------------------
    def validate(self, job: Job) -> None:
        p, n = job.payload, job.size
        if not isinstance(p.get("n"), int) or n < 1:
            raise InvalidJob("payload 'n' must be a positive integer")
        if job.task in ("tokenize", "reconstruct"):
            S = self.registry.tokenizer(job.model).image_size
            images = _check_array(p.get("images"), "images", (n, 3, S, S))
            if not np.isfinite(images).all():
                raise InvalidJob("images hold NaN or Inf")
        elif job.task == "decode":
            t = self.registry.tokenizer(job.model)
            tokens = _check_array(p.get("tokens"), "tokens", (n, t.num_tokens, t.token_dim))
            if not np.isfinite(tokens).all():
                raise InvalidJob("tokens hold NaN or Inf")
        elif job.task == "generate":
            g = self.registry.generator(job.model)
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
            if not (isinstance(q.get("steps"), int) and 1 <= q["steps"] <= self.max_steps):
                raise InvalidJob(f"steps must be an integer in [1, {self.max_steps}]")
            if q.get("sampler", "euler") not in SAMPLERS:
                raise InvalidJob(
                    f"unknown sampler {q.get('sampler')!r}; expected one of {SAMPLERS}"
                )
            if q.get("path", "linear") not in PATHS:
                raise InvalidJob(f"unknown path {q.get('path')!r}")
            lo, hi = q.get("guidance_interval", (0.0, 1.0))
            if not (0.0 <= float(lo) <= float(hi) <= 1.0):
                raise InvalidJob("guidance_interval must be [lo, hi] with 0 <= lo <= hi <= 1")
        else:
            raise InvalidJob(f"unknown task {job.task!r}")

    # --- the math -----------------------------------------------------------------------
    def compute(self, jobs: list[Job]) -> list[dict]:
        """One model call for the whole list (padded to a bucket). Raises on failure."""
        job0 = jobs[0]
        task, name = job0.task, job0.model
        items = sum(j.size for j in jobs)
        start = time.perf_counter()
        # No padding here: a runner whose backend needs fixed shapes pads to its own buckets
        # (model.backends.bucketing); eager and ONNX on the CPU run the batch as it is.
        if task == "generate":
            outputs = {"images": tensor_to_uint8(self._generate(jobs))}
        else:
            tok = self.registry.tokenizer(name)
            key = "tokens" if task == "decode" else "images"
            x = torch.from_numpy(np.concatenate([j.payload[key] for j in jobs]))
            if task == "decode":
                outputs = {"images": tensor_to_uint8(tok.runner.decode(x))}
            else:
                tokens, indices = tok.runner.encode(x)
                if task == "tokenize":
                    outputs = {
                        "tokens": tokens.float().cpu().numpy(),
                        "indices": indices.to(torch.int64).cpu().numpy(),
                    }
                else:
                    rec = tok.runner.decode(tokens).float().cpu()
                    outputs = {
                        "images": tensor_to_uint8(rec),
                        "psnr": np.asarray(psnr(rec, x.float()), dtype=np.float64),
                    }
        elapsed = time.perf_counter() - start
        self._record(job0, items, elapsed)
        return _slice(jobs, outputs)

    def _generate(self, jobs: list[Job]) -> torch.Tensor:
        gen = self.registry.generator(jobs[0].model)
        tok = self.registry.tokenizer(gen.tokenizer)
        q = jobs[0].params
        labels = [y for j in jobs for y in j.payload["labels"]]
        seeds = [s for j in jobs for s in j.payload["seeds"]]
        # Per-sample guidance scale: jobs with different cfg_scale share the batch (only the
        # guided samples run a null branch).
        cfg = [float(j.payload.get("cfg_scale", 1.0)) for j in jobs for _ in range(j.size)]
        cfg = torch.tensor(cfg, dtype=torch.float64)
        lo, hi = q.get("guidance_interval", (0.0, 1.0))
        z = sample_latents(
            gen.runner,
            labels,
            seeds,
            steps=int(q["steps"]),
            sampler=q.get("sampler", "euler"),
            cfg_scale=cfg,
            guidance_interval=(float(lo), float(hi)),
            path=q.get("path", "linear"),
            cuda_graphs=self.registry.settings.cuda_graphs,
        )
        return tok.runner.decode(z.float() * tok.vq_std + tok.vq_mean).float()

    def _record(self, job: Job, items: int, elapsed: float) -> None:
        labels = {"model": job.model, "task": job.task}
        metrics.COMPUTE_TIME.labels(**labels).observe(elapsed)
        metrics.BATCH_SIZE.labels(**labels).observe(items)
        if job.task == "generate":
            gen = self.registry.generator(job.model)
            metrics.IMAGES.labels(**labels).inc(items)
            metrics.TOKENS.labels(**labels).inc(items * gen.num_tokens)
        else:
            tok = self.registry.tokenizer(job.model)
            metrics.IMAGES.labels(**labels).inc(items * (2 if job.task == "reconstruct" else 1))
            metrics.TOKENS.labels(**labels).inc(items * tok.num_tokens)
        device = self.registry.device
        if device.type == "cuda":
            metrics.GPU_MEMORY.labels(device=str(device), kind="allocated").set(
                torch.cuda.memory_allocated(device)
            )
            metrics.GPU_MEMORY.labels(device=str(device), kind="reserved").set(
                torch.cuda.memory_reserved(device)
            )
            metrics.GPU_MEMORY.labels(device=str(device), kind="peak").set(
                torch.cuda.max_memory_allocated(device)
            )


def _slice(jobs: list[Job], outputs: dict[str, np.ndarray]) -> list[dict]:
    results, start = [], 0
    for job in jobs:
        end = start + job.size
        r = {k: v[start:end] for k, v in outputs.items()}
        if "psnr" in r:
            r["psnr"] = [float(x) for x in r["psnr"]]
        results.append(r)
        start = end
    return results


def _check_array(x, name: str, shape: tuple[int, ...]) -> np.ndarray:
    if not isinstance(x, np.ndarray) or x.dtype != np.float32:
        raise InvalidJob(f"{name} must be a float32 array")
    if x.shape != shape:
        raise InvalidJob(f"{name} must have shape {list(shape)}, got {list(x.shape)}")
    return x


def _int_list(x, n: int) -> bool:
    return (
        isinstance(x, list)
        and len(x) == n
        and all(isinstance(v, int) and not isinstance(v, bool) for v in x)
    )


def _message(e: BaseException) -> str:
    return str(e) or type(e).__name__
