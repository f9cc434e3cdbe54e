"""Where async jobs (POST /jobs) live: their record and their event log, for GET and SSE.

A ``JobRecord`` is what ``GET /jobs/{id}`` shows (Replicate's prediction object, roughly);
its event log is what ``GET /jobs/{id}/events`` streams, each event with an id a client
sends back as ``Last-Event-ID`` to resume. (Not to be confused with service/jobs.py's
``Job``, the unit of work that travels to the batcher.)

Two stores, chosen like the broker (``make_job_store``):

- ``MemoryJobStore`` (embedded mode): a dict bounded to ``job_max_kept`` records (finished
  ones are evicted first, oldest first), each finished record kept ``job_ttl_s``;
- ``RedisJobStore`` (Redis mode): a hash ``{p}:jobrec:{id}`` and a stream
  ``{p}:jobevents:{id}`` per job, both expiring ``job_ttl_s`` after the job ends, so any API
  replica answers for any job and a restarted replica loses nothing finished. Workers write
  ``started`` and ``progress`` into them directly (service/broker/redis_source.py).

Every change is a transition that names the states it may leave (``TRANSITIONS``), applied
atomically (a Lua script in Redis): a job cancelled while its worker reports progress stays
cancelled, and a terminal state is final.

``preview`` events (a base64 PNG of the sampler's x0 estimate, for jobs submitted with
``previews``) are the one large event: only the latest is kept. A new one supersedes the
one before: deleted from the Redis stream (its id kept in the record hash), emptied in
memory (its id stays, with no data; readers skip it). Resuming after any id still works.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

ACTIVE = ("queued", "running")
TERMINAL = ("succeeded", "failed", "canceled")
# event -> (states it may follow, state it sets)
TRANSITIONS: dict[str, tuple[tuple[str, ...], str]] = {
    "started": (("queued",), "running"),
    "progress": (ACTIVE, "running"),
    "preview": (("running",), "running"),
    "succeeded": (ACTIVE, "succeeded"),
    "failed": (ACTIVE, "failed"),
    "canceled": (ACTIVE, "canceled"),
}


class JobRecord(BaseModel):
    id: str
    task: str
    model: str
    priority: str
    status: str = "queued"
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    progress: dict[str, int] | None = None  # {step, steps} of a sampling loop
    output: dict[str, Any] | None = None  # the sync endpoint's JSON body
    error: dict[str, str] | None = None  # {error, message}
    deadline: float = 0.0  # epoch seconds; the job fails with 504 past it
    owner: str | None = None  # hash of the API key that submitted it (None without keys)
    runner: str | None = None  # the API replica whose task awaits its outcome (Redis mode)


@dataclass
class JobEvent:
    id: str  # SSE id: resume after it with Last-Event-ID
    event: str  # queued | started | progress | preview | succeeded | failed | canceled
    data: dict


def _changes(event: str, data: dict, now: float) -> dict[str, Any]:
    """Record fields an event sets."""
    if event == "started":
        return {"started_at": now}
    if event == "progress":
        return {"progress": {"step": int(data["step"]), "steps": int(data["steps"])}}
    if event == "preview":
        return {}  # only in the log
    fields: dict[str, Any] = {"finished_at": now}
    if "progress" in data:
        fields["progress"] = data["progress"]
    if "output" in data:
        fields["output"] = data["output"]
    if "error" in data:
        fields["error"] = data["error"]
    return fields


async def record_progress(
    store: JobStore, jobs: list, step: int, steps: int, previews: dict | None = None
) -> None:
    """A running batch's report (service.batcher.JobSource.progress) as events of its
    tracked jobs: ``started`` (step 0), else ``progress`` and, for a job with a new
    service.progress.Preview, ``preview`` {step, steps, png (base64)}."""
    for job in jobs:
        if step == 0:
            await store.transition(job.id, "started")
            continue
        await store.transition(job.id, "progress", {"step": step, "steps": steps})
        p = (previews or {}).get(job.id)
        if p is not None:
            png = base64.b64encode(p.png).decode()
            await store.transition(
                job.id, "preview", {"step": p.step, "steps": p.steps, "png": png}
            )


class JobStore:
    """Interface; ``ttl_s``: how long a finished record is kept."""

    ttl_s: float

    async def create(self, record: JobRecord) -> tuple[JobRecord, bool]:
        """Store a new record (event ``queued``) -> (record, True); if the id exists already
        -> (the existing record, False): a client-chosen id makes submitting idempotent."""
        raise NotImplementedError

    async def get(self, job_id: str) -> JobRecord | None:
        raise NotImplementedError

    async def transition(self, job_id: str, event: str, data: dict | None = None) -> bool:
        """Apply ``event`` (see TRANSITIONS) with its data ({step, steps}, {output} or
        {error}); False when the record is gone or its state does not allow it. Terminal
        events carry the final record as their data in the log."""
        raise NotImplementedError

    async def events(self, job_id: str, after: str | None, timeout: float) -> list[JobEvent]:
        """Events after the id ``after`` (None: all), waiting up to ``timeout`` s for one."""
        raise NotImplementedError

    async def renew_lease(self, runner: str, ttl_s: float) -> None:
        """Say that API replica ``runner`` is alive for ``ttl_s`` more seconds. In memory
        the store dies with its only replica: nothing to say."""

    async def lease_alive(self, runner: str) -> bool:
        return True

    async def close(self) -> None:
        pass


# --- embedded -----------------------------------------------------------------------------


class _Entry:
    def __init__(self, record: JobRecord):
        self.record = record
        self.events: list[JobEvent] = []
        self.changed = asyncio.Event()
        self.preview_at: int | None = None  # index of the latest preview event

    def add(self, event: str, data: dict) -> None:
        self.events.append(JobEvent(str(len(self.events) + 1), event, data))
        self.changed.set()
        self.changed = asyncio.Event()


class MemoryJobStore(JobStore):
    def __init__(self, ttl_s: float, max_kept: int):
        self.ttl_s, self.max_kept = ttl_s, max_kept
        self._jobs: OrderedDict[str, _Entry] = OrderedDict()  # insertion (creation) order

    def _expire(self) -> None:
        now = time.time()
        for job_id in [
            k
            for k, e in self._jobs.items()
            if e.record.finished_at is not None and now - e.record.finished_at > self.ttl_s
        ]:
            del self._jobs[job_id]
        # Over the bound: the oldest finished records go first; active ones are never
        # dropped (their number is bounded by the queues).
        excess = len(self._jobs) - self.max_kept
        if excess > 0:
            done = [k for k, e in self._jobs.items() if e.record.status in TERMINAL]
            for job_id in done[:excess]:
                del self._jobs[job_id]

    async def create(self, record: JobRecord) -> tuple[JobRecord, bool]:
        self._expire()
        entry = self._jobs.get(record.id)
        if entry is not None:
            return entry.record, False
        entry = _Entry(record)
        self._jobs[record.id] = entry
        entry.add("queued", record.model_dump(exclude={"output"}))
        return record, True

    async def get(self, job_id: str) -> JobRecord | None:
        self._expire()
        entry = self._jobs.get(job_id)
        return entry.record if entry else None

    async def transition(self, job_id: str, event: str, data: dict | None = None) -> bool:
        entry = self._jobs.get(job_id)
        allowed, status = TRANSITIONS[event]
        if entry is None or entry.record.status not in allowed:
            return False
        data = data or {}
        now = time.time()
        entry.record = entry.record.model_copy(
            update={"status": status, **_changes(event, data, now)}
        )
        if status in TERMINAL:
            data = entry.record.model_dump()
        if event == "preview":
            if entry.preview_at is not None:  # superseded: the id stays, the PNG goes
                old = entry.events[entry.preview_at]
                entry.events[entry.preview_at] = JobEvent(old.id, old.event, {})
            entry.preview_at = len(entry.events)
        entry.add(event, data)
        return True

    async def events(self, job_id: str, after: str | None, timeout: float) -> list[JobEvent]:
        entry = self._jobs.get(job_id)
        if entry is None:
            return []
        start = int(after) if after and after.isdigit() else 0
        if len(entry.events) <= start and timeout > 0:
            changed = entry.changed
            try:
                await asyncio.wait_for(changed.wait(), timeout)
            except asyncio.TimeoutError:
                return []
        return entry.events[start:]


# --- Redis --------------------------------------------------------------------------------

# A record is a hash: 'status', 'meta' (the fields set at creation, JSON) and one JSON field
# per later change (started_at, progress, output, ...), so no script ever parses JSON (Lua's
# cjson would round 64-bit seeds). A terminal event's data in the log is empty: readers fill
# in the final record, which no longer changes.

# Create a record unless it exists. KEYS: record hash, event stream; ARGV: ttl, meta JSON,
# queued-event data.
CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'status', 'queued', 'meta', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', 1000, '*', 'event', 'queued', 'data', ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[1])
return 1
"""

# Apply a transition. KEYS: record hash, event stream; ARGV: allowed states (",a,b,"), new
# state, event, event data, ttl (0: keep), then field / JSON value pairs.
TRANSITION = """
local st = redis.call('HGET', KEYS[1], 'status')
if not st or not string.find(ARGV[1], ',' .. st .. ',', 1, true) then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[2])
for i = 6, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', 1000, '*', 'event', ARGV[3], 'data', ARGV[4])
if tonumber(ARGV[5]) > 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[5])
  redis.call('EXPIRE', KEYS[2], ARGV[5])
end
return 1
"""

# A preview: added only while running; the one before it deleted (only the latest PNG is
# kept). Its id lives in the record hash as a JSON string (every field there is JSON).
# KEYS: record hash, event stream; ARGV: event data.
PREVIEW = """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
local prev = redis.call('HGET', KEYS[1], 'preview_event')
if prev then redis.call('XDEL', KEYS[2], string.sub(prev, 2, -2)) end
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', 1000, '*', 'event', 'preview', 'data', ARGV[1])
redis.call('HSET', KEYS[1], 'preview_event', '"' .. id .. '"')
return 1
"""

META = ("id", "task", "model", "priority", "created_at", "deadline", "owner", "runner")


def _s(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


class RedisJobStore(JobStore):
    """Records and event logs in Redis (see the module docstring). ``redis``: an asyncio
    client (service.broker.redis_streams.connect)."""

    def __init__(self, redis, prefix: str, ttl_s: float):
        self.redis, self.prefix, self.ttl_s = redis, prefix, ttl_s

    def record_key(self, job_id: str) -> str:
        return f"{self.prefix}:jobrec:{job_id}"

    def events_key(self, job_id: str) -> str:
        return f"{self.prefix}:jobevents:{job_id}"

    def _active_ttl(self, deadline: float) -> int:
        # While active: until its deadline, then ttl_s more (a record is never lost while
        # something may still answer it).
        return max(1, int(max(0.0, deadline - time.time()) + self.ttl_s) + 1)

    async def create(self, record: JobRecord) -> tuple[JobRecord, bool]:
        created = await self.redis.eval(
            CREATE,
            2,
            self.record_key(record.id),
            self.events_key(record.id),
            self._active_ttl(record.deadline),
            record.model_dump_json(include=set(META)),
            record.model_dump_json(exclude={"output"}),
        )
        if created:
            return record, True
        existing = await self.get(record.id)
        return (existing or record), False

    def lease_key(self, runner: str) -> str:
        return f"{self.prefix}:api-lease:{runner}"

    async def renew_lease(self, runner: str, ttl_s: float) -> None:
        await self.redis.set(self.lease_key(runner), b"1", px=max(1, int(ttl_s * 1000)))

    async def lease_alive(self, runner: str) -> bool:
        return bool(await self.redis.exists(self.lease_key(runner)))

    async def get(self, job_id: str) -> JobRecord | None:
        raw = await self.redis.hgetall(self.record_key(job_id))
        if not raw or b"meta" not in raw:
            return None
        fields = json.loads(raw.pop(b"meta"))
        fields["status"] = _s(raw.pop(b"status", b"queued"))
        for k, v in raw.items():
            fields[_s(k)] = json.loads(v)
        return JobRecord.model_validate(fields)

    async def transition(self, job_id: str, event: str, data: dict | None = None) -> bool:
        allowed, status = TRANSITIONS[event]
        data = data or {}
        if event == "preview":
            done = await self.redis.eval(
                PREVIEW, 2, self.record_key(job_id), self.events_key(job_id), json.dumps(data)
            )
            return bool(done)
        terminal = status in TERMINAL
        pairs = []
        for k, v in _changes(event, data, time.time()).items():
            pairs += [k, json.dumps(v)]
        done = await self.redis.eval(
            TRANSITION,
            2,
            self.record_key(job_id),
            self.events_key(job_id),
            "," + ",".join(allowed) + ",",
            status,
            event,
            "{}" if terminal else json.dumps(data),
            max(1, int(self.ttl_s)) if terminal else 0,
            *pairs,
        )
        return bool(done)

    async def events(self, job_id: str, after: str | None, timeout: float) -> list[JobEvent]:
        start = after if after and _stream_id(after) else "0-0"
        # XREAD blocks at most a second at a time: under the client's socket timeout.
        block = max(1, int(min(timeout, 1.0) * 1000)) if timeout > 0 else None
        resp = await self.redis.xread({self.events_key(job_id): start}, block=block)
        out = []
        for _, entries in resp or []:
            for entry_id, fields in entries:
                event = _s(fields[b"event"])
                data = json.loads(fields[b"data"])
                if event in TERMINAL:
                    record = await self.get(job_id)
                    data = record.model_dump() if record else data
                out.append(JobEvent(_s(entry_id), event, data))
        return out


def _stream_id(text: str) -> bool:
    ms, dash, seq = text.partition("-")
    return ms.isdigit() and (not dash or seq.isdigit()) and len(text) < 40


def make_job_store(settings, redis=None) -> JobStore:
    """Redis-backed when ``settings.redis_url`` is set (``redis``: the client to use), else
    in memory."""
    if settings.redis_url:
        if redis is None:
            from .broker.redis_streams import connect

            redis = connect(settings.redis_url)
        return RedisJobStore(redis, settings.stream_prefix, settings.job_ttl_s)
    return MemoryJobStore(settings.job_ttl_s, settings.job_max_kept)
