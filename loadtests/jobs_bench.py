"""Issue #16's measures, each as a ratio side by side in one run:

progress   generation with the service's per-step callback (service/progress.py's
           BatchProgress.on_step, as every generate batch now runs) against none:
           images/s ratio, interleaved runs, median of ``--rounds`` (goal: >= 0.97);
           and a third arm where every job asked for previews (the x0 estimate decoded
           by softvq-demo-64 and PNG-encoded about every second): what previews cost
cache      /tokenize through HTTP (`softvq serve`'s app under uvicorn, bundled demo
           models, one 64x64 PNG): a cache hit's latency against a miss's
           (Cache-Control: no-cache), median ms of each (goal: a hit under 5 ms)
lanes      /generate of one image through HTTP: latency on an idle server against the
           same request while 200 batch-lane jobs are queued (goal: <= 2x)

python3 -m loadtests.jobs_bench [--rounds 9] [--steps 50] [--batch 8] [--device cpu]
(previews need runs longer than a second: --steps 250)
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

import model
from model.backends import make_generator_runner
from model.pipeline import sample_latents
from service.jobs import Job
from service.progress import BatchProgress

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "model" / "demo_weights"


def progress_overhead(rounds: int, steps: int, batch: int, device: str) -> dict:
    gen = model.load_generator(DEMO / "sit-demo-64", device=device)
    tok = model.load_tokenizer(DEMO / "softvq-demo-64", device=device)
    runner = make_generator_runner(gen, "eager")
    labels, seeds = [i % 10 for i in range(batch)], list(range(batch))
    jobs = [Job("sit-demo-64", "generate", {"n": 1}) for _ in range(batch)]
    watched = [
        Job("sit-demo-64", "generate", {"n": 1}, tracked=True, previews=True) for _ in range(batch)
    ]

    def run(mode: str) -> tuple[float, float]:
        progress = BatchProgress(watched if mode == "previews" else jobs)
        progress.begin(progress.jobs)

        def decode(z):
            decodes.append(1)
            return tok.decode(z.float() * tok.vq_std + tok.vq_mean).float()

        progress.decode = decode
        t0, c0 = time.perf_counter(), time.thread_time()
        with torch.inference_mode():
            on_step = progress.on_step if mode != "off" else None
            sample_latents(runner, labels, seeds, steps, on_step=on_step)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0, time.thread_time() - c0

    decodes: list[int] = []
    for mode in ("off", "on", "previews"):
        run(mode)  # warm-up
    decodes.clear()
    off, on, prev = [], [], []
    arms = {"off": off, "on": on, "previews": prev}
    for i in range(rounds):  # interleaved, rotating which goes first
        order = ["off", "on", "previews"]
        for mode in order[i % 3 :] + order[: i % 3]:
            arms[mode].append(run(mode))
    out = {"runs": rounds}
    # The machine is shared: the best run (least disturbed) and the median, of wall time and
    # of this thread's CPU time (torch runs on this one thread here: set_num_threads(1)).
    for what, k in (("wall", 0), ("cpu", 1)):
        for stat, f in (("min", min), ("median", statistics.median)):
            t_off, t_on = f(r[k] for r in off), f(r[k] for r in on)
            out[f"{what}_{stat}_images_per_s_off"] = batch / t_off
            out[f"{what}_{stat}_images_per_s_on"] = batch / t_on
            out[f"{what}_{stat}_ratio_on_over_off"] = t_off / t_on
            t_prev = f(r[k] for r in prev)
            out[f"{what}_{stat}_images_per_s_previews"] = batch / t_prev
            out[f"{what}_{stat}_ratio_previews_over_off"] = t_off / t_prev
    out["seconds_per_run_median"] = statistics.median(r[0] for r in off)
    out["previews_per_run"] = len(decodes) / rounds
    return out


def _serve(env: dict, port: int) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "service.cli",
        "serve",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT)
    end = time.monotonic() + 180
    while time.monotonic() < end:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server not ready")


def http_parts(rounds: int) -> dict:
    from tests.redis_server import free_port

    port = free_port()
    env = {**os.environ, "SOFTVQ_BACKEND": "eager", "SOFTVQ_DEVICE": "cpu"}
    env = {k: v for k, v in env.items() if k != "SOFTVQ_REDIS_URL"}
    proc = _serve(env, port)
    base = f"http://127.0.0.1:{port}"
    try:
        img = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "PNG")
        body = {"images": [base64.b64encode(buf.getvalue()).decode()]}
        with httpx.Client(base_url=base, timeout=120) as c:

            def timed(**kw) -> float:
                t0 = time.perf_counter()
                r = c.post("/tokenize", json=body, **kw)
                assert r.status_code == 200, r.text
                return time.perf_counter() - t0

            timed()  # warm
            miss = [timed(headers={"Cache-Control": "no-cache"}) for _ in range(rounds * 3)]
            hit = [timed() for _ in range(rounds * 3)]
            hit_min, miss_min = min(hit), min(miss)

            gen = {"class_labels": [1], "seed": 0, "steps": 50}

            def one() -> float:
                t0 = time.perf_counter()
                assert c.post("/generate", json=gen).status_code == 200
                return time.perf_counter() - t0

            one()
            idle = [one() for _ in range(rounds)]
            flood = [
                c.post("/jobs", json={"task": "generate", "input": {**gen, "seed": i}}).json()["id"]
                for i in range(200)
            ]
            busy = [one() for _ in range(rounds)]
            left = sum(c.get(f"/jobs/{j}").json()["status"] in ("queued", "running") for j in flood)
            for j in flood:
                c.delete(f"/jobs/{j}")
    finally:
        proc.terminate()
        proc.wait(30)
    return {
        "cache_hit_ms_min": 1000 * hit_min,
        "cache_miss_ms_min": 1000 * miss_min,
        "cache_hit_ms_p50": 1000 * statistics.median(hit),
        "cache_miss_ms_p50": 1000 * statistics.median(miss),
        "miss_over_hit": statistics.median(miss) / statistics.median(hit),
        "interactive_idle_ms_p50": 1000 * statistics.median(idle),
        "interactive_under_flood_ms_p50": 1000 * statistics.median(busy),
        "flood_over_idle": statistics.median(busy) / statistics.median(idle),
        "flood_jobs_left_at_end": left,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m loadtests.jobs_bench")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--skip-http", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # one thread: its CPU time is the loop's whole cost
    out = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_avg": os.getloadavg()[0],
        "progress": progress_overhead(args.rounds, args.steps, args.batch, args.device),
    }
    if not args.skip_http:
        out["http"] = http_parts(args.rounds)
    out["load_avg_after"] = os.getloadavg()[0]
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
