"""The embedded broker: API and model in one process, no Redis.

``submit`` puts the job on an asyncio queue and awaits a future; a ``Batcher`` task on the
same event loop pulls from the queue and runs batches on its model thread. Models are warmed
up by that task before the first batch, so the API can start answering /healthz at once and
/readyz turns ready when warm-up is done.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections import Counter

from .. import metrics
from ..batcher import Batcher, HungModelCall, JobSource, Outcome
from ..executor import Executor
from ..jobs import (
    BrokerUnavailable,
    Job,
    JobCanceled,
    JobError,
    JobTimeout,
    ModelHung,
    QueueFull,
)
from ..lanes import lane_rank
from ..registry import ModelRegistry
from ..settings import Settings
from .base import Broker

log = logging.getLogger(__name__)


class InProcessBroker(Broker, JobSource):
    def __init__(
        self, settings: Settings, registry: ModelRegistry, executor: Executor | None = None
    ):
        self.settings = settings
        self.registry = registry
        self.executor = executor or Executor(registry)
        self.batcher: Batcher | None = None
        self._task: asyncio.Task | None = None
        self._queue: asyncio.Queue[Job] | None = None
        self._futures: dict[str, asyncio.Future] = {}  # job id -> its caller's future
        self._jobs: dict[str, Job] = {}  # job id -> job, while its caller waits
        self._counts: Counter[tuple[str, str]] = Counter()  # (model, task) -> accepted, unanswered
        self._lane_counts: Counter[tuple[str, str, str]] = Counter()  # the same, per lane
        self._closing = False
        self._error: str | None = None
        self._hung: str | None = None  # why the model thread is lost for good
        self._dead: str | None = None  # why this broker can never run another job
        self._started = time.time()

    # --- Broker -------------------------------------------------------------------------
    async def start(self) -> None:
        if not self.registry.loaded:
            raise RuntimeError("the embedded broker needs a registry with loaded weights")
        self._queue = asyncio.Queue()
        self.batcher = Batcher(self.settings, self.executor, self)
        self._task = asyncio.create_task(self._serve(), name="softvq-batcher")

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            if not self.registry.warm:
                await loop.run_in_executor(self.batcher.pool, self.registry.warmup)
            # Ready on eager now; the configured backend is proven and swapped in meanwhile.
            self.registry.start_tuning()
            await self.batcher.run()
        except HungModelCall as e:
            # The model thread is lost: every waiting caller gets a clear 503 now rather than
            # a 504 at its deadline, and the service is told (it exits for a restart).
            self._hung = self._dead = self._error = f"model hung: {e}"
            self._fail_all(ModelHung(f"{e}; the service is restarting"))
            if self.on_fatal is not None:
                self.on_fatal(self._error)
            return
        except Exception as e:
            # Warm-up or the batch loop died: this process will never serve again. Dead, not
            # merely unready: /healthz says so and the service exits for a restart.
            self._dead = self._error = f"batcher stopped: {type(e).__name__}: {e}"
            log.exception("embedded batcher crashed")
            self._fail_all(BrokerUnavailable(self._error))
            if self.on_fatal is not None:
                self.on_fatal(self._error)
            raise
        if not self._closing:  # run() returns only when stopped; anything else is a bug
            self._dead = self._error = "batcher stopped without being asked to"
            self._fail_all(BrokerUnavailable(self._error))
            if self.on_fatal is not None:
                self.on_fatal(self._error)

    async def stop(self) -> None:
        self._closing = True
        if self.batcher is not None and self._task is not None:
            self.batcher.stop(drain=True)
            try:
                await self._task
            except Exception:  # noqa: BLE001 - already logged by _serve
                pass
        self._fail_all(BrokerUnavailable("the server is shutting down"))

    async def submit(self, job: Job) -> dict:
        if self._closing or self._task is None:
            raise BrokerUnavailable(
                "the server is shutting down" if self._closing else "not started"
            )
        if self._hung:
            raise ModelHung(f"{self._hung}; the service is restarting")
        if self._task.done():
            raise BrokerUnavailable(self._error or "the batcher is not running")
        # Bounded per lane, as the Redis streams are: a flood of batch jobs never makes an
        # interactive request 429.
        if self._lane_counts[(job.model, job.task, job.priority)] >= self.settings.queue_max:
            raise QueueFull(
                f"queue for {job.model}/{job.task} is full ({self.settings.queue_max} jobs)"
            )
        if not job.deadline:
            job.deadline = time.time() + self.settings.request_timeout_s
        fut = asyncio.get_running_loop().create_future()
        self._futures[job.id] = fut
        self._jobs[job.id] = job
        self._count(job, +1)
        self._queue.put_nowait(job)
        try:
            return await asyncio.wait_for(fut, timeout=max(0.0, job.deadline - time.time()))
        except asyncio.TimeoutError:
            raise JobTimeout(f"no result within the request deadline ({job.id})") from None
        finally:
            # Timed out or cancelled (client went away): forget the job; the batcher drops it
            # when it comes up (``cancelled`` below) instead of running it.
            self._jobs.pop(job.id, None)
            if self._futures.pop(job.id, None) is not None:
                self._count(job, -1)

    async def cancel(self, job_id: str) -> None:
        # Without its future the batcher treats the job as gone: dropped unrun if queued,
        # its rows dropped at the next sampling step if running (Batcher._watch).
        fut = self._futures.pop(job_id, None)
        if fut is None:
            return
        job = self._jobs.pop(job_id, None)
        if job is not None:
            self._count(job, -1)
        if not fut.done():
            fut.set_exception(JobCanceled("cancelled by its caller"))

    async def queue_position(self, job_id: str) -> int | None:
        job = self._jobs.get(job_id)
        if job is None or self.batcher is None or job in self.batcher.running:
            return None
        waiting = [j for q in self.batcher.pending.values() for _, j in q]
        waiting += list(self._queue._queue)  # noqa: SLF001 - a read-only look
        if not any(j.id == job_id for j in waiting):
            return None
        return sum(
            1
            for j in waiting
            if (j.model, j.task) == (job.model, job.task)
            and j.id != job_id
            and j.id in self._futures
            and (lane_rank(j), j.created) < (lane_rank(job), job.created)
        )

    async def ready(self) -> tuple[bool, str]:
        if self._closing:
            return False, "shutting down"
        if self._task is None:
            return False, "not started"
        if self._task.done():
            return False, self._error or "batcher stopped"
        if not self.registry.warm:
            return False, "warming up models"
        return True, "ok"

    async def workers(self) -> list[dict]:
        batcher = self.batcher
        return [
            {
                "id": "embedded",
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "started": self._started,
                "busy": bool(batcher and batcher.running),
                "batches": batcher.batches_run if batcher else 0,
                "served": self.registry.served(),
            }
        ]

    def alive(self) -> tuple[bool, str]:
        return (False, self._dead) if self._dead else (True, "ok")

    async def queue_depth(self, model: str, task: str) -> int:
        return self._counts[(model, task)]

    # --- JobSource (called by the batcher, on this event loop) ------------------------------
    async def fetch(self, timeout: float, limit: int) -> list[Job]:
        jobs: list[Job] = []
        try:
            if timeout > 0:
                jobs.append(await asyncio.wait_for(self._queue.get(), timeout))
            while len(jobs) < limit:
                jobs.append(self._queue.get_nowait())
        except (asyncio.TimeoutError, asyncio.QueueEmpty):
            pass
        return jobs

    async def cancelled(self, jobs: list[Job]) -> set[str]:
        return {j.id for j in jobs if j.id not in self._futures}

    async def finish(self, items: list[tuple[Job, Outcome]]) -> None:
        for job, outcome in items:
            fut = self._futures.pop(job.id, None)
            self._jobs.pop(job.id, None)
            if fut is None:
                continue  # its caller already gave up
            self._count(job, -1)
            if fut.done() or outcome is None:
                continue
            if isinstance(outcome, JobError):
                fut.set_exception(outcome)
            else:
                fut.set_result(outcome)

    async def progress(self, jobs: list[Job], step: int, steps: int, previews=None) -> None:
        if self.on_progress is not None:
            await self.on_progress(jobs, step, steps, previews)

    async def retry(self, jobs: list[Job]) -> None:
        for job in jobs:
            self._queue.put_nowait(job)

    async def hand_back(self, jobs: list[Job]) -> None:
        for job in jobs:  # nobody else can run them in this process
            self._queue.put_nowait(job)

    # --- helpers ------------------------------------------------------------------------
    def _count(self, job: Job, delta: int) -> None:
        key = (job.model, job.task)
        self._counts[key] += delta
        self._lane_counts[(*key, job.priority)] += delta
        metrics.QUEUE_DEPTH.labels(model=key[0], task=key[1]).set(self._counts[key])
        metrics.LANE_DEPTH.labels(model=key[0], task=key[1], lane=job.priority).set(
            self._lane_counts[(*key, job.priority)]
        )

    def _fail_all(self, error: JobError) -> None:
        for job_id, fut in list(self._futures.items()):
            if not fut.done():
                fut.set_exception(error)
            self._futures.pop(job_id, None)
        self._jobs.clear()
        self._counts.clear()
        self._lane_counts.clear()
