"""The CPU's ``compile`` backend: static graphs per batch bucket against a dynamic batch axis.

    python -m loadtests.compile_shapes [--threads 2] [--reps 15] [--json out.json]

For each bundled demo model (2 tokenizers, 2 generators), in one process: a ``compile`` runner
with static graphs (one per bucket, batches padded to a bucket: what CUDA graphs need) and one
with a dynamic batch axis (a graph for a batch of one and one for every other size, no
padding), each warmed up at the default buckets on its own empty inductor cache, as the
service's ``auto`` backend proves it on a first start. Prints the seconds each warm-up took,
then the seconds per call (decode for tokenizers, one velocity for generators; median of
``--reps``, round-robin over runner and batch size so both see the same machine) at batch
sizes on and off the buckets, with eager beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from functools import partial

import torch

from model.backends import DEFAULT_BUCKETS, build_runner
from model.backends.auto import probe_calls
from model.backends.compiled import CompiledGeneratorRunner, CompiledTokenizerRunner
from model.demo import DEMO_GENERATORS, DEMO_TOKENIZERS, demo_path
from model.loading import load_generator, load_tokenizer

SIZES = (1, 2, 3, 4, 5, 8, 11, 16)
MODES = ("eager", "static", "dynamic")


def runners(kind: str, module) -> dict:
    cls = CompiledTokenizerRunner if kind == "tokenizer" else CompiledGeneratorRunner
    return {
        "eager": build_runner(kind, module, "eager"),
        "static": cls(module, DEFAULT_BUCKETS, dynamic_batch=False),
        "dynamic": cls(module, DEFAULT_BUCKETS, dynamic_batch=True),
    }


def measure(kind: str, name: str, module, reps: int, order: int) -> dict:
    rs = runners(kind, module)
    warm = {}
    for mode in ("static", "dynamic") if order == 0 else ("dynamic", "static"):
        # Each compiled runner starts on an empty inductor cache, as on a first start.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix=f"inductor-{mode}-")
        t0 = time.perf_counter()
        rs[mode].warmup()
        warm[mode] = time.perf_counter() - t0
    # The same inputs for every runner: auto's probes (decode / one velocity) at each size.
    timed = "decode" if kind == "tokenizer" else "velocity"
    probes = {n: probe_calls(kind, rs["eager"], n)[f"{timed}@{n}"] for n in SIZES}
    calls = {(m, n): partial(probes[n], rs[m]) for m in MODES for n in SIZES}
    for fn in calls.values():
        fn()  # compiled runners: nothing new is built here (the batch sizes' graphs exist)
    times: dict = {key: [] for key in calls}
    for _ in range(reps):
        for key, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    seconds = {f"{m}@{n}": statistics.median(times[(m, n)]) for m, n in calls}
    return {"model": name, "warmup_s": warm, "seconds_per_call": seconds}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    # The process's one-time compile costs (inductor's imports, worker pool, C++ headers) paid
    # before any measured warm-up, so neither mode carries them.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-first-")
    torch.compile(lambda x: (x * 2).relu(), fullgraph=True)(torch.randn(4, 4))
    models = [("tokenizer", n, load_tokenizer(demo_path(n))) for n in DEMO_TOKENIZERS]
    models += [("generator", n, load_generator(demo_path(n))) for n in DEMO_GENERATORS]
    # Which mode warms up first alternates from model to model.
    results = [measure(*m, args.reps, order=i % 2) for i, m in enumerate(models)]
    print(f"torch {torch.__version__}, {args.threads} threads, buckets {list(DEFAULT_BUCKETS)}")
    print("| model | warm-up static / dynamic, s | ratio |")
    print("|---|---|---|")
    for r in results:
        w = r["warmup_s"]
        print(
            f"| {r['model']} | {w['static']:.1f} / {w['dynamic']:.1f} | "
            f"{w['static'] / w['dynamic']:.2f}x |"
        )
    total = {m: sum(r["warmup_s"][m] for r in results) for m in ("static", "dynamic")}
    print(
        f"| all four | {total['static']:.1f} / {total['dynamic']:.1f} | "
        f"{total['static'] / total['dynamic']:.2f}x |"
    )
    print()
    print("ms per call, eager / static / dynamic, by batch size")
    print("| model | " + " | ".join(str(n) for n in SIZES) + " |")
    print("|---|" + "---|" * len(SIZES))
    for r in results:
        s = r["seconds_per_call"]
        cells = [" / ".join(f"{1000 * s[f'{m}@{n}']:.1f}" for m in MODES) for n in SIZES]
        print(f"| {r['model']} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
