"""The result cache: the same input answered from memory instead of recomputed.

A job's key is a hash of everything its result depends on: the model, the task, the payload
(decoded pixels for tokenize / reconstruct, so the same picture sent as PNG or as JPEG of the
same pixels, JSON or multipart, is one entry; tokens for decode; classes, seeds and
guidance scale for generate) and the params (steps, sampler, guidance interval). The value
is the model's raw result (numpy arrays, in the wire format of service/serialization.py);
the route renders it exactly as it renders a fresh result, so a hit is byte-identical to a
miss. Hits are answered by the API (service/app.py ``Service.run``) and never reach a worker.

- ``MemoryResultCache`` (embedded): an LRU bounded to ``cache_max_bytes``;
- ``RedisResultCache`` (Redis mode): keys ``{p}:cache:{hash}`` with TTL ``cache_ttl_s``,
  shared by every API replica (bound the bytes with Redis' own ``maxmemory`` policy).

Entries over ``cache_max_entry_bytes`` are never stored. Which tasks are cached:
``SOFTVQ_CACHE_TASKS`` (tokenize and reconstruct by default; generate is deterministic
given its seeds and may be added). ``Cache-Control: no-cache`` on a request skips the
lookup (the fresh result is stored).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict

from redis.exceptions import RedisError

from .jobs import Job
from .serialization import dumps, loads

log = logging.getLogger(__name__)


def cache_key(job: Job) -> str:
    """sha256 over model, task, payload and params (arrays by dtype, shape and bytes)."""
    blob = dumps({"model": job.model, "task": job.task, "payload": job.payload, "p": job.params})
    return hashlib.sha256(blob).hexdigest()


class ResultCache:
    async def get(self, key: str) -> dict | None:
        raise NotImplementedError

    async def put(self, key: str, result: dict) -> None:
        raise NotImplementedError


class MemoryResultCache(ResultCache):
    def __init__(self, max_bytes: int, max_entry_bytes: int, ttl_s: float):
        self.max_bytes, self.max_entry, self.ttl = max_bytes, max_entry_bytes, ttl_s
        self._items: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self.bytes = 0

    async def get(self, key: str) -> dict | None:
        item = self._items.get(key)
        if item is None:
            return None
        stored, blob = item
        if time.monotonic() - stored > self.ttl:
            self._drop(key)
            return None
        self._items.move_to_end(key)
        return loads(blob)

    async def put(self, key: str, result: dict) -> None:
        blob = dumps(result)
        if len(blob) > min(self.max_entry, self.max_bytes):
            return
        if key in self._items:
            self._drop(key)
        self._items[key] = (time.monotonic(), blob)
        self.bytes += len(blob)
        while self.bytes > self.max_bytes:
            self._drop(next(iter(self._items)))

    def _drop(self, key: str) -> None:
        _, blob = self._items.pop(key)
        self.bytes -= len(blob)


class RedisResultCache(ResultCache):
    def __init__(self, redis, prefix: str, max_entry_bytes: int, ttl_s: float):
        self.redis, self.prefix = redis, prefix
        self.max_entry, self.ttl = max_entry_bytes, max(1, int(ttl_s))

    async def get(self, key: str) -> dict | None:
        try:
            blob = await self.redis.get(f"{self.prefix}:cache:{key}")
            return loads(blob) if blob else None
        except (RedisError, OSError, ValueError) as e:
            log.debug("cache read failed: %s", e)  # a cache that fails is a miss
            return None

    async def put(self, key: str, result: dict) -> None:
        blob = dumps(result)
        if len(blob) > self.max_entry:
            return
        try:
            await self.redis.set(f"{self.prefix}:cache:{key}", blob, ex=self.ttl)
        except (RedisError, OSError) as e:
            log.debug("cache write failed: %s", e)


def make_result_cache(settings, redis=None) -> ResultCache | None:
    """None when caching is off (no tasks, or a zero byte budget in embedded mode)."""
    if not settings.cache_tasks:
        return None
    if settings.redis_url:
        if redis is None:
            from .broker.redis_streams import connect

            redis = connect(settings.redis_url)
        return RedisResultCache(
            redis, settings.stream_prefix, settings.cache_max_entry_bytes, settings.cache_ttl_s
        )
    if settings.cache_max_bytes <= 0:
        return None
    return MemoryResultCache(
        settings.cache_max_bytes, settings.cache_max_entry_bytes, settings.cache_ttl_s
    )
