"""Issue #13 item 4: what one image costs on its way to the model, as the API builds the job.

For each image size, a random RGB PNG goes through the API's decoding (service.codec) into a
tokenize job exactly as /tokenize builds it; the job is serialised as a Redis stream entry's
``job`` field (service.serialization.dump_job) and read back (load_job). Prints bytes per
image and the time to dump + load a 32-image job. Runs against whichever tree is first on
the path, so the same script measures an old checkout too:

    python -m loadtests.payloads                          # this tree
    PYTHONPATH=/tmp/before python loadtests/payloads.py   # another checkout (before uint8)
"""

from __future__ import annotations

import argparse
import io
import json
import time

import numpy as np
from PIL import Image


def png(size: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def measure(size: int, images: int = 32, reps: int = 5) -> dict:
    from service import codec
    from service.jobs import Job
    from service.serialization import dump_job, load_job

    blobs = [png(size, i) for i in range(images)]
    pixels = codec.decode_images(blobs, size, 1 << 26, 1 << 26)
    one = len(dump_job(Job("m", "tokenize", {"images": pixels[:1], "n": 1})))
    job = Job("m", "tokenize", {"images": pixels, "n": images})
    many = len(dump_job(job))
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        load_job(dump_job(job))
        best = min(best, time.perf_counter() - t0)
    return {
        "image_size": size,
        "dtype": str(pixels.dtype),
        "entry_bytes_1_image": one,
        f"entry_bytes_{images}_images": many,
        "bytes_per_image": many / images,
        f"dump_load_ms_{images}_images": best * 1000,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="64,256", help="image sizes (px), comma-separated")
    args = p.parse_args()
    for size in (int(s) for s in args.sizes.split(",")):
        print(json.dumps(measure(size)))


if __name__ == "__main__":
    main()
