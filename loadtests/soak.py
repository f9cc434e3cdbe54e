"""Soak run of Redis mode: real redis-server, ``softvq serve --redis`` and two ``softvq worker``
processes under mixed load (loadtests/load.py) for N minutes, with memory sampled throughout.

    python -m loadtests.soak --minutes 10 --out runs/soak        # tiny random models
    python -m loadtests.soak --minutes 1 --models demo           # the bundled demo weights
    python -m loadtests.soak --minutes 4 --tree /tmp/before      # processes of another checkout

Every ``--sample-every`` seconds it records the resident memory (VmRSS from /proc) of the API
and of each worker, and Redis' ``used_memory`` and key count. At the end it waits for the
queues to drain and checks Redis holds nothing for ever: streams empty, nothing pending in the
consumer group, no reply left unread (an unread reply would be a lost or duplicated answer).
It writes ``summary.json`` and ``summary.md`` (and ``samples.csv``) into ``--out`` with the
verdicts:

- answers: zero lost, failed, duplicated, mixed-up or mismatched answers (load.py checks each);
- RSS flat: after the warm-up (the first ``--warmup`` fraction of the run), each process'
  RSS stays within 10 % of its first post-warm-up sample (max and min both);
- Redis memory bounded: after the warm-up, ``used_memory`` never exceeds twice its warm-up
  peak, and the run ends with an empty queue and no unread replies.

It also measures what health costs with the keys the load leaves in Redis (``health`` in the
summary, not a verdict): during the load, the latency of ``GET /readyz`` and ``GET /metrics``
every ``--probe-every`` seconds; after it, with the keys still there, ``--probe-calls`` calls of
each, timed one by one, with the Redis commands each call issued (``INFO commandstats``
counted around the calls, less the same span of background traffic without calls).

``Stack`` (the processes) is also what tests/test_reliability_*.py use to fault them.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import redis

from tests.redis_server import RedisServer, free_port

from .load import run_load

ROOT = Path(__file__).resolve().parent.parent


def softvq_command() -> list[str]:
    exe = shutil.which("softvq")
    return [exe] if exe else [sys.executable, "-m", "service.cli"]


def tiny_model_env(root: Path) -> dict[str, str]:
    """Save a tiny random tokenizer + generator under ``root``; SOFTVQ_* env serving them."""
    from tests.tiny_models import save_tiny_pair

    save_tiny_pair(root, "tiny", tokens=8, dim=8, image_size=32, seed=0)
    return {
        "SOFTVQ_MODEL_ROOT": str(root),
        "SOFTVQ_TOKENIZERS": json.dumps({"tiny": "tiny"}),
        "SOFTVQ_GENERATORS": json.dumps({"sit-tiny": {"path": "sit-tiny", "tokenizer": "tiny"}}),
        "SOFTVQ_BATCH_BUCKETS": "[1, 2, 4, 8]",
        "SOFTVQ_MAX_BATCH_SIZE": "8",
    }


# --- the processes ------------------------------------------------------------------------
class Stack:
    """redis-server + API processes + worker processes, each logging to its own file."""

    def __init__(
        self,
        env: dict[str, str],
        workdir: Path,
        redis_server: RedisServer | None = None,
        tree: Path | None = None,
    ):
        self.redis = redis_server or RedisServer()
        self.workdir = Path(workdir)
        # ``tree``: run the processes from another checkout (e.g. a git worktree of an older
        # commit, for before/after numbers): ``python -m service.cli`` from its root.
        self.tree = Path(tree).resolve() if tree else None
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("SOFTVQ_")},
            "OMP_NUM_THREADS": "1",
            "SOFTVQ_DEVICE": "cpu",
            "SOFTVQ_DTYPE": "float32",
            "SOFTVQ_BACKEND": "eager",
            **env,
        }
        self.procs: dict[str, subprocess.Popen] = {}
        self.ports: dict[str, int] = {}  # API http port / worker metrics port
        self._logs: dict[str, object] = {}
        self._expected_exits: set[str] = set()  # processes a test stopped on purpose

    @property
    def redis_url(self) -> str:
        return self.redis.url

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "a+")
        self._logs[name] = log
        command = [sys.executable, "-m", "service.cli"] if self.tree else softvq_command()
        extra = {"PYTHONPATH": str(self.tree)} if self.tree else {}
        proc = subprocess.Popen(
            [*command, *args],
            env={**self.env, **env, **extra, "SOFTVQ_REDIS_URL": self.redis.url},
            cwd=self.tree or ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.procs[name] = proc
        return proc

    def spawn_worker(self, name: str, **env: str) -> subprocess.Popen:
        self.ports[name] = free_port()
        args = ["worker", "--redis", self.redis.url, "--worker-id", name]
        args += ["--metrics-port", str(self.ports[name]), "--log-level", "warning"]
        return self._spawn(name, args, env)

    def spawn_api(self, name: str = "api", port: int | None = None, **env: str) -> subprocess.Popen:
        self.ports[name] = port or free_port()
        args = ["serve", "--port", str(self.ports[name]), "--redis", self.redis.url]
        return self._spawn(name, [*args, "--log-level", "warning", "--no-access-log"], env)

    def url(self, name: str = "api") -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def start(self, workers: int = 2) -> Stack:
        """Redis, ``workers`` workers (w1, w2, ...) and one API; returns once /readyz is 200."""
        self.redis.start()
        for i in range(workers):
            self.spawn_worker(f"w{i + 1}")
        self.spawn_api("api")
        self.wait_ready("api")
        self.wait_workers(workers)
        return self

    def wait_ready(self, name: str = "api", timeout: float = 180) -> None:
        self._wait(
            lambda: httpx.get(f"{self.url(name)}/readyz", timeout=2).status_code == 200,
            timeout,
            f"{name} ready",
        )

    def heartbeats(self) -> list[str]:
        r = redis.Redis.from_url(self.redis.url, socket_timeout=2)
        try:
            return sorted(k.decode().rsplit(":", 1)[1] for k in r.scan_iter("softvq:worker:*"))
        finally:
            r.close()

    def wait_workers(self, n: int, timeout: float = 180) -> None:
        self._wait(lambda: len(self.heartbeats()) >= n, timeout, f"{n} worker heartbeats")

    def _wait(self, cond, timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for name, p in self.procs.items():
                if p.poll() is not None and name not in self._expected_exits:
                    raise RuntimeError(f"{name} exited with {p.returncode}:\n{self.log(name)}")
            try:
                if cond():
                    return
            except (httpx.HTTPError, redis.RedisError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"timed out waiting for {what}")

    def expect_exit(self, name: str) -> None:
        """``name`` is allowed to be gone (a test stopped or killed it)."""
        self._expected_exits.add(name)

    def signal(self, name: str, sig: int) -> None:
        self.expect_exit(name)
        self.procs[name].send_signal(sig)

    def rss_bytes(self, name: str) -> int | None:
        """VmRSS of the process (the python process itself: the console script execs none)."""
        try:
            with open(f"/proc/{self.procs[name].pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def metrics(self, name: str) -> str:
        path = "/metrics"
        return httpx.get(f"http://127.0.0.1:{self.ports[name]}{path}", timeout=5).text

    def log(self, name: str, tail: int = 3000) -> str:
        try:
            return (self.workdir / f"{name}.log").read_text()[-tail:]
        except OSError:
            return ""

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        for log in self._logs.values():
            log.close()
        self.redis.close()

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def redis_leftovers(url: str, prefix: str = "softvq") -> dict[str, int]:
    """What is still queued or unread in Redis: entries in job streams, pending deliveries,
    unread replies (each a lost or duplicated answer once every caller is done)."""
    r = redis.Redis.from_url(url, socket_timeout=5)
    try:
        out = {"stream_entries": 0, "pending": 0, "unread_replies": 0}
        for key in r.scan_iter(f"{prefix}:jobs:*"):
            out["stream_entries"] += r.xlen(key)
            try:
                out["pending"] += int(r.xpending(key, f"{prefix}-workers")["pending"])
            except redis.ResponseError:
                pass
        for key in r.scan_iter(f"{prefix}:reply:*"):
            out["unread_replies"] += r.llen(key)
        return out
    finally:
        r.close()


# --- the soak -------------------------------------------------------------------------------
async def _sample(stack: Stack, every: float, samples: list[dict], stop: asyncio.Event) -> None:
    r = redis.Redis.from_url(stack.redis_url, socket_timeout=5)
    t0 = time.monotonic()
    try:
        while not stop.is_set():
            info = await asyncio.to_thread(r.info, "memory")
            keys = await asyncio.to_thread(r.dbsize)
            row = {"t": round(time.monotonic() - t0, 1), "redis_used": info["used_memory"]}
            row["redis_keys"] = keys
            for name in stack.procs:
                row[f"rss_{name}"] = stack.rss_bytes(name)
            samples.append(row)
            try:
                await asyncio.wait_for(stop.wait(), every)
            except asyncio.TimeoutError:
                pass
    finally:
        r.close()


# --- what health costs --------------------------------------------------------------------------
HEALTH_PATHS = ("/readyz", "/metrics")


def _ms(xs: list[float]) -> dict:
    xs = sorted(xs)
    if not xs:
        return {"n": 0}
    pick = lambda q: round(xs[min(len(xs) - 1, int(q * len(xs)))], 1)  # noqa: E731
    return {"n": len(xs), "p50": pick(0.5), "p95": pick(0.95), "max": round(xs[-1], 1)}


async def _probe(stack: Stack, every: float, rows: list[dict], stop: asyncio.Event) -> None:
    """Time GET /readyz and GET /metrics on the API while the load runs."""
    async with httpx.AsyncClient(timeout=10) as client:
        while not stop.is_set():
            for path in HEALTH_PATHS:
                t = time.perf_counter()
                try:
                    status = (await client.get(stack.url() + path)).status_code
                except httpx.HTTPError:
                    status = 0
                rows.append(
                    {"path": path, "ms": 1000 * (time.perf_counter() - t), "status": status}
                )
            try:
                await asyncio.wait_for(stop.wait(), every)
            except asyncio.TimeoutError:
                pass


def command_counts(r: redis.Redis) -> dict[str, int]:
    return {k.removeprefix("cmdstat_"): v["calls"] for k, v in r.info("commandstats").items()}


def health_cost(stack: Stack, calls: int) -> dict:
    """With the keys the load left in Redis: ``calls`` sequential GETs of /readyz and of
    /metrics, each timed, and the Redis commands per call (counted with INFO commandstats
    around the calls, less the same span of background traffic -- idle workers' reads and
    heartbeats -- measured right after without calls)."""
    r = redis.Redis.from_url(stack.redis_url, socket_timeout=5)
    out: dict = {"redis_keys": r.dbsize()}
    try:
        with httpx.Client(timeout=10) as client:
            for path in HEALTH_PATHS:
                client.get(stack.url() + path)  # connection and scripts loaded
                before = command_counts(r)
                t0, lat, statuses = time.perf_counter(), [], set()
                for _ in range(calls):
                    t = time.perf_counter()
                    statuses.add(client.get(stack.url() + path).status_code)
                    lat.append(1000 * (time.perf_counter() - t))
                span = time.perf_counter() - t0
                after = command_counts(r)
                time.sleep(span)
                idle = command_counts(r)
                per_call = {}
                for cmd in set(after) | set(before) | set(idle):
                    if cmd == "info":
                        continue
                    probe = after.get(cmd, 0) - before.get(cmd, 0)
                    background = idle.get(cmd, 0) - after.get(cmd, 0)
                    n = max(0.0, (probe - background) / calls)
                    if n >= 0.05:
                        per_call[cmd] = round(n, 1)
                out[path] = {
                    **_ms(lat),
                    "statuses": sorted(statuses),
                    "redis_commands_per_call": dict(sorted(per_call.items())),
                    "redis_commands_total": round(sum(per_call.values()), 1),
                }
    finally:
        r.close()
    return out


def verdicts(samples: list[dict], names: list[str], warmup: float, load: dict, left: dict) -> dict:
    end = samples[-1]["t"]
    warm = [s for s in samples if s["t"] <= warmup * end]
    after = [s for s in samples if s["t"] > warmup * end]
    rss = {}
    for name in names:
        xs = [s[f"rss_{name}"] for s in after if s.get(f"rss_{name}")]
        if not xs:
            continue
        first = xs[0]
        rss[name] = {
            "first_mb": round(first / 2**20, 1),
            "min_mb": round(min(xs) / 2**20, 1),
            "max_mb": round(max(xs) / 2**20, 1),
            "last_mb": round(xs[-1] / 2**20, 1),
            "max_drift_pct": round(100 * max(abs(x - first) for x in xs) / first, 2),
        }
    rss_flat = bool(rss) and all(v["max_drift_pct"] <= 10.0 for v in rss.values())
    warm_peak = max(s["redis_used"] for s in warm) if warm else samples[0]["redis_used"]
    after_peak = max((s["redis_used"] for s in after), default=warm_peak)
    redis_mem = {
        "warmup_peak_mb": round(warm_peak / 2**20, 2),
        "after_peak_mb": round(after_peak / 2**20, 2),
        "last_mb": round(samples[-1]["redis_used"] / 2**20, 2),
        "max_keys": max(s["redis_keys"] for s in samples),
        "leftovers_after_drain": left,
    }
    redis_bounded = after_peak <= 2 * warm_peak and not any(left.values())
    answers_ok = bool(load["clean"])
    return {
        "answers_ok": answers_ok,
        "rss_flat_within_10pct": rss_flat,
        "redis_memory_bounded": redis_bounded,
        "rss": rss,
        "redis": redis_mem,
        "passed": answers_ok and rss_flat and redis_bounded,
    }


def markdown(summary: dict) -> str:
    v, load = summary["verdicts"], summary["load"]
    yes = {True: "yes", False: "**NO**"}
    lines = [
        f"# Soak run {summary['started']}",
        "",
        f"`{summary['command']}` -- {summary['minutes']} min, {summary['workers']} workers, "
        f"models {summary['models']}, concurrency {load['concurrency']}, "
        f"machine: {summary['machine']}",
        "",
        "| verdict | |",
        "|---|---|",
        f"| zero lost / failed / duplicated / wrong answers | {yes[v['answers_ok']]} |",
        f"| RSS flat within 10% after warm-up | {yes[v['rss_flat_within_10pct']]} |",
        f"| Redis memory bounded | {yes[v['redis_memory_bounded']]} |",
        "",
        f"Requests: {load['sent']} sent, {load['ok']} ok, {load['failed']} failed, "
        f"{load['lost']} lost, {load['duplicates']} duplicated, {load['mixed_up']} mixed up, "
        f"{load['mismatches']} mismatched ({load['requests_per_s']} req/s).",
        "",
        "| process | RSS first after warm-up (MB) | min | max | last | max drift |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in v["rss"].items():
        lines.append(
            f"| {name} | {r['first_mb']} | {r['min_mb']} | {r['max_mb']} | {r['last_mb']} "
            f"| {r['max_drift_pct']}% |"
        )
    rm = v["redis"]
    lines += [
        "",
        f"Redis used_memory: warm-up peak {rm['warmup_peak_mb']} MB, after warm-up peak "
        f"{rm['after_peak_mb']} MB, last {rm['last_mb']} MB, most keys {rm['max_keys']}; "
        f"after draining: {rm['leftovers_after_drain']}.",
        "",
        "Latency (ms): "
        + "; ".join(
            f"{t} p50 {x['p50']} p95 {x['p95']} p99 {x['p99']} (n={x['n']})"
            for t, x in load["latency_ms"].items()
        ),
        "",
    ]
    health = summary.get("health")
    if health:
        quiet = health["after_load"]
        lines += [
            f"Health probes (API): under load, and after it with {quiet['redis_keys']} keys "
            "in Redis (commands counted with INFO commandstats):",
            "",
            "| call | under load p50 / p95 (ms) | after load p50 / p95 (ms) | Redis commands "
            "per call |",
            "|---|---|---|---|",
        ]
        for path in HEALTH_PATHS:
            u, q = health["under_load"][path], quiet[path]
            cmds = ", ".join(f"{k} {v}" for k, v in q["redis_commands_per_call"].items())
            lines.append(
                f"| `GET {path}` | {u.get('p50')} / {u.get('p95')} (n={u['n']}) "
                f"| {q['p50']} / {q['p95']} (n={q['n']}) | {q['redis_commands_total']} ({cmds}) |"
            )
        lines.append("")
    return "\n".join(lines)


def soak(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    models_dir = Path(tempfile.mkdtemp(prefix="softvq-soak-models-"))
    env = tiny_model_env(models_dir) if args.models == "tiny" else {}
    env["SOFTVQ_MAX_WAIT_MS"] = str(args.max_wait_ms)
    stack = Stack(env, out, tree=args.tree)
    samples: list[dict] = []
    probes: list[dict] = []
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    try:
        stack.start(workers=args.workers)

        async def drive():
            stop = asyncio.Event()
            sampler = asyncio.create_task(_sample(stack, args.sample_every, samples, stop))
            prober = asyncio.create_task(_probe(stack, args.probe_every, probes, stop))
            try:
                return await run_load(
                    stack.url(),
                    seconds=args.minutes * 60,
                    concurrency=args.concurrency,
                    steps=args.steps,
                )
            finally:
                stop.set()
                await sampler
                await prober

        load = asyncio.run(drive())
        # Every caller got its answer; nothing may stay queued or unread in Redis.
        time.sleep(2)
        left = redis_leftovers(stack.redis_url)
        health = {
            "under_load": {
                path: _ms([p["ms"] for p in probes if p["path"] == path]) for path in HEALTH_PATHS
            },
            "after_load": health_cost(stack, args.probe_calls),
        }
    finally:
        stack.close()
        shutil.rmtree(models_dir, ignore_errors=True)
    names = ["api", *[f"w{i + 1}" for i in range(args.workers)]]
    summary = {
        "started": started,
        "command": "python -m loadtests.soak " + " ".join(sys.argv[1:]),
        "minutes": args.minutes,
        "workers": args.workers,
        "models": args.models,
        "machine": args.machine,
        "tree": str(args.tree or ROOT),
        "load": load,
        "verdicts": verdicts(samples, names, args.warmup, load, left),
        "health": health,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(markdown(summary))
    with open(out / "samples.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(samples[0]) if samples else ["t"])
        w.writeheader()
        w.writerows(samples)
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.soak", description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--steps", type=int, default=4, help="sampling steps of /generate")
    p.add_argument("--models", choices=["tiny", "demo"], default="tiny")
    p.add_argument("--max-wait-ms", type=float, default=10.0)
    p.add_argument("--sample-every", type=float, default=5.0, help="seconds between samples")
    p.add_argument("--warmup", type=float, default=0.2, help="fraction of the run that is warm-up")
    p.add_argument("--machine", default=f"{os.cpu_count()} CPU cores (shared)")
    p.add_argument(
        "--probe-every", type=float, default=2.0, help="seconds between health probes in the load"
    )
    p.add_argument(
        "--probe-calls", type=int, default=50, help="calls of each health probe after the load"
    )
    p.add_argument("--tree", type=Path, default=None, help="run the processes of this checkout")
    p.add_argument("--out", default="runs/soak")
    args = p.parse_args(argv)
    summary = soak(args)
    print(markdown(summary))
    return 0 if summary["verdicts"]["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
