"""``softvq worker``: runs jobs from Redis streams with the same batcher as the embedded mode.

    run_worker(settings, worker_id=None, metrics_port=9100)   # blocks until SIGTERM / SIGINT

A worker loads every configured model, warms it up, then loops: read new entries of every
``{p}:jobs:{model}:{task}`` stream through the consumer group ``{p}-workers`` (XREADGROUP),
batch, run, answer (once per job, see service/broker/redis_streams.py), XACK + XDEL.

Delivery is at least once:
- every ``visibility_timeout_s / 2`` a worker XAUTOCLAIMs entries idle longer than
  ``visibility_timeout_s``: their worker died. Deliveries are counted (XPENDING plus the job's
  own ``attempts`` for re-queued crashes); past ``max_attempts`` the caller gets JobFailed and
  the entry is acked;
- while it holds jobs (waiting in a group or running) a worker re-XCLAIMs them to itself
  every ``visibility_timeout_s / 3`` (JUSTID: idle time reset, delivery count unchanged), so
  a long batch is never mistaken for a dead worker;
- a job the model crashed on is re-added as a new entry with ``attempts + 1``.

A model call that hangs (still running ``hang_grace_s`` after its jobs' last deadline) ends
the worker: the heartbeat stops, unstarted jobs are handed back, the hung call's jobs are left
to the visibility timeout, and the process exits with status 70 (``batcher.exit_for_restart``).

SIGTERM: stop reading, finish the running batch, then hand every held but unstarted job
back by re-adding it as a new entry and acking the old one (in one MULTI), so other workers
get it at once instead of after the visibility timeout. A heartbeat key
``{p}:worker:{worker_id}`` (TTL ``HEARTBEAT_TTL_S``) tells the API that workers are alive.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import sys
import time
import uuid

from redis.exceptions import RedisError, ResponseError

from . import metrics
from .batcher import Batcher, HungModelCall, JobSource, Outcome, exit_for_restart
from .broker.redis_streams import ANSWER, UNAVAILABLE, Keys, connect, ttl_seconds
from .executor import Executor
from .jobs import Job, JobFailed
from .registry import ModelRegistry
from .serialization import dump_job, dump_outcome, load_job

log = logging.getLogger("softvq.worker")

HEARTBEAT_INTERVAL_S = 1.0
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
HEARTBEAT_TTL_S = 5


class RedisSource(JobSource):
    """Jobs from the streams of every model this worker serves."""

    def __init__(self, settings, registry: ModelRegistry, redis, worker_id: str):
        self.settings = settings
        self.redis = redis
        self.keys = Keys(settings.stream_prefix)
        self.consumer = worker_id
        self.streams = [self.keys.stream(m, t) for m, t in registry.streams()]
        self.entries: dict[str, tuple[str, str, str]] = {}  # job id -> (stream, entry id, reply)
        self.claim_every = settings.visibility_timeout_s / 2
        self._last_claim = 0.0
        self._groups_ok = False
        self._down_since: float | None = None

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
        try:
            if not self._groups_ok:
                await self.ensure_groups()
            jobs: list[Job] = []
            if time.monotonic() - self._last_claim >= self.claim_every:
                self._last_claim = time.monotonic()
                jobs += await self._reclaim(limit)
            if len(jobs) < limit:
                # Blocking reads stay short (<= 1 s, under the client's socket timeout) so
                # reclaiming, shutdown and a Redis outage are all noticed promptly.
                # (BLOCK 0 would mean forever, hence at least 1 ms.)
                block = max(1, int(min(timeout, 1.0) * 1000)) if timeout > 0 and not jobs else None
                resp = await self.redis.xreadgroup(
                    self.keys.group,
                    self.consumer,
                    dict.fromkeys(self.streams, ">"),
                    count=limit - len(jobs),
                    block=block,
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
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for job in jobs:
                    pipe.exists(self.keys.cancel(job.id))
                flags = await pipe.execute()
        except RedisError:
            return set()  # cannot tell; run them (an answer nobody reads expires)
        return {j.id for j, f in zip(jobs, flags, strict=True) if f}

    async def finish(self, items: list[tuple[Job, Outcome]]) -> None:
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


class Worker:
    def __init__(self, settings, registry: ModelRegistry, worker_id: str | None = None):
        if not settings.redis_url:
            raise ValueError("a worker needs a Redis URL (settings.redis_url / --redis)")
        self.settings = settings
        self.registry = registry
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.keys = Keys(settings.stream_prefix)
        self.batcher: Batcher | None = None
        self._stop_requested = False
        self._helpers_run = True

    def stop(self) -> None:
        """Graceful stop (SIGTERM): finish the running batch, hand back the rest."""
        self._stop_requested = True
        if self.batcher is not None:
            self.batcher.stop(drain=False)

    async def run(self) -> None:
        redis = connect(self.settings.redis_url)
        source = RedisSource(self.settings, self.registry, redis, self.worker_id)
        # Hold at most two batches' worth (XREADGROUP's COUNT applies per stream, so a read
        # may bring up to this many from each): the rest stays for other workers.
        self.batcher = Batcher(
            self.settings,
            Executor(self.registry),
            source,
            self.worker_id,
            max_held=2 * self.settings.max_batch_size,
        )
        if self._stop_requested:
            self.batcher.stop(drain=False)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self.stop)
            except (NotImplementedError, RuntimeError):  # not the main thread
                pass
        helpers = [
            asyncio.create_task(self._heartbeat(redis)),
            asyncio.create_task(self._keep_held(source)),
        ]
        log.info(
            "worker %s serving %d streams of group %s",
            self.worker_id,
            len(source.streams),
            self.keys.group,
        )
        try:
            await self.batcher.run()
        finally:
            # Helpers loop on this flag too: redis-py may swallow a cancellation that lands
            # inside a command (turning it into a ConnectionError the helper survives).
            self._helpers_run = False
            for t in helpers:
                t.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            if self.batcher.hung is not None:
                # Unstarted jobs go to other workers now; the hung call's own jobs stay
                # pending under this consumer, unkept, so they are reclaimed after the
                # visibility timeout like a dead worker's (and count as a delivery).
                try:
                    await self.batcher.hand_back_pending()
                except RedisError as e:
                    log.warning("could not hand back held jobs: %s", e)
            try:
                await redis.delete(self.keys.worker(self.worker_id))
            except RedisError:
                pass
            await redis.aclose()
            log.info("worker %s stopped after %d batches", self.worker_id, self.batcher.batches_run)

    async def _heartbeat(self, redis) -> None:
        key = self.keys.worker(self.worker_id)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        while self._helpers_run:
            try:
                # GET /models shows these, not the API's view; the backend of a model changes
                # once its configured backend is proven (registry.start_tuning).
                info["served"] = self.registry.served()
                info["busy"] = bool(self.batcher.running)
                info["batches"] = self.batcher.batches_run
                await redis.set(key, json.dumps(info), ex=HEARTBEAT_TTL_S)
            except RedisError:
                pass  # fetch() logs the outage
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)

    async def _keep_held(self, source: RedisSource) -> None:
        every = self.settings.visibility_timeout_s / 3
        while self._helpers_run:
            await asyncio.sleep(every)
            try:
                await source.keep(self.batcher.held())
            except RedisError as e:
                log.debug("keep-alive of held jobs failed: %s", e)


def run_worker(
    settings,
    worker_id: str | None = None,
    metrics_port: int | None = None,
    registry: ModelRegistry | None = None,
) -> None:
    """Load and warm the models (or take ``registry``), serve /metrics on ``metrics_port``,
    run until SIGTERM (or a hung model call: exit status 70)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s"
        )
    if not settings.redis_url:
        raise ValueError("a worker needs a Redis URL (SOFTVQ_REDIS_URL or --redis)")
    # SIGTERM while the models load: nothing is held yet, so just exit cleanly.
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    registry = registry or ModelRegistry.from_settings(settings)
    registry.warmup()
    signal.signal(signal.SIGTERM, previous)  # from here on the event loop handles it
    if metrics_port:
        from prometheus_client import start_http_server

        start_http_server(metrics_port)
    # Jobs are taken on eager at once; the configured backend is proven and swapped in.
    registry.start_tuning()
    worker = Worker(settings, registry, worker_id)
    try:
        asyncio.run(worker.run())
    except HungModelCall as e:
        exit_for_restart(f"worker {worker.worker_id}: {e}")
    except Exception as e:  # noqa: BLE001 - the loop died: a restart is the only cure
        log.exception("worker loop crashed")
        exit_for_restart(f"worker {worker.worker_id}: loop stopped: {type(e).__name__}: {e}")


def _s(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def main(argv: list[str] | None = None) -> int:
    """``python -m service.worker`` (``softvq worker`` is the same through service.cli)."""
    from .settings import Settings

    p = argparse.ArgumentParser(prog="python -m service.worker", description="a softvq worker")
    p.add_argument("--redis", metavar="URL", help="Redis URL (default: SOFTVQ_REDIS_URL)")
    p.add_argument("--metrics-port", type=int, default=None, help="serve /metrics on this port")
    p.add_argument("--worker-id", default=None)
    args = p.parse_args(argv)
    settings = Settings()
    if args.redis:
        settings = settings.model_copy(update={"redis_url": args.redis})
    run_worker(settings, args.worker_id, args.metrics_port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
