"""The broker interface the API codes against: submit a job, wait for its outcome.

Two implementations share service/batcher.py: ``InProcessBroker`` (model in this process, no
Redis) and ``RedisBroker`` (jobs go to Redis streams, ``softvq worker`` processes run them).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable

from ..jobs import Job
from ..settings import Settings


class Broker(ABC):
    settings: Settings

    # Called once with the reason when this broker can never run another job (a hung model
    # call); the service decides what to do with the process (service/app.py).
    on_fatal: Callable[[str], None] | None = None

    # Embedded mode: called with (tracked jobs, step, steps, previews) as their batch runs
    # (0, 0 when it starts; previews: job id -> service.progress.Preview, or None), to update
    # their records (service/async_jobs.py). Redis workers write to the job store themselves.
    on_progress: Callable[[list[Job], int, int, dict | None], Awaitable[None]] | None = None

    def alive(self) -> tuple[bool, str]:
        """(False, why) once the broker can never run another job: a liveness probe should
        restart the process."""
        return True, "ok"

    @abstractmethod
    async def start(self) -> None:
        """Begin serving (embedded: load-warm the models in the background)."""

    @abstractmethod
    async def stop(self) -> None:
        """Graceful: refuse new work, finish what is held, then release resources."""

    @abstractmethod
    async def submit(self, job: Job) -> dict:
        """Run a job and return its result (see the payload table in service/broker/__init__).

        Raises the JobError subclasses of service/jobs.py: QueueFull (the model+task queue is
        at ``queue_max``), JobTimeout (the deadline passed; an expired job never reaches the
        model), JobFailed, InvalidJob, BrokerUnavailable (Redis down or shutting down: fails
        fast, never hangs). Cancelling the awaiting task drops the job if it has not started.
        """

    @abstractmethod
    async def cancel(self, job_id: str) -> None:
        """Give up on a job (DELETE /jobs/{id}): one not started never runs; a running one
        leaves its sampling loop at the next step while the rest of its batch goes on; a
        ``submit`` awaiting it raises JobCanceled. Unknown or finished ids: nothing."""

    async def queue_position(self, job_id: str) -> int | None:
        """Jobs of the same model and task ahead of this one (0: next), or None when it is
        not waiting here (running, finished, or queued through another API replica)."""
        return None

    @abstractmethod
    async def ready(self) -> tuple[bool, str]:
        """(True, "ok") when jobs can run now; else (False, why not)."""

    @abstractmethod
    async def workers(self) -> list[dict]:
        """The processes that run jobs, each ``{"id", "host", "pid", "started", "busy",
        "batches", "served": {model: {backend, device, dtype}}}``."""

    @abstractmethod
    async def queue_depth(self, model: str, task: str) -> int:
        """Jobs accepted for (model, task) and not yet answered."""
