"""The speedup through HTTP: the same request mix driven at each generator of a running
softvq-serve, throughput read off its own /metrics.

    softvq serve --compare cpu &                       # or any deployment serving a 2-D baseline
    python -m loadtests.compare --url http://127.0.0.1:8000 --duration 60 --out runs/compare

Generators: ``--models`` or, by default, the speed references ``GET /models`` marks (the
compare profile), else every generator. The baseline is the one of family ``latent-2d``.
Each generator gets, in turn, ``--concurrency`` closed-loop clients sending the same requests
(``--images`` per request, ``--steps``, ``--cfg-scale``, the server's batch limits) for
``--duration`` seconds, split into ``--rounds`` round-robin phases so that every generator
sees the same drift of a shared machine's load. Around each phase /metrics (``--metrics-url``,
repeatable: the workers' in Redis mode; default URL/metrics), or a Prometheus that scrapes
them (``--prometheus URL``: each reading waits ``--settle`` seconds, more than one scrape
interval, so the counters hold the whole phase) is read: generated images and model
(compute) seconds of that generator over the phase. It prints and writes
(``--out``: compare.json + compare.md) per generator images/s, model seconds per image,
request latency and errors, and the ratios of each to the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import re
import shlex
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import httpx

SAMPLE = re.compile(r"^(\w+)\{([^}]*)\} (\S+)$")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


COUNTERS = ("softvq_images_processed_total", "softvq_compute_seconds_sum")


def query_prometheus(base: str, settle_s: float) -> dict[tuple[str, str], float]:
    """The same sums from a Prometheus's last scrapes (after ``settle_s``)."""
    time.sleep(settle_s)
    out: dict[tuple[str, str], float] = defaultdict(float)
    for name in COUNTERS:
        q = f'sum by (model) ({name}{{task="generate"}})'
        r = httpx.get(f"{base.rstrip('/')}/api/v1/query", params={"query": q}, timeout=30)
        r.raise_for_status()
        for item in r.json()["data"]["result"]:
            out[(name, item["metric"]["model"])] = float(item["value"][1])
    return out


def scrape(urls: list[str]) -> dict[tuple[str, str], float]:
    """(metric, model) -> value summed over every process, for the generate task."""
    out: dict[tuple[str, str], float] = defaultdict(float)
    for url in urls:
        for line in httpx.get(url, timeout=30).text.splitlines():
            m = SAMPLE.match(line)
            if not m or m.group(1) not in COUNTERS:
                continue
            labels = dict(LABEL.findall(m.group(2)))
            if labels.get("task") == "generate":
                out[(m.group(1), labels["model"])] += float(m.group(3))
    return out


async def drive(url: str, model: str, seconds: float, args, seed0: int) -> dict:
    """``concurrency`` clients, one request at a time each, for ``seconds``."""
    latencies: list[float] = []
    errors: dict[str, int] = defaultdict(int)
    images = 0
    end = time.perf_counter() + seconds

    async def client(i: int, http: httpx.AsyncClient) -> None:
        nonlocal images
        n = 0
        while time.perf_counter() < end:
            body = {
                "model": model,
                "num_images": args.images,
                "seed": seed0 + 100_000 * i + n * args.images,
                "steps": args.steps,
                "cfg_scale": args.cfg_scale,
            }
            t0 = time.perf_counter()
            try:
                r = await http.post(f"{url}/generate", json=body)
            except httpx.HTTPError as e:
                errors[type(e).__name__] += 1
                continue
            n += 1
            if r.status_code == 200:
                latencies.append(time.perf_counter() - t0)
                images += len(r.json()["images"])
            else:
                errors[str(r.status_code)] += 1
                if r.status_code == 429:
                    await asyncio.sleep(float(r.headers.get("retry-after", 1)))

    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=args.timeout) as http:
        await asyncio.gather(*(client(i, http) for i in range(args.concurrency)))
    return {
        "wall_s": time.perf_counter() - t0,
        "images": images,
        "latencies": latencies,
        "errors": dict(errors),
    }


def pick_models(url: str, wanted: list[str] | None) -> tuple[list[str], str, dict]:
    info = httpx.get(f"{url}/models", timeout=30).json()
    gens = {g["name"]: g for g in info["generators"]}
    if wanted:
        unknown = [m for m in wanted if m not in gens]
        if unknown:
            raise SystemExit(f"not served: {unknown}; served: {sorted(gens)}")
        names = wanted
    else:
        refs = [n for n, g in gens.items() if g.get("speed_reference")]
        names = refs or list(gens)
    baselines = [n for n in names if gens[n].get("family") == "latent-2d"]
    if not baselines:
        raise SystemExit(f"no 2-D baseline (family latent-2d) among {names}")
    return names, baselines[0], gens


def run(args) -> dict:
    url = args.url.rstrip("/")
    metrics_urls = args.metrics_url or [f"{url}/metrics"]

    def read() -> dict[tuple[str, str], float]:
        if args.prometheus:
            return query_prometheus(args.prometheus, args.settle)
        return scrape(metrics_urls)

    names, baseline, gens = pick_models(url, args.models)
    per = {n: {"wall_s": 0.0, "images": 0, "latencies": [], "errors": defaultdict(int),
               "metric_images": 0.0, "model_s": 0.0} for n in names}  # fmt: skip
    phase_s = args.duration / args.rounds
    for n in names:  # warm: first requests of a model pay for allocations
        asyncio.run(drive(url, n, min(2.0, phase_s), _one_client(args), seed0=0))
    for rnd in range(args.rounds):
        for n in names:
            before = read()
            got = asyncio.run(drive(url, n, phase_s, args, seed0=rnd * 10_000_000))
            after = read()
            p = per[n]
            p["wall_s"] += got["wall_s"]
            p["images"] += got["images"]
            p["latencies"] += got["latencies"]
            for k, v in got["errors"].items():
                p["errors"][k] += v
            key_i, key_s = ("softvq_images_processed_total", n), ("softvq_compute_seconds_sum", n)
            p["metric_images"] += after[key_i] - before[key_i]
            p["model_s"] += after[key_s] - before[key_s]
            print(
                f"round {rnd + 1}/{args.rounds} {n}: {got['images'] / got['wall_s']:.3f} images/s",
                file=sys.stderr,
            )
    results = {}
    for n, p in per.items():
        lat = sorted(p["latencies"])
        results[n] = {
            "family": gens[n].get("family"),
            "num_tokens": gens[n].get("num_tokens"),
            "images_per_s": p["metric_images"] / p["wall_s"] if p["wall_s"] else 0.0,
            "client_images_per_s": p["images"] / p["wall_s"] if p["wall_s"] else 0.0,
            "model_s_per_image": p["model_s"] / p["metric_images"] if p["metric_images"] else None,
            "images": p["metric_images"],
            "requests_ok": len(lat),
            "errors": dict(p["errors"]),
            "latency_s": {
                "p50": statistics.median(lat) if lat else None,
                "p95": lat[int(0.95 * (len(lat) - 1))] if lat else None,
            },
        }
    base = results[baseline]
    for r in results.values():
        r["throughput_ratio_vs_2d"] = (
            r["images_per_s"] / base["images_per_s"] if base["images_per_s"] else None
        )
        r["model_time_speedup_vs_2d"] = (
            base["model_s_per_image"] / r["model_s_per_image"]
            if base["model_s_per_image"] and r["model_s_per_image"]
            else None
        )
    return {
        "baseline": baseline,
        "results": results,
        "request": {
            "images_per_request": args.images,
            "steps": args.steps,
            "cfg_scale": args.cfg_scale,
            "concurrency": args.concurrency,
            "duration_s_per_model": args.duration,
            "rounds": args.rounds,
        },
        "meta": {
            "command": args.command,
            "url": url,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "client_host": platform.node(),
        },
    }


def _one_client(args):
    return argparse.Namespace(**{**vars(args), "concurrency": 1})


def markdown(report: dict) -> str:
    req = report["request"]
    lines = [
        f"# Speedup through HTTP ({report['meta']['date']})",
        "",
        f"`{report['meta']['command']}` against {report['meta']['url']}: {req['concurrency']}"
        f" clients per generator, {req['images_per_request']} images per request,"
        f" {req['steps']} steps, cfg {req['cfg_scale']}, {req['duration_s_per_model']} s per"
        f" generator in {req['rounds']} round(s). Baseline: `{report['baseline']}`.",
        "",
        "| generator | tokens | images/s | vs 2-D (images/s) | model s / image |"
        " vs 2-D (model time) | p50 / p95 latency s | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    for name, r in report["results"].items():
        lat = r["latency_s"]
        lines.append(
            f"| {name} | {r['num_tokens']} | {r['images_per_s']:.3f} |"
            f" {f(r['throughput_ratio_vs_2d'], '.2f')}x | {f(r['model_s_per_image'], '.4f')} |"
            f" {f(r['model_time_speedup_vs_2d'], '.2f')}x |"
            f" {f(lat['p50'], '.2f')} / {f(lat['p95'], '.2f')} | {r['errors'] or 0} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m loadtests.compare", description=__doc__.split("\n")[0]
    )
    p.add_argument("--url", required=True, help="base URL of the API")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load per generator")
    p.add_argument("--rounds", type=int, default=2, help="round-robin phases per generator")
    p.add_argument("--concurrency", type=int, default=8, help="closed-loop clients")
    p.add_argument("--images", type=int, default=1, help="images per request")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--timeout", type=float, default=300.0, help="client timeout per request (s)")
    p.add_argument("--models", type=lambda s: [x for x in s.split(",") if x],
                   help="comma-separated generators (default: the speed references)")  # fmt: skip
    p.add_argument("--metrics-url", action="append",
                   help="a /metrics to read (repeat per worker in Redis mode)")  # fmt: skip
    p.add_argument("--prometheus", help="read the counters from this Prometheus instead")
    p.add_argument("--settle", type=float, default=20.0,
                   help="with --prometheus: seconds to wait before each reading")  # fmt: skip
    p.add_argument("--out", help="directory for compare.json and compare.md")
    args = p.parse_args(argv)
    args.command = "python -m loadtests.compare " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    if args.duration <= 0 or args.rounds < 1 or args.concurrency < 1 or args.images < 1:
        p.error("--duration, --rounds, --concurrency and --images must be positive")
    report = run(args)
    md = markdown(report)
    print(md)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare.json").write_text(json.dumps(report, indent=1) + "\n")
        (out / "compare.md").write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
