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

What is still weak: in Redis mode the task awaiting a job lives on the replica that
accepted it; if that replica dies while the job runs, the record stays ``running`` until its
deadline passes (then ``GET`` reports it failed with 504). A finished result is in Redis and
survives any replica.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from starlette.concurrency import run_in_threadpool

from . import metrics
from .job_store import ACTIVE, JobRecord, JobStore, record_progress
from .jobs import Job, JobCanceled, JobError, JobTimeout, QueueFull

if TYPE_CHECKING:
    from .prepare import Prepared

log = logging.getLogger("softvq.jobs")


class AsyncJobs:
    def __init__(self, store: JobStore, run: Callable, broker):
        """``run(job, use_cache)``: the service's path to a result (cache, then broker)."""
        self.store, self._run, self.broker = store, run, broker
        self._tasks: dict[str, asyncio.Task] = {}
        broker.on_progress = self._progress

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
        """The record; an active one past its deadline (its runner went away with an API
        replica) is reported failed with 504."""
        record = await self.store.get(job_id)
        if record is not None and record.status in ACTIVE and record.deadline:
            if time.time() > record.deadline + 5.0:
                err = JobTimeout("the job did not finish before its deadline")
                await self.store.transition(
                    job_id, "failed", {"error": {"error": err.code, "message": str(err)}}
                )
                record = await self.store.get(job_id)
        return record

    async def stop(self) -> None:
        """Wait for the jobs this process runs (the broker drains them first)."""
        if self._tasks:
            await asyncio.gather(*list(self._tasks.values()), return_exceptions=True)
