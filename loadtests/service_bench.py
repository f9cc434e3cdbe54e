"""Parts c, d, e: the HTTP service under load, against the same model run in process.

The service (service.app.create_app, embedded broker and batcher) runs in this process
under uvicorn on 127.0.0.1, in its own thread; an asyncio httpx client drives it.

    c. service_efficiency = images/s through HTTP at saturation (clients >= 2 x max batch)
                            / images/s of the raw batched model (same runners, batch = max
                            batch size, sample + decode only)
    d. batching_gain      = images/s with `clients` concurrent clients
                            / images/s of sequential single requests
    e. latency_ms         = p50 / p95 / p99 with Poisson arrivals at 50 % and 90 % of the
                            saturation rate (open loop: arrivals do not wait for answers)

Every request is /generate for one image (Accept: image/png), `service_steps` Euler steps.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from pathlib import Path

import numpy as np
import torch

import model
from model.backends import make_generator_runner, make_tokenizer_runner
from model.pipeline import sample_latents

from . import models
from .flops import sync
from .presets import Preset


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_models(preset: Preset, root: Path) -> tuple[Path, Path]:
    L = preset.service_tokens
    width, depth, heads, D = preset.vit_1d[L]
    tok = models.softvq(256, L, D, (width, depth, heads))
    gen = models.sit_1d(L, D, preset.sit)
    return model.save_tokenizer(tok, root / "bench-tok"), model.save_generator(
        gen, root / "sit-bench"
    )


class ServerThread:
    """uvicorn serving the app on 127.0.0.1 in a background thread."""

    def __init__(self, app, port: int):
        import uvicorn

        self.server = uvicorn.Server(
            uvicorn.Config(
                app,
                host="127.0.0.1",
                port=port,
                log_level="warning",
                access_log=False,
                lifespan="on",
            )
        )
        self.thread = threading.Thread(target=self.server.run, name="bench-uvicorn", daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=120)


class RawModel:
    """The served pair loaded again in this process, run as one batch without the service:
    sample + decode only. Throughput is images / total seconds over `reps` batches (a mean,
    like the service's, not a best case)."""

    def __init__(self, preset: Preset, tok_dir: Path, gen_dir: Path, device, dtype):
        self.tok = model.load_tokenizer(tok_dir).to(device, dtype).eval()
        gen = model.load_generator(gen_dir).to(device, dtype).eval()
        self.tok_runner = make_tokenizer_runner(self.tok, "eager")
        self.gen_runner = make_generator_runner(gen, "eager")
        self.batch, self.steps, self.device = preset.service_max_batch, preset.service_steps, device
        self.run_once()  # warm

    @torch.inference_mode()
    def run_once(self):
        B, tok = self.batch, self.tok
        # cuda_graphs as the service runs it (settings default); a no-op on the CPU.
        z = sample_latents(
            self.gen_runner, list(range(B)), list(range(B)), self.steps, cuda_graphs=True
        )
        return self.tok_runner.decode(z * tok.vq_std + tok.vq_mean)

    def images_per_s(self, reps: int = 2) -> float:
        t0 = time.perf_counter()
        for _ in range(reps):
            self.run_once()
        sync(self.device)
        return self.batch * reps / (time.perf_counter() - t0)


async def _one(client, i: int, steps: int) -> float:
    t0 = time.perf_counter()
    r = await client.post(
        "/generate",
        json={"class_labels": [i % 1000], "seed": i, "steps": steps},
        headers={"Accept": "image/png"},
    )
    if r.status_code != 200:
        raise RuntimeError(f"/generate answered {r.status_code}: {r.text[:300]}")
    return time.perf_counter() - t0


async def _closed_loop(client, n: int, concurrency: int, steps: int) -> float:
    """n requests, at most `concurrency` in flight; returns requests/s."""
    sem = asyncio.Semaphore(concurrency)

    async def worker(i):
        async with sem:
            await _one(client, i, steps)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(n)))
    return n / (time.perf_counter() - t0)


async def _open_loop(client, n: int, rate: float, steps: int, seed: int) -> dict:
    """n requests with exponential gaps of mean 1/rate; latency percentiles in ms."""
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=n)
    tasks = []
    t0 = time.perf_counter()
    for i, gap in enumerate(gaps):
        await asyncio.sleep(gap)
        tasks.append(asyncio.create_task(_one(client, 10_000 + i, steps)))
    lat = np.array(await asyncio.gather(*tasks)) * 1000
    wall = time.perf_counter() - t0
    return {
        "offered_rps": rate,
        "achieved_rps": n / wall,
        "requests": n,
        "p50": float(np.percentile(lat, 50)),
        "p95": float(np.percentile(lat, 95)),
        "p99": float(np.percentile(lat, 99)),
        "mean": float(lat.mean()),
    }


async def _drive(base: str, preset: Preset, raw: RawModel, server: ServerThread, log) -> dict:
    import httpx

    limits = httpx.Limits(
        max_connections=preset.service_clients * 2,
        max_keepalive_connections=preset.service_clients * 2,
    )
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:
        # uvicorn binds the port only after the app's startup (model loading); then /readyz
        # says 503 until every batch bucket is warm.
        deadline = time.monotonic() + 600
        while True:
            try:
                if (await client.get("/readyz")).status_code == 200:
                    break
            except httpx.TransportError:
                if not server.alive:
                    raise RuntimeError(
                        "the service thread exited during startup (see its log above)"
                    ) from None
            if time.monotonic() > deadline:
                raise RuntimeError("service not ready after 600 s")
            await asyncio.sleep(0.2)
        steps = preset.service_steps
        await _closed_loop(client, 2, 1, steps)  # first-request costs out of the way
        # The raw model right before and right after the saturation run (the service idle),
        # so both sides of the efficiency ratio see the same machine load.
        raw_before = await asyncio.to_thread(raw.images_per_s)
        log(f"  raw batched model in process (batch {raw.batch}): {raw_before:.2f} images/s")
        seq = await _closed_loop(client, preset.sequential_requests, 1, steps)
        log(f"  sequential single requests: {seq:.2f} images/s")
        sat = await _closed_loop(client, preset.service_requests, preset.service_clients, steps)
        log(f"  {preset.service_clients} concurrent clients: {sat:.2f} images/s")
        raw_after = await asyncio.to_thread(raw.images_per_s)
        log(f"  raw batched model again: {raw_after:.2f} images/s")
        latency = {}
        for frac in (0.5, 0.9):
            key = f"load_{int(frac * 100)}"
            latency[key] = await _open_loop(
                client, preset.latency_requests, frac * sat, steps, seed=int(frac * 100)
            )
            lat = latency[key]
            log(
                f"  {key}: p50 {lat['p50']:.0f} ms, p95 {lat['p95']:.0f} ms, p99 {lat['p99']:.0f} ms"
            )
    return {
        "sequential_images_per_s": seq,
        "saturation_images_per_s": sat,
        "raw_images_per_s": (raw_before + raw_after) / 2,
        "raw_images_per_s_before_after": [raw_before, raw_after],
        "latency_ms": latency,
    }


def run(preset: Preset, device: torch.device, dtype: torch.dtype, workdir: Path, log) -> dict:
    from service.app import create_app
    from service.settings import Settings

    tok_dir, gen_dir = save_models(preset, workdir)
    raw = RawModel(preset, tok_dir, gen_dir, device, dtype)
    buckets = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b < preset.service_max_batch] + [
        preset.service_max_batch
    ]
    port = free_port()
    settings = Settings(
        tokenizers={"bench-tok": str(tok_dir)},
        generators={"sit-bench": {"path": str(gen_dir), "tokenizer": "bench-tok"}},
        default_tokenizer="bench-tok",
        default_generator="sit-bench",
        device=device.type,
        dtype=str(dtype).removeprefix("torch."),
        backend="eager",
        max_batch_size=preset.service_max_batch,
        batch_buckets=buckets,
        max_wait_ms=10.0,
        queue_max=4096,
        request_timeout_s=600.0,
        max_steps=max(250, preset.service_steps),
        host="127.0.0.1",
        port=port,
    )
    with ServerThread(create_app(settings), port) as server:
        out = asyncio.run(_drive(f"http://127.0.0.1:{port}", preset, raw, server, log))
    out["service_efficiency"] = out["saturation_images_per_s"] / out["raw_images_per_s"]
    out["batching_gain"] = out["saturation_images_per_s"] / out["sequential_images_per_s"]
    out["config"] = {
        "endpoint": "/generate (1 image, Accept: image/png)",
        "steps": preset.service_steps,
        "tokens": preset.service_tokens,
        "max_batch_size": preset.service_max_batch,
        "batch_buckets": buckets,
        "clients": preset.service_clients,
        "backend": "eager",
    }
    return out
