"""Faults of Redis mode with every part real: our own redis-server, ``softvq serve --redis`` and
``softvq worker`` processes (loadtests/soak.py's ``Stack``), driven over HTTP and hit with
signals. Nothing of the service is patched.

- Redis killed under load: requests (queued and new) fail fast with 503, /readyz turns 503,
  and API and workers recover by themselves once Redis is back on its port.
- A worker SIGTERMed mid-batch finishes that batch, hands its unstarted jobs back, and
  another worker completes them; an API SIGTERMed stops accepting and finishes what it holds.
- A job run twice (its worker was frozen past the visibility timeout, then woke up and
  finished) is answered exactly once.
- A real poisoned payload (a guidance scale that drives the latents to Inf, so the model
  raises) fails alone with its 4xx while its batch-mates are answered; a job that kills every
  worker that runs it is run at most ``max_attempts`` times, then its caller gets an error,
  and the surviving worker keeps serving.
"""

from __future__ import annotations

import asyncio
import base64
import io
import signal
import threading
import time

import httpx
import numpy as np
import pytest
import redis
from PIL import Image

from loadtests.soak import Stack
from service.broker.redis_streams import Keys
from service.jobs import Job
from service.serialization import dump_job, load_outcome
from tests.test_serve_uvicorn import metric

pytestmark = pytest.mark.redis

# The tiny SiT runs ~1000 Euler steps a second on one idle core: this many make a batch that
# lasts seconds, long enough to hit its worker with a signal while it runs.
SLOW_STEPS = 4000
GROUP, PREFIX = "softvq-workers", "softvq"


def png_b64(seed: int, size: int = 32) -> str:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def tokens(seed: int) -> list:
    return np.random.default_rng(seed).standard_normal((1, 8, 8)).astype(np.float32).tolist()


def slow_generate(seed: int, steps: int = SLOW_STEPS) -> dict:
    return {"class_labels": [seed % 10], "seed": seed, "steps": steps}


def wait_for(cond, timeout: float, what: str, every: float = 0.05):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = cond()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def busy(stack: Stack, worker: str) -> bool:
    try:
        return metric(stack.metrics(worker), "softvq_worker_busy", worker=worker) == 1.0
    except httpx.HTTPError:
        return False


def batches(stack: Stack, worker: str, model: str, task: str) -> float:
    return metric(stack.metrics(worker), "softvq_batch_size_count", model=model, task=task)


def freeze(stack: Stack, worker: str) -> None:
    """SIGSTOP a worker so that it takes no new job. A read it was blocked in when stopped is
    still served by Redis (a job would land in the frozen worker's pending list), so wait out
    the longest blocking read a worker issues (1 s)."""
    stack.procs[worker].send_signal(signal.SIGSTOP)
    time.sleep(1.5)


def pending_of(r: redis.Redis, stream: str) -> dict[str, int]:
    """consumer -> deliveries it holds unacknowledged on ``stream``."""
    if not r.exists(stream):
        return {}
    info = r.xpending(stream, GROUP)
    return {c["name"].decode(): int(c["pending"]) for c in info["consumers"] or []}


class Calls:
    """HTTP requests run in background threads, so the test can signal processes meanwhile."""

    def __init__(self, base: str):
        self.base, self.threads, self.results = base, [], {}

    def post(self, key, path: str, body: dict, timeout: float = 120) -> None:
        def run():
            t0 = time.monotonic()
            try:
                r = httpx.post(self.base + path, json=body, timeout=timeout)
                self.results[key] = (r.status_code, r.json(), time.monotonic() - t0)
            except httpx.HTTPError as e:
                self.results[key] = (None, repr(e), time.monotonic() - t0)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        self.threads.append(t)

    def wait(self, timeout: float = 120) -> dict:
        for t in self.threads:
            t.join(timeout)
        return self.results


@pytest.fixture
def make_stack(api_env, tmp_path):
    """``make(**env) -> Stack`` (not started) on the tiny models of tests/conftest.py."""
    stacks = []

    def make(**env) -> Stack:
        base = {**api_env, "SOFTVQ_MAX_STEPS": str(SLOW_STEPS), "SOFTVQ_REQUEST_TIMEOUT_S": "60"}
        stack = Stack({**base, **env}, tmp_path)
        stacks.append(stack)
        return stack

    yield make
    for s in stacks:
        for name in s.procs:
            print(f"--- {name} ---\n{s.log(name, 1500)}")
        s.close()


# --- Redis outage ---------------------------------------------------------------------------
def test_redis_killed_fails_fast_with_503_and_everything_recovers(make_stack):
    stack = make_stack().start(workers=2)
    base = stack.url()
    good = {
        "/tokenize": {"images": [png_b64(1)]},
        "/decode": {"tokens": tokens(1)},
        "/reconstruct": {"images": [png_b64(2)]},
        "/generate": {"class_labels": [3], "seed": 7, "steps": 4},
    }
    before = {p: httpx.post(base + p, json=b, timeout=60) for p, b in good.items()}
    assert {p: r.status_code for p, r in before.items()} == dict.fromkeys(good, 200)
    pids = {n: p.pid for n, p in stack.procs.items()}

    # A request in flight when Redis dies: its job died with Redis, it fails at once.
    calls = Calls(base)
    calls.post("in-flight", "/generate", slow_generate(11))
    wait_for(lambda: busy(stack, "w1") or busy(stack, "w2"), 30, "a worker running it")
    stack.redis.kill()
    killed_at = time.monotonic()
    status, body, _ = calls.wait(30)["in-flight"]
    assert status == 503 and body["error"] == "broker_unavailable", body
    assert time.monotonic() - killed_at < 10

    for path, body in good.items():  # new requests: 503 fast, never a hang
        t0 = time.monotonic()
        r = httpx.post(base + path, json=body, timeout=30)
        assert r.status_code == 503, (path, r.status_code, r.text)
        assert r.json()["error"] == "broker_unavailable" and r.headers["retry-after"] == "1"
        assert time.monotonic() - t0 < 5, path
    ready = httpx.get(base + "/readyz", timeout=10)
    assert ready.status_code == 503 and ready.json()["error"] == "not_ready"
    assert httpx.get(base + "/healthz", timeout=10).status_code == 200  # alive all along

    stack.redis.restart()  # same port, empty (no persistence): groups must be re-created
    wait_for(
        lambda: httpx.get(base + "/readyz", timeout=5).status_code == 200,
        60,
        "/readyz after Redis came back",
        every=0.2,
    )
    after = {p: httpx.post(base + p, json=b, timeout=60) for p, b in good.items()}
    assert {p: r.status_code for p, r in after.items()} == dict.fromkeys(good, 200), {
        p: r.text[:200] for p, r in after.items()
    }
    # the same answers as before the outage, from the same processes (nobody restarted)
    assert after["/tokenize"].json()["tokens"] == before["/tokenize"].json()["tokens"]
    assert after["/generate"].json()["images"] == before["/generate"].json()["images"]
    assert {n: p.pid for n, p in stack.procs.items()} == pids
    assert all(p.poll() is None for p in stack.procs.values())
    wait_for(lambda: stack.heartbeats() == ["w1", "w2"], 30, "both workers' heartbeats")


# --- graceful shutdown ------------------------------------------------------------------------
def test_sigterm_worker_finishes_its_batch_and_hands_back_then_api_drains(make_stack):
    # A visibility timeout far beyond the test: only the hand-back can get the jobs done.
    # The long max_wait lets w1 take the later requests while its slow batch is still forming.
    stack = make_stack(SOFTVQ_VISIBILITY_TIMEOUT_S="600")
    stack.redis.start()
    stack.spawn_api()
    stack.spawn_worker("w1", SOFTVQ_MAX_WAIT_MS="3000")
    stack.spawn_worker("w2")
    stack.wait_ready("api")
    stack.wait_workers(2)
    freeze(stack, "w2")  # the rescuer, frozen until w1 is stopped
    base = stack.url()
    r = redis.Redis.from_url(stack.redis_url)

    calls = Calls(base)
    calls.post("slow", "/generate", slow_generate(21))
    wait_for(lambda: pending_of(r, f"{PREFIX}:jobs:sit-tiny:generate").get("w1"), 30, "w1")
    unstarted = {f"decode{i}": ("/decode", {"tokens": tokens(i)}) for i in range(3)}
    unstarted |= {f"tok{i}": ("/tokenize", {"images": [png_b64(i)]}) for i in range(3)}
    for key, (path, body) in unstarted.items():
        calls.post(key, path, body)

    def held_by_w1() -> int:
        return sum(
            pending_of(r, f"{PREFIX}:jobs:tiny:{t}").get("w1", 0) for t in ("decode", "tokenize")
        )

    wait_for(lambda: held_by_w1() == len(unstarted), 30, "w1 holding every unstarted job")
    wait_for(lambda: busy(stack, "w1"), 30, "w1 running the slow batch")
    assert held_by_w1() == len(unstarted)  # held, not run: the slow batch has the model

    stack.signal("w1", signal.SIGTERM)
    stack.procs["w2"].send_signal(signal.SIGCONT)
    assert stack.procs["w1"].wait(60) == 0  # finished its batch, handed back, clean exit
    results = calls.wait(120)
    status, body, _ = results["slow"]
    assert status == 200 and body["seeds"] == [21], body  # w1 finished the running batch
    for key in unstarted:
        assert results[key][0] == 200, (key, results[key])
    # the handed-back jobs ran on w2, right away (not after the visibility timeout)
    assert batches(stack, "w2", "tiny", "decode") >= 1
    assert batches(stack, "w2", "tiny", "tokenize") >= 1
    assert batches(stack, "w2", "sit-tiny", "generate") == 0
    assert max(results[k][2] for k in unstarted) < 120

    # API SIGTERM: it stops taking connections, and the request it holds completes.
    calls = Calls(base)
    calls.post("held", "/generate", slow_generate(31))
    wait_for(lambda: busy(stack, "w2"), 30, "w2 running the API's job")
    stack.signal("api", signal.SIGTERM)
    time.sleep(0.5)
    with pytest.raises(httpx.ConnectError):
        httpx.post(base + "/decode", json={"tokens": tokens(0)}, timeout=10)
    status, body, _ = calls.wait(120)["held"]
    assert status == 200 and body["seeds"] == [31], body
    assert stack.procs["api"].wait(60) in (0, -signal.SIGTERM)
    r.close()


# --- exactly-once answers -----------------------------------------------------------------
def test_job_run_twice_is_answered_once(make_stack):
    """w1 takes a slow job and freezes (SIGSTOP) mid-batch; past the visibility timeout w2
    claims the job, runs it and answers. w1 then wakes (SIGCONT), finishes the same job and
    tries to answer too: the caller's reply list must hold exactly one answer. This test is
    the caller (it queues the job as the API does), so every pushed answer stays visible."""
    stack = make_stack(SOFTVQ_VISIBILITY_TIMEOUT_S="1.5")
    stack.redis.start()
    stack.spawn_worker("w1")
    stack.spawn_worker("w2", SOFTVQ_MAX_WAIT_MS="5")
    stack.wait_workers(2)
    freeze(stack, "w2")  # so that w1 takes the job
    r = redis.Redis.from_url(stack.redis_url)
    keys = Keys(PREFIX)
    stream, reply = keys.stream("sit-tiny", "generate"), keys.reply("test-caller")
    job = Job(
        "sit-tiny",
        "generate",
        {"labels": [4], "seeds": [41], "cfg_scale": 1.0, "n": 1},
        params={
            "steps": SLOW_STEPS,
            "sampler": "euler",
            "guidance_interval": [0.0, 1.0],
            "path": "linear",
        },
        deadline=time.time() + 120,
    )
    r.xadd(stream, {"job": dump_job(job), "reply": reply})
    wait_for(lambda: busy(stack, "w1"), 30, "w1 running the job")
    stack.procs["w1"].send_signal(signal.SIGSTOP)
    try:
        stack.procs["w2"].send_signal(signal.SIGCONT)
        # w2 reclaims the frozen worker's job and answers it
        wait_for(lambda: r.llen(reply) >= 1, 90, "w2's answer", every=0.2)
        assert batches(stack, "w2", "sit-tiny", "generate") == 1
    finally:
        stack.procs["w1"].send_signal(signal.SIGCONT)
    # w1 wakes up and completes its copy of the batch (then tries to answer: refused)
    wait_for(lambda: batches(stack, "w1", "sit-tiny", "generate") >= 1, 60, "w1's batch")
    time.sleep(1.0)
    assert r.llen(reply) == 1
    job_id, outcome = load_outcome(r.lpop(reply))
    assert job_id == job.id and outcome["images"].shape == (1, 32, 32, 3)
    assert r.exists(keys.done(job.id))  # the marker that refused the second answer
    assert r.xlen(stream) == 0 and r.xpending(stream, GROUP)["pending"] == 0
    retried = metric(
        stack.metrics("w2"), "softvq_job_retries_total", model="sit-tiny", task="generate"
    )
    assert retried == 1  # w2's run was the second delivery
    r.close()


# --- poisoned jobs --------------------------------------------------------------------------
def test_poisoned_jobs_fail_alone_within_max_attempts_and_workers_keep_serving(make_stack):
    stack = make_stack(SOFTVQ_VISIBILITY_TIMEOUT_S="1.5", SOFTVQ_MAX_ATTEMPTS="2")
    stack.redis.start()
    for name in ("w1", "w2", "w3"):
        stack.spawn_worker(name, SOFTVQ_MAX_WAIT_MS="200")
    stack.spawn_api()
    stack.wait_ready("api")
    stack.wait_workers(3)
    base = stack.url()

    # 1. A real poisoned payload: valid by the schema (finite, >= 0), but this guidance scale
    # overflows the latents to Inf and the tokenizer refuses to decode them. It is batched with
    # good jobs (same steps), fails alone, and they are answered.
    async def mixed():
        async with httpx.AsyncClient(base_url=base, timeout=60) as c:
            good = [{"class_labels": [i], "seed": 60 + i, "steps": 8} for i in range(4)]
            bad = {"class_labels": [5], "seed": 99, "steps": 8, "cfg_scale": 1e30}
            return await asyncio.gather(*(c.post("/generate", json=b) for b in [*good, bad]))

    *good, bad = asyncio.run(mixed())
    assert [g.status_code for g in good] == [200] * 4
    assert [g.json()["seeds"] for g in good] == [[60], [61], [62], [63]]
    assert bad.status_code == 422 and bad.json()["error"] == "invalid_input", bad.text
    assert "NaN or Inf" in bad.json()["message"]

    # 2. A job that kills the worker running it (as a segfault or the OOM killer would):
    # every worker that holds it dies. With max_attempts 2 it is run twice, then the third
    # worker gives up on it and the caller gets an error instead of waiting forever.
    r = redis.Redis.from_url(stack.redis_url)
    stream = f"{PREFIX}:jobs:sit-tiny:generate"
    calls = Calls(base)
    calls.post("deadly", "/generate", slow_generate(77))
    killed = []
    while "deadly" not in calls.results:
        holders = [w for w, n in pending_of(r, stream).items() if n and w not in killed]
        for w in holders:
            if busy(stack, w):  # it is running the job: crash it
                stack.signal(w, signal.SIGKILL)
                stack.procs[w].wait(10)
                killed.append(w)
        time.sleep(0.05)
        assert len(killed) <= 2, f"the job was run more than max_attempts times: {killed}"
    status, body, _ = calls.wait(60)["deadly"]
    assert len(killed) == 2
    assert status == 500 and body["error"] == "job_failed", body
    assert "2 attempts" in body["message"]

    # the survivor keeps serving
    (survivor,) = {"w1", "w2", "w3"} - set(killed)
    assert stack.procs[survivor].poll() is None
    ok = httpx.post(base + "/generate", json={"class_labels": [1], "seed": 5, "steps": 4})
    assert ok.status_code == 200 and ok.json()["seeds"] == [5]
    assert httpx.post(base + "/decode", json={"tokens": tokens(3)}, timeout=60).status_code == 200
    assert r.xlen(stream) == 0 and r.xpending(stream, GROUP)["pending"] == 0
    r.close()
