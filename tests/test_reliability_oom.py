"""Out of memory in Redis mode, with real allocation failures (no simulated exception type).

PyTorch's CPU allocator reports a failed allocation as ``RuntimeError: [enforce fail ...]
DefaultCPUAllocator: can't allocate memory`` -- not "out of memory" and not
``torch.OutOfMemoryError``. The executor must recognise it, split the batch and retry the
halves, and fail a single job that cannot fit with ``OutOfMemory`` (no retries: it would only
fail again), while the rest of the batch is answered.

The runner below is the real tokenizer runner plus a scratch buffer whose size grows with the
batch, as activations do; past a batch of 2 the request is far beyond any machine, so the
allocator itself refuses it.
"""

from __future__ import annotations

import asyncio
import weakref

import numpy as np
import pytest
import torch

from service import metrics
from service.executor import Executor, is_oom
from service.jobs import Job, JobFailed
from tests.test_batcher import tok_job
from tests.test_redis_broker import assert_matches, expected
from tests.test_worker_faults import run_with_worker

pytestmark = pytest.mark.redis
torch.set_num_threads(1)

IMPOSSIBLE = 2**50  # bytes per batch row past the limit: 1 PiB, refused by any allocator


def test_real_cpu_allocation_failure_is_out_of_memory():
    with pytest.raises(RuntimeError) as info:
        torch.empty(IMPOSSIBLE, dtype=torch.uint8)
    assert is_oom(info.value), str(info.value)
    assert not is_oom(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


class ScratchHungry:
    """The real runner; batches of more than ``fits`` rows also ask for scratch memory no
    machine has, so the real allocator fails them."""

    def __init__(self, runner, fits: int):
        self.runner, self.fits, self.sizes = runner, fits, []

    def _scratch(self, x: torch.Tensor) -> None:
        self.sizes.append(int(x.shape[0]))
        if x.shape[0] > self.fits:
            torch.empty(IMPOSSIBLE * x.shape[0], dtype=torch.uint8)

    def encode(self, x):
        self._scratch(x)
        return self.runner.encode(x)

    def decode(self, x):
        self._scratch(x)
        return self.runner.decode(x)

    def __getattr__(self, name):
        return getattr(self.runner, name)


def test_redis_worker_splits_a_batch_on_allocation_failure(
    redis_server, engine_settings_factory, engine_registry
):
    settings = engine_settings_factory(
        redis_url=redis_server.url, max_wait_ms=300, max_attempts=3, batch_buckets=[1, 2, 4, 8]
    )
    tok = engine_registry.tokenizer("tiny")
    direct = tok.runner
    hungry = tok.runner = ScratchHungry(direct, fits=2)
    jobs = [tok_job(1, i) for i in range(4)]
    too_big = tok_job(3, 9)  # 3 rows (eager does not pad them to 4): cannot fit alone
    retries = metrics.JOB_RETRIES.labels(model="tiny", task="tokenize")._value.get()

    async def body(broker):
        ok = await asyncio.gather(*(broker.submit(j) for j in jobs))
        with pytest.raises(JobFailed, match="out of memory") as failed:
            await broker.submit(too_big)
        return ok, failed.value

    try:
        results, error = run_with_worker(settings, engine_registry, body)
    finally:
        tok.runner = direct
    # 4 jobs tried together, refused by the allocator, then the two halves fit
    assert hungry.sizes[:3] == [4, 2, 2], hungry.sizes
    for job, res in zip(jobs, results, strict=True):
        assert_matches(res, expected(engine_registry, job))
    # the one that cannot fit: tried alone once, then its caller gets out-of-memory; an
    # allocation failure is not retried the way a crash is
    assert hungry.sizes[3:] == [3], hungry.sizes
    assert error.status == 500 and error.code == "job_failed"
    assert metrics.JOB_RETRIES.labels(model="tiny", task="tokenize")._value.get() == retries


class FailsHoldingMemory:
    """The real runner; a batch of more than ``fits`` rows first allocates its activations
    (a tensor the test can watch through a weak reference), then runs out of memory."""

    def __init__(self, runner, fits: int):
        self.runner, self.fits = runner, fits
        self.held: list[weakref.ref] = []
        self.alive_at_retry: list[bool] = []

    def decode(self, x):
        # Whatever a failed attempt allocated must be gone when the next attempt starts.
        self.alive_at_retry += [ref() is not None for ref in self.held]
        if x.shape[0] > self.fits:
            activations = torch.empty(x.shape[0], 1024, 1024)  # noqa: F841 - held by the frame
            self.held.append(weakref.ref(activations))
            torch.empty(IMPOSSIBLE * x.shape[0], dtype=torch.uint8)
        return self.runner.decode(x)

    def __getattr__(self, name):
        return getattr(self.runner, name)


def test_halves_run_after_the_failed_attempt_released_its_memory(engine_registry):
    """Retrying inside the ``except`` block would keep the exception's traceback -- and with
    it every tensor of the failed attempt -- alive while the halves run, so on a full device
    the halves would run out of memory too."""
    tok = engine_registry.tokenizer("tiny")
    direct = tok.runner
    tok.runner = watched = FailsHoldingMemory(direct, fits=2)
    jobs = [
        Job("tiny", "decode", {"tokens": np.full((1, 8, 8), i / 10, np.float32), "n": 1})
        for i in range(4)
    ]
    try:
        outcomes = Executor(engine_registry).run(jobs)
    finally:
        tok.runner = direct
    assert all(isinstance(o, dict) for o in outcomes), outcomes
    assert len(watched.held) == 1 and watched.alive_at_retry  # one failure, then retries
    assert not any(watched.alive_at_retry), "the halves ran while the failed batch's tensors lived"
