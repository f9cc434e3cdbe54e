"""Redis Streams broker, API side: queue jobs on streams, wait for answers.

Layout in Redis (``p`` = settings.stream_prefix; deploy/ and KEDA read the first two):

    {p}:jobs:{model}:{task}   stream, one per model and task; entries {job: frame, reply: key}
    {p}:jobs:{model}:{task}:batch   the same for the batch lane (service/lanes.py)
    {p}-workers               the one consumer group every ``softvq worker`` reads through
    {p}:reply:{api_id}        list, one per API process: answers pushed by workers (TTL)
    {p}:done:{job_id}         "already answered" marker (TTL): the first answer wins
    {p}:cancel:{job_id}       the caller went away (TTL): workers drop the job unrun
    {p}:workers               sorted set of live workers: member worker id, score the Redis
                              time its heartbeat expires; expired members are pruned by the
                              readers, so /readyz, /metrics and /workers cost O(workers)
    {p}:worker:{worker_id}    what that worker serves, JSON (TTL = the heartbeat's)

Flow: ``submit`` XADDs the job through a script that refuses it when the stream already holds
``queue_max`` entries (QueueFull), then awaits a future. One listener task per API process
BLPOPs its reply list and resolves futures by job id, so waiting costs no connection per
request. Workers (service/broker/redis_source.py) answer through ``ANSWER``, which pushes
only if the job has no answer yet: a job run twice (its worker was presumed dead) is answered
once.

Liveness: every second a worker runs ``BEAT`` (its info key, and its member in the workers
set scored with Redis' own clock plus the TTL, so host clocks never matter); ``ready()`` and
``workers()`` run ``LIVE``, which drops expired members and returns the rest: one round trip
(plus one MGET of the info keys for ``workers()``), however many other keys Redis holds. A
worker that stops beating (killed, frozen, its loop stuck) leaves both within its TTL.

Redis down: every call fails within ``socket_connect_timeout`` and becomes
BrokerUnavailable; waiters in flight fail at once (their jobs died with Redis); the listener
reconnects by itself when Redis returns.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from typing import TYPE_CHECKING

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .. import metrics
from ..jobs import BrokerUnavailable, Job, JobCanceled, JobError, JobTimeout, QueueFull
from ..lanes import LANES
from ..serialization import dump_job, load_outcome
from ..settings import Settings
from .base import Broker

if TYPE_CHECKING:
    from ..registry import ModelRegistry

log = logging.getLogger(__name__)

# Add a job unless its stream is at the bound. KEYS: stream; ARGV: bound, job frame, reply key.
BOUNDED_ADD = """
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then return false end
return redis.call('XADD', KEYS[1], '*', 'job', ARGV[2], 'reply', ARGV[3])
"""

# Answer a job once. KEYS: done marker, reply list; ARGV: outcome frame, ttl seconds.
ANSWER = """
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[2]) then
  redis.call('RPUSH', KEYS[2], ARGV[1])
  redis.call('EXPIRE', KEYS[2], ARGV[2])
  return 1
end
return 0
"""

# A worker's heartbeat. KEYS: workers set, the worker's info key; ARGV: worker id, info JSON,
# ttl seconds. Scored by expiry in Redis time (TIME), so readers need neither the TTL nor
# synchronised clocks. The set itself expires when no worker beats any more.
BEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local ttl = tonumber(ARGV[3])
redis.call('SET', KEYS[2], ARGV[2], 'EX', ttl)
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('TTL', KEYS[1]) < ttl then redis.call('EXPIRE', KEYS[1], ttl) end
return 1
"""

# The live workers' ids, expired members pruned first. KEYS: workers set.
LIVE = """
local t = redis.call('TIME')
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', tonumber(t[1]) + tonumber(t[2]) / 1e6)
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""

UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, OSError)


class Keys:
    def __init__(self, prefix: str):
        self.prefix = prefix
        self.group = f"{prefix}-workers"

    def stream(self, model: str, task: str, lane: str = "interactive") -> str:
        """The interactive lane keeps the stream name of before lanes (KEDA, dashboards)."""
        base = f"{self.prefix}:jobs:{model}:{task}"
        return base if lane != "batch" else f"{base}:batch"

    def reply(self, api_id: str) -> str:
        return f"{self.prefix}:reply:{api_id}"

    def done(self, job_id: str) -> str:
        return f"{self.prefix}:done:{job_id}"

    def cancel(self, job_id: str) -> str:
        return f"{self.prefix}:cancel:{job_id}"

    @property
    def workers(self) -> str:
        return f"{self.prefix}:workers"

    def worker(self, worker_id: str) -> str:
        return f"{self.prefix}:worker:{worker_id}"


def connect(url: str, max_connections: int | None = None) -> aioredis.Redis:
    """A client that fails fast when Redis is gone (1 s to connect) but tolerates the short
    blocking reads (<= 1 s) the broker and workers issue.

    One immediate retry on a connection error, on a fresh connection: after Redis restarts
    (`docker compose restart redis`), every pooled connection is dead and would fail its
    next command once -- a 503 for each, long after Redis is back (deploy/smoke/check.py
    found it). With Redis still gone the retry's connect is refused at once, so failing fast
    is unchanged.

    ``max_connections``: a pool of that many connections that makes a command wait (up to
    5 s) for a free one instead of failing at once (the API's job store and cache: many
    event streams each hold a connection during their short blocking reads)."""
    options = dict(
        socket_connect_timeout=1.0,
        socket_timeout=5.0,
        retry_on_timeout=False,
        retry=Retry(NoBackoff(), 1),
        retry_on_error=[RedisConnectionError],
        health_check_interval=10,
    )
    if max_connections is None:
        return aioredis.from_url(url, **options)
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=5.0, **options
    )
    return aioredis.Redis(connection_pool=pool)


def ttl_seconds(settings: Settings) -> int:
    return max(1, math.ceil(settings.result_ttl_s))


async def beat(redis: aioredis.Redis, keys: Keys, worker_id: str, info: dict, ttl: int) -> None:
    """Tell the API this worker is alive for ``ttl`` more seconds, serving ``info``."""
    await redis.eval(
        BEAT, 2, keys.workers, keys.worker(worker_id), worker_id, json.dumps(info), ttl
    )


async def leave(redis: aioredis.Redis, keys: Keys, worker_id: str) -> None:
    """A stopping worker's heartbeat goes at once, not after its TTL."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.zrem(keys.workers, worker_id)
        pipe.delete(keys.worker(worker_id))
        await pipe.execute()


async def live_workers(redis: aioredis.Redis, keys: Keys) -> list[str]:
    """Ids of the workers whose heartbeat has not expired (expired ones are pruned)."""
    return sorted(_s(m) for m in await redis.eval(LIVE, 1, keys.workers))


def _s(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


class RedisBroker(Broker):
    def __init__(self, settings: Settings, registry: ModelRegistry | None = None):
        if not settings.redis_url:
            raise ValueError("RedisBroker needs settings.redis_url")
        self.settings = settings
        self.registry = registry
        self.keys = Keys(settings.stream_prefix)
        self.api_id = uuid.uuid4().hex[:16]
        self.reply_key = self.keys.reply(self.api_id)
        self.redis: aioredis.Redis | None = None
        self._waiters: dict[str, asyncio.Future] = {}
        self._entries: dict[str, tuple[str, str]] = {}  # job id -> (stream, entry id), queued
        self._tracked: set[str] = set()  # waiters of async jobs
        self._listener: asyncio.Task | None = None
        self._background: set[asyncio.Task] = set()
        self._closing = False
        self._redis_up = False
        self._listening = True

    # --- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        self.redis = connect(self.settings.redis_url)
        self._listener = asyncio.create_task(self._listen(), name="softvq-reply-listener")

    async def stop(self) -> None:
        """Refuse new jobs, wait (up to their deadlines) for the answers already awaited."""
        self._closing = True
        # Sync callers are waited for (up to their deadlines). Async jobs may run for an
        # hour: their waiters are failed now; their records say so (service/async_jobs.py).
        while set(self._waiters) - self._tracked:
            await asyncio.sleep(0.05)
        self._fail_waiters(BrokerUnavailable("the API replica running this job stopped"))
        self._listening = False
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
        await asyncio.gather(*self._background, return_exceptions=True)
        if self.redis is not None:
            await self.redis.aclose()

    # --- submit ---------------------------------------------------------------------------
    async def submit(self, job: Job) -> dict:
        if self._closing or self.redis is None:
            raise BrokerUnavailable(
                "the server is shutting down" if self._closing else "not started"
            )
        if not job.deadline:
            job.deadline = time.time() + self.settings.request_timeout_s
        stream = self.keys.stream(job.model, job.task, job.priority)
        fut = asyncio.get_running_loop().create_future()
        self._waiters[job.id] = fut
        if job.tracked:
            self._tracked.add(job.id)
        entry_id = None
        try:
            try:
                entry_id = await self.redis.eval(
                    BOUNDED_ADD, 1, stream, self.settings.queue_max, dump_job(job), self.reply_key
                )
            except UNAVAILABLE as e:
                raise BrokerUnavailable(f"Redis is unreachable: {e}") from None
            except RedisError as e:
                raise BrokerUnavailable(f"Redis refused the job: {e}") from None
            if entry_id is None:
                raise QueueFull(
                    f"queue for {job.model}/{job.task} is full ({self.settings.queue_max} jobs)"
                )
            self._entries[job.id] = (stream, _s(entry_id))
            try:
                outcome = await asyncio.wait_for(fut, timeout=max(0.0, job.deadline - time.time()))
            except asyncio.TimeoutError:
                self._cancel_later(job, stream, entry_id)
                raise JobTimeout(f"no result within the request deadline ({job.id})") from None
            except asyncio.CancelledError:
                self._cancel_later(job, stream, entry_id)  # the client went away
                raise
        finally:
            self._waiters.pop(job.id, None)
            self._entries.pop(job.id, None)
            self._tracked.discard(job.id)
        if isinstance(outcome, JobError):
            raise outcome
        return outcome

    async def cancel(self, job_id: str) -> None:
        """Mark the job cancelled for the workers (an unstarted one is dropped unrun, a
        running one leaves its sampling loop at the next step) and fail its waiter here, if
        this replica has one."""
        if self.redis is None:
            return
        try:
            await self.redis.set(self.keys.cancel(job_id), 1, ex=ttl_seconds(self.settings))
        except UNAVAILABLE as e:
            raise BrokerUnavailable(f"Redis is unreachable: {e}") from None
        fut = self._waiters.get(job_id)
        if fut is not None and not fut.done():
            fut.set_result(JobCanceled("cancelled by its caller"))

    async def queue_position(self, job_id: str) -> int | None:
        where = self._entries.get(job_id)
        if where is None or self.redis is None:
            return None
        stream, entry_id = where
        try:
            ahead = await self.redis.xrange(
                stream, "-", entry_id, count=self.settings.queue_max + 1
            )
        except RedisError:
            return None
        return max(0, len(ahead) - 1)

    def _cancel_later(self, job: Job, stream: str, entry_id) -> None:
        """Drop a job nobody waits for by marking it cancelled: the worker that reads it
        acks and deletes it unrun. The entry is deliberately NOT deleted here: an XDEL of an
        undelivered entry makes Redis report the group's lag as NULL until the workers have
        read past it, and KEDA (which scales on that lag) would then see no backlog exactly
        when requests time out. Runs as its own task because the caller may be cancelled."""

        async def cancel():
            try:
                await self.redis.set(self.keys.cancel(job.id), 1, ex=ttl_seconds(self.settings))
            except RedisError as e:
                log.info("could not cancel job %s: %s", job.id, e)

        task = asyncio.create_task(cancel())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # --- answers ----------------------------------------------------------------------------
    async def _listen(self) -> None:
        # Loop on a flag rather than relying on cancellation alone: redis-py may turn a
        # cancelled blocking read into a ConnectionError, which the loop would survive.
        while self._listening:
            try:
                item = await self.redis.blpop([self.reply_key], timeout=1)
                self._redis_up = True
            except asyncio.CancelledError:
                raise
            except UNAVAILABLE as e:
                if not self._listening:
                    return
                if isinstance(e, (RedisTimeoutError, TimeoutError)) and await self._pingable():
                    continue  # a slow read (e.g. this event loop was busy), not an outage
                if self._redis_up or self._waiters:
                    log.warning(
                        "Redis unreachable (%s); failing %d waiting jobs", e, len(self._waiters)
                    )
                self._redis_up = False
                self._fail_waiters(BrokerUnavailable("lost the connection to Redis"))
                await asyncio.sleep(0.2)
                continue
            except RedisError as e:
                log.warning("reply listener: %s", e)
                await asyncio.sleep(0.2)
                continue
            if item is None:
                continue
            try:
                job_id, outcome = load_outcome(item[1])
            except ValueError as e:
                log.warning("dropping a malformed answer: %s", e)
                continue
            fut = self._waiters.get(job_id)
            if fut is not None and not fut.done():
                fut.set_result(outcome)  # a JobError outcome is raised by submit

    async def _pingable(self) -> bool:
        try:
            return bool(await self.redis.ping())
        except (RedisError, OSError):
            return False

    def _fail_waiters(self, error: JobError) -> None:
        for fut in list(self._waiters.values()):
            if not fut.done():
                fut.set_exception(error)

    # --- status ---------------------------------------------------------------------------
    async def ready(self) -> tuple[bool, str]:
        if self._closing:
            return False, "shutting down"
        if self.redis is None:
            return False, "not started"
        try:
            alive = await live_workers(self.redis, self.keys)  # also proves Redis answers
        except RedisError as e:
            metrics.WORKERS_ALIVE.set(0)
            return False, f"Redis unreachable: {e}"
        metrics.WORKERS_ALIVE.set(len(alive))
        if not alive:
            return False, "no worker heartbeat"
        return True, "ok"

    async def workers(self) -> list[dict]:
        """Live workers, from their heartbeats (what each one serves and how)."""
        if self.redis is None:
            return []
        try:
            ids = await live_workers(self.redis, self.keys)
            values = await self.redis.mget([self.keys.worker(i) for i in ids]) if ids else []
        except RedisError as e:
            raise BrokerUnavailable(f"Redis unreachable: {e}") from None
        out = []
        for worker_id, raw in zip(ids, values, strict=True):
            try:
                info = json.loads(raw) if raw else None
            except ValueError:
                info = None
            if isinstance(info, dict):  # expired between the two calls, or not ours: skip
                out.append({"id": worker_id, **info})
        return out

    async def queue_depth(self, model: str, task: str) -> int:
        if self.redis is None:
            return 0
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for lane in LANES:
                    pipe.xlen(self.keys.stream(model, task, lane))
                depths = [int(d) for d in await pipe.execute()]
        except RedisError as e:
            raise BrokerUnavailable(f"Redis unreachable: {e}") from None
        for lane, d in zip(LANES, depths, strict=True):
            metrics.LANE_DEPTH.labels(model=model, task=task, lane=lane).set(d)
        metrics.QUEUE_DEPTH.labels(model=model, task=task).set(sum(depths))
        return sum(depths)
