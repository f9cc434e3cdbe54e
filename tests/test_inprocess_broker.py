"""The embedded broker end to end: answers equal direct model calls; the queue bound,
deadlines, cancellation, out-of-memory splitting, poisoned jobs, invalid payloads and a
graceful stop."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import torch

import model
from model.images import psnr, tensor_to_uint8
from service import metrics
from service.broker import InProcessBroker, make_broker
from service.jobs import BrokerUnavailable, InvalidJob, Job, JobFailed, JobTimeout, QueueFull
from tests.test_batcher import (
    Watched,
    decode_job,
    gen_job,
    poison_tokenizer,
    run_broker,
    tok_job,
)

torch.set_num_threads(1)


def test_answers_equal_direct_model_calls(engine_registry, engine_settings_factory):
    settings = engine_settings_factory(max_wait_ms=50)
    tok, gen = engine_registry.tokenizer("tiny").model, engine_registry.generator("sit-tiny").model
    t, r, d = tok_job(2, 1), tok_job(3, 2, "reconstruct"), decode_job(2, 3)
    g = gen_job([1, 4], [10, 11], cfg=2.0, steps=3, sampler="euler-maruyama")

    async def body(broker, ex):
        return await asyncio.gather(*(broker.submit(j) for j in (t, r, d, g)))

    rt, rr, rd, rg = run_broker(engine_registry, engine_settings_factory(max_wait_ms=50), body)
    assert settings.max_wait_ms == 50
    with torch.inference_mode():
        tokens, indices = tok.encode(torch.from_numpy(t.payload["images"]), return_indices=True)
        x = torch.from_numpy(r.payload["images"])
        rec = tok.decode(tok.encode(x))
        dec = tok.decode(torch.from_numpy(d.payload["tokens"]))
        img = model.generate(
            tok, gen, [1, 4], [10, 11], steps=3, sampler="euler-maruyama", cfg_scale=2.0
        )
    np.testing.assert_allclose(rt["tokens"], tokens.numpy(), atol=1e-5)
    assert rt["tokens"].dtype == np.float32 and rt["indices"].dtype == np.int64
    np.testing.assert_array_equal(rt["indices"], indices.numpy())
    assert np.abs(rr["images"].astype(int) - tensor_to_uint8(rec).astype(int)).max() <= 1
    assert rr["psnr"] == pytest.approx(psnr(rec, x), abs=0.05)
    assert np.abs(rd["images"].astype(int) - tensor_to_uint8(dec).astype(int)).max() <= 1
    assert rg["images"].shape == (2, 32, 32, 3) and rg["images"].dtype == np.uint8
    assert np.abs(rg["images"].astype(int) - tensor_to_uint8(img).astype(int)).max() <= 1


def test_queue_full_at_the_bound(engine_registry, engine_settings_factory):
    settings = engine_settings_factory(queue_max=3, max_wait_ms=0)
    tok = engine_registry.tokenizer("tiny")
    tok.runner = Watched(tok.runner, hold=True)

    async def body(broker, ex):
        waiting = [asyncio.create_task(broker.submit(tok_job(1, i))) for i in range(3)]
        await asyncio.sleep(0)
        assert await broker.queue_depth("tiny", "tokenize") == 3
        with pytest.raises(QueueFull):
            await broker.submit(tok_job(1, 9))
        # The bound is per model and task: other queues still take work.
        other = asyncio.create_task(broker.submit(decode_job(1, 1)))
        await asyncio.to_thread(tok.runner.entered.wait, 10)
        tok.runner.release.set()
        results = await asyncio.gather(*waiting, other)
        return results, await broker.queue_depth("tiny", "tokenize")

    results, depth = run_broker(engine_registry, settings, body)
    assert len(results) == 4 and depth == 0


def test_deadline_gives_timeout_and_the_job_never_runs(engine_registry, engine_settings_factory):
    settings = engine_settings_factory(max_wait_ms=0)
    tok = engine_registry.tokenizer("tiny")
    tok.runner = Watched(tok.runner, hold=True)
    slow, late = tok_job(1, 1), decode_job(1, 2)

    async def body(broker, ex):
        first = asyncio.create_task(broker.submit(slow))
        await asyncio.to_thread(tok.runner.entered.wait, 10)
        late.deadline = time.time() + 0.2
        with pytest.raises(JobTimeout):
            await broker.submit(late)
        tok.runner.release.set()
        await first
        await asyncio.sleep(0.1)  # the batcher passes over the late job
        return ex, await broker.queue_depth("tiny", "decode")

    ex, depth = run_broker(engine_registry, settings, body)
    assert not ex.ran(late) and ex.ran(slow) and depth == 0


def test_cancelled_waiter_drops_its_queued_job(engine_registry, engine_settings_factory):
    settings = engine_settings_factory(max_wait_ms=0)
    tok = engine_registry.tokenizer("tiny")
    tok.runner = Watched(tok.runner, hold=True)
    slow, abandoned, kept = tok_job(1, 1), tok_job(1, 2, "reconstruct"), decode_job(1, 3)

    async def body(broker, ex):
        first = asyncio.create_task(broker.submit(slow))
        await asyncio.to_thread(tok.runner.entered.wait, 10)
        gone = asyncio.create_task(broker.submit(abandoned))
        stays = asyncio.create_task(broker.submit(kept))
        await asyncio.sleep(0.05)
        gone.cancel()  # the client disconnected
        await asyncio.sleep(0.02)
        depth = await broker.queue_depth("tiny", "reconstruct")
        tok.runner.release.set()
        await asyncio.gather(first, stays)
        return ex, depth, gone.cancelled()

    ex, depth, cancelled = run_broker(engine_registry, settings, body)
    assert cancelled and depth == 0
    assert not ex.ran(abandoned) and ex.ran(kept)


def _oom_above(limit):
    def fail(x):
        if x.shape[0] > limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated by the test)")

    return fail


def test_out_of_memory_splits_the_batch(engine_registry, engine_settings_factory):
    settings = engine_settings_factory(max_wait_ms=200, batch_buckets=[1, 2, 4, 8])
    tok = engine_registry.tokenizer("tiny")
    direct = tok.runner
    tok.runner = Watched(direct, fail=_oom_above(2))
    jobs = [tok_job(1, i) for i in range(4)]
    too_big = tok_job(3, 9)  # alone it is still 3 (padded to 4) > 2: cannot fit at all

    async def body(broker, ex):
        ok = await asyncio.gather(*(broker.submit(j) for j in jobs))
        with pytest.raises(JobFailed, match="out of memory"):
            await broker.submit(too_big)
        return ok

    results = run_broker(engine_registry, settings, body)
    assert tok.runner.sizes[:3] == [4, 2, 2]  # 4 jobs tried together, then two halves
    for job, res in zip(jobs, results, strict=True):
        expect = direct.encode(torch.from_numpy(job.payload["images"]))[0].numpy()
        np.testing.assert_allclose(res["tokens"], expect, atol=1e-5)


def test_poisoned_job_fails_alone_after_max_attempts(engine_registry, engine_settings_factory):
    settings = engine_settings_factory(max_wait_ms=200, max_attempts=3)
    poisoned, poisoned_calls = poison_tokenizer(engine_registry, 0.123)
    good = [tok_job(1, i) for i in range(3)]
    before = metrics.JOB_RETRIES.labels(model="tiny", task="tokenize")._value.get()

    async def body(broker, ex):
        return await asyncio.gather(
            *(broker.submit(j) for j in [*good, poisoned]), return_exceptions=True
        )

    results = run_broker(engine_registry, settings, body)
    assert all(isinstance(r, dict) and r["tokens"].shape == (1, 8, 8) for r in results[:3])
    assert isinstance(results[3], JobFailed) and "3 attempts" in str(results[3])
    assert poisoned_calls.count(1) == 3  # ran alone on each of its three attempts
    assert metrics.JOB_RETRIES.labels(model="tiny", task="tokenize")._value.get() - before == 2


def test_invalid_payloads_fail_alone_with_invalid_job(engine_registry, engine_settings_factory):
    settings = engine_settings_factory(max_wait_ms=100)
    nan_tokens = decode_job(1, 1)
    nan_tokens.payload["tokens"][0, 0, 0] = np.nan
    bad = [
        nan_tokens,
        Job("tiny", "tokenize", {"images": np.zeros((1, 3, 16, 16), np.float32), "n": 1}),
        Job("tiny", "tokenize", {"images": np.zeros((2, 3, 32, 32), np.float32), "n": 1}),
        gen_job([10], [0]),  # class id out of range (10 classes)
        gen_job([1], [2**64]),  # a seed no torch.Generator takes
        gen_job([1], [0], steps=0),
        gen_job([1], [0], sampler="rk45"),
        Job("nope", "tokenize", {"images": np.zeros((1, 3, 32, 32), np.float32), "n": 1}),
    ]
    good = gen_job([1], [0])

    async def body(broker, ex):
        return await asyncio.gather(
            *(broker.submit(j) for j in [*bad, good]), return_exceptions=True
        )

    results = run_broker(engine_registry, settings, body)
    for job, res in zip(bad, results, strict=False):
        assert isinstance(res, InvalidJob), (job.task, res)
    assert "NaN" in str(results[0]) and "[0, 10)" in str(results[3])
    assert results[-1]["images"].shape == (1, 32, 32, 3)


def test_ready_and_graceful_stop(engine_registry, engine_settings_factory):
    settings = engine_settings_factory(max_wait_ms=0)
    engine_registry.warm = False  # start() warms up in the background; ready() waits for it

    async def main():
        broker = make_broker(settings, engine_registry)
        assert isinstance(broker, InProcessBroker)
        assert await broker.ready() == (False, "not started")
        with pytest.raises(BrokerUnavailable):
            await broker.submit(tok_job())
        await broker.start()
        for _ in range(200):
            if (await broker.ready())[0]:
                break
            await asyncio.sleep(0.05)
        assert await broker.ready() == (True, "ok")
        held = [asyncio.create_task(broker.submit(gen_job([i], [i], steps=5))) for i in range(6)]
        await asyncio.sleep(0)
        await broker.stop()  # graceful: what was accepted still completes
        results = await asyncio.gather(*held)
        assert all(r["images"].shape == (1, 32, 32, 3) for r in results)
        assert (await broker.ready())[0] is False
        with pytest.raises(BrokerUnavailable):
            await broker.submit(tok_job())

    asyncio.run(asyncio.wait_for(main(), 60))
