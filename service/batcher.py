"""Dynamic batching, shared by the embedded broker and the Redis workers.

A ``Batcher`` pulls jobs from a ``JobSource`` (an in-process queue, or Redis streams read by
a worker), groups them by (model, task, params), and runs one group at a time on the
executor's thread:

- a group runs once it holds its ``max_batch_size`` items (a guided generate item counts
  twice: its null branch doubles the forward) or its oldest job has waited its
  ``max_wait_ms``: each (model, task) has its own policy (``SOFTVQ_BATCH_POLICY``, the global
  settings by default), read from the task table (service/tasks.py), like a job's cost and
  the key that groups it;
- jobs of different params (e.g. step counts) never share a batch, so one sampling loop never
  runs two schedules; cfg_scale is a payload value and may differ inside a batch;
- an expired job is answered JobTimeout and a cancelled one dropped, before the model sees it;
- a job the model crashed on alone (``ModelCrashed``) goes back to the source for another
  attempt until ``max_attempts``, then its caller gets JobFailed;
- a model call still running ``hang_grace_s`` after the last deadline of its jobs is hung (a
  wedged device or a deadlock: a thread cannot be interrupted): ``run()`` raises
  ``HungModelCall`` at once, leaving the thread behind, and its owner fails over and restarts
  the process (service/broker/inprocess.py, service/worker.py).

The source decides what "back" and "answered" mean: an asyncio future in process, a stream
entry and a reply list in Redis.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from abc import ABC, abstractmethod
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import NoReturn

from . import metrics
from .executor import Executor, ModelCrashed
from .jobs import Job, JobCanceled, JobError, JobFailed, JobTimeout
from .lanes import LanePicker, lane_rank
from .progress import PREEMPT_POLL_S, PROGRESS_EVERY_S, BatchProgress, Preview
from .settings import Settings
from .tasks import TASKS, BatchPolicy, group_key, job_cost, resolve_policy

log = logging.getLogger(__name__)

Outcome = dict | JobError | None  # None: answer nobody (the caller went away)


class JobSource(ABC):
    """Where a batcher's jobs come from, and where their outcomes go."""

    @abstractmethod
    async def fetch(self, timeout: float, limit: int) -> list[Job]:
        """Up to ``limit`` new jobs; waits at most ``timeout`` s for the first. [] if none."""

    @abstractmethod
    async def cancelled(self, jobs: list[Job]) -> set[str]:
        """Ids of the given jobs whose caller no longer waits."""

    @abstractmethod
    async def finish(self, items: list[tuple[Job, Outcome]]) -> None:
        """Answer each job's caller (unless the outcome is None) and release the job."""

    @abstractmethod
    async def retry(self, jobs: list[Job]) -> None:
        """Queue the jobs again (their ``attempts`` already counts the failed run)."""

    @abstractmethod
    async def hand_back(self, jobs: list[Job]) -> None:
        """Jobs taken but never started, at shutdown: let someone else run them."""

    async def progress(
        self, jobs: list[Job], step: int, steps: int, previews: dict[str, Preview] | None = None
    ) -> None:
        """The running batch's sampling loop is at ``step`` of ``steps`` (0 of 0: the batch
        started). ``jobs``: its tracked (async) jobs. ``previews``: job id -> its latest
        preview, for jobs that asked (service/progress.py). Default: nobody listens."""
        return None


# Exit status of a process that ends itself because it can no longer serve: a hung model
# call, or a batcher / worker loop that stopped (EX_SOFTWARE).
EXIT_HUNG = 70


def exit_for_restart(message: str) -> NoReturn:
    """End a process that can no longer serve. Not sys.exit: after a hung model call the
    interpreter's exit would join the stuck model thread forever; the supervisor starts a
    fresh process."""
    log.critical("%s; exiting with status %d for a restart", message, EXIT_HUNG)
    logging.shutdown()
    sys.stderr.flush()
    os._exit(EXIT_HUNG)


def leave_past_tuner(registry, who: str) -> None:
    """After a clean stop: if the registry's backend tuner is still inside torch (compiling,
    exporting), end the process now with status 0 rather than finalise the interpreter under
    it, which can crash (SIGSEGV seen on a worker stopped mid-compile)."""
    if registry is None or registry.stop_tuning():
        return
    log.info("%s: backend tuning interrupted by the stop", who)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class HungModelCall(RuntimeError):
    """A model call that never returned. ``jobs`` ran in it; the batcher is unusable (its one
    model thread is stuck), so its owner must fail over and end the process."""

    def __init__(self, message: str, jobs: list[Job]):
        super().__init__(message)
        self.jobs = jobs


class Batcher:
    def __init__(
        self,
        settings: Settings,
        executor: Executor,
        source: JobSource,
        worker_id: str = "embedded",
        idle_poll_s: float = 0.25,
        max_held: int | None = None,
    ):
        self.settings = settings
        self.executor = executor
        self.source = source
        self.worker_id = worker_id
        self._policies: dict[tuple[str, str], BatchPolicy] = {}  # (model, task) -> policy
        self.max_attempts = settings.max_attempts
        self.hang_grace = settings.hang_grace_s
        self.hung: HungModelCall | None = None
        self.idle_poll = idle_poll_s
        # Most jobs held waiting at once. Embedded: everything queued (all of it is ours, and
        # seeing it all makes the fullest batches). Redis workers pass a bound so that jobs
        # they cannot start soon stay in the stream for other workers.
        self.max_held = max_held
        # Jobs held but not yet running, by group, oldest first: (time received, job).
        self.pending: dict[tuple, deque[tuple[float, Job]]] = {}
        self.running: list[Job] = []
        self._expired: list[Job] = []  # purged from their groups, answered by the next turn
        self.batches_run = 0
        self.lanes = LanePicker(settings.interactive_burst)
        self._stopping = False
        self._drain = True
        # One model thread: batches run one after another, never concurrently on the device.
        self.pool = ThreadPoolExecutor(1, thread_name_prefix=f"softvq-model-{worker_id}")
        metrics.WORKER_BUSY.labels(worker=worker_id).set(0)
        metrics.MODEL_HANGS.labels(worker=worker_id)  # exported from 0, for increase()

    # --- control --------------------------------------------------------------------------
    def stop(self, drain: bool = True) -> None:
        """Stop taking new jobs. ``drain``: run what is held; else hand it back to the source
        (the batch already running always finishes)."""
        self._stopping, self._drain = True, drain

    def held(self) -> list[Job]:
        """Every job this batcher holds: waiting in a group or running."""
        return [j for q in self.pending.values() for _, j in q] + list(self.running)

    def held_count(self) -> int:
        return sum(len(q) for q in self.pending.values())

    async def run(self) -> None:
        try:
            while True:
                if self._stopping and not self._drain:
                    await self._hand_back_pending()
                    return
                if self._stopping and not self.pending and not self._expired:
                    await self._pull(0.0)  # a last look at what was accepted before stop()
                    if not self.pending:
                        return
                await self.step()
        finally:
            # A hung call's thread never ends: joining it would hang the owner too.
            self.pool.shutdown(wait=self.hung is None, cancel_futures=self.hung is not None)

    # --- one turn: pull, pick a due group, run it --------------------------------------------
    async def step(self) -> None:
        await self._pull(0.0)  # whatever has arrived may still join a group
        self._purge_expired()
        if self._expired:
            await self._answer_expired()
            return
        key, wait = self._next_due()
        if key is None:
            await self._pull(self.idle_poll if wait is None else wait)
            return
        batch = self._take(key)
        await self.run_batch(batch)

    async def _pull(self, timeout: float) -> None:
        if self._stopping:
            # Draining takes what the source already holds, without waiting for more.
            if not self._drain:
                return
            timeout = 0.0
        room = (self.max_held or sys.maxsize) - self.held_count()
        if room <= 0:
            return
        for job in await self.source.fetch(timeout, room):
            self.add(job)

    def add(self, job: Job) -> None:
        # Lanes never share a batch: an interactive job never waits on bulk items beside it.
        key = (*group_key(job), lane_rank(job))
        self.pending.setdefault(key, deque()).append((time.monotonic(), job))

    def _purge_expired(self) -> None:
        """Expired jobs leave their group now (answered when the next batch runs), so they
        neither take slots nor make a group look due."""
        now = time.time()
        for key in list(self.pending):
            q = self.pending[key]
            if any(j.expired(now) for _, j in q):
                keep = deque((t, j) for t, j in q if not j.expired(now))
                self._expired.extend(j for _, j in q if j.expired(now))
                if keep:
                    self.pending[key] = keep
                else:
                    del self.pending[key]

    async def _answer_expired(self) -> None:
        expired, self._expired = self._expired, []
        await self.run_batch(expired)  # every job in it is past its deadline: none runs

    def policy(self, job: Job) -> BatchPolicy:
        """The batching policy of the job's (model, task) group, from its task."""
        key = (job.model, job.task)
        pol = self._policies.get(key)
        if pol is None:
            task = TASKS.get(job.task)
            pol = (
                task.policy(self.settings, job.model)
                if task is not None
                else resolve_policy(self.settings, job.model, job.task)  # answered InvalidJob
            )
            self._policies[key] = pol
        return pol

    def _next_due(self) -> tuple[tuple | None, float | None]:
        """(group to run now, None) or (None, seconds until the first group is due)."""
        now = time.monotonic()
        due, first_wait = [], None
        for key, q in self.pending.items():
            oldest, job = q[0]
            pol = self.policy(job)
            cost = sum(job_cost(j) for _, j in q)
            if cost >= pol.max_batch_size or now - oldest >= pol.max_wait_s or self._stopping:
                due.append((oldest, key[-1], key))
            else:
                w = oldest + pol.max_wait_s - now
                first_wait = w if first_wait is None else min(first_wait, w)
        if any(rank for _, rank, _ in due):
            # Bulk work is about to take the model for a whole batch: an interactive group
            # still waiting for company goes now instead of after it.
            due += [
                (q[0][0], 0, key)
                for key, q in self.pending.items()
                if key[-1] == 0 and all(key != d[2] for d in due)
            ]
        if due:
            return self.lanes.pick(due), None
        return None, first_wait

    def _take(self, key: tuple) -> list[Job]:
        q = self.pending[key]
        limit = self.policy(q[0][1]).max_batch_size
        batch, cost = [], 0
        while q and (not batch or cost + job_cost(q[0][1]) <= limit):
            _, job = q.popleft()
            batch.append(job)
            cost += job_cost(job)
        if not q:
            del self.pending[key]
        return batch

    # --- running a batch ------------------------------------------------------------------
    async def _admit(self, batch: list[Job]) -> list[Job]:
        """The jobs of ``batch`` to run: cancelled and expired ones are answered here."""
        now = time.time()
        gone = await self.source.cancelled(batch)
        dropped: list[tuple[Job, Outcome]] = []
        live = []
        for job in batch:
            if job.id in gone:
                # An async job's record may be read on another API replica: say so.
                dropped.append(
                    (job, JobCanceled("cancelled before it ran") if job.tracked else None)
                )
            elif job.expired(now):
                metrics.JOBS_FAILED.labels(model=job.model, task=job.task, reason="timeout").inc()
                dropped.append((job, JobTimeout("deadline passed before the job could run")))
            else:
                live.append(job)
        if dropped:
            await self.source.finish(dropped)
        for job in live:
            metrics.QUEUE_WAIT.labels(model=job.model, task=job.task).observe(
                max(0.0, now - job.created)
            )
            metrics.LANE_WAIT.labels(lane=job.priority).observe(max(0.0, now - job.created))
        tracked = [j for j in live if j.tracked]
        if tracked:
            await self._report(tracked, 0, 0)
        return live

    async def run_batch(self, batch: list[Job]) -> None:
        live = await self._admit(batch)
        if not live:
            return
        self.running = live
        busy = metrics.WORKER_BUSY.labels(worker=self.worker_id)
        busy.set(1)
        start = time.perf_counter()
        progress = BatchProgress(live)
        call = asyncio.get_running_loop().run_in_executor(
            self.pool, self.executor.run, live, progress
        )
        watch = asyncio.create_task(self._watch(call, progress, live))
        try:
            # Nobody waits for the result once every deadline has passed; a call still running
            # a grace period later is hung, not slow.
            # (A job without a deadline is given the default request timeout from now.)
            now = time.time()
            last = max(j.deadline or now + self.settings.request_timeout_s for j in live)
            done, _ = await asyncio.wait({call}, timeout=max(0.0, last - now) + self.hang_grace)
            if not done:
                self._hung(live, time.perf_counter() - start)
            outcomes = call.result()
            await watch  # ends with the call; it may still be settling a guest batch
        finally:
            watch.cancel()
            busy.set(0)
            metrics.WORKER_BUSY_SECONDS.labels(worker=self.worker_id).inc(
                time.perf_counter() - start
            )
            if self.hung is None:
                self.running = []
        self.batches_run += 1
        await self._settle(live, outcomes)

    async def _watch(self, call: asyncio.Future, progress: BatchProgress, live: list[Job]):
        """While a batch runs: every PROGRESS_EVERY_S, hand cancellations to its sampling loop
        (its rows leave at the next step) and report the loop's step for tracked jobs. While
        a batch-lane loop samples, also look for interactive work every PREEMPT_POLL_S and
        hand it to the loop to run between two steps (service/progress.py). Previews the
        model thread rendered go out with the next report."""
        loop = asyncio.get_running_loop()
        tracked = [j for j in live if j.tracked]
        bulk = all(lane_rank(j) for j in live)
        last, next_report = 0, loop.time() + PROGRESS_EVERY_S
        while not call.done():
            await asyncio.wait({call}, timeout=PREEMPT_POLL_S if bulk else PROGRESS_EVERY_S)
            if call.done():
                return
            if bulk and progress.sampling:
                await self._preempt(call, progress)
            if loop.time() < next_report or call.done():
                continue
            next_report = loop.time() + PROGRESS_EVERY_S
            try:
                gone = await self.source.cancelled(progress.jobs)
            except Exception as e:  # noqa: BLE001 - a missed poll only delays a cancel
                log.debug("cancel poll failed: %s", e)
                gone = set()
            if gone:
                progress.cancel(gone)
            step, steps = progress.step, progress.steps
            still = [j for j in tracked if j.id not in gone and j.id not in progress.dropped]
            ids = {j.id for j in still}
            previews = {k: p for k, p in progress.take_previews().items() if k in ids}
            if still and steps and (step != last or previews):
                last = step
                await self._report(still, step, steps, previews)

    async def _preempt(self, call: asyncio.Future, progress: BatchProgress) -> None:
        """Run waiting interactive work inside the running batch-lane loop, between two of
        its steps: the interactive request waits one step of the bulk batch, not all of it."""
        await self._pull(0.0)
        key = next((k for k in self.pending if k[-1] == 0), None)
        if key is None:
            return
        guest = await self._admit(self._take(key))
        if not guest:
            return
        self.running = self.running + guest  # held: kept alive in Redis while they run
        start = time.perf_counter()
        answer = asyncio.wrap_future(progress.offer_guest(guest))
        await asyncio.wait({answer, call}, return_when=asyncio.FIRST_COMPLETED)
        if not answer.done():
            back = progress.take_back()
            if back is not None:  # the loop ended before its next step: run them next
                for job in back:
                    self.add(job)
                self.running = [j for j in self.running if j not in back]
                return
        outcomes = await answer  # claimed by the loop: the call ends only after it
        self.running = [j for j in self.running if j not in guest]
        metrics.GUEST_BATCHES.labels(worker=self.worker_id).inc()
        log.debug(
            "ran %d interactive jobs inside a batch-lane loop in %.3fs",
            len(guest),
            time.perf_counter() - start,
        )
        self.batches_run += 1
        await self._settle(guest, outcomes)

    async def _report(
        self, jobs: list[Job], step: int, steps: int, previews: dict | None = None
    ) -> None:
        try:
            await self.source.progress(jobs, step, steps, previews or None)
        except Exception as e:  # noqa: BLE001 - progress is advisory; the job goes on
            log.debug("progress report failed: %s", e)

    def _hung(self, jobs: list[Job], seconds: float) -> None:
        what = ", ".join(sorted({f"{j.model}/{j.task}" for j in jobs}))
        self.hung = HungModelCall(
            f"a model call ({what}, {len(jobs)} jobs) has not returned after {seconds:.0f}s,"
            f" {self.hang_grace:.0f}s past its last deadline",
            jobs,
        )
        self._stopping, self._drain = True, False
        metrics.MODEL_HANGS.labels(worker=self.worker_id).inc()
        log.critical("%s: %s", self.worker_id, self.hung)
        raise self.hung

    async def _settle(self, jobs: list[Job], outcomes: list[dict | JobError]) -> None:
        answers: list[tuple[Job, Outcome]] = []
        again: list[Job] = []
        for job, out in zip(jobs, outcomes, strict=True):
            if isinstance(out, ModelCrashed):
                job.attempts += 1
                if job.attempts < self.max_attempts:
                    metrics.JOB_RETRIES.labels(model=job.model, task=job.task).inc()
                    again.append(job)
                    continue
                out = JobFailed(f"failed after {job.attempts} attempts: {out}")
            if isinstance(out, JobError):
                metrics.JOBS_FAILED.labels(model=job.model, task=job.task, reason=out.code).inc()
            answers.append((job, out))
        if again:
            await self.source.retry(again)
        if answers:
            await self.source.finish(answers)

    async def hand_back_pending(self) -> None:
        """Give every held, unstarted job back to the source (after a hung call)."""
        await self._hand_back_pending()

    async def _hand_back_pending(self) -> None:
        if self._expired:
            await self._answer_expired()  # answered JobTimeout, not handed on
        jobs = [j for q in self.pending.values() for _, j in q]
        self.pending.clear()
        if jobs:
            await self.source.hand_back(jobs)
