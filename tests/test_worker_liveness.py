"""Worker liveness (issue #13, item 5), with a real redis-server and real worker processes.

- The live-worker set ``{p}:workers``: ``ready()`` (/readyz, /metrics) and ``workers()``
  (/workers, /models) cost one script call (plus one MGET), never a SCAN, however many keys
  Redis holds; expired members are pruned; a SIGKILLed worker leaves /workers and /readyz
  within its heartbeat TTL.
- The worker's liveness probe (``python -m service.liveness``, the form compose and k8s run,
  and ``softvq worker --check``): passes for a live worker, also while Redis is down; fails
  when its process is frozen (SIGSTOP), when no worker ever ran, and after it stopped.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import redis
from fastapi.testclient import TestClient

from service.app import create_app
from service.broker.redis_streams import Keys, RedisBroker, beat, leave
from service.liveness import check
from service.worker import HEARTBEAT_TTL_S, Worker
from tests.redis_server import free_port
from tests.test_serve_uvicorn import softvq_command

pytestmark = pytest.mark.redis

ROOT = Path(__file__).resolve().parent.parent


def command_calls(r: redis.Redis) -> dict[str, int]:
    """Calls per command so far (INFO commandstats), without INFO itself."""
    stats = r.info("commandstats")
    return {k.removeprefix("cmdstat_"): v["calls"] for k, v in stats.items() if k != "cmdstat_info"}


def issued(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {c: n - before.get(c, 0) for c, n in after.items() if n != before.get(c, 0)}


def wait_until(cond, timeout: float, what: str, every: float = 0.1) -> float:
    """Seconds it took for ``cond()`` to hold."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return time.monotonic() - t0
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


# --- the live-worker set --------------------------------------------------------------------
def test_ready_and_workers_cost_no_scan_and_prune_expired_members(
    redis_server, engine_settings_factory
):
    settings = engine_settings_factory(redis_url=redis_server.url)
    keys = Keys(settings.stream_prefix)
    r = redis.Redis.from_url(redis_server.url)
    # The keyspace of a busy service (the soak levels off at 12-16k keys, mostly done markers).
    with r.pipeline(transaction=False) as pipe:
        for i in range(15_000):
            pipe.set(keys.done(f"job-{i}"), 1, ex=300)
        pipe.execute()
    r.zadd(keys.workers, {"ghost": 1.0})  # a worker that died long ago, never pruned yet

    async def main():
        broker = RedisBroker(settings)
        await broker.start()
        try:
            await beat(broker.redis, keys, "short", {"pid": 1, "host": "h"}, 1)
            await beat(broker.redis, keys, "long", {"pid": 2, "host": "h"}, 30)
            await broker.ready()  # the connection is open: count only the calls themselves
            before = command_calls(r)
            assert await broker.ready() == (True, "ok")
            ready_cost = issued(before, command_calls(r))
            before = command_calls(r)
            workers = await broker.workers()
            workers_cost = issued(before, command_calls(r))
            assert [(w["id"], w["pid"]) for w in workers] == [("long", 2), ("short", 1)]
            assert r.zscore(keys.workers, "ghost") is None  # pruned by the reads
            # A member whose heartbeat expires leaves both answers, and the set.
            await asyncio.sleep(1.3)
            assert [w["id"] for w in await broker.workers()] == ["long"]
            assert r.zscore(keys.workers, "short") is None
            assert await broker.ready() == (True, "ok")
            # A worker that stops cleanly leaves at once.
            await leave(broker.redis, keys, "long")
            assert await broker.ready() == (False, "no worker heartbeat")
            assert await broker.workers() == []
            return ready_cost, workers_cost
        finally:
            await broker.stop()

    ready_cost, workers_cost = asyncio.run(asyncio.wait_for(main(), 30))
    # One round trip (the LIVE script; Redis counts the commands it runs inside too), plus one
    # MGET of the info keys for workers(): nothing that grows with the 15k other keys.
    assert "scan" not in ready_cost and "scan" not in workers_cost
    assert ready_cost.get("eval") == 1 and "mget" not in ready_cost, ready_cost
    assert workers_cost.get("eval") == 1 and workers_cost.get("mget") == 1, workers_cost
    assert sum(ready_cost.values()) <= 4 and sum(workers_cost.values()) <= 5
    # The set expires by itself when no worker beats any more (nothing stays for ever).
    assert not r.exists(keys.workers) or r.ttl(keys.workers) <= 30
    r.close()


def test_sigkilled_worker_leaves_workers_and_readyz_within_its_ttl(
    redis_server, spawn_worker, engine_settings_factory, tmp_path
):
    """Two real workers; one SIGKILLed (no goodbye: only its heartbeat's expiry can tell) is
    gone from /workers within HEARTBEAT_TTL_S; the other one SIGKILLed too, /readyz turns 503
    within the TTL and /metrics counts no live worker."""
    procs = {
        name: spawn_worker(
            redis_server.url, name, worker_liveness_file=str(tmp_path / f"{name}.alive")
        )
        for name in ("w1", "w2")
    }
    keys = Keys("softvq")
    r = redis.Redis.from_url(redis_server.url)
    settings = engine_settings_factory(redis_url=redis_server.url)
    with TestClient(create_app(settings)) as c:

        def ids() -> set[str]:
            return {w["id"] for w in c.get("/workers").json()["workers"]}

        wait_until(lambda: ids() == {"w1", "w2"}, 180, "both workers' heartbeats", 0.5)
        assert c.get("/readyz").status_code == 200
        for p in procs.values():
            assert p.poll() is None

        procs["w1"].send_signal(signal.SIGKILL)
        procs["w1"].wait(10)
        took = wait_until(lambda: ids() == {"w2"}, HEARTBEAT_TTL_S + 3, "w1 to leave /workers")
        assert took <= HEARTBEAT_TTL_S + 0.5, took
        assert r.zscore(keys.workers, "w1") is None  # pruned, not just hidden
        assert c.get("/readyz").status_code == 200  # w2 is still alive

        procs["w2"].send_signal(signal.SIGKILL)
        procs["w2"].wait(10)
        took = wait_until(
            lambda: c.get("/readyz").status_code == 503, HEARTBEAT_TTL_S + 3, "/readyz 503"
        )
        assert took <= HEARTBEAT_TTL_S + 0.5, took
        assert c.get("/readyz").json()["message"] == "no worker heartbeat"
        assert ids() == set()
        assert "softvq_workers_alive 0.0" in c.get("/metrics").text
    r.close()


# --- the worker's liveness probe ------------------------------------------------------------
def probe(path: Path) -> subprocess.CompletedProcess:
    """The probe as compose and k8s run it (``python3 -m service.liveness``)."""
    return subprocess.run(
        [sys.executable, "-m", "service.liveness", "--file", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )


def cli_check(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*softvq_command(), "worker", "--check", "--liveness-file", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_worker_probe_passes_when_live_and_fails_when_frozen_stopped_or_never_run(
    redis_server, spawn_worker, tmp_path
):
    path = tmp_path / "w1.alive"
    # No worker ever ran here: both forms fail, and say why.
    for done in (probe(path), cli_check(path)):
        assert done.returncode == 1 and "no liveness file" in done.stdout + done.stderr, done

    stuck_after = 3.0
    proc = spawn_worker(
        redis_server.url, "w1", worker_liveness_file=str(path), worker_stuck_after_s=stuck_after
    )
    try:
        wait_until(lambda: probe(path).returncode == 0, 180, "the probe to pass", 0.5)
        done = cli_check(path)
        assert done.returncode == 0 and "alive" in done.stdout, done
        state = json.loads(path.read_text())
        assert state["worker_id"] == "w1" and state["pid"] == proc.pid

        # Redis down for longer than stuck_after: the worker is not stuck, the probe passes
        # (a Redis outage must not restart every worker).
        redis_server.kill()
        time.sleep(stuck_after + 1.5)
        done = probe(path)
        assert done.returncode == 0, done
        redis_server.restart()

        # Frozen (its event loop cannot run): fails within stuck_after (+ a beat + slack).
        proc.send_signal(signal.SIGSTOP)
        try:
            took = wait_until(lambda: probe(path).returncode == 1, stuck_after + 5, "a failure")
            assert took <= stuck_after + 2.5, took
            # Frozen: the loop's file goes stale, and the batcher's last turn may be found
            # stale first (right after the Redis outage above); either names a stuck worker.
            why = probe(path).stderr
            assert "event loop stuck" in why or "batcher stuck" in why, why
        finally:
            proc.send_signal(signal.SIGCONT)
        wait_until(lambda: probe(path).returncode == 0, 10, "the probe to pass again")

        # Stopped cleanly: its file goes with it.
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        done = probe(path)
        assert done.returncode == 1 and "no liveness file" in done.stderr, done
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()


def test_check_reads_a_stuck_batcher_and_a_running_model_call(tmp_path):
    """The verdicts of ``check`` on the file a worker writes: the loop beats but the batcher
    has not turned for longer than allowed -> stuck, unless a model call runs (the hang
    watchdog bounds those); garbage -> not live."""
    path = tmp_path / "alive"
    now = time.time()
    state = {"pid": 1, "worker_id": "w", "at": now - 1, "stuck_after_s": 30}
    path.write_text(json.dumps({**state, "batcher_at": now - 2, "busy": False}))
    assert check(str(path), now)[0]
    path.write_text(json.dumps({**state, "batcher_at": now - 31, "busy": False}))
    ok, why = check(str(path), now)
    assert not ok and "batcher stuck" in why
    path.write_text(json.dumps({**state, "batcher_at": now - 31, "busy": True}))
    assert check(str(path), now)[0]
    path.write_text(json.dumps({**state, "at": now - 31, "batcher_at": now - 1, "busy": False}))
    ok, why = check(str(path), now)
    assert not ok and "event loop stuck" in why
    path.write_text("{not json")
    assert not check(str(path), now)[0]


def test_metrics_answers_while_the_loop_is_stuck_but_the_probe_fails(
    redis_server, engine_settings_factory, engine_registry, tmp_path
):
    """Why /metrics is no liveness probe: prometheus-client serves it from its own thread. A
    real worker (in this process, its loop on a thread) whose event loop is blocked by a
    synchronous call: /metrics still answers 200, the probe fails; unblocked, it passes."""
    from prometheus_client import start_http_server

    path = tmp_path / "alive"
    settings = engine_settings_factory(
        redis_url=redis_server.url, worker_liveness_file=str(path), worker_stuck_after_s=2
    )
    worker = Worker(settings, engine_registry, "in-process")
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(worker.run(),), daemon=True)
    thread.start()
    port = free_port()
    server, _ = start_http_server(port, addr="127.0.0.1")  # as run_worker serves /metrics
    try:
        wait_until(lambda: check(str(path))[0], 30, "the worker to be live")
        loop.call_soon_threadsafe(time.sleep, 6)  # a blocking call on the loop: stuck
        time.sleep(4)
        assert httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).status_code == 200
        ok, why = check(str(path))
        assert not ok and "event loop stuck" in why, why
        wait_until(lambda: check(str(path))[0], 10, "the worker to be live again")
    finally:
        loop.call_soon_threadsafe(worker.stop)
        thread.join(30)
        server.shutdown()
    assert not thread.is_alive() and not path.exists()  # stopped cleanly, file removed
