"""Mixed-traffic load generator for a running softvq-serve: checks every answer it gets.

    python -m loadtests.load --url http://127.0.0.1:8000 --seconds 60 --concurrency 8
    python -m loadtests.load --url http://127.0.0.1:8000 --requests 500 --out load.json

``concurrency`` coroutines each send one request at a time (closed loop, so the load is
bounded) until the time or request budget is spent. Requests are a weighted mix of
/tokenize, /decode, /reconstruct and /generate over a small pool of fixed inputs (images,
token sets, class/seed pairs), so every input is asked many times. Each answer is checked:

- status 200 with the documented JSON shape (a non-200 is a *failed* answer, by status);
- it echoes what was asked (model, shape, seeds, class labels): a *mixed-up* answer fails;
- it equals the answer first seen for the same input (tokens to 1e-4, PSNR to 0.05 dB,
  pixels to 2/255): the models are deterministic, so any difference means an answer went to
  the wrong caller or was corrupted -- counted as a *mismatch*;
- a request that gets no answer at all (client timeout, connection dropped) is *lost*;
- every request id is answered once: a second completion of one id is a *duplicate*.

Distinct inputs must give distinct answers, or a swap could hide: the summary reports, per
kind of answer, how many input pairs are indistinguishable (``ambiguous_refs``); tokens and
PSNR must tell every input apart (``clean`` requires it), generate answers carry their seeds.

Traffic goes only to 127.0.0.1 / localhost.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import random
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from urllib.parse import urlparse

import httpx
import numpy as np
from PIL import Image

TASKS = ("tokenize", "decode", "reconstruct", "generate")
DEFAULT_MIX = {"tokenize": 3, "decode": 3, "reconstruct": 2, "generate": 2}
# Answers for one input may differ by float rounding with the batch they ran in.
ATOL = {
    "tokens": 1e-4,
    "psnr": 0.05,  # dB
    "pixels-decode": 2,  # uint8 levels
    "pixels-reconstruct": 2,
    "pixels-generate": 2,
}
# Kinds whose answers must tell every input apart (else a swap could hide); pixels of the
# tiny random test models barely depend on their input, so they are only compared.
IDENTITY_KINDS = ("tokens", "psnr")


# --- inputs -----------------------------------------------------------------------------
@dataclass
class Plan:
    """What to send: the served models (from GET /models) and a pool of fixed inputs."""

    tokenizer: str
    generator: str | None
    images: list[str]  # base64 PNGs
    tokens: list[list]  # (1, L, D) nested lists
    gen_inputs: list[tuple[int, int]]  # (class label, seed)
    steps: int
    shape: tuple[int, int]  # (L, D) of the tokenizer


def random_png(rng: np.random.Generator, size: int) -> str:
    """A smooth random image (noise blurred by resizing), base64 PNG."""
    small = rng.integers(0, 256, (max(2, size // 8), max(2, size // 8), 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((size, size), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


async def make_plan(
    client: httpx.AsyncClient, pool: int = 8, steps: int = 4, seed: int = 0
) -> Plan:
    info = (await client.get("/models")).raise_for_status().json()
    tok = info["tokenizers"][0]
    gen = next((g for g in info["generators"] if g["tokenizer"] == tok["name"]), None)
    rng = np.random.default_rng(seed)
    L, D = tok["num_tokens"], tok["token_dim"]
    return Plan(
        tokenizer=tok["name"],
        generator=gen["name"] if gen else None,
        images=[random_png(rng, tok["image_size"]) for _ in range(pool)],
        tokens=[rng.standard_normal((1, L, D)).astype(np.float32).tolist() for _ in range(pool)],
        gen_inputs=[
            (int(rng.integers(0, gen["num_classes"])) if gen else 0, 1000 + i) for i in range(pool)
        ],
        steps=steps,
        shape=(L, D),
    )


# --- checking -----------------------------------------------------------------------------
def png_pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), np.int16)


@dataclass
class Stats:
    sent: int = 0
    ok: int = 0
    lost: int = 0
    duplicates: int = 0
    mixed_up: int = 0
    mismatches: int = 0
    failed: Counter = field(default_factory=Counter)  # "endpoint status/code" -> count
    by_task: Counter = field(default_factory=Counter)
    latency: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: list[str] = field(default_factory=list)  # first few problems, for the log

    def note(self, text: str) -> None:
        if len(self.errors) < 20:
            self.errors.append(text)


class Checker:
    """Compares each answer with the first one seen for the same input."""

    def __init__(self):
        self.refs: dict[tuple, np.ndarray] = {}

    def same(self, key: tuple[str, int], value: np.ndarray) -> bool:
        ref = self.refs.setdefault(key, value)
        return ref.shape == value.shape and bool(np.abs(ref - value).max() <= ATOL[key[0]])

    def ambiguous(self) -> dict[str, int]:
        """Per kind of answer: pairs of distinct inputs whose answers cannot be told apart
        (a swap between those two requests would go unseen)."""
        out: Counter = Counter()
        keys = list(self.refs)
        for i, a in enumerate(keys):
            out[a[0]] += 0
            for b in keys[i + 1 :]:
                if a[0] == b[0] and self.refs[a].shape == self.refs[b].shape:
                    diff = np.abs(self.refs[a] - self.refs[b]).max()
                    out[a[0]] += bool(diff <= ATOL[a[0]])
        return dict(out)


def check(task: str, index: int, plan: Plan, body: dict, checker: Checker) -> str | None:
    """None if the answer is right, else what is wrong ("mixed_up: ..." / "mismatch: ...").

    Identity: tokenize answers by their tokens, reconstruct by PSNR (it depends on the input
    image), generate by the echoed seeds and classes; pixels are compared too."""
    if task == "tokenize":
        if body.get("model") != plan.tokenizer or body.get("shape") != [1, *plan.shape]:
            return f"mixed_up: tokenize model/shape {body.get('model')} {body.get('shape')}"
        tokens = np.asarray(body["tokens"], np.float32)
        return None if checker.same(("tokens", index), tokens) else "mismatch: tokenize tokens"
    if task == "generate":
        label, seed = plan.gen_inputs[index]
        if body.get("seeds") != [seed] or body.get("class_labels") != [label]:
            return (
                f"mixed_up: asked seed {seed} class {label}, "
                f"got {body.get('seeds')} {body.get('class_labels')}"
            )
    if body.get("model") not in (plan.tokenizer, plan.generator) or len(body["images"]) != 1:
        return f"mixed_up: {task} model {body.get('model')} with {len(body['images'])} images"
    if task == "reconstruct":
        psnr = np.asarray([np.nan if p is None else p for p in body["psnr"]], np.float64)
        if not checker.same(("psnr", index), psnr):
            return "mismatch: reconstruct psnr"
    pixels = png_pixels(body["images"][0])
    return None if checker.same((f"pixels-{task}", index), pixels) else f"mismatch: {task} pixels"


def request_for(task: str, index: int, plan: Plan) -> tuple[str, dict]:
    if task == "tokenize":
        return "/tokenize", {"images": [plan.images[index]], "model": plan.tokenizer}
    if task == "reconstruct":
        return "/reconstruct", {"images": [plan.images[index]], "model": plan.tokenizer}
    if task == "decode":
        return "/decode", {"tokens": plan.tokens[index], "model": plan.tokenizer}
    label, seed = plan.gen_inputs[index]
    body = {"class_labels": [label], "seeds": [seed], "steps": plan.steps}
    return "/generate", {**body, "model": plan.generator}


# --- driving ------------------------------------------------------------------------------
async def _client_loop(
    client: httpx.AsyncClient,
    plan: Plan,
    tasks: list[str],
    weights: list[float],
    stats: Stats,
    checker: Checker,
    stop_at: float,
    budget: list[int],
    answered: set[int],
    rng: random.Random,
) -> None:
    while time.monotonic() < stop_at and budget[0] != 0:
        budget[0] -= 1
        task = rng.choices(tasks, weights)[0]
        index = rng.randrange(len(plan.images))
        path, body = request_for(task, index, plan)
        rid = stats.sent
        stats.sent += 1
        stats.by_task[task] += 1
        t0 = time.perf_counter()
        try:
            r = await client.post(path, json=body, headers={"X-Request-ID": str(rid)})
        except httpx.HTTPError as e:  # no answer: timed out, connection refused or dropped
            stats.lost += 1
            stats.note(f"lost {task}: {type(e).__name__}: {e}")
            continue
        if rid in answered:
            stats.duplicates += 1
        answered.add(rid)
        stats.latency[task].append(time.perf_counter() - t0)
        if r.status_code != 200:
            try:
                code = r.json().get("error", "?")
            except ValueError:
                code = "not-json"
            stats.failed[f"{path} {r.status_code} {code}"] += 1
            stats.note(f"{task} -> {r.status_code} {r.text[:200]}")
            continue
        problem = check(task, index, plan, r.json(), checker)
        if problem is None:
            stats.ok += 1
        elif problem.startswith("mixed_up"):
            stats.mixed_up += 1
            stats.note(problem)
        else:
            stats.mismatches += 1
            stats.note(problem)


def _check_local(url: str) -> None:
    host = urlparse(url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"refusing to load {host}: this tool only targets 127.0.0.1")


async def run_load(
    url: str,
    seconds: float | None = 60.0,
    requests: int | None = None,
    concurrency: int = 8,
    mix: dict[str, float] | None = None,
    steps: int = 4,
    pool: int = 8,
    timeout: float = 60.0,
    api_key: str | None = None,
    seed: int = 0,
) -> dict:
    """Drive the server; returns the summary (see ``summarize``)."""
    _check_local(url)
    mix = {k: v for k, v in (mix or DEFAULT_MIX).items() if v > 0}
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(
        base_url=url, timeout=timeout, limits=limits, headers=headers
    ) as client:
        plan = await make_plan(client, pool=pool, steps=steps, seed=seed)
        if plan.generator is None:
            mix.pop("generate", None)
        stats, checker, answered = Stats(), Checker(), set()
        tasks, weights = list(mix), [mix[t] for t in mix]
        stop_at = time.monotonic() + (seconds if seconds else 10**9)
        budget = [requests if requests else -1]
        start = time.perf_counter()
        await asyncio.gather(
            *(
                _client_loop(
                    client,
                    plan,
                    tasks,
                    weights,
                    stats,
                    checker,
                    stop_at,
                    budget,
                    answered,
                    random.Random(seed * 1000 + i),
                )
                for i in range(concurrency)
            )
        )
        elapsed = time.perf_counter() - start
    return summarize(stats, checker, elapsed, concurrency)


def summarize(stats: Stats, checker: Checker, elapsed: float, concurrency: int) -> dict:
    def pct(xs: list[float], q: float) -> float | None:
        return round(float(np.percentile(xs, q)) * 1000, 1) if xs else None

    failed = sum(stats.failed.values())
    ambiguous = checker.ambiguous()
    return {
        "seconds": round(elapsed, 1),
        "concurrency": concurrency,
        "sent": stats.sent,
        "ok": stats.ok,
        "failed": failed,
        "failed_by_status": dict(stats.failed),
        "lost": stats.lost,
        "duplicates": stats.duplicates,
        "mixed_up": stats.mixed_up,
        "mismatches": stats.mismatches,
        "ambiguous_refs": ambiguous,
        "requests_per_s": round(stats.sent / elapsed, 2) if elapsed else 0.0,
        "by_task": dict(stats.by_task),
        "latency_ms": {
            t: {"p50": pct(v, 50), "p95": pct(v, 95), "p99": pct(v, 99), "n": len(v)}
            for t, v in sorted(stats.latency.items())
        },
        "first_errors": stats.errors,
        "clean": stats.sent > 0
        and stats.ok == stats.sent
        and not (stats.lost or stats.duplicates or stats.mixed_up or stats.mismatches)
        and not any(ambiguous.get(k, 0) for k in IDENTITY_KINDS),
    }


def parse_mix(text: str) -> dict[str, float]:
    """'tokenize=3,decode=3,reconstruct=2,generate=2' -> weights."""
    out = {}
    for part in text.split(","):
        name, _, weight = part.partition("=")
        if name.strip() not in TASKS:
            raise argparse.ArgumentTypeError(f"unknown task {name!r}; tasks: {TASKS}")
        out[name.strip()] = float(weight or 1)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.load", description=__doc__.split("\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--seconds", type=float, default=60.0, help="run time (0 = until --requests)")
    p.add_argument("--requests", type=int, default=None, help="stop after this many requests")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--mix", type=parse_mix, default=None, help="e.g. tokenize=3,generate=1")
    p.add_argument("--steps", type=int, default=4, help="sampling steps of /generate")
    p.add_argument("--pool", type=int, default=8, help="distinct inputs per task")
    p.add_argument("--timeout", type=float, default=60.0, help="client timeout per request (s)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--out", default=None, help="write the JSON summary here")
    args = p.parse_args(argv)
    summary = asyncio.run(
        run_load(
            args.url,
            seconds=args.seconds or None,
            requests=args.requests,
            concurrency=args.concurrency,
            mix=args.mix,
            steps=args.steps,
            pool=args.pool,
            timeout=args.timeout,
            api_key=args.api_key,
        )
    )
    text = json.dumps(summary, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0 if summary["clean"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
