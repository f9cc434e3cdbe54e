"""Issue #13 item 3, measured: throughput of odd-sized batches on the eager backend.

Before the runners owned padding, the executor padded every batch with zero rows up to a
bucket (3 -> 4, 5 -> 8, 6 -> 8, 7 -> 8 with buckets 1, 2, 4, 8, 16), even for eager, which
takes any batch size. This times ``Executor.run`` on one job of n images (a batch of n) for
tokenize and reconstruct, on the cpu preset's service tokenizer (256 px, 64 tokens, ViT
192 x 12), through the shipped registry and executor with images decoded as the API
decodes them. Round-robin over (task, n), best of ``--reps``. ``--padded`` adds, in the same
rounds, each batch padded with zero rows to its bucket (the old executor's padding, run on
this tree): a paired measure of what the padding cost. Runs against whichever tree is
first on the path:

    python -m loadtests.odd_batches --models /tmp/odd-models [--padded]
    PYTHONPATH=/tmp/before python loadtests/odd_batches.py --models /tmp/odd-models
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

BUCKETS = [1, 2, 4, 8, 16]


def make_models(root: Path) -> Path:
    path = root / "bench-tok"
    if not (path / "config.json").exists():
        import model
        from loadtests import models, presets

        L = presets.CPU.service_tokens
        width, depth, heads, D = presets.CPU.vit_1d[L]
        model.save_tokenizer(models.softvq(256, L, D, (width, depth, heads)), path)
    return path


def pngs(n: int, size: int = 256) -> list[bytes]:
    out = []
    for i in range(n):
        pixels = np.random.default_rng(i).integers(0, 256, (size, size, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=Path, required=True, help="where the tokenizer is saved")
    p.add_argument("--sizes", default="3,5,6,7")
    p.add_argument("--tasks", default="tokenize,reconstruct")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--padded",
        action="store_true",
        help="also time, in the same rounds, each batch padded with zero rows to its bucket"
        " (what the executor did before): a paired measure of what padding costs",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    import service
    from service import codec
    from service.executor import Executor
    from service.jobs import Job
    from service.registry import ModelRegistry
    from service.settings import Settings

    tok_dir = make_models(args.models)
    settings = Settings(
        tokenizers={"bench-tok": str(tok_dir)},
        device="cpu",
        dtype="float32",
        backend="eager",
        batch_buckets=BUCKETS,
        max_batch_size=16,
    )
    registry = ModelRegistry.from_settings(settings)
    registry.warmup()
    executor = Executor(registry)
    sizes = [int(s) for s in args.sizes.split(",")]
    tasks = args.tasks.split(",")
    images = codec.decode_images(pngs(max(sizes)), 256, 1 << 26, 1 << 26)

    def job(task: str, n: int, padded: bool = False) -> Job:
        x = images[:n].copy()
        if padded:  # float32 in [-1, 1] plus zero rows up to the bucket, as before
            m = min(b for b in BUCKETS if b >= n)
            f = x.astype(np.float32) / 127.5 - 1.0 if x.dtype == np.uint8 else x
            x = np.concatenate([f, np.zeros((m - n, *x.shape[1:]), np.float32)])
        return Job("bench-tok", task, {"images": x, "n": len(x)})

    variants = [False, True] if args.padded else [False]
    best: dict[tuple[str, int, bool], float] = {}
    for task in tasks:  # a first call of each shape out of the way
        for n in sizes:
            for pad in variants:
                executor.run([job(task, n, pad)])
    for _ in range(args.reps):
        for task in tasks:
            for n in sizes:
                for pad in variants:
                    j = job(task, n, pad)
                    t0 = time.perf_counter()
                    out = executor.run([j])[0]
                    dt = time.perf_counter() - t0
                    if not isinstance(out, dict):
                        raise RuntimeError(f"{task} of {n}: {out!r}")
                    best[task, n, pad] = min(best.get((task, n, pad), float("inf")), dt)
    result = {
        "tree": str(Path(service.__file__).resolve().parent.parent),
        "payload_dtype": str(images.dtype),
        "threads": args.threads,
        "images_per_s": {f"{t}/{n}": round(n / best[t, n, False], 3) for t in tasks for n in sizes},
    }
    if args.padded:
        result["images_per_s_padded_to_bucket"] = {
            f"{t}/{n}": round(n / best[t, n, True], 3) for t in tasks for n in sizes
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
