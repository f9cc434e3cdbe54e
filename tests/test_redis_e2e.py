"""Redis mode end to end, all real processes: our own redis-server on a free port, ``softvq
serve --redis`` (API only) and two ``softvq worker`` processes, driven over HTTP.

- 64 concurrent single-item mixed requests, every answer checked against the models called
  directly; some model batch held more than one request (a worker's softvq_batch_size);
- workers paused: a full queue answers 429 with Retry-After, an expired deadline 504;
- one worker SIGKILLed while it holds jobs: every request still completes.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import time

import httpx
import numpy as np
import pytest
import redis
import torch
from fastapi.testclient import TestClient

import model
from model.images import load_image, psnr, tensor_to_uint8
from service.app import create_app
from tests.redis_server import RedisServer, free_port
from tests.test_api import b64, decode_png, png
from tests.test_serve_uvicorn import metric, softvq_command, steps_for, wait_http_ready

pytestmark = pytest.mark.redis

QUEUE_MAX = 24
GEN_STEPS = 4


class Cluster:
    """redis-server + API + two workers, each process' output in its own log file."""

    def __init__(self, env: dict, tmp):
        self.redis = RedisServer().start()
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            **env,
            "SOFTVQ_REDIS_URL": self.redis.url,
            "SOFTVQ_VISIBILITY_TIMEOUT_S": "2",
            "SOFTVQ_MAX_WAIT_MS": "25",
            "SOFTVQ_QUEUE_MAX": str(QUEUE_MAX),
            "SOFTVQ_MAX_STEPS": "5000",
            "SOFTVQ_REQUEST_TIMEOUT_S": "120",
        }
        self.tmp, self.procs, self.logs = tmp, {}, {}
        self.metrics_ports = {}

    def spawn(self, name: str, args: list[str], **env: str) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "w+")
        self.logs[name] = log
        proc = subprocess.Popen(
            [*softvq_command(), *args],
            env={**self.env, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.procs[name] = proc
        return proc

    def start(self) -> Cluster:
        for name in ("worker1", "worker2"):
            self.metrics_ports[name] = free_port()
            self.spawn(
                name,
                [
                    "worker",
                    "--redis",
                    self.redis.url,
                    "--worker-id",
                    name,
                    "--metrics-port",
                    str(self.metrics_ports[name]),
                    "--log-level",
                    "warning",
                ],
            )
        self.spawn(
            "api",
            [
                "serve",
                "--port",
                str(self.port),
                "--redis",
                self.redis.url,
                "--log-level",
                "warning",
            ],
            # The API loads no weights in Redis mode: its own view of the backend stays
            # "auto"; GET /models must show what the workers run (eager).
            SOFTVQ_BACKEND="auto",
        )
        wait_http_ready(self.base, self.procs["api"])
        self.wait_workers(2)
        return self

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis.url)

    def heartbeats(self) -> dict[str, dict]:
        r = self.client()
        out = {
            k.decode().rsplit(":", 1)[1]: json.loads(r.get(k) or "{}")
            for k in r.scan_iter("softvq:worker:*")
        }
        r.close()
        return out

    def wait_workers(self, n: int, timeout: float = 120) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode}")
            if len(self.heartbeats()) >= n:
                return
            time.sleep(0.2)
        raise RuntimeError("workers did not come up")

    def worker_metrics(self, name: str) -> str:
        return httpx.get(f"http://127.0.0.1:{self.metrics_ports[name]}/metrics").text

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.send_signal(signal.SIGTERM)
        for name, p in self.procs.items():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
            log = self.logs[name]
            log.seek(0)
            print(f"--- {name} (exit {p.returncode}) ---\n{log.read()[-2000:]}")
            log.close()
        self.redis.close()


@pytest.fixture(scope="module")
def cluster(api_env, tmp_path_factory):
    c = Cluster(api_env, tmp_path_factory.mktemp("redis-e2e"))
    try:
        yield c.start()
    finally:
        c.close()


@pytest.fixture(scope="module")
def models(api_model_root):
    return {
        "tiny": model.load_tokenizer(api_model_root / "tiny"),
        "tiny16": model.load_tokenizer(api_model_root / "tiny16"),
        "sit-tiny": model.load_generator(api_model_root / "sit-tiny"),
    }


def images_of(body) -> np.ndarray:
    return np.stack([decode_png(base64.b64decode(s)) for s in body["images"]]).astype(int)


async def _gather(base: str, requests: list[tuple[str, dict]], timeout: float = 120):
    limits = httpx.Limits(max_connections=128, max_keepalive_connections=128)
    async with httpx.AsyncClient(base_url=base, timeout=timeout, limits=limits) as c:
        return await asyncio.gather(*(c.post(path, json=body) for path, body in requests))


def test_64_concurrent_mixed_requests(cluster, models):
    tok, tok16, gen = models["tiny"], models["tiny16"], models["sit-tiny"]
    blobs = [png(100 + i, 30 + i, 40) for i in range(16)]
    token_sets = [
        torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(16)
    ]
    requests = []
    for i in range(16):
        name = "tiny" if i % 2 else "tiny16"
        requests.append(("/tokenize", {"images": [b64(blobs[i])], "model": name}))
        requests.append(("/decode", {"tokens": token_sets[i].tolist()}))
        requests.append(("/reconstruct", {"images": [b64(blobs[i])]}))
        requests.append(
            ("/generate", {"class_labels": [i % 10], "seed": 1000 + i, "steps": GEN_STEPS})
        )
    assert len(requests) == 64
    answers = asyncio.run(_gather(cluster.base, requests))

    for (path, req), r in zip(requests, answers, strict=True):
        assert r.status_code == 200, (path, r.status_code, r.text[:300])
        body = r.json()
        if path == "/tokenize":
            t = tok if req["model"] == "tiny" else tok16
            image = load_image(base64.b64decode(req["images"][0]), 32)[None]
            with torch.inference_mode():
                want = t.encode(image).numpy()
            assert body["model"] == req["model"] and body["shape"] == list(want.shape)
            np.testing.assert_allclose(np.asarray(body["tokens"], np.float32), want, atol=1e-5)
        elif path == "/decode":
            with torch.inference_mode():
                want = tensor_to_uint8(tok.decode(torch.tensor(req["tokens"])))
            assert np.abs(images_of(body) - want).max() <= 1
        elif path == "/reconstruct":
            image = load_image(base64.b64decode(req["images"][0]), 32)[None]
            with torch.inference_mode():
                rec = tok.decode(tok.encode(image))
            assert np.abs(images_of(body) - tensor_to_uint8(rec)).max() <= 1
            assert body["psnr"][0] == pytest.approx(psnr(rec, image)[0], abs=0.05)
        else:
            want = tensor_to_uint8(
                model.generate(tok, gen, req["class_labels"], [req["seed"]], steps=GEN_STEPS)
            )
            assert body["seeds"] == [req["seed"]]
            assert np.abs(images_of(body) - want).max() <= 2

    # every request held one item, so a batch of more than one item held several requests
    multi = 0
    for name in ("worker1", "worker2"):
        text = cluster.worker_metrics(name)
        for m, task in (
            ("tiny", "decode"),
            ("tiny", "reconstruct"),
            ("sit-tiny", "generate"),
            ("tiny", "tokenize"),
            ("tiny16", "tokenize"),
        ):
            count = metric(text, "softvq_batch_size_count", model=m, task=task)
            singles = metric(text, "softvq_batch_size_bucket", model=m, task=task, le="1.0")
            multi += count - singles
    assert multi > 0


def test_models_and_workers_are_reported_by_the_workers(cluster):
    info = httpx.get(f"{cluster.base}/models").json()
    entries = {e["name"]: e for e in [*info["tokenizers"], *info["generators"]]}
    assert set(entries) == {"tiny", "tiny16", "sit-tiny", "sit-tiny16"}
    for e in entries.values():
        assert (e["backend"], e["device"], e["dtype"], e["workers"]) == (
            "eager",
            "cpu",
            "float32",
            2,
        ), e
    workers = httpx.get(f"{cluster.base}/workers").json()["workers"]
    assert [w["id"] for w in workers] == ["worker1", "worker2"]
    for w in workers:
        assert w["pid"] == cluster.procs[w["id"]].pid and isinstance(w["busy"], bool)
        assert set(w["served"]) == set(entries) and w["batches"] >= 0


def test_full_queue_429_and_expired_deadline_504(cluster):
    """With both workers paused, jobs pile up: past QUEUE_MAX the API answers 429, and a job
    whose deadline passes answers 504. Resumed, the workers run the queued jobs."""
    workers = [cluster.procs[n] for n in ("worker1", "worker2")]
    stream = "softvq:jobs:tiny:decode"
    r = cluster.client()
    for p in workers:
        p.send_signal(signal.SIGSTOP)
    try:

        async def scenario():
            limits = httpx.Limits(max_connections=64)
            async with httpx.AsyncClient(base_url=cluster.base, timeout=120, limits=limits) as c:
                tokens = np.zeros((1, 8, 8)).tolist()
                queued = [
                    asyncio.create_task(c.post("/decode", json={"tokens": tokens}))
                    for _ in range(QUEUE_MAX)
                ]
                end = time.monotonic() + 30
                while r.xlen(stream) < QUEUE_MAX and time.monotonic() < end:
                    await asyncio.sleep(0.05)
                full = await c.post("/decode", json={"tokens": tokens})
                late = await c.post("/tokenize", json={"images": [b64(png(1))], "timeout_s": 0.5})
                for p in workers:
                    p.send_signal(signal.SIGCONT)
                return full, late, await asyncio.gather(*queued)

        full, late, queued = asyncio.run(scenario())
    finally:
        for p in workers:
            p.send_signal(signal.SIGCONT)
        r.close()
    assert full.status_code == 429, full.text
    assert full.json()["error"] == "queue_full" and int(full.headers["retry-after"]) >= 1
    assert late.status_code == 504 and late.json()["error"] == "timeout"
    assert [q.status_code for q in queued] == [200] * QUEUE_MAX
    cluster.wait_workers(2)


def test_worker_sigkilled_while_holding_jobs(cluster):
    """SIGKILL a worker while jobs sit in its pending list: after the visibility timeout the
    other worker claims them, and every request completes."""
    steps = steps_for(cluster.base, 1.0)  # a batch holds its worker for a second or more
    stream, group = "softvq:jobs:sit-tiny:generate", "softvq-workers"
    requests = [
        ("/generate", {"class_labels": [i % 10], "seed": 50 + i, "steps": steps}) for i in range(12)
    ]
    r = cluster.client()

    async def scenario():
        task = asyncio.ensure_future(_gather(cluster.base, requests))
        victim, end = None, time.monotonic() + 60
        while victim is None and time.monotonic() < end and not task.done():
            pending = r.xpending(stream, group)
            holding = [c["name"].decode() for c in pending["consumers"] if c["pending"] > 0]
            victim = holding[0] if holding else None
            await asyncio.sleep(0.01)
        assert victim in cluster.procs, f"no worker took the jobs ({victim})"
        cluster.procs[victim].send_signal(signal.SIGKILL)
        cluster.procs[victim].wait(10)
        # what the dead worker still held (read before the visibility timeout lets the
        # survivor claim it)
        orphaned = sum(
            c["pending"]
            for c in r.xpending(stream, group)["consumers"]
            if c["name"].decode() == victim
        )
        return victim, orphaned, await task

    try:
        victim, orphaned, answers = asyncio.run(scenario())
    finally:
        r.close()
    assert cluster.procs[victim].wait(10) == -signal.SIGKILL
    for (_, req), resp in zip(requests, answers, strict=True):
        assert resp.status_code == 200, resp.text[:300]
        assert resp.json()["seeds"] == [req["seed"]] and len(resp.json()["images"]) == 1
    survivor = ({"worker1", "worker2"} - {victim}).pop()
    text = cluster.worker_metrics(survivor)
    # the survivor took over the victim's orphaned jobs (XAUTOCLAIM counts a retry each)
    retries = metric(text, "softvq_job_retries_total", model="sit-tiny", task="generate")
    assert orphaned > 0 and retries >= orphaned, (orphaned, retries)


def test_rate_limit_is_shared_by_api_replicas(api_settings_factory):
    """Two API apps (replicas) on one Redis share each key's token bucket; with Redis gone
    the limiter refuses fast with 503 instead of hanging or letting traffic through."""
    with RedisServer() as server:
        settings = api_settings_factory(
            redis_url=server.url,
            api_keys=["key-a", "key-b"],
            rate_limit_per_s=0.2,
            rate_limit_burst=3,
        )
        with TestClient(create_app(settings)) as a, TestClient(create_app(settings)) as b:
            key_a = {"Authorization": "Bearer key-a"}
            codes = [c.get("/models", headers=key_a).status_code for c in (a, b, a, b)]
            assert codes == [200, 200, 200, 429]
            assert b.get("/models", headers={"Authorization": "Bearer key-b"}).status_code == 200
            assert a.get("/models").status_code == 401
            server.kill()
            t0 = time.monotonic()
            r = a.get("/models", headers={"Authorization": "Bearer key-b"})
            assert r.status_code == 503 and r.json()["error"] == "broker_unavailable"
            assert time.monotonic() - t0 < 5
            assert a.get("/healthz").status_code == 200
            assert a.get("/readyz").status_code == 503


def test_redis_down_fails_fast_with_503(api_settings_factory):
    """API in Redis mode with Redis gone: a request is refused at once with 503 and
    Retry-After (never a hang), the probes say alive but not ready."""
    with RedisServer() as server:
        with TestClient(create_app(api_settings_factory(redis_url=server.url))) as c:
            assert c.get("/readyz").json()["message"] == "no worker heartbeat"
            server.kill()
            t0 = time.monotonic()
            r = c.post("/decode", json={"tokens": np.zeros((1, 8, 8)).tolist()})
            assert r.status_code == 503 and r.json()["error"] == "broker_unavailable"
            assert int(r.headers["retry-after"]) >= 1
            assert time.monotonic() - t0 < 5
            assert c.get("/healthz").status_code == 200
            assert c.get("/readyz").status_code == 503
