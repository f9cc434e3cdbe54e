"""The checks of deploy/smoke/run.sh, against the compose project it started.

    python3 deploy/smoke/check.py --project P --api URL --prometheus URL ... -- COMPOSE ARGV

Standard library only (it runs on the host, outside the images). Every request goes to
127.0.0.1 (the published ports) or through `docker exec`; the load is bounded in count and
time. Checks, in order (each one's numbers go to --results as JSON):

 1. healthy: the API, both workers and Redis report HEALTHCHECK `healthy`; seconds from
    `compose up` to each, and to /readyz 200
 2. published ports: every published port of the project binds 127.0.0.1
 3. non-root: the API and worker processes run as uid 10001 (the image's USER)
 4. answers: /models lists the bundled demo models; /tokenize, /decode, /reconstruct and
    /generate answer with the right shapes and image sizes, the same input gives the same
    answer twice (whichever worker takes it), and the jobs ran on the worker containers
    (the API runs with --redis and /workers lists them)
 5. two workers: a burst of requests is shared by both worker replicas (/workers: batches)
 6. Prometheus (in its container, through its DNS discovery): the API and both workers are
    `up` targets, every alert rule of deploy/prometheus/alerts.yml is loaded and healthy, and
    it holds the workers' job counters per instance
 7. worker killed mid-load (SIGKILL to one worker's process while requests run): every
    request still answers 200 (the other worker takes the killed one's jobs), and the
    restart policy brings the container back healthy
 8. `docker compose restart redis` with jobs queued (workers frozen): the queued jobs
    survive the restart (AOF) and the workers run them once thawed (SIGCONT); requests
    waiting during the restart get 200 or the API's fail-fast 503 (never a hang), and
    answer 200 when sent again
 9. healthy again: every container healthy, /readyz 200
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures as cf
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
UID = "10001"
RESULTS: dict = {"checks": {}}


def log(msg: str) -> None:
    print(f"[smoke check {time.strftime('%H:%M:%S', time.gmtime())}] {msg}", flush=True)


def run(argv: list[str], timeout: float = 120, check: bool = True) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} -> {done.returncode}: {done.stderr[-2000:]}")
    return done.stdout


def http(url: str, body: dict | None = None, timeout: float = 90) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    # no-cache: every request must reach the workers (the API answers repeated tokenize
    # requests from its result cache, and these checks are about the queue and the workers).
    headers = {"Content-Type": "application/json", "Cache-Control": "no-cache"}
    req = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
        return 0, str(e).encode()


def get_json(url: str) -> dict:
    status, body = http(url, timeout=30)
    assert status == 200, f"{url}: {status} {body[:300]!r}"
    return json.loads(body)


def png(width: int, height: int, seed: int) -> str:
    """A base64 RGB PNG with a deterministic pattern (no PIL on the host needed)."""
    rows = b"".join(
        b"\x00"
        + bytes(
            v
            for x in range(width)
            for v in ((x * 7 + seed * 31) % 256, (y * 5 + seed * 17) % 256, (x * y + seed) % 256)
        )
        for y in range(height)
    )

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    raw = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )
    return base64.b64encode(raw).decode()


def png_size(b64: str) -> tuple[int, int]:
    raw = base64.b64decode(b64)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", raw[16:24])


class Stack:
    def __init__(self, args):
        self.project = args.project
        self.api = args.api
        self.prom = args.prometheus
        self.compose_argv = args.compose
        self.up_started = args.up_started
        self.models: tuple[list[dict], list[dict]] = ([], [])

    def compose(self, *argv: str, timeout: float = 180) -> str:
        return run([*self.compose_argv, *argv], timeout=timeout)

    def containers(self, service: str, running_only: bool = True) -> list[str]:
        out = run(
            [
                "docker", "ps", *([] if running_only else ["-a"]), "-q",
                "--filter", f"label=com.docker.compose.project={self.project}",
                "--filter", f"label=com.docker.compose.service={service}",
            ]
        )  # fmt: skip
        return sorted(out.split())

    def inspect(self, cid: str) -> dict:
        return json.loads(run(["docker", "inspect", cid]))[0]

    def health(self, cid: str) -> str:
        state = self.inspect(cid)["State"]
        return state.get("Health", {}).get("Status", "none") if state["Running"] else "exited"

    def wait_healthy(self, services: dict[str, int], timeout: float) -> dict[str, float]:
        """Seconds (from now) until each service has `count` healthy containers."""
        t0, seen = time.monotonic(), {}
        while time.monotonic() - t0 < timeout:
            for svc, count in services.items():
                if svc in seen:
                    continue
                states = [self.health(c) for c in self.containers(svc)]
                if states.count("healthy") >= count:
                    seen[svc] = round(time.monotonic() - t0, 1)
            if len(seen) == len(services):
                return seen
            time.sleep(1)
        states = {s: [self.health(c) for c in self.containers(s, False)] for s in services}
        raise AssertionError(f"not healthy after {timeout:.0f} s: {states}")

    def workers(self) -> list[dict]:
        return get_json(f"{self.api}/workers")["workers"]

    def queued(self) -> int:
        """Entries in every job stream (redis-cli in the Redis container)."""
        (cid,) = self.containers("redis")
        keys = run(["docker", "exec", cid, "redis-cli", "--scan", "--pattern", "softvq:jobs:*"])
        total = 0
        for key in keys.split():
            if run(["docker", "exec", cid, "redis-cli", "TYPE", key]).strip() == "stream":
                total += int(run(["docker", "exec", cid, "redis-cli", "XLEN", key]).strip())
        return total


def check(name: str):
    def wrap(fn):
        def inner(*a, **kw):
            log(f"{name} ...")
            t0 = time.monotonic()
            out = fn(*a, **kw) or {}
            out = {"ok": True, "seconds": round(time.monotonic() - t0, 1), **out}
            RESULTS["checks"][name] = out
            log(f"{name}: ok {json.dumps(out)}")
            return out

        return inner

    return wrap


# --- the checks ---------------------------------------------------------------------------
@check("healthy")
def healthy(s: Stack) -> dict:
    started = time.time() - s.up_started
    seen = s.wait_healthy({"redis": 1, "api": 1, "worker": 2}, timeout=420)
    t0 = time.monotonic()
    while http(f"{s.api}/readyz", timeout=5)[0] != 200:
        assert time.monotonic() - t0 < 120, f"/readyz: {http(f'{s.api}/readyz')}"
        time.sleep(0.5)
    ready = round(started + time.monotonic() - t0 + max(seen.values()), 1)
    return {
        "seconds_from_up_to_healthy": {k: round(started + v, 1) for k, v in seen.items()},
        "seconds_from_up_to_readyz_200": ready,
    }


@check("ports on 127.0.0.1")
def ports(s: Stack) -> dict:
    bound = {}
    for svc in ("redis", "api", "worker", "prometheus"):
        for cid in s.containers(svc):
            for port, binds in (s.inspect(cid)["NetworkSettings"]["Ports"] or {}).items():
                for b in binds or []:
                    bound[f"{svc}:{port}"] = f"{b['HostIp']}:{b['HostPort']}"
    assert bound, "nothing published"
    bad = {k: v for k, v in bound.items() if not v.startswith("127.0.0.1:")}
    assert not bad, f"published beyond 127.0.0.1: {bad}"
    return {"published": bound}


@check("non-root")
def non_root(s: Stack) -> dict:
    uids = {}
    for svc in ("api", "worker"):
        for cid in s.containers(svc):
            uid = run(["docker", "exec", cid, "id", "-u"]).strip()
            # the service process itself (pid 1: the entrypoint `softvq`)
            status = run(["docker", "exec", cid, "cat", "/proc/1/status"])
            (puid,) = re.findall(r"^Uid:\s+(\d+)", status, re.M)
            uids[f"{svc}:{cid[:12]}"] = puid
            assert uid == UID and puid == UID, (svc, uid, puid)
    return {"uids": uids}


def models(s: Stack) -> tuple[list[dict], list[dict]]:
    m = get_json(f"{s.api}/models")
    return m["tokenizers"], m["generators"]


@check("answers through API -> Redis -> workers")
def answers(s: Stack) -> dict:
    toks, gens = s.models = models(s)
    assert toks and gens, "no demo models served"
    api_cmd = s.inspect(s.containers("api")[0])["Config"]["Cmd"]
    assert "--redis" in api_cmd, f"the API does not queue on Redis: {api_cmd}"
    before = {w["id"]: w.get("batches", 0) for w in s.workers()}
    assert len(before) == 2, f"/workers: {before}"
    seen = {}
    for tok in toks:
        name = tok["name"]
        size = int(tok.get("image_size") or tok.get("resolution") or 0)
        images = [png(size or 32, size or 32, 1), png(size or 32, size or 32, 2)]
        status, body = http(f"{s.api}/tokenize", {"images": images, "model": name})
        assert status == 200, body[:500]
        t = json.loads(body)
        shape = t["shape"]
        assert shape[0] == 2 and len(t["tokens"]) == 2 and len(t["tokens"][0]) == shape[1], shape
        if tok.get("num_tokens"):
            assert shape[1] == int(tok["num_tokens"]), (shape, tok)
        status2, body2 = http(f"{s.api}/tokenize", {"images": images, "model": name})
        assert status2 == 200 and json.loads(body2)["tokens"] == t["tokens"], "not deterministic"
        status, body = http(f"{s.api}/decode", {"tokens": t["tokens"], "model": name})
        assert status == 200, body[:500]
        decoded = json.loads(body)["images"]
        status, body = http(f"{s.api}/reconstruct", {"images": images, "model": name})
        assert status == 200, body[:500]
        r = json.loads(body)
        assert len(r["images"]) == 2 and len(r["psnr"]) == 2, r.keys()
        out_size = png_size(r["images"][0])
        assert png_size(decoded[0]) == out_size, (png_size(decoded[0]), out_size)
        if size:
            assert out_size == (size, size), (out_size, size)
        seen[name] = {"token_shape": shape, "image": list(out_size), "psnr": r["psnr"]}
    for gen in gens:
        name = gen["name"]
        req = {"model": name, "num_images": 2, "seed": 7, "steps": 2}
        status, body = http(f"{s.api}/generate", req)
        assert status == 200, body[:500]
        g = json.loads(body)
        assert len(g["images"]) == 2 and g["seeds"] == [7, 8], g.get("seeds")
        status, body2 = http(f"{s.api}/generate", req)
        assert status == 200 and json.loads(body2)["images"] == g["images"], "not deterministic"
        seen[name] = {"images": [list(png_size(i)) for i in g["images"]]}
    status, body = http(f"{s.api}/generate", {"model": gens[0]["name"], "steps": 0})
    assert status == 422, (status, body[:300])
    t0 = time.monotonic()
    while True:  # /workers reads what the workers' heartbeats last wrote
        after = {w["id"]: w.get("batches", 0) for w in s.workers()}
        ran = sum(after.values()) - sum(before.get(k, 0) for k in after)
        if ran > 0:
            break
        assert time.monotonic() - t0 < 15, f"no worker ran a batch: {before} -> {after}"
        time.sleep(0.5)
    return {"models": seen, "worker_batches": ran}


def one_request(s: Stack, i: int, kind: str, timeout: float, steps: int = 8):
    toks, gens = s.models
    t0 = time.monotonic()
    if kind == "tokenize" or (kind == "mixed" and i % 2):
        tok = toks[i % len(toks)]
        size = int(tok.get("image_size") or 32)
        req = {"images": [png(size, size, i)], "model": tok["name"]}
        status, body = http(f"{s.api}/tokenize", req, timeout=timeout)
    else:
        gen = gens[i % len(gens)]
        req = {"model": gen["name"], "num_images": 2, "seed": i, "steps": steps}
        status, body = http(f"{s.api}/generate", req, timeout=timeout)
    return status, round(time.monotonic() - t0, 2), body[:200]


def burst(s: Stack, n: int, threads: int, timeout: float, kind: str = "mixed"):
    """n requests over `threads` threads; returns [(status, seconds, body head)]."""
    with cf.ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda i: one_request(s, i, kind, timeout), range(n)))


def steady_load(s: Stack, seconds: float, threads: int, max_requests: int, timeout: float):
    """`threads` clients, each sending its next request when the last one answered, for
    `seconds` (at most `max_requests` in all); returns [(status, seconds, body head)]."""
    end = time.monotonic() + seconds
    count = iter(range(max_requests))
    results: list = []

    def client():
        for i in count:
            if time.monotonic() >= end:
                return
            results.append(one_request(s, i, "mixed", timeout, steps=16))

    with cf.ThreadPoolExecutor(threads) as pool:
        for f in [pool.submit(client) for _ in range(threads)]:
            f.result()
    return results


@check("two workers share the load")
def two_workers(s: Stack) -> dict:
    before = {w["id"]: w.get("batches", 0) for w in s.workers()}
    results = burst(s, 48, 8, 60, kind="tokenize")
    bad = [r for r in results if r[0] != 200]
    assert not bad, bad[:5]
    t0 = time.monotonic()
    while True:  # /workers reads what the workers' heartbeats last wrote (every second or so)
        after = {w["id"]: w.get("batches", 0) for w in s.workers()}
        per = {k: after[k] - before.get(k, 0) for k in after}
        if len(per) == 2 and all(v > 0 for v in per.values()):
            break
        assert time.monotonic() - t0 < 15, f"batches per worker: {per}"
        time.sleep(0.5)
    return {"requests": len(results), "batches_per_worker": per}


def prom(s: Stack, path: str) -> dict:
    return get_json(f"{s.prom}{path}")["data"]


@check("prometheus: targets up, alert and recording rules loaded")
def prometheus(s: Stack) -> dict:
    t0 = time.monotonic()
    while True:  # DNS discovery and scrapes run every 15 s (deploy/prometheus/prometheus.yml)
        active = prom(s, "/api/v1/targets")["activeTargets"]
        up = {}
        for t in active:
            up.setdefault(t["labels"]["job"], []).append((t["labels"]["instance"], t["health"]))
        api_ok = [i for i, h in up.get("softvq-api", []) if h == "up"]
        workers_ok = [i for i, h in up.get("softvq-worker", []) if h == "up"]
        if len(api_ok) == 1 and len(workers_ok) == 2:
            break
        assert time.monotonic() - t0 < 120, f"targets: {up}"
        time.sleep(2)
    groups = prom(s, "/api/v1/rules")["groups"]
    rules = {r["name"]: r["health"] for g in groups for r in g["rules"]}
    # Every alert of alerts.yml and every recorded series of recording.yml, nothing else.
    wanted = {
        name
        for f, kind in (("alerts.yml", "alert"), ("recording.yml", "record"))
        for name in re.findall(
            rf"^\s*- {kind}:\s*(\S+)", (ROOT / "deploy/prometheus" / f).read_text(), re.M
        )
    }
    assert wanted and wanted == set(rules), wanted ^ set(rules)
    t1 = time.monotonic()
    while True:  # the rules evaluate every 15 s; `unknown` until their first evaluation
        rules = {
            r["name"]: r["health"] for g in prom(s, "/api/v1/rules")["groups"] for r in g["rules"]
        }
        if all(h == "ok" for h in rules.values()):
            break
        assert time.monotonic() - t1 < 60, rules
        time.sleep(2)
    t2 = time.monotonic()
    while True:  # both workers' counters, as Prometheus scraped them
        res = prom(s, "/api/v1/query?query=" + urllib.request.quote(
            "sum by (instance) (softvq_images_processed_total)"))["result"]  # fmt: skip
        per = {r["metric"]["instance"]: float(r["value"][1]) for r in res}
        if len(per) == 2 and all(v > 0 for v in per.values()):
            break
        assert time.monotonic() - t2 < 60, per
        time.sleep(2)
    return {
        "api_targets": api_ok,
        "worker_targets": workers_ok,
        "alert_rules": len(rules),
        "images_processed_per_worker": per,
    }


@check("worker killed mid-load loses no request")
def kill_worker(s: Stack) -> dict:
    victim = s.containers("worker")[0]
    with cf.ThreadPoolExecutor(1) as pool:
        load = pool.submit(steady_load, s, 15, 6, 300, 90)
        time.sleep(4.0)  # both workers busy: the victim holds jobs when it dies
        assert not load.done(), "the load ended before the kill"
        # SIGKILL to the worker process from outside, as the kernel's OOM killer or a crash
        # would end it (`docker kill` would count as a manual stop and disable the restart)
        os.kill(s.inspect(victim)["State"]["Pid"], signal.SIGKILL)
        killed_at = time.monotonic()
        results = load.result(timeout=150)
    bad = [r for r in results if r[0] != 200]
    assert not bad, f"{len(bad)} of {len(results)} failed: {bad[:5]}"
    slowest = max(r[1] for r in results)
    # compose's `restart: unless-stopped` brings the killed worker back by itself
    healthy_again = s.wait_healthy({"worker": 2}, timeout=300)
    restarted = s.inspect(victim)["RestartCount"]
    assert restarted >= 1, "the killed worker was not restarted"
    return {
        "requests": len(results),
        "all_200": True,
        "slowest_request_s": slowest,
        "seconds_after_kill": round(time.monotonic() - killed_at, 1),
        "killed_container_restarts": restarted,
        "workers_healthy_again_s": healthy_again["worker"],
    }


@check("redis restart with queued jobs loses none (AOF)")
def restart_redis(s: Stack) -> dict:
    """Workers frozen (SIGSTOP: they take nothing), n jobs queued, `docker compose restart
    redis`: the n entries are in the streams after the restart (AOF); once the workers are
    thawed (SIGCONT) they run them all (the streams drain, their batch counters grow). The HTTP
    requests that were waiting meanwhile answer at once, either 200 or -- the API's
    documented fail-fast on a lost Redis connection (docs/RELIABILITY.md, "Redis outage")
    -- 503 broker_unavailable; none hangs. The same requests sent again answer 200."""
    (rid,) = s.containers("redis")
    aof = run(["docker", "exec", rid, "redis-cli", "CONFIG", "GET", "appendonly"]).split()
    assert aof[-1] == "yes", aof
    batches0 = sum(w.get("batches", 0) for w in s.workers())
    before = s.queued()
    n = 6
    # SIGSTOP from the host, not `docker compose pause`: the cgroup freezer that pause uses
    # is not available in every container host (it is not on this project's machines)
    stopped = [s.inspect(c)["State"]["Pid"] for c in s.containers("worker")]
    for pid in stopped:
        os.kill(pid, signal.SIGSTOP)
    try:
        with cf.ThreadPoolExecutor(1) as pool:
            load = pool.submit(burst, s, n, n, 90, "tokenize")
            t0 = time.monotonic()
            while s.queued() - before < n:
                assert time.monotonic() - t0 < 20, f"not queued: {s.queued() - before} of {n}"
                time.sleep(0.3)
            s.compose("restart", "redis", timeout=120)
            s.wait_healthy({"redis": 1}, timeout=60)
            after_restart = s.queued() - before
            assert after_restart >= n, f"queued before the restart: {n}, after: {after_restart}"
            results = load.result(timeout=150)
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
    statuses: dict[str, int] = {}
    for status, _, body in results:
        key = "200" if status == 200 else f"{status} {json.loads(body or b'{}').get('error')}"
        statuses[key] = statuses.get(key, 0) + 1
    assert set(statuses) <= {"200", "503 broker_unavailable"}, results
    t1 = time.monotonic()
    while s.queued() > before:  # the workers take and run the n jobs queued before
        assert time.monotonic() - t1 < 90, f"still queued: {s.queued() - before}"
        time.sleep(1)
    drained = round(time.monotonic() - t1, 1)
    t2 = time.monotonic()
    while (ran := sum(w.get("batches", 0) for w in s.workers()) - batches0) <= 0:
        assert time.monotonic() - t2 < 30, f"no batch ran: {s.workers()}"
        time.sleep(1)
    again = burst(s, n, n, 60, "tokenize")
    assert all(r[0] == 200 for r in again), again
    return {
        "queued": n,
        "queued_after_restart": after_restart,
        "answers_while_redis_restarted": statuses,
        "queue_drained_after_sigcont_s": drained,
        "worker_batches_after_sigcont": ran,
        "retried_requests_200": len(again),
    }


@check("healthy at the end")
def healthy_end(s: Stack) -> dict:
    seen = s.wait_healthy({"redis": 1, "api": 1, "worker": 2}, timeout=300)
    t0 = time.monotonic()
    while http(f"{s.api}/readyz", timeout=5)[0] != 200:
        assert time.monotonic() - t0 < 120, http(f"{s.api}/readyz")
        time.sleep(0.5)
    return {"waited_s": seen}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--project", required=True)
    p.add_argument("--api", required=True)
    p.add_argument("--prometheus", required=True)
    p.add_argument("--up-started", type=float, required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--image-size", type=int, required=True)
    p.add_argument("--build-seconds", type=int, required=True)
    p.add_argument("--results", required=True)
    p.add_argument("compose", nargs=argparse.REMAINDER)
    args = p.parse_args()
    args.compose = (
        [a for a in args.compose if a != "--"] if args.compose[:1] == ["--"] else args.compose
    )
    RESULTS.update(
        image=args.image,
        image_size_mb=round(args.image_size / 1e6),
        build_seconds=args.build_seconds,
    )
    s = Stack(args)
    failed = None
    t0 = time.monotonic()
    try:
        for step in (
            healthy, ports, non_root, answers, two_workers, prometheus, kill_worker,
            restart_redis, healthy_end,
        ):  # fmt: skip
            step(s)
    except Exception as e:  # noqa: BLE001 -- reported, then the exit status says it
        failed = f"{type(e).__name__}: {e}"
        log(f"FAILED: {failed}")
    RESULTS["passed"] = failed is None
    RESULTS["failure"] = failed
    RESULTS["check_seconds"] = round(time.monotonic() - t0, 1)
    Path(args.results).write_text(json.dumps(RESULTS, indent=1))
    return 0 if failed is None else 1


if __name__ == "__main__":
    sys.exit(main())
