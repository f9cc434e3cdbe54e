"""Redis Streams mode with a real redis-server and real worker processes: mixed concurrent
jobs answered correctly and batched; queue bound and deadlines; a Redis outage fails fast
and heals by itself; the wire format refuses anything but its own frames."""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import numpy as np
import pytest
import redis
import torch

from model.images import tensor_to_uint8
from model.pipeline import sample_latents
from service.broker import make_broker
from service.broker.redis_streams import ANSWER, Keys, RedisBroker
from service.jobs import BrokerUnavailable, Job, JobFailed, JobTimeout, QueueFull
from service.registry import ModelRegistry
from service.serialization import dump_job, dump_outcome, dumps, load_job, load_outcome, loads
from tests.redis_server import free_port, free_ports
from tests.test_batcher import decode_job, gen_job, tok_job

pytestmark = pytest.mark.redis
torch.set_num_threads(1)


async def wait_ready(broker, timeout: float = 90.0, workers: int = 1) -> None:
    """Until the broker is ready with at least ``workers`` live workers (ready() needs one; a
    test about several must not start while the others are still loading their models)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        ok, why = await broker.ready()
        live = len(await broker.workers()) if ok else 0
        if ok and live >= workers:
            return
        why = why if not ok else f"{live} of {workers} workers live"
        await asyncio.sleep(0.1)
    raise AssertionError(f"broker not ready: {why}")


def expected(registry: ModelRegistry, job: Job) -> dict:
    """The direct model call for a job (what the workers must answer)."""
    tok = registry.tokenizer("tiny")
    with torch.inference_mode():
        if job.task == "tokenize":
            tokens, indices = tok.runner.encode(torch.from_numpy(job.payload["images"]))
            return {"tokens": tokens.numpy(), "indices": indices.numpy()}
        if job.task == "reconstruct":
            rec = tok.runner.decode(tok.runner.encode(torch.from_numpy(job.payload["images"]))[0])
            return {"images": tensor_to_uint8(rec)}
        if job.task == "decode":
            return {
                "images": tensor_to_uint8(
                    tok.runner.decode(torch.from_numpy(job.payload["tokens"]))
                )
            }
        p, q = job.payload, job.params
        z = sample_latents(
            registry.generator("sit-tiny").runner,
            p["labels"],
            p["seeds"],
            q["steps"],
            q["sampler"],
            p["cfg_scale"],
        )
        return {"images": tensor_to_uint8(tok.runner.decode(z.float() * tok.vq_std + tok.vq_mean))}


def assert_matches(got: dict, want: dict) -> None:
    if "tokens" in want:
        np.testing.assert_allclose(got["tokens"], want["tokens"], atol=1e-5)
        np.testing.assert_array_equal(got["indices"], want["indices"])
    else:
        assert got["images"].shape == want["images"].shape
        assert np.abs(got["images"].astype(int) - want["images"].astype(int)).max() <= 1


def mixed_jobs(count: int) -> list[Job]:
    makers = [
        lambda i: tok_job(1, i),
        lambda i: tok_job(1, i, "reconstruct"),
        lambda i: decode_job(1, i),
        lambda i: gen_job([i % 10], [i], cfg=1.0 + (i % 3), steps=3),
    ]
    return [makers[i % 4](i) for i in range(count)]


def scrape(port: int) -> str:
    return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text


def batch_sums(text: str) -> tuple[float, float]:
    """(items, batches) over every softvq_batch_size series of a /metrics page."""
    items = sum(float(v) for v in re.findall(r"^softvq_batch_size_sum\{[^}]*\} (\S+)$", text, re.M))
    count = sum(
        float(v) for v in re.findall(r"^softvq_batch_size_count\{[^}]*\} (\S+)$", text, re.M)
    )
    return items, count


def test_mixed_concurrent_jobs_on_two_workers(
    redis_server, spawn_worker, engine_settings_factory, engine_registry
):
    ports = free_ports(2)
    for i, port in enumerate(ports):
        spawn_worker(redis_server.url, f"w{i}", metrics_port=port, max_wait_ms=30)
    settings = engine_settings_factory(redis_url=redis_server.url)
    jobs = mixed_jobs(64)

    async def main():
        broker = make_broker(settings, ModelRegistry.from_settings(settings, load_weights=False))
        assert isinstance(broker, RedisBroker)
        await broker.start()
        try:
            await wait_ready(broker, workers=2)  # both serve /metrics once they heartbeat
            results = await asyncio.gather(*(broker.submit(j) for j in jobs))
            depth = await broker.queue_depth("tiny", "tokenize")
        finally:
            await broker.stop()
        return results, depth, broker.reply_key

    results, depth, reply_key = asyncio.run(asyncio.wait_for(main(), 120))
    for job, res in zip(jobs, results, strict=True):
        assert_matches(res, expected(engine_registry, job))
    assert depth == 0
    # Every job held one item, so more items than batches means some batch held > 1 job.
    items, batches = map(sum, zip(*(batch_sums(scrape(p)) for p in ports), strict=True))
    assert items == 64 and batches < 64
    # Nothing piles up: entries acked and deleted, the reply list drained, markers expire.
    r = redis.Redis.from_url(redis_server.url)
    keys = Keys(settings.stream_prefix)
    for model, task in ModelRegistry.from_settings(settings, load_weights=False).streams():
        assert r.xlen(keys.stream(model, task)) == 0
        assert r.xpending(keys.stream(model, task), keys.group)["pending"] == 0
    assert not r.exists(reply_key)
    done = [k for k in r.scan_iter(match=f"{keys.prefix}:done:*")]
    assert len(done) == 64 and all(0 < r.ttl(k) <= settings.result_ttl_s for k in done)


def test_queue_bound_and_deadline_without_workers(
    redis_server, engine_settings_factory, spawn_worker
):
    settings = engine_settings_factory(redis_url=redis_server.url, queue_max=2)
    r = redis.Redis.from_url(redis_server.url)
    stream = Keys(settings.stream_prefix).stream("tiny", "tokenize")

    async def main():
        broker = RedisBroker(settings)
        await broker.start()
        try:
            assert await broker.ready() == (False, "no worker heartbeat")
            held_jobs = [tok_job(1, i) for i in range(2)]
            held = [asyncio.create_task(broker.submit(j)) for j in held_jobs]
            await asyncio.sleep(0.2)
            assert await broker.queue_depth("tiny", "tokenize") == 2
            with pytest.raises(QueueFull):
                await broker.submit(tok_job(1, 9))
            # Another model+task has its own bound.
            late = decode_job(1, 1)
            late.deadline = time.time() + 0.3
            with pytest.raises(JobTimeout):
                await broker.submit(late)
            for t in held:  # the clients go away
                t.cancel()
            await asyncio.gather(*held, return_exceptions=True)
            await asyncio.sleep(0.2)
        finally:
            await broker.stop()
        return late, held_jobs

    late, held_jobs = asyncio.run(asyncio.wait_for(main(), 30))
    # Abandoned and expired jobs are marked cancelled (a worker drops them unrun). Their
    # entries stay until then: deleting undelivered entries would blind KEDA's lag metric.
    keys = Keys(settings.stream_prefix)
    assert r.xlen(stream) == 2
    for job in [late, *held_jobs]:
        assert r.exists(keys.cancel(job.id))
    # A worker that comes up drops them unrun: the streams drain, nothing is processed.
    port = free_port()
    spawn_worker(redis_server.url, "w-late", metrics_port=port)
    deadline = time.time() + 60
    while time.time() < deadline and (r.xlen(stream) or r.xlen(keys.stream("tiny", "decode"))):
        time.sleep(0.2)
    assert r.xlen(stream) == 0 and r.xlen(keys.stream("tiny", "decode")) == 0
    assert (
        "softvq_images_processed_total{" not in httpx.get(f"http://127.0.0.1:{port}/metrics").text
    )


def test_redis_outage_fails_fast_then_recovers(
    redis_server, spawn_worker, engine_settings_factory, engine_registry
):
    spawn_worker(redis_server.url, "w0", max_wait_ms=5)
    settings = engine_settings_factory(redis_url=redis_server.url)
    job = tok_job(1, 3)

    async def main():
        broker = RedisBroker(settings)
        await broker.start()
        try:
            await wait_ready(broker)
            assert_matches(
                await broker.submit(tok_job(1, 1)), expected(engine_registry, tok_job(1, 1))
            )
            redis_server.kill()
            with pytest.raises(BrokerUnavailable):
                await asyncio.wait_for(broker.submit(tok_job(1, 2)), 5)  # fails, never hangs
            ok, why = await asyncio.wait_for(broker.ready(), 5)
            assert not ok and "Redis" in why
            redis_server.restart()
            await wait_ready(broker, 30)  # the worker re-creates its group, heartbeats again
            return await asyncio.wait_for(broker.submit(job), 30)
        finally:
            await broker.stop()

    assert_matches(asyncio.run(asyncio.wait_for(main(), 90)), expected(engine_registry, job))


def test_each_job_is_answered_once(redis_server):
    r = redis.Redis.from_url(redis_server.url)
    keys = Keys("softvq")
    blob = dump_outcome("j1", {"images": np.zeros((1, 2, 2, 3), np.uint8)})
    first = r.eval(ANSWER, 2, keys.done("j1"), keys.reply("api"), blob, 60)
    second = r.eval(ANSWER, 2, keys.done("j1"), keys.reply("api"), blob, 60)
    assert (first, second) == (1, 0)
    assert r.llen(keys.reply("api")) == 1 and 0 < r.ttl(keys.reply("api")) <= 60


# --- the wire format ------------------------------------------------------------------------
def test_frames_round_trip_jobs_and_outcomes():
    job = gen_job([1, 2], [3, 4], cfg=2.5, steps=7, sampler="heun")
    job.payload["extra"] = np.arange(6, dtype=np.int64).reshape(2, 3)
    back = load_job(dump_job(job))
    assert (back.id, back.model, back.task, back.params, back.deadline, back.attempts) == (
        job.id,
        job.model,
        job.task,
        job.params,
        job.deadline,
        job.attempts,
    )
    np.testing.assert_array_equal(back.payload["extra"], job.payload["extra"])
    assert back.payload["extra"].flags.writeable
    t = tok_job(2, 1)
    np.testing.assert_array_equal(load_job(dump_job(t)).payload["images"], t.payload["images"])
    job_id, err = load_outcome(dump_outcome("x", JobFailed("boom")))
    assert job_id == "x" and isinstance(err, JobFailed) and str(err) == "boom"
    big_endian = np.arange(4, dtype=">f4")
    np.testing.assert_array_equal(loads(dumps({"a": big_endian}))["a"], big_endian)


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"\x80\x04pickle",
        b"SVQ1\xff\xff\xff\xff",
        b"SVQ1\x05\x00\x00\x00{bad}",
        b'SVQ1\x3b\x00\x00\x00{"__nd__":[0,400],"dtype":"float32","shape":[10,10],"x":1}',
        b'SVQ1\x2d\x00\x00\x00{"__nd__":[0,0],"dtype":"object","shape":[0]}',
    ],
)
def test_malformed_frames_are_refused(blob):
    with pytest.raises(ValueError):
        loads(blob)


def test_unserialisable_values_are_refused():
    with pytest.raises(ValueError):
        dumps({"f": lambda: 0})
    with pytest.raises(ValueError):
        dumps({"a": np.array([object()])})
    with pytest.raises(ValueError, match="bad job frame"):
        load_job(
            dumps(
                {
                    "id": "x",
                    "model": "m",
                    "task": "rm -rf",
                    "payload": {},
                    "params": {},
                    "deadline": 0,
                    "created": 0,
                    "attempts": 0,
                }
            )
        )
