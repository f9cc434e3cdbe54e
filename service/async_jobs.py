"""Async jobs: accept now (202), run in the background, keep the answer for later.

``POST /jobs`` and ``Prefer: respond-async`` on a sync endpoint build the very same ``Job``
as the sync route, then ``AsyncJobs.accept`` stores its record (service/job_store.py) and
runs it on this API process' event loop: ``Service.run`` (result cache, then the broker,
exactly the sync path), then the route's own renderer turns the result into the body the
sync endpoint would have returned, stored as the record's ``output``. Progress comes from
the sampling loop: in embedded mode through ``broker.on_progress`` (here), in Redis mode
written by the worker straight into the record.

Cancel (``DELETE /jobs/{id}``): the record turns ``canceled`` at once (a terminal state is
final, whatever a worker reports later) and the broker drops the job: unrun if queued, at
its next sampling step if running, the rest of its batch going on (service/progress.py).
Any API replica can cancel any job: the mark travels through Redis.

In Redis mode the task awaiting a job lives on the replica that accepted it (the record's
``runner``), which renews a lease in Redis every third of ``SOFTVQ_JOB_RUNNER_LEASE_S``. If
that replica dies while the job is active, its lease lapses and any replica that reads the
job (``GET``, the event stream) reports it failed with ``runner_lost`` at once, instead of
leaving it ``running`` until its deadline, and the workers drop it as if it were cancelled
(nobody is left to store its answer): the caller learns within a lease, and submits again.
The event stream looks too while the worker is still writing progress. A finished result is
in Redis and survives any replica.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

from starlette.concurrency import run_in_threadpool

from . import metrics
from .job_store import ACTIVE, JobRecord, JobStore, record_progress
from .jobs import BrokerUnavailable, Job, JobCanceled, JobError, JobTimeout, QueueFull

if TYPE_CHECKING:
    from .prepare import Prepared

log = logging.getLogger("softvq.jobs")


class AsyncJobs:
    def __init__(self, store: JobStore, run: Callable, broker, lease_s: float = 15.0):
        """``run(job, use_cache)``: the service's path to a result (cache, then broker).
        ``lease_s``: this replica's lease on the jobs it runs (see the module docstring)."""
        self.store, self._run, self.broker = store, run, broker
        self._tasks: dict[str, asyncio.Task] = {}
        broker.on_progress = self._progress
        self.replica = uuid.uuid4().hex[:16]
        self.lease_s = lease_s
        self._lease: asyncio.Task | None = None

    async def start(self) -> None:
        """Take this replica's lease before accepting any job, then keep renewing it."""
        await self.store.renew_lease(self.replica, self.lease_s)
        self._lease = asyncio.create_task(self._renew(), name="job-runner-lease")

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            try:
                await self.store.renew_lease(self.replica, self.lease_s)
            except Exception as e:  # noqa: BLE001 - Redis away: the next renewal tries again
                log.warning("could not renew this replica's job lease: %s", e)

    async def accept(
        self, prep: Prepared, use_cache: bool = True, owner: str | None = None
    ) -> tuple[JobRecord, bool]:
        """Store the job's record and start it -> (record, created). An id already known
        (client-chosen ids make POST idempotent) returns that job and starts nothing."""
        job = prep.job
        job.tracked = True
        record = JobRecord(
            id=job.id,
            task=job.task,
            model=job.model,
            priority=job.priority,
            created_at=time.time(),
            deadline=job.deadline,
            owner=owner,
            runner=self.replica,
        )
        record, created = await self.store.create(record)
        if created:
            metrics.JOBS_SUBMITTED.labels(task=job.task, lane=job.priority).inc()
            task = asyncio.create_task(self._execute(prep, use_cache), name=f"job-{job.id}")
            self._tasks[job.id] = task
            task.add_done_callback(lambda _: self._tasks.pop(job.id, None))
        return record, created

    async def _execute(self, prep: Prepared, use_cache: bool) -> None:
        try:
            await self._outcome(prep, use_cache)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the store itself failed (Redis gone)
            # The record stays active; GET reports it failed (504) after its deadline.
            log.warning("could not record the outcome of job %s: %s", prep.job.id, e)

    async def _outcome(self, prep: Prepared, use_cache: bool) -> None:
        job = prep.job
        try:
            result = await self._submit(job, use_cache)
            output = await run_in_threadpool(prep.render_json, result)
            done = {"output": output}
            if "steps" in job.params:  # a sampling loop: it ran every step
                done["progress"] = {"step": job.params["steps"], "steps": job.params["steps"]}
            await self.store.transition(job.id, "succeeded", done)
        except JobCanceled:
            await self.store.transition(job.id, "canceled")
        except JobError as e:
            error = {"error": e.code, "message": str(e)}
            await self.store.transition(job.id, "failed", {"error": error})
        except asyncio.CancelledError:
            # This process is stopping: the job's fate is unknown to it; a record left
            # active expires after its deadline (see ``record_view``).
            raise
        except Exception as e:  # noqa: BLE001 - every accepted job gets an answer
            log.exception("async job %s failed", job.id)
            error = {"error": "internal_error", "message": f"{type(e).__name__}: {e}"}
            await self.store.transition(job.id, "failed", {"error": error})

    async def _submit(self, job: Job, use_cache: bool) -> dict:
        """An async job waits its turn: while its model's queue is full (the bound protects
        the workers, SOFTVQ_QUEUE_MAX) it stays queued here and tries again, until its
        deadline or a cancel."""
        delay = 0.05
        while True:
            try:
                return await self._run(job, use_cache)
            except QueueFull:
                record = await self.store.get(job.id)
                if record is None or record.status not in ACTIVE:
                    raise JobCanceled("cancelled while it waited") from None
                if time.time() + delay > job.deadline:
                    raise
                await asyncio.sleep(delay)
                delay = min(1.0, delay * 2)

    async def _progress(self, jobs: list[Job], step: int, steps: int, previews=None) -> None:
        await record_progress(self.store, jobs, step, steps, previews)

    async def cancel(self, job_id: str) -> JobRecord | None:
        """Cancel the job if it is still active -> its record (None: unknown id)."""
        record = await self.store.get(job_id)
        if record is None:
            return None
        if record.status in ACTIVE:
            await self.store.transition(job_id, "canceled")
            await self.broker.cancel(job_id)
            record = await self.store.get(job_id)
        return record

    async def get(self, job_id: str) -> JobRecord | None:
        """The record. An active one is reported failed when nothing can finish it any more:
        the replica running it died (its lease lapsed: ``runner_lost``), or its deadline
        passed (504)."""
        record = await self.store.get(job_id)
        if record is None or record.status not in ACTIVE:
            return record
        error = None
        if record.deadline and time.time() > record.deadline + 5.0:
            err = JobTimeout("the job did not finish before its deadline")
            error = {"error": err.code, "message": str(err)}
        elif (
            record.runner
            and record.runner != self.replica
            and not await self.store.lease_alive(record.runner)
        ):
            error = {
                "error": "runner_lost",
                "message": "the API replica that ran this job stopped before it finished;"
                " submit it again",
            }
        if error is not None:
            await self.store.transition(job_id, "failed", {"error": error})
            try:  # free the worker: whatever it would compute has no reader any more
                await self.broker.cancel(job_id)
            except BrokerUnavailable as e:  # the verdict stands; the rows just run on
                log.info("could not drop failed job %s on the workers: %s", job_id, e)
            record = await self.store.get(job_id)
        return record

    async def stop(self) -> None:
        """Wait for the jobs this process runs (the broker drains them first), then give up
        the lease."""
        if self._tasks:
            await asyncio.gather(*list(self._tasks.values()), return_exceptions=True)
        if self._lease is not None:
            self._lease.cancel()
