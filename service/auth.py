"""Optional bearer API keys and a per-caller token-bucket rate limit.

- ``settings.api_keys`` empty: no authentication. Otherwise every request except the probes,
  ``/metrics``, the docs and the playground (``/``, ``/playground/*``) needs
  ``Authorization: Bearer <key>`` (401 without a valid one).
- ``settings.rate_limit_per_s`` > 0: each caller (its API key, or its client address when keys
  are off) gets a bucket of ``rate_limit_burst`` requests refilled at that rate; an empty
  bucket answers 429 with ``Retry-After``.
- The bucket lives in Redis when ``settings.redis_url`` is set, so the limit holds across
  API replicas (one Lua script: atomic, clocked by Redis' TIME so replica clocks do not
  matter); in process memory otherwise.

The check runs as ASGI middleware, before the body is read: a refused caller costs nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time

from .errors import error_response
from .settings import Settings

OPEN_PATHS = frozenset(
    {
        "/healthz",
        "/readyz",
        "/metrics",
        "/docs",
        "/docs/oauth2-redirect",
        "/openapi.json",
        "/redoc",
        "/",  # the playground page: it asks for the key, so it must load without one
    }
)
OPEN_PREFIXES = ("/playground/",)  # the playground's static files (service/playground.py)


class MemoryBuckets:
    """Token buckets in this process. Single event loop, no awaits inside: no lock needed."""

    def __init__(self, rate: float, burst: int, max_callers: int = 100_000):
        self.rate, self.burst, self.max_callers = rate, burst, max_callers
        self.buckets: dict[str, tuple[float, float]] = {}  # caller -> (tokens, last refill)

    async def take(self, caller: str) -> float:
        """Take one token: 0.0 if allowed, else the seconds until one is available."""
        now = time.monotonic()
        tokens, last = self.buckets.get(caller, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        wait = 0.0
        if tokens >= 1:
            tokens -= 1
        else:
            wait = (1 - tokens) / self.rate
        if len(self.buckets) >= self.max_callers and caller not in self.buckets:
            self.buckets.clear()  # bound memory under a flood of distinct callers
        self.buckets[caller] = (tokens, now)
        return wait

    async def close(self) -> None:
        pass


# KEYS[1] bucket; ARGV rate, burst, ttl. Returns the wait in seconds as a string (Lua numbers
# come back from Redis as integers otherwise).
TOKEN_BUCKET_LUA = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1]) or burst
local ts = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
return tostring(wait)
"""


class RedisBuckets:
    """Token buckets shared by every API replica through Redis."""

    def __init__(self, url: str, prefix: str, rate: float, burst: int):
        import redis.asyncio as aioredis

        self.redis = aioredis.from_url(url, socket_connect_timeout=1.0, socket_timeout=2.0)
        self.script = self.redis.register_script(TOKEN_BUCKET_LUA)
        self.prefix, self.rate, self.burst = prefix, rate, burst
        # A bucket refills completely in burst / rate seconds; after that it can go.
        self.ttl = max(1, math.ceil(burst / rate) + 1)

    async def take(self, caller: str) -> float:
        key = f"{self.prefix}:ratelimit:{caller}"
        return float(await self.script(keys=[key], args=[self.rate, self.burst, self.ttl]))

    async def close(self) -> None:
        await self.redis.aclose()


def caller_id(key: str | None, client_host: str | None) -> str:
    """Stable bucket name: a hash of the API key (never the key itself), or the address."""
    if key:
        return "key:" + hashlib.sha256(key.encode()).hexdigest()[:24]
    return f"ip:{client_host or 'unknown'}"


def bearer_token(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


class AuthMiddleware:
    """ASGI middleware: bearer-key check, then the rate limit, for every non-open path."""

    def __init__(self, app, settings: Settings):
        self.app = app
        self.keys = [k.encode() for k in settings.api_keys if k]
        self.limiter = None
        if settings.rate_limit_per_s > 0:
            rate, burst = settings.rate_limit_per_s, settings.rate_limit_burst
            if settings.redis_url:
                self.limiter = RedisBuckets(settings.redis_url, settings.stream_prefix, rate, burst)
            else:
                self.limiter = MemoryBuckets(rate, burst)

    def _key_ok(self, token: str | None) -> bool:
        if token is None:
            return False
        given = token.encode()
        # Compare against every key so timing does not tell which one nearly matched.
        return sum(hmac.compare_digest(given, k) for k in self.keys) > 0

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if (
            scope["type"] != "http"
            or path in OPEN_PATHS
            or (path.startswith(OPEN_PREFIXES) and ".." not in path)  # no way out of them
            or scope["method"] == "OPTIONS"
        ):
            return await self.app(scope, receive, send)
        token = bearer_token(scope.get("headers", []))
        if self.keys and not self._key_ok(token):
            response = error_response(
                401,
                "unauthorized",
                "missing or invalid API key (Authorization: Bearer <key>)",
                headers={"WWW-Authenticate": "Bearer"},
            )
            return await response(scope, receive, send)
        if self.limiter is not None:
            client = scope.get("client") or (None, None)
            caller = caller_id(token if self.keys else None, client[0])
            try:
                wait = await self.limiter.take(caller)
            except Exception:  # Redis down: refuse fast rather than hang or let a flood in
                response = error_response(
                    503,
                    "broker_unavailable",
                    "rate limiter unavailable (Redis)",
                    headers={"Retry-After": "1"},
                )
                return await response(scope, receive, send)
            if wait > 0:
                response = error_response(
                    429,
                    "rate_limited",
                    f"rate limit exceeded; retry in {wait:.2f} s",
                    headers={"Retry-After": str(max(1, math.ceil(wait)))},
                )
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)
