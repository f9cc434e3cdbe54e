"""The worker side of the Redis Streams broker: a ``JobSource`` over the job streams.

A worker's batcher (service/batcher.py) pulls from ``RedisSource``: it reads new entries of
every ``{p}:jobs:{model}:{task}`` stream this worker serves through the consumer group
``{p}-workers`` (XREADGROUP), answers each job once (``ANSWER`` in redis_streams.py), then
XACK + XDEL. The key layout and the API side are in service/broker/redis_streams.py; the
process around it (signals, heartbeat, run loop) in service/worker.py.

Delivery is at least once:
- every ``visibility_timeout_s / 2`` the source XAUTOCLAIMs entries idle longer than
  ``visibility_timeout_s``: their worker died. Deliveries are counted (XPENDING plus the job's
  own ``attempts`` for re-queued crashes); past ``max_attempts`` the caller gets JobFailed and
  the entry is acked;
- while it holds jobs (waiting in a group or running) a worker re-XCLAIMs them to itself
  (``keep``, every ``visibility_timeout_s / 3``; JUSTID: idle time reset, delivery count
  unchanged), so a long batch is never mistaken for a dead worker;
- a job the model crashed on is re-added as a new entry with ``attempts + 1``; jobs handed
  back (SIGTERM, a hung model call) likewise, with their attempts unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import time

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from .. import metrics
from ..batcher import JobSource, Outcome
from ..job_store import RedisJobStore, record_progress
from ..jobs import Job, JobFailed
from ..registry import ModelRegistry
from ..serialization import dump_job, dump_outcome, load_job
from ..settings import Settings
from .redis_streams import ANSWER, UNAVAILABLE, Keys, _s, ttl_seconds

log = logging.getLogger("softvq.worker")

# Keep-alive of held entries, only those this consumer still owns (a plain XCLAIM would take
# back an entry another worker had already reclaimed). KEYS: stream; ARGV: group, consumer,
# entry ids. Returns how many were kept.
KEEP = """
local kept = 0
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    kept = kept + 1
  end
end
return kept
"""


class RedisSource(JobSource):
    """Jobs from the streams of every model this worker serves."""

    def __init__(
        self,
        settings: Settings,
        registry: ModelRegistry,
        redis: aioredis.Redis | None,
        worker_id: str,
    ):
        self.settings = settings
        self.redis = redis
        self.keys = Keys(settings.stream_prefix)
        self.consumer = worker_id
        pairs = registry.streams()
        self.interactive = [self.keys.stream(m, t) for m, t in pairs]
        self.batch = [self.keys.stream(m, t, "batch") for m, t in pairs]
        self.streams = self.interactive + self.batch
        self.jobs = RedisJobStore(redis, settings.stream_prefix, settings.job_ttl_s)
        self.entries: dict[str, tuple[str, str, str]] = {}  # job id -> (stream, entry id, reply)
        self.claim_every = settings.visibility_timeout_s / 2
        self._last_claim = 0.0
        self._groups_ok = False
        self._down_since: float | None = None
        # When the batcher last called in (monotonic): it fetches every turn (at most about a
        # second apart, also while Redis is down) and reports each batch's outcome, so a
        # stale value while no model call runs means the batcher is stuck (worker liveness).
        self.last_called = time.monotonic()

    # --- setup ----------------------------------------------------------------------------
    async def ensure_groups(self) -> None:
        """Create the consumer group on every stream (from id 0, so jobs queued before any
        worker existed are delivered too). Also after Redis lost its data."""
        for stream in self.streams:
            try:
                await self.redis.xgroup_create(stream, self.keys.group, id="0", mkstream=True)
            except ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise
        self._groups_ok = True

    # --- JobSource ------------------------------------------------------------------------
    async def fetch(self, timeout: float, limit: int) -> list[Job]:
        self.last_called = time.monotonic()
        try:
            if not self._groups_ok:
                await self.ensure_groups()
            jobs: list[Job] = []
            if time.monotonic() - self._last_claim >= self.claim_every:
                self._last_claim = time.monotonic()
                jobs += await self._reclaim(limit)
            # Interactive streams first: the batch lane gets only the room they leave.
            for streams in (self.interactive, self.batch):
                if len(jobs) >= limit:
                    break
                resp = await self.redis.xreadgroup(
                    self.keys.group,
                    self.consumer,
                    dict.fromkeys(streams, ">"),
                    count=limit - len(jobs),
                )
                for stream, entries in resp or []:
                    jobs += await self._accept(_s(stream), entries)
            if not jobs and timeout > 0:
                # Nothing waiting: block on every stream. Blocking reads stay short (<= 1 s,
                # under the client's socket timeout) so reclaiming, shutdown and a Redis
                # outage are all noticed promptly. (BLOCK 0 would mean forever.)
                resp = await self.redis.xreadgroup(
                    self.keys.group,
                    self.consumer,
                    dict.fromkeys(self.streams, ">"),
                    count=limit,
                    block=max(1, int(min(timeout, 1.0) * 1000)),
                )
                for stream, entries in resp or []:
                    jobs += await self._accept(_s(stream), entries)
            self._redis_back()
            return jobs
        except ResponseError as e:
            if "NOGROUP" in str(e):  # Redis restarted empty: recreate, then read again
                log.warning("consumer group missing (Redis restarted?); recreating it")
                self._groups_ok = False
                return []
            log.error("Redis refused a read: %s", e)  # e.g. a key of the wrong type
            await asyncio.sleep(min(max(timeout, 0.05), 0.5))
            return []
        except UNAVAILABLE as e:
            self._redis_down(e)
            await asyncio.sleep(min(max(timeout, 0.05), 0.5))
            return []

    async def _accept(self, stream: str, entries, deliveries: dict | None = None) -> list[Job]:
        jobs, bad = [], []
        for entry_id, fields in entries:
            entry_id = _s(entry_id)
            if not fields:  # deleted while pending (its caller cancelled it)
                bad.append(entry_id)
                continue
            try:
                job = load_job(fields[b"job"])
                reply = _s(fields[b"reply"])
            except (KeyError, ValueError) as e:
                log.warning("dropping malformed entry %s of %s: %s", entry_id, stream, e)
                bad.append(entry_id)
                continue
            if deliveries is not None and job.id in self.entries:
                # XAUTOCLAIM cannot skip this consumer's own entries: one that sat idle here
                # (e.g. the event loop stalled) came back to us. We still hold it; carry on.
                continue
            self.entries[job.id] = (stream, entry_id, reply)
            if deliveries is not None:
                # Earlier deliveries of this entry ended without an answer: their worker died.
                job.attempts += max(0, deliveries.get(entry_id, 1) - 1)
                if job.attempts >= self.settings.max_attempts:
                    metrics.JOBS_FAILED.labels(
                        model=job.model, task=job.task, reason="attempts"
                    ).inc()
                    await self.finish(
                        [
                            (
                                job,
                                JobFailed(
                                    f"gave up after {job.attempts} attempts (its workers stopped or crashed)"
                                ),
                            )
                        ]
                    )
                    continue
                metrics.JOB_RETRIES.labels(model=job.model, task=job.task).inc()
                log.info("reclaimed job %s (%s) after attempt %d", job.id, stream, job.attempts)
            jobs.append(job)
        if bad:
            async with self.redis.pipeline(transaction=False) as pipe:
                for entry_id in bad:
                    pipe.xack(stream, self.keys.group, entry_id)
                    pipe.xdel(stream, entry_id)
                await pipe.execute()
        return jobs

    async def _reclaim(self, limit: int) -> list[Job]:
        """Entries idle past the visibility timeout: their worker is gone. Take them over."""
        jobs: list[Job] = []
        min_idle = int(self.settings.visibility_timeout_s * 1000)
        for stream in self.streams:
            if len(jobs) >= limit:
                break
            resp = await self.redis.xautoclaim(
                stream, self.keys.group, self.consumer, min_idle, "0-0", count=limit - len(jobs)
            )
            claimed = resp[1] if len(resp) > 1 else []
            if not claimed:
                continue
            ids = [_s(e[0]) for e in claimed]
            pending = await self.redis.xpending_range(
                stream,
                self.keys.group,
                min=ids[0],
                max=ids[-1],
                count=len(ids) + 100,
                consumername=self.consumer,
            )
            deliveries = {_s(p["message_id"]): int(p["times_delivered"]) for p in pending}
            jobs += await self._accept(stream, claimed, deliveries)
        return jobs

    async def cancelled(self, jobs: list[Job]) -> set[str]:
        self.last_called = time.monotonic()
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for job in jobs:
                    pipe.exists(self.keys.cancel(job.id))
                flags = await pipe.execute()
        except RedisError:
            return set()  # cannot tell; run them (an answer nobody reads expires)
        return {j.id for j, f in zip(jobs, flags, strict=True) if f}

    async def finish(self, items: list[tuple[Job, Outcome]]) -> None:
        self.last_called = time.monotonic()
        ttl = ttl_seconds(self.settings)
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for job, outcome in items:
                    if job.id not in self.entries:
                        continue
                    stream, entry_id, reply = self.entries.pop(job.id)
                    if outcome is not None:
                        pipe.eval(
                            ANSWER,
                            2,
                            self.keys.done(job.id),
                            reply,
                            dump_outcome(job.id, outcome),
                            ttl,
                        )
                    pipe.xack(stream, self.keys.group, entry_id)
                    pipe.xdel(stream, entry_id)
                await pipe.execute()
        except RedisError as e:
            # Redis went away mid-batch: the callers were already failed with 503 by their
            # API, and the entries are gone with Redis's data (or will be redelivered).
            log.warning("could not deliver %d answers: %s", len(items), e)

    async def progress(self, jobs: list[Job], step: int, steps: int, previews=None) -> None:
        """Straight into the jobs' records and event logs: any API replica streams them."""
        await record_progress(self.jobs, jobs, step, steps, previews)

    async def retry(self, jobs: list[Job]) -> None:
        await self._requeue(jobs)

    async def hand_back(self, jobs: list[Job]) -> None:
        await self._requeue(jobs)
        log.info("handed back %d unstarted jobs", len(jobs))

    async def _requeue(self, jobs: list[Job]) -> None:
        """New entry (with the job's current ``attempts``), old one acked and deleted, in one
        MULTI so the job is never lost nor doubled."""
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                for job in jobs:
                    if job.id not in self.entries:
                        continue
                    stream, entry_id, reply = self.entries.pop(job.id)
                    pipe.xadd(stream, {"job": dump_job(job), "reply": reply})
                    pipe.xack(stream, self.keys.group, entry_id)
                    pipe.xdel(stream, entry_id)
                await pipe.execute()
        except RedisError as e:
            log.warning(
                "could not re-queue %d jobs (redelivered after the visibility timeout instead): %s",
                len(jobs),
                e,
            )

    # --- keeping held jobs ----------------------------------------------------------------
    async def keep(self, jobs: list[Job]) -> int:
        """Reset the idle time of entries this worker still owns (XCLAIM JUSTID does not
        count a delivery), so no other worker takes them over while they wait or run.
        An entry another worker already took over is left to it. Returns entries kept."""
        by_stream: dict[str, list[str]] = {}
        for job in jobs:
            if job.id in self.entries:
                stream, entry_id, _ = self.entries[job.id]
                by_stream.setdefault(stream, []).append(entry_id)
        kept = 0
        for stream, ids in by_stream.items():
            kept += int(
                await self.redis.eval(KEEP, 1, stream, self.keys.group, self.consumer, *ids)
            )
        return kept

    def _redis_down(self, e: Exception) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning("Redis unreachable (%s); retrying", e)

    def _redis_back(self) -> None:
        if self._down_since is not None:
            log.info("Redis reachable again after %.1fs", time.monotonic() - self._down_since)
            self._down_since = None
