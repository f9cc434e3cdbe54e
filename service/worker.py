"""``softvq worker``: the process that runs jobs from Redis streams with the same batcher as
the embedded mode.

    run_worker(settings, worker_id=None, metrics_port=9100)   # blocks until SIGTERM / SIGINT

A worker loads every configured model, warms it up, then loops: its batcher pulls jobs from a
``RedisSource`` (service/broker/redis_source.py: reading the streams, at-least-once delivery,
answering once), runs them, and answers. This module is the shell around that: signals, the
heartbeats, the keep-alive of held jobs, the run loop and its exits.

Heartbeats, both from the event loop every second:
- in Redis (``beat`` in service/broker/redis_streams.py): the worker's member of the
  ``{p}:workers`` sorted set and its info key, TTL ``HEARTBEAT_TTL_S``; the API's /readyz,
  /workers and /models read them;
- on local disk (service/liveness.py): ``settings.worker_liveness_file``, which the liveness
  probe ``softvq worker --check`` reads. It does not need Redis, and it goes stale when the
  event loop or the batcher is stuck (``/metrics`` is served from another thread and would
  still answer).

A model call that hangs (still running ``hang_grace_s`` after its jobs' last deadline) ends
the worker: the heartbeat stops, unstarted jobs are handed back, the hung call's jobs are left
to the visibility timeout, and the process exits with status 70 (``batcher.exit_for_restart``).

SIGTERM: stop reading, finish the running batch, then hand every held but unstarted job
back by re-adding it as a new entry and acking the old one (in one MULTI), so other workers
get it at once instead of after the visibility timeout; the heartbeats go at once too.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
import time
import uuid

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from .batcher import Batcher, HungModelCall, exit_for_restart, leave_past_tuner
from .broker.redis_source import RedisSource
from .broker.redis_streams import Keys, beat, connect, leave
from .executor import Executor
from .liveness import LivenessFile
from .registry import ModelRegistry
from .settings import Settings
from .tasks import largest_batch

log = logging.getLogger("softvq.worker")

HEARTBEAT_INTERVAL_S = 1.0
HEARTBEAT_TTL_S = 5


class Worker:
    def __init__(self, settings: Settings, registry: ModelRegistry, worker_id: str | None = None):
        if not settings.redis_url:
            raise ValueError("a worker needs a Redis URL (settings.redis_url / --redis)")
        self.settings = settings
        self.registry = registry
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.keys = Keys(settings.stream_prefix)
        self.batcher: Batcher | None = None
        self.liveness = LivenessFile(
            settings.worker_liveness_file, self.worker_id, settings.worker_stuck_after_s
        )
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
        # Hold at most two of the largest batches any task's policy allows (XREADGROUP's COUNT
        # applies per stream, so a read may bring up to this many from each): the rest stays
        # for other workers.
        self.batcher = Batcher(
            self.settings,
            Executor(self.registry),
            source,
            self.worker_id,
            max_held=2 * largest_batch(self.settings),
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
            asyncio.create_task(self._alive(source)),
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
            self.liveness.remove()
            if self.batcher.hung is not None:
                # Unstarted jobs go to other workers now; the hung call's own jobs stay
                # pending under this consumer, unkept, so they are reclaimed after the
                # visibility timeout like a dead worker's (and count as a delivery).
                try:
                    await self.batcher.hand_back_pending()
                except RedisError as e:
                    log.warning("could not hand back held jobs: %s", e)
            try:
                await leave(redis, self.keys, self.worker_id)
            except RedisError:
                pass
            await redis.aclose()
            log.info("worker %s stopped after %d batches", self.worker_id, self.batcher.batches_run)

    async def _alive(self, source: RedisSource) -> None:
        """The local liveness file: written by this loop, so it goes stale when the loop is
        stuck; it carries when the batcher last called its source (service/liveness.py)."""
        while self._helpers_run:
            idle = time.monotonic() - source.last_called
            self.liveness.write(busy=bool(self.batcher.running), batcher_at=time.time() - idle)
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)

    async def _heartbeat(self, redis: aioredis.Redis) -> None:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        while self._helpers_run:
            try:
                # GET /models shows these, not the API's view; the backend of a model changes
                # once its configured backend is proven (registry.start_tuning).
                info["served"] = self.registry.served()
                info["busy"] = bool(self.batcher.running)
                info["batches"] = self.batcher.batches_run
                await beat(redis, self.keys, self.worker_id, info, HEARTBEAT_TTL_S)
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
    settings: Settings,
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
    # A liveness file left by an earlier process here must not vouch for this one while it
    # loads (the probe's startup allowance covers the loading).
    LivenessFile(settings.worker_liveness_file, "", 0).remove()
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
    leave_past_tuner(registry, f"worker {worker.worker_id}")  # stopped cleanly


def main(argv: list[str] | None = None) -> int:
    """``python -m service.worker`` (``softvq worker`` is the same through service.cli)."""
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
