"""The broker interface the API codes against: submit a job, wait for its outcome.

Two implementations share service/batcher.py: ``InProcessBroker`` (model in this process, no
Redis) and ``RedisBroker`` (jobs go to Redis streams, ``softvq worker`` processes run them).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

from ..jobs import Job
from ..settings import Settings


class Broker(ABC):
    settings: Settings

    # Called once with the reason when this broker can never run another job (a hung model
    # call); the service decides what to do with the process (service/app.py).
    on_fatal: Callable[[str], None] | None = None

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
    async def ready(self) -> tuple[bool, str]:
        """(True, "ok") when jobs can run now; else (False, why not)."""

    @abstractmethod
    async def workers(self) -> list[dict]:
        """The processes that run jobs, each ``{"id", "host", "pid", "started", "busy",
        "batches", "served": {model: {backend, device, dtype}}}``."""

    @abstractmethod
    async def queue_depth(self, model: str, task: str) -> int:
        """Jobs accepted for (model, task) and not yet answered."""
