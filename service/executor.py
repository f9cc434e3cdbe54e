"""Runs one batch of jobs on the models: the only place the service touches tensors.

A batch (built by service/batcher.py) holds jobs of one model, task and params. The executor
is generic over the task table (service/tasks.py): the job's task checks each payload,
collates the batch, runs the model through its model.backends runner (which pads to a batch
bucket when its backend needs fixed shapes) and splits the outputs back per job.

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
from contextlib import nullcontext

import torch

from . import metrics
from .jobs import InvalidJob, Job, JobCanceled, JobError, JobFailed
from .progress import BatchProgress
from .tasks import TASKS, Task, guided, job_cost  # noqa: F401 - guided, job_cost: re-exported

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


class Executor:
    def __init__(self, registry):
        self.registry = registry

    # --- entry point --------------------------------------------------------------------
    def run(self, jobs: list[Job], progress: BatchProgress | None = None) -> list[dict | JobError]:
        """Jobs of one (model, task, params) -> one outcome per job, in order. Never raises.

        ``progress``: a sampling loop reports its steps there, and jobs cancelled on it while
        they run leave the loop at the next step (outcome JobCanceled); between two steps it
        may run a guest batch (``run_guest``: interactive work preempting a batch-lane loop).
        """
        if progress is not None:
            progress.guest_runner = self.run_guest
        return self._run(jobs, progress, lock=True)

    def run_guest(self, jobs: list[Job]) -> list[dict | JobError]:
        """A batch run from inside another's sampling step, on the model thread that already
        holds the registry's lock."""
        return self._run(jobs, None, lock=False)

    def _run(
        self, jobs: list[Job], progress: BatchProgress | None, lock: bool
    ) -> list[dict | JobError]:
        outcomes: list[dict | JobError | None] = [None] * len(jobs)
        valid = []
        for i, job in enumerate(jobs):
            try:
                self.validate(job)
                valid.append(i)
            except (InvalidJob, ValueError, KeyError, TypeError) as e:
                outcomes[i] = e if isinstance(e, InvalidJob) else InvalidJob(_message(e))
        if valid:
            with self.registry.lock if lock else nullcontext():
                done = self._run_split([jobs[i] for i in valid], progress)
            for i, out in zip(valid, done, strict=True):
                outcomes[i] = out
        return outcomes

    def _run_split(
        self, jobs: list[Job], progress: BatchProgress | None = None
    ) -> list[dict | JobError]:
        try:
            return self.compute(jobs, progress)
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
        return self._run_split(jobs[:half], progress) + self._run_split(jobs[half:], progress)

    # --- validation (per job, before anything is batched) ----------------------------------
    def validate(self, job: Job) -> None:
        p, n = job.payload, job.size
        if not isinstance(p.get("n"), int) or n < 1:
            raise InvalidJob("payload 'n' must be a positive integer")
        task = TASKS.get(job.task)
        if task is None:
            raise InvalidJob(f"unknown task {job.task!r}")
        task.validate(job, self.registry)

    # --- the math -----------------------------------------------------------------------
    def compute(self, jobs: list[Job], progress: BatchProgress | None = None) -> list[dict]:
        """One model call for the whole list (the task collates, runs and splits it). Raises
        on failure."""
        if progress is not None:
            progress.begin(jobs)
        job0 = jobs[0]
        task = TASKS[job0.task]
        items = sum(j.size for j in jobs)
        start = time.perf_counter()
        # No padding here: a runner whose backend needs fixed shapes pads to its own buckets
        # (model.backends.bucketing); eager and ONNX on the CPU run the batch as it is.
        outputs = task.run_tracked(self.registry, job0.model, task.collate(jobs), progress)
        elapsed = time.perf_counter() - start
        results: list = task.split(jobs, outputs)
        if progress is not None and progress.dropped:
            for i, job in enumerate(jobs):
                if job.id in progress.dropped:
                    results[i] = JobCanceled("cancelled while it ran")
                    items -= job.size  # its images were never made
        self._record(task, job0.model, items, elapsed)
        return results

    def _record(self, task: Task, model: str, items: int, elapsed: float) -> None:
        labels = {"model": model, "task": task.name}
        metrics.COMPUTE_TIME.labels(**labels).observe(elapsed)
        metrics.BATCH_SIZE.labels(**labels).observe(items)
        task.record(self.registry, model, items)
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


def _message(e: BaseException) -> str:
    return str(e) or type(e).__name__
