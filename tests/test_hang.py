"""A model call that never returns (a wedged device, a deadlock) must not leave a zombie.

Once a call has run ``hang_grace_s`` past the last deadline of its jobs:
- embedded: every waiting caller gets 503 model_hung at once (not a 504 at its own deadline),
  /healthz and /readyz answer 503, and the process exits with status 70 for its supervisor
  (or, with SOFTVQ_EXIT_ON_HANG=false, stays up unhealthy for a liveness probe);
- Redis: the worker stops its heartbeat, hands its unstarted jobs back, leaves the hung jobs
  to the visibility timeout and exits 70; another worker answers the handed-back jobs.

The hang is a test-only wrapper that blocks the tokenizer's thread on an all-black image
(tests/hang_harness.py, tests/test_batcher.py ``Watched``); the processes are the real ones.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
import torch
from PIL import Image

from service import metrics
from service.batcher import EXIT_HUNG
from service.broker import InProcessBroker
from service.broker.redis_streams import Keys, RedisBroker
from service.jobs import Job, JobTimeout, ModelHung
from tests.redis_server import free_port
from tests.test_batcher import Watched, decode_job, tok_job
from tests.test_serve_uvicorn import wait_http_ready

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent


def black_png(size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size)).save(buf, format="PNG")
    return buf.getvalue()


def black_job(deadline: float) -> Job:
    images = np.full((1, 3, 32, 32), -1.0, np.float32)
    return Job("tiny", "tokenize", {"images": images, "n": 1}, deadline=deadline)


# --- embedded broker, in process ----------------------------------------------------------
def test_hung_call_answers_every_waiting_caller_503_and_marks_the_broker_dead(
    engine_registry, engine_settings_factory
):
    settings = engine_settings_factory(hang_grace_s=0.5)
    tok = engine_registry.tokenizer("tiny")
    stuck = tok.runner = Watched(tok.runner, hold=True)  # never returns until released
    hangs = metrics.MODEL_HANGS.labels(worker="embedded")._value.get()
    fatal: list[str] = []

    async def main():
        broker = InProcessBroker(settings, engine_registry)
        broker.on_fatal = fatal.append
        await broker.start()
        try:
            t0 = time.monotonic()
            first = asyncio.create_task(broker.submit(tok_job(1, 0, deadline=time.time() + 0.5)))
            await asyncio.to_thread(stuck.entered.wait, 10)
            later = asyncio.create_task(broker.submit(decode_job(1, 1)))  # 30 s deadline
            with pytest.raises(JobTimeout):
                await first
            with pytest.raises(ModelHung, match="has not returned"):
                await asyncio.wait_for(later, 10)
            waited = time.monotonic() - t0
            assert broker.alive()[0] is False and "model hung" in broker.alive()[1]
            assert (await broker.ready())[0] is False
            with pytest.raises(ModelHung):  # new work is refused at once
                await asyncio.wait_for(broker.submit(decode_job(1, 2)), 1)
            return waited
        finally:
            stuck.release.set()
            await broker.stop()

    waited = asyncio.run(main())
    # 0.5 s deadline + 0.5 s grace, not the later job's 30 s deadline
    assert 0.9 < waited < 8, waited
    assert len(fatal) == 1 and "tiny/tokenize" in fatal[0]
    assert metrics.MODEL_HANGS.labels(worker="embedded")._value.get() - hangs == 1


def test_a_slow_call_within_its_deadline_is_not_a_hang(engine_registry, engine_settings_factory):
    settings = engine_settings_factory(hang_grace_s=0.3)
    tok = engine_registry.tokenizer("tiny")
    slow = tok.runner = Watched(tok.runner, hold=True)

    async def main():
        broker = InProcessBroker(settings, engine_registry)
        await broker.start()
        try:
            job = tok_job(1, 0, deadline=time.time() + 30)
            waiting = asyncio.create_task(broker.submit(job))
            await asyncio.to_thread(slow.entered.wait, 10)
            await asyncio.sleep(1.5)  # five graces, well inside the deadline
            slow.release.set()
            out = await asyncio.wait_for(waiting, 10)
            return out, broker.alive()
        finally:
            slow.release.set()
            await broker.stop()

    out, alive = asyncio.run(main())
    assert out["tokens"].shape[0] == 1 and alive == (True, "ok")


# --- real processes -------------------------------------------------------------------------
def harness(role: str, env: dict[str, str], *args: str, log=None) -> subprocess.Popen:
    env = {**os.environ, **env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.hang_harness", role, *args],
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT if log else None,
    )


@pytest.fixture
def hung_server(api_env, tmp_path):
    """``start(**env) -> (base URL, process, log path)`` of the harness server, ready."""
    procs = []

    def start(**extra):
        port, log_path = free_port(), tmp_path / f"serve{len(procs)}.log"
        env = {**api_env, "SOFTVQ_HANG_GRACE_S": "1", **extra}
        proc = harness("serve", env, "--port", str(port), log=open(log_path, "w"))
        procs.append(proc)
        base = f"http://127.0.0.1:{port}"
        wait_http_ready(base, proc)
        return base, proc, log_path

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(10)


def post_concurrently(base: str, calls: list[tuple[str, dict]]) -> list[httpx.Response]:
    async def go():
        async with httpx.AsyncClient(base_url=base, timeout=60) as c:
            tasks = []
            for path, kw in calls:
                tasks.append(asyncio.create_task(c.post(path, **kw)))
                await asyncio.sleep(0.3)  # in this order
            return await asyncio.gather(*tasks)

    return asyncio.run(go())


def test_embedded_server_answers_503_then_exits_70_for_a_restart(hung_server):
    base, proc, log_path = hung_server()
    t0 = time.monotonic()
    hung, queued = post_concurrently(
        base,
        [
            ("/tokenize", {"files": {"image": ("b.png", black_png())}, "data": {"timeout_s": "1"}}),
            ("/decode", {"json": {"tokens": [[[0.1] * 8] * 8]}}),  # 30 s deadline
        ],
    )
    assert hung.status_code == 504, hung.text
    assert queued.status_code == 503 and queued.json()["error"] == "model_hung", queued.text
    assert queued.headers["Retry-After"] == "10"
    assert time.monotonic() - t0 < 15  # the queued caller did not wait for its 30 s deadline
    assert proc.wait(20) == EXIT_HUNG
    log = log_path.read_text()
    assert "has not returned" in log and f"exiting with status {EXIT_HUNG}" in log


def test_without_exit_the_server_stays_up_unhealthy(hung_server):
    base, proc, _ = hung_server(SOFTVQ_EXIT_ON_HANG="false")
    (hung,) = post_concurrently(
        base,
        [("/tokenize", {"files": {"image": ("b.png", black_png())}, "data": {"timeout_s": "1"}})],
    )
    assert hung.status_code == 504, hung.text
    deadline = time.monotonic() + 15
    while httpx.get(f"{base}/healthz").status_code == 200:
        assert time.monotonic() < deadline, "/healthz never turned 503"
        time.sleep(0.2)
    health = httpx.get(f"{base}/healthz")
    assert health.status_code == 503 and health.json()["error"] == "unhealthy"
    assert "model hung" in health.json()["message"]
    assert httpx.get(f"{base}/readyz").status_code == 503
    r = httpx.post(f"{base}/decode", json={"tokens": [[[0.1] * 8] * 8]}, timeout=10)
    assert r.status_code == 503 and r.json()["error"] == "model_hung", r.text
    metrics_text = httpx.get(f"{base}/metrics").text
    assert 'softvq_model_hangs_total{worker="embedded"} 1.0' in metrics_text
    time.sleep(1.5)
    assert proc.poll() is None  # still up: the liveness probe decides
    # ... and its restart (SIGTERM) is not blocked by the stuck model thread
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == EXIT_HUNG


@pytest.mark.redis
def test_hung_worker_hands_back_its_jobs_and_exits_70(
    redis_server, engine_settings_factory, spawn_worker
):
    opts = {"visibility_timeout_s": 1.0, "hang_grace_s": 1.0}
    settings = engine_settings_factory(redis_url=redis_server.url, **opts)
    # An 800 ms batching window: w1 reads both jobs before it starts the black one.
    w1 = spawn_worker(redis_server.url, "w1", module="tests.hang_harness", max_wait_ms=800, **opts)
    keys = Keys(settings.stream_prefix)
    r = redis.Redis.from_url(redis_server.url)
    end = time.monotonic() + 120
    while not r.exists(keys.worker("w1")):
        assert w1.poll() is None and time.monotonic() < end, "w1 never started"
        time.sleep(0.1)

    async def main():
        broker = RedisBroker(settings)
        await broker.start()
        try:
            hung = asyncio.create_task(broker.submit(black_job(time.time() + 2.0)))
            tokenize = keys.stream("tiny", "tokenize")
            while not r.xlen(tokenize):  # queued first, so it runs first
                await asyncio.sleep(0.005)
            good = asyncio.create_task(broker.submit(decode_job(1, 3)))  # 30 s deadline
            with pytest.raises(JobTimeout):
                await hung
            # w1 hangs on the black image holding the decode job; once it has given up, a
            # healthy worker takes the handed-back job.
            await asyncio.to_thread(w1.wait, 30)
            assert not r.exists(keys.worker("w1"))  # its heartbeat went with it
            decode = keys.stream("tiny", "decode")
            assert r.xinfo_stream(decode)["entries-added"] == 2  # re-added by w1's hand-back
            assert r.xlen(decode) == 1 and r.xpending(decode, keys.group)["pending"] == 0
            spawn_worker(redis_server.url, "w2", max_wait_ms=20, **opts)
            return await asyncio.wait_for(good, 60)
        finally:
            await broker.stop()

    out = asyncio.run(main())
    assert w1.returncode == EXIT_HUNG
    assert out["images"].shape == (1, 32, 32, 3)
    # the hung job itself is reclaimed after the visibility timeout and dropped as expired
    stream = keys.stream("tiny", "tokenize")
    end = time.monotonic() + 30
    while r.xlen(stream) or r.xpending(stream, keys.group)["pending"]:
        assert time.monotonic() < end, "the hung job stayed in its stream"
        time.sleep(0.2)
    r.close()
