"""The shared batcher: grouping, batch limits, buckets, deadlines, batch invariance.

Runs the real executor and tiny models through the embedded broker (and, for the expiry
path, the batcher alone on a list of jobs). Observers below only record what reached the
model; they never change a result.
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import torch

from service.batcher import Batcher, JobSource, group_key
from service.broker.inprocess import InProcessBroker
from service.executor import Executor, job_cost
from service.jobs import Job, JobTimeout

torch.set_num_threads(1)
GEN_PARAMS = {"guidance_interval": [0.0, 1.0], "path": "linear"}


# --- helpers shared with test_inprocess_broker.py ------------------------------------------
def images(n: int, seed: int = 0) -> np.ndarray:
    g = np.random.default_rng(seed)
    return (g.random((n, 3, 32, 32), dtype=np.float32) * 2 - 1).astype(np.float32)


def tok_job(n: int = 1, seed: int = 0, task: str = "tokenize", deadline: float = 0.0) -> Job:
    return Job("tiny", task, {"images": images(n, seed), "n": n}, deadline=deadline)


def decode_job(n: int = 1, seed: int = 0) -> Job:
    tokens = np.random.default_rng(seed).standard_normal((n, 8, 8)).astype(np.float32)
    return Job("tiny", "decode", {"tokens": tokens, "n": n})


def gen_job(labels, seeds, cfg: float = 1.0, steps: int = 3, sampler: str = "euler") -> Job:
    payload = {"labels": list(labels), "seeds": list(seeds), "cfg_scale": cfg, "n": len(labels)}
    return Job("sit-tiny", "generate", payload, {"steps": steps, "sampler": sampler, **GEN_PARAMS})


class RecordingExecutor(Executor):
    """The real executor, remembering which jobs each batch held."""

    def __init__(self, registry):
        super().__init__(registry)
        self.batches: list[list[Job]] = []

    def run(self, jobs, progress=None):
        self.batches.append(list(jobs))
        return super().run(jobs, progress)

    def ran(self, job: Job) -> bool:
        return any(job.id == j.id for b in self.batches for j in b)


def poison_tokenizer(registry, value: float) -> tuple[Job, list[int]]:
    """Make the tiny tokenizer's runner raise (a simulated device fault) on any batch holding
    an image filled with ``value``; returns that poisoned job and the list of failed batch
    sizes the fault appends to."""
    tok = registry.tokenizer("tiny")
    calls: list[int] = []

    def fail(x):
        if x.ndim == 4 and bool((x == value).all(dim=(1, 2, 3)).any()):
            calls.append(x.shape[0])
            raise RuntimeError("device fault (simulated by the test)")

    tok.runner = Watched(tok.runner, fail=fail)
    job = Job("tiny", "tokenize", {"images": np.full((1, 3, 32, 32), value, np.float32), "n": 1})
    return job, calls


class Watched:
    """Wraps a runner: records batch sizes, and can hold the model thread (a slow device)
    or raise (a device fault) as the test says. Everything else goes to the real runner."""

    def __init__(self, runner, fail=None, hold: bool = False):
        self.runner, self.fail = runner, fail
        self.sizes: list[int] = []
        self.entered, self.release = threading.Event(), threading.Event()
        if not hold:
            self.release.set()

    def _enter(self, x):
        self.sizes.append(int(x.shape[0]))
        self.entered.set()
        assert self.release.wait(30), "test never released the model"
        if self.fail is not None:
            self.fail(x)

    def encode(self, x):
        self._enter(x)
        return self.runner.encode(x)

    def decode(self, x):
        self._enter(x)
        return self.runner.decode(x)

    def __call__(self, x, t, y):
        self._enter(x)
        return self.runner(x, t, y)

    def __getattr__(self, name):
        return getattr(self.runner, name)


def run_broker(registry, settings, body, executor=None):
    """Start an embedded broker (recording executor), run ``body(broker, executor)``, stop."""
    executor = executor or RecordingExecutor(registry)
    registry.settings = settings

    async def main():
        broker = InProcessBroker(settings, registry, executor)
        await broker.start()
        try:
            return await asyncio.wait_for(body(broker, executor), 60)
        finally:
            await broker.stop()

    return asyncio.run(main())


# --- grouping ------------------------------------------------------------------------------
def test_groups_by_model_task_and_params(engine_registry, engine_settings_factory):
    settings = engine_settings_factory(max_wait_ms=200)
    jobs = (
        [tok_job(1, i) for i in range(3)]
        + [tok_job(1, i, "reconstruct") for i in range(3)]
        + [decode_job(1, i) for i in range(3)]
        + [gen_job([i], [i], steps=3) for i in range(3)]
        + [gen_job([i], [i], steps=5) for i in range(3)]
    )

    async def body(broker, ex):
        results = await asyncio.gather(*(broker.submit(j) for j in jobs))
        return results, ex

    results, ex = run_broker(engine_registry, settings, body)
    assert all("images" in r or "tokens" in r for r in results)
    for batch in ex.batches:
        assert len({group_key(j) for j in batch}) == 1, "a batch mixed models, tasks or params"
    # Everything was queued before the first batch formed: one batch per group.
    assert len(ex.batches) == 5
    steps = sorted(b[0].params.get("steps", 0) for b in ex.batches)
    assert steps == [0, 0, 0, 3, 5]


def test_max_batch_size_with_guidance_counting_double(engine_registry, engine_settings_factory):
    settings = engine_settings_factory(max_batch_size=4, max_wait_ms=200)
    plain = [tok_job(1, i) for i in range(10)]
    guided = [gen_job([i], [i], cfg=2.0) for i in range(5)]

    async def body(broker, ex):
        await asyncio.gather(*(broker.submit(j) for j in plain + guided))
        return ex

    ex = run_broker(engine_registry, settings, body)
    sizes = {
        task: [len(b) for b in ex.batches if b[0].task == task] for task in ("tokenize", "generate")
    }
    assert sizes["tokenize"] == [4, 4, 2]
    assert sizes["generate"] == [2, 2, 1]  # each guided item takes two of the four slots
    assert [job_cost(j) for j in guided] == [2] * 5


def test_a_job_bigger_than_the_batch_runs_alone(engine_registry, engine_settings_factory):
    settings = engine_settings_factory(max_batch_size=4, max_wait_ms=100)
    big, small = tok_job(6, 1), tok_job(1, 2)

    async def body(broker, ex):
        return await asyncio.gather(broker.submit(big), broker.submit(small)), ex

    (r_big, r_small), ex = run_broker(engine_registry, settings, body)
    assert r_big["tokens"].shape == (6, 8, 8) and r_small["tokens"].shape == (1, 8, 8)
    assert [len(b) for b in ex.batches] == [1, 1]


def test_max_wait_lets_a_later_job_join_and_flushes_a_partial_batch(
    engine_registry, engine_settings_factory
):
    settings = engine_settings_factory(max_batch_size=8, max_wait_ms=400)
    first, second = tok_job(1, 1), tok_job(1, 2)

    async def body(broker, ex):
        a = asyncio.create_task(broker.submit(first))
        await asyncio.sleep(0.05)  # well inside the wait: joins the first job's batch
        b = asyncio.create_task(broker.submit(second))
        await asyncio.gather(a, b)
        return ex

    ex = run_broker(engine_registry, settings, body)
    # Two jobs, far below max_batch_size: the wait ran out and they went together.
    assert [len(b) for b in ex.batches] == [2]


# --- buckets -------------------------------------------------------------------------------
def test_batches_reach_an_eager_runner_unpadded(engine_registry, engine_settings_factory):
    """The padding contract: the executor never pads; an eager runner (dynamic shapes) gets
    the batch as it is, with no zero rows to pay for. (Fixed-shape runners pad to their own
    buckets: tests/test_backends.py.)"""
    settings = engine_settings_factory(max_wait_ms=200, batch_buckets=[1, 2, 4, 8])
    tok = engine_registry.tokenizer("tiny")
    gen = engine_registry.generator("sit-tiny")
    assert not tok.runner.fixed_shapes and not gen.runner.fixed_shapes
    tok.runner = Watched(tok.runner)
    gen.runner = Watched(gen.runner)
    tjobs = [tok_job(1, i) for i in range(3)]
    gjobs = [gen_job([1], [1], cfg=2.0, steps=2), gen_job([2], [2], cfg=1.0, steps=2)]

    async def body(broker, ex):
        return await asyncio.gather(*(broker.submit(j) for j in tjobs + gjobs))

    results = run_broker(engine_registry, settings, body)
    assert tok.runner.sizes[0] == 3  # 3 tokenize items -> one encode of 3, not of bucket 4
    # Generate: 1 guided + 1 plain sample -> each step runs 2 conditional rows + 1 null row;
    # then one decode of the 2 images.
    assert gen.runner.sizes == [3, 3] and tok.runner.sizes[1:] == [2]
    direct = tok.runner.runner.encode(
        torch.from_numpy(np.concatenate([j.payload["images"] for j in tjobs]))
    )
    got = np.concatenate([r["tokens"] for r in results[:3]])
    np.testing.assert_allclose(got, direct[0].numpy(), atol=1e-5)


# --- deadlines -----------------------------------------------------------------------------
class ListSource(JobSource):
    """A fixed list of jobs as a source; outcomes collected by job id."""

    def __init__(self, jobs):
        self.jobs, self.outcomes = list(jobs), {}

    async def fetch(self, timeout, limit):
        out, self.jobs = self.jobs[:limit], self.jobs[limit:]
        return out

    async def cancelled(self, jobs):
        return set()

    async def finish(self, items):
        self.outcomes.update({j.id: o for j, o in items})

    async def retry(self, jobs):
        self.jobs += jobs

    async def hand_back(self, jobs):
        self.jobs += jobs


def test_expired_job_is_answered_timeout_without_reaching_the_model(
    engine_registry, engine_settings_factory
):
    settings = engine_settings_factory(max_wait_ms=0)
    expired = tok_job(1, 1, deadline=time.time() - 1)
    live = tok_job(1, 2, deadline=time.time() + 60)
    source = ListSource([expired, live])
    ex = RecordingExecutor(engine_registry)
    batcher = Batcher(settings, ex, source, worker_id="test")

    async def main():
        while len(source.outcomes) < 2:
            await batcher.step()

    asyncio.run(asyncio.wait_for(main(), 30))
    assert isinstance(source.outcomes[expired.id], JobTimeout)
    assert source.outcomes[live.id]["tokens"].shape == (1, 8, 8)
    assert not ex.ran(expired) and ex.ran(live)


# --- batch invariance ------------------------------------------------------------------------
def test_a_job_gives_the_same_image_alone_and_in_a_batch(engine_registry, engine_settings_factory):
    settings = engine_settings_factory(max_wait_ms=200)
    params = {"cfg": 1.5, "steps": 4, "sampler": "heun"}
    alone = gen_job([3], [7], **params)
    batched = gen_job([3], [7], **params)
    others = [
        gen_job([i], [100 + i], cfg=c, steps=4, sampler="heun")
        for i, c in enumerate([1.0, 3.0, 1.0])
    ]
    t_alone, t_batched = tok_job(1, 5), tok_job(1, 5)
    t_others = [tok_job(2, 9), tok_job(1, 8)]

    async def body(broker, ex):
        a = await broker.submit(alone)
        ta = await broker.submit(t_alone)
        res = await asyncio.gather(
            *(broker.submit(j) for j in [batched, *others, t_batched, *t_others])
        )
        return a, ta, res[0], res[4], ex

    a, ta, b, tb, ex = run_broker(engine_registry, settings, body)
    assert any(len(batch) == 4 and batched in batch for batch in ex.batches)
    diff = np.abs(a["images"].astype(int) - b["images"].astype(int))
    assert diff.max() <= 1
    np.testing.assert_allclose(ta["tokens"], tb["tokens"], atol=1e-5)
    np.testing.assert_array_equal(ta["indices"], tb["indices"])
