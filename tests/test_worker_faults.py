"""Worker faults with real Redis: a live worker's held jobs are never taken over, a SIGKILLed
worker's jobs are reclaimed and answered once, SIGTERM hands unstarted jobs back, a poisoned job is retried then failed while the worker
keeps serving, and a job whose workers keep dying is given up after max_attempts."""

from __future__ import annotations

import asyncio
import re
import signal
import time

import httpx
import pytest
import redis
import torch

from service import metrics
from service.broker.redis_streams import Keys, RedisBroker
from service.jobs import JobFailed
from service.registry import ModelRegistry
from service.worker import RedisSource, Worker
from tests.redis_server import free_port
from tests.test_batcher import gen_job, poison_tokenizer, tok_job
from tests.test_redis_broker import assert_matches, expected, mixed_jobs, wait_ready

pytestmark = pytest.mark.redis
torch.set_num_threads(1)


def held_by(r: redis.Redis, stream_keys: list[str], group: str, consumer: str) -> int:
    total = 0
    for s in stream_keys:
        if r.exists(s):
            for c in r.xpending(s, group)["consumers"] or []:
                if c["name"].decode() == consumer:
                    total += int(c["pending"])
    return total


def most_deliveries(r: redis.Redis, stream_keys: list[str], group: str) -> int:
    """Highest delivery count among pending entries (1 = never taken over or reclaimed)."""
    counts = [
        p["times_delivered"]
        for s in stream_keys
        if r.exists(s)
        for p in r.xpending_range(s, group, "-", "+", 1000)
    ]
    return max(counts, default=0)


def all_streams(settings) -> list[str]:
    keys = Keys(settings.stream_prefix)
    reg = ModelRegistry.from_settings(settings, load_weights=False)
    return [keys.stream(m, t) for m, t in reg.streams()]


async def wait_until(cond, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def job_retries(metrics_text: str) -> float:
    found = re.findall(r"^softvq_job_retries_total\{[^}]*\} (\S+)$", metrics_text, re.M)
    return sum(float(v) for v in found)


# A holder that takes jobs and waits (a long max_wait on a big batch) holds them unrun; to
# Redis that is the same as a worker in the middle of a batch.
HOLDER = {"max_wait_ms": 60_000, "max_batch_size": 64}
VISIBILITY_S = 1.0


def run_fault(redis_server, spawn_worker, jobs, fault, settings):
    """Worker "holder" (configured to sit on its jobs) takes every job. Worker "rescuer"
    starts; for three visibility timeouts it must not take any of them (the holder keeps
    them alive). Then ``fault(holder)``; the rescuer must answer every job.
    Returns (holder process, results, jobs the rescuer reclaimed)."""
    r = redis.Redis.from_url(redis_server.url)
    keys = Keys(settings.stream_prefix)
    streams = all_streams(settings)
    common = {"visibility_timeout_s": VISIBILITY_S}
    holder = spawn_worker(redis_server.url, "holder", **HOLDER, **common)
    port = free_port()

    async def main():
        broker = RedisBroker(settings)
        await broker.start()
        try:
            await wait_ready(broker)
            waiting = [asyncio.create_task(broker.submit(j)) for j in jobs]
            every_job_held = lambda: held_by(r, streams, keys.group, "holder") == len(jobs)  # noqa: E731
            await wait_until(every_job_held, 30, "the holder to take every job")
            spawn_worker(redis_server.url, "rescuer", metrics_port=port, max_wait_ms=5, **common)
            await wait_until(lambda: r.exists(keys.worker("rescuer")), 60, "the rescuer")
            await asyncio.sleep(3 * VISIBILITY_S)
            assert every_job_held(), "a live worker's jobs were taken over"
            # ... nor even reclaimed by itself: its keep-alive leaves the delivery count at 1.
            assert most_deliveries(r, streams, keys.group) == 1
            await asyncio.to_thread(fault, holder)  # keep this event loop serving
            results = await asyncio.gather(*waiting)
            return results, job_retries(httpx.get(f"http://127.0.0.1:{port}/metrics").text)
        finally:
            await broker.stop()

    results, reclaimed = asyncio.run(asyncio.wait_for(main(), 120))
    for s in streams:  # every entry answered, acked and deleted
        assert r.xlen(s) == 0 and r.xpending(s, keys.group)["pending"] == 0
    return holder, results, reclaimed


def test_sigkilled_worker_jobs_are_reclaimed_and_answered_once(
    redis_server, spawn_worker, engine_settings_factory, engine_registry
):
    settings = engine_settings_factory(redis_url=redis_server.url, request_timeout_s=60)
    jobs = mixed_jobs(12)

    def sigkill(proc):
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    holder, results, reclaimed = run_fault(redis_server, spawn_worker, jobs, sigkill, settings)
    assert holder.returncode == -signal.SIGKILL
    assert reclaimed == len(jobs)  # each taken over once, after the visibility timeout
    for job, res in zip(jobs, results, strict=True):
        assert_matches(res, expected(engine_registry, job))


def test_sigterm_hands_unstarted_jobs_back(
    redis_server, spawn_worker, engine_settings_factory, engine_registry
):
    settings = engine_settings_factory(redis_url=redis_server.url, request_timeout_s=60)
    jobs = mixed_jobs(8)

    def sigterm(proc):
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0  # finished its (empty) batch, handed back, exited cleanly

    _, results, reclaimed = run_fault(redis_server, spawn_worker, jobs, sigterm, settings)
    assert reclaimed == 0  # handed back as fresh entries, not reclaimed after a timeout
    for job, res in zip(jobs, results, strict=True):
        assert_matches(res, expected(engine_registry, job))


# --- in-process workers (so the test can wrap the model to simulate faults) -------------------
def run_with_worker(settings, registry, body):
    async def main():
        worker = Worker(settings, registry, "inproc")
        task = asyncio.create_task(worker.run())
        broker = RedisBroker(settings)
        await broker.start()
        try:
            await wait_ready(broker, 30)
            return await body(broker)
        finally:
            worker.stop()
            await broker.stop()
            await asyncio.wait_for(task, 30)

    return asyncio.run(asyncio.wait_for(main(), 90))


def test_poisoned_job_is_retried_then_failed_and_the_worker_keeps_serving(
    redis_server, engine_settings_factory, engine_registry
):
    settings = engine_settings_factory(redis_url=redis_server.url, max_attempts=2, max_wait_ms=50)
    poisoned, crashes = poison_tokenizer(engine_registry, 0.321)
    good = [tok_job(1, i) for i in range(3)]
    after = gen_job([2], [5])
    retries = metrics.JOB_RETRIES.labels(model="tiny", task="tokenize")._value.get()

    async def body(broker):
        first = await asyncio.gather(
            *(broker.submit(j) for j in [*good, poisoned]), return_exceptions=True
        )
        return first, await broker.submit(after)

    first, later = run_with_worker(settings, engine_registry, body)
    assert isinstance(first[3], JobFailed) and "2 attempts" in str(first[3])
    assert crashes.count(1) == 2  # alone, once per attempt (re-queued through the stream)
    assert metrics.JOB_RETRIES.labels(model="tiny", task="tokenize")._value.get() - retries == 1
    for job, res in zip(good, first[:3], strict=True):
        assert_matches(res, expected(engine_registry, job))
    assert later["images"].shape == (1, 32, 32, 3)


def test_job_whose_workers_keep_dying_fails_after_max_attempts(
    redis_server, engine_settings_factory, engine_registry
):
    settings = engine_settings_factory(
        redis_url=redis_server.url, max_attempts=3, visibility_timeout_s=0.3
    )
    keys = Keys(settings.stream_prefix)
    stream = keys.stream("tiny", "tokenize")
    r = redis.Redis.from_url(redis_server.url)
    job = tok_job(1, 1)

    async def main():
        # A "ghost" worker takes the job and dies, twice more it is claimed and lost again.
        source = RedisSource(settings, engine_registry, None, "ghost")
        source.redis = __import__("redis.asyncio", fromlist=["Redis"]).Redis.from_url(
            redis_server.url
        )
        await source.ensure_groups()
        broker = RedisBroker(settings)
        await broker.start()
        waiting = asyncio.create_task(broker.submit(job))
        await wait_until(lambda: r.xlen(stream) == 1, 10, "the job in its stream")
        r.xreadgroup(keys.group, "ghost", {stream: ">"})
        entry = r.xpending_range(stream, keys.group, "-", "+", 1)[0]["message_id"]
        r.xclaim(stream, keys.group, "ghost2", 0, [entry])
        r.xclaim(stream, keys.group, "ghost3", 0, [entry])
        await source.redis.aclose()
        # A healthy worker now claims it for the 4th delivery: 3 attempts are used up.
        worker = Worker(settings, engine_registry, "healthy")
        task = asyncio.create_task(worker.run())
        try:
            with pytest.raises(JobFailed, match="3 attempts"):
                await asyncio.wait_for(waiting, 20)
        finally:
            worker.stop()
            await broker.stop()
            await asyncio.wait_for(task, 30)

    asyncio.run(asyncio.wait_for(main(), 60))
    assert r.xlen(stream) == 0 and r.xpending(stream, keys.group)["pending"] == 0
