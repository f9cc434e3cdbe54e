"""What travels between the API and the workers: jobs, results and the errors a caller sees.

A job is one request's work for one model and task. Its payload holds numpy arrays (images
as (n, 3, S, S) uint8 pixels, tokens as (n, L, D) float32) and plain values, so it
serialises for Redis as well as staying in process. What each task expects of it:
service/tasks.py.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Job:
    model: str  # tokenizer name, or generator name for "generate"
    task: str  # a key of service.tasks.TASKS
    payload: dict[str, Any]  # task inputs
    params: dict[str, Any] = field(default_factory=dict)  # jobs batch together only if equal
    deadline: float = 0.0  # epoch seconds; past it the job is dropped and its caller gets 504
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: float = field(default_factory=time.time)
    attempts: int = 0
    # Lane: "interactive" jobs are taken before "batch" ones (service/lanes.py).
    priority: str = "interactive"
    # An async job (POST /jobs): its steps are reported to the job store as it runs.
    tracked: bool = False
    # A tracked generate job that asked for previews: a small PNG of the sampling loop's x0
    # estimate about every second (service/progress.py).
    previews: bool = False

    @property
    def size(self) -> int:
        """Items this job adds to a batch (guidance counts double; the batcher applies that)."""
        return int(self.payload.get("n", 1))

    def expired(self, now: float | None = None) -> bool:
        return self.deadline > 0 and (now or time.time()) > self.deadline


class JobError(Exception):
    """Base of the errors a caller can get back for an accepted job."""

    status = 500
    code = "internal_error"


class QueueFull(JobError):
    status, code = 429, "queue_full"


class JobTimeout(JobError):
    status, code = 504, "timeout"


class JobFailed(JobError):
    """The job failed on every attempt (or is invalid for the model)."""

    status, code = 500, "job_failed"


class JobCanceled(JobError):
    """Cancelled by its caller (DELETE /jobs/{id}) before or while it ran."""

    status, code = 409, "canceled"


class InvalidJob(JobError):
    status, code = 422, "invalid_input"


class BrokerUnavailable(JobError):
    status, code = 503, "broker_unavailable"


class ModelHung(JobError):
    """The model call running (or about to run) the job never returned: the process that
    holds it is restarting."""

    status, code = 503, "model_hung"
