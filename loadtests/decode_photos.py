"""Photos through the service: what decoding them costs, per request and in a burst.

    python -m loadtests.decode_photos [--reps 9] [--json out.json]
    python -m loadtests.decode_photos --url http://127.0.0.1:8001 --url http://127.0.0.1:8002
    python -m loadtests.decode_photos --url http://127.0.0.1:8001 --burst 8

By default: the service's image path (service.codec.decode_image -> model.images.decode_for)
asks the JPEG decoder to scale down in the DCT (1/2, 1/4, 1/8) while both sides keep twice the
model's size, then resamples the centre square. This times that path against decoding the same bytes whole
(then the same crop and resize), side by side in one process (round-robin, median of
``--reps``), for phone-sized JPEGs and the model sizes in use, and reads how far the two
results are apart (PSNR of the 8-bit pixels). The photos are drawn: a smooth field with fine
grain on top, quality 90 (these machines hold no camera photos).

With ``--url`` (repeatable) it times instead the whole request a person makes with such a
photo, ``POST /reconstruct`` (multipart upload, the server's default tokenizer), against each
running server in turn, one request at a time (round-robin, median of ``--reps``): two
deployments of two versions side by side. With ``--burst N`` as well, it sends N uploads of
a drawn 16 MP WebP at once to each server (twice, alternating) and reads the server's
resident memory off its /metrics every 20 ms meanwhile: the peak a burst of large uploads
costs it (the size of a WebP says nothing of the pixels it decodes to).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import httpx
import numpy as np
import torch
from PIL import Image

from model.images import psnr, square_rgb
from service.codec import decode_image

PHOTOS = {"12 MP (4032x3024)": (4032, 3024), "3 MP (2016x1512)": (2016, 1512)}
SIZES = (32, 256, 512)
LIMIT = 10**9  # no byte or pixel limit in the way of the timing


def drawn_photo(
    width: int, height: int, fmt: str = "JPEG", grain: float = 12.0, quality: int = 90, seed=0
) -> bytes:
    """A smooth random field, ``grain`` (std of per-pixel noise) on top, encoded as ``fmt``."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 64, width // 64, 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), np.int16)
    if grain:
        field = field + rng.normal(0, grain, (height, width, 1))
    buf = io.BytesIO()
    Image.fromarray(np.clip(field, 0, 255).astype(np.uint8)).save(buf, fmt, quality=quality)
    return buf.getvalue()


def as_model_input(pixels: np.ndarray) -> torch.Tensor:
    """(3, S, S) uint8 -> (1, 3, S, S) in [-1, 1], what model.images.psnr reads."""
    return torch.from_numpy(pixels).float()[None] / 127.5 - 1.0


def decoded_whole(data: bytes, size: int) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return np.asarray(square_rgb(img, size), dtype=np.uint8).transpose(2, 0, 1)


def time_requests(urls: list[str], reps: int) -> list[dict]:
    rows = []
    with httpx.Client(timeout=120) as client:
        for name, (w, h) in PHOTOS.items():
            data = drawn_photo(w, h)
            times = {url: [] for url in urls}
            for _ in range(reps):
                for url in urls:
                    t = time.perf_counter()
                    r = client.post(f"{url}/reconstruct", files={"image": ("photo.jpg", data)})
                    times[url].append(time.perf_counter() - t)
                    if r.status_code != 200:  # e.g. 413: the server's image limits are lower
                        raise SystemExit(f"{url}/reconstruct: {r.status_code} {r.text}")
            for url in urls:
                ms = 1e3 * statistics.median(times[url])
                rows.append({"photo": name, "url": url, "reconstruct_ms": round(ms, 1)})
                print(f"{name:18s} {url}: POST /reconstruct {ms:7.1f} ms", flush=True)
    return rows


def resident_bytes(client: httpx.Client, url: str) -> float:
    for line in client.get(f"{url}/metrics").text.splitlines():
        if line.startswith("process_resident_memory_bytes "):
            return float(line.split()[1])
    raise SystemExit(f"{url}/metrics: no process_resident_memory_bytes")


def burst_once(client: httpx.Client, url: str, data: bytes, n: int) -> dict:
    """``n`` uploads of ``data`` at once; the server's resident memory sampled meanwhile."""
    idle = resident_bytes(client, url)
    samples, done = [idle], threading.Event()

    def watch():
        with httpx.Client(timeout=30) as own:
            while not done.wait(0.02):
                samples.append(resident_bytes(own, url))

    def upload(_):
        return client.post(f"{url}/tokenize", files={"image": ("p.webp", data)}).status_code

    watcher = threading.Thread(target=watch)
    watcher.start()
    t = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        codes = list(pool.map(upload, range(n)))
    seconds = time.perf_counter() - t
    done.set()
    watcher.join()
    return {
        "url": url,
        "uploads": n,
        "answered_200": codes.count(200),
        "seconds": round(seconds, 2),
        "idle_mb": round(idle / 2**20),
        "peak_mb": round(max(samples) / 2**20),
    }


def burst(urls: list[str], n: int) -> list[dict]:
    data, rows = drawn_photo(4600, 3450, "WEBP", grain=0, quality=80, seed=1), []
    with httpx.Client(timeout=300) as client:
        for url in urls * 2:
            row = burst_once(client, url, data, n)
            rows.append(row)
            print(
                f"{url}: {n} x 16 MP WebP at once: {row['answered_200']} answered 200 in"
                f" {row['seconds']:.1f} s, resident {row['idle_mb']} MB idle,"
                f" {row['peak_mb']} MB peak",
                flush=True,
            )
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--url", action="append", help="a running server (repeatable)")
    ap.add_argument("--burst", type=int, help="with --url: N large uploads at once")
    ap.add_argument("--json", help="write the rows here too")
    args = ap.parse_args(argv)
    if args.url:
        rows = burst(args.url, args.burst) if args.burst else time_requests(args.url, args.reps)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        return
    rows = []
    for name, (w, h) in PHOTOS.items():
        data = drawn_photo(w, h)
        for size in SIZES:
            ways = {
                "whole": partial(decoded_whole, data, size),
                "scaled": partial(decode_image, data, size, LIMIT, LIMIT),
            }
            times = {way: [] for way in ways}
            for _ in range(args.reps):
                for way, call in ways.items():
                    t = time.perf_counter()
                    call()
                    times[way].append(time.perf_counter() - t)
            whole_ms, scaled_ms = (1e3 * statistics.median(times[w]) for w in ways)
            row = {
                "photo": name,
                "jpeg_bytes": len(data),
                "model_size": size,
                "whole_ms": round(whole_ms, 1),
                "scaled_ms": round(scaled_ms, 1),
                "speedup": round(whole_ms / scaled_ms, 2),
                "psnr_db": round(psnr(*(as_model_input(ways[w]()) for w in ways))[0], 1),
            }
            rows.append(row)
            print(
                f"{name:18s} {size:4d} px: whole {whole_ms:6.1f} ms, scaled {scaled_ms:6.1f} ms,"
                f" x{row['speedup']:.2f}, apart {row['psnr_db']:.1f} dB",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
