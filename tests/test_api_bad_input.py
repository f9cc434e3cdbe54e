"""Every kind of bad input gets its 4xx JSON ``{"error", "message"}`` -- never a 500 -- before
any model work, and the server stays healthy and answers good requests afterwards."""

from __future__ import annotations

import base64
import io
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client import REGISTRY

from service import codec
from service.app import create_app
from tests.test_api import b64, png, wait_ready


def png_header_only(width: int, height: int, mode: str = "1") -> bytes:
    """A valid PNG whose IHDR declares width x height, with an all-zero image that zlib
    shrinks to almost nothing: a decompression bomb. Built row-chunk by row-chunk so the
    test itself never holds the raw pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    bit_depth, color = (1, 0) if mode == "1" else (8, 2)
    row = 1 + (width * (3 if color == 2 else 1) * bit_depth + 7) // 8  # filter byte + pixels
    comp, parts, zero_rows = zlib.compressobj(9), [], bytes(row * 256)
    for _ in range(height // 256):
        parts.append(comp.compress(zero_rows))
    parts.append(comp.compress(bytes(row * (height % 256))))
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", b"".join(parts))
        + chunk(b"IEND", b"")
    )


def noise_png(side: int) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


GOOD = b64(png(0))
TOK8 = np.zeros((1, 8, 8)).tolist()
TRUNCATED = png(1, 64, 64)[: len(png(1, 64, 64)) // 2]
HEIC = png(1, 64, 64, fmt="HEIF")


def flat(width: int, height: int, fmt: str) -> bytes:
    """One colour, so a big picture encodes small (under the byte limit, over the pixel one)."""
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (40, 90, 200)).save(buf, fmt)
    return buf.getvalue()


def _json(path, body):
    return {"method": "POST", "url": path, "json": body}


def _raw(path, content, ctype="application/json"):
    return {"method": "POST", "url": path, "content": content, "headers": {"content-type": ctype}}


# (id, request kwargs, status, error code) -- max_images_per_request 8, max_steps 20,
# max_image_pixels 1e6, max_image_bytes 200 kB, max_body_bytes 1 MB (tests/conftest.py).
CASES = [
    # images
    (
        "non-image bytes",
        _json("/tokenize", {"images": [b64(b"hello, world")]}),
        400,
        "invalid_image",
    ),
    ("truncated png", _json("/reconstruct", {"images": [b64(TRUNCATED)]}), 400, "invalid_image"),
    ("bad base64", _json("/tokenize", {"images": ["@@not base64@@"]}), 400, "invalid_base64"),
    ("empty image", _json("/tokenize", {"images": [""]}), 400, "invalid_image"),
    ("gif refused", _json("/tokenize", {"images": [b64(png(2, fmt="GIF"))]}), 400, "invalid_image"),
    (
        "over pixel limit",
        _json("/tokenize", {"images": [b64(png_header_only(1100, 1000, "RGB"))]}),
        422,
        "image_too_many_pixels",
    ),
    (
        "truncated heic",
        _json("/tokenize", {"images": [b64(HEIC[: len(HEIC) // 2])]}),
        400,
        "invalid_image",
    ),
    (
        "avif over pixel limit",
        _json("/tokenize", {"images": [b64(flat(1100, 1000, "AVIF"))]}),
        422,
        "image_too_many_pixels",
    ),
    (
        "heic over pixel limit",
        _json("/reconstruct", {"images": [b64(flat(1100, 1000, "HEIF"))]}),
        422,
        "image_too_many_pixels",
    ),
    (
        "decompression bomb",
        _json("/reconstruct", {"images": [b64(png_header_only(20000, 20000))]}),
        422,
        "image_too_many_pixels",
    ),
    (
        "image over byte limit",
        _json("/tokenize", {"images": [b64(noise_png(300))]}),
        413,
        "image_too_large",
    ),
    ("too many images", _json("/tokenize", {"images": [GOOD] * 9}), 422, "too_many_images"),
    ("no images", _json("/tokenize", {"images": []}), 422, "invalid_request"),
    ("images not strings", _json("/tokenize", {"images": [1, 2]}), 422, "invalid_request"),
    ("bad format", _json("/tokenize", {"images": [GOOD], "format": "xml"}), 422, "invalid_request"),
    # body
    ("body over limit", _json("/tokenize", {"images": ["A" * 1_200_000]}), 413, "body_too_large"),
    (
        "chunked body over limit",
        {
            "method": "POST",
            "url": "/decode",
            "headers": {"content-type": "application/json"},
            "content": iter([b'{"tokens_b64": "' + b"A" * 600_000, b"A" * 600_000 + b'"}']),
        },
        413,
        "body_too_large",
    ),
    ("deeply nested json", _raw("/tokenize", b"[" * 200_000), 400, "invalid_json"),
    ("deeply nested json (decode)", _raw("/decode", b"[" * 200_000), 400, "invalid_json"),
    ("not json", _raw("/generate", b"{steps: 3"), 422, "invalid_request"),
    ("json array body", _json("/generate", [1, 2, 3]), 422, "invalid_request"),
    ("empty body", _raw("/tokenize", b""), 422, "invalid_request"),
    (
        "wrong content type",
        _raw("/tokenize", b"hello", "text/plain"),
        415,
        "unsupported_media_type",
    ),
    (
        "wrong content type (generate)",
        _raw("/generate", b"steps=3", "text/plain"),
        422,
        "invalid_request",
    ),
    (
        "malformed multipart",
        _raw("/tokenize", b"--xyz\r\ngarbage", "multipart/form-data; boundary=xyz"),
        422,
        "invalid_request",
    ),
    (
        "multipart without boundary",
        _raw("/tokenize", b"--xyz\r\ngarbage", "multipart/form-data"),
        400,
        "bad_request",
    ),
    (
        "multipart without image",
        {
            "method": "POST",
            "url": "/tokenize",
            "data": {"model": "tiny"},
            "files": [("other", ("a.txt", b"x", "text/plain"))],
        },
        422,
        "invalid_request",
    ),
    (
        "multipart too many files",
        {
            "method": "POST",
            "url": "/tokenize",
            "files": [("image", (f"{i}.png", png(0), "image/png")) for i in range(12)],
        },
        400,
        "bad_request",
    ),
    (
        "multipart 9 files",
        {
            "method": "POST",
            "url": "/tokenize",
            "files": [("image", (f"{i}.png", png(0), "image/png")) for i in range(9)],
        },
        422,
        "too_many_images",
    ),
    (
        "multipart bad field",
        {
            "method": "POST",
            "url": "/tokenize",
            "data": {"format": "xml"},
            "files": [("image", ("a.png", png(0), "image/png"))],
        },
        422,
        "invalid_request",
    ),
    ("unknown field", _json("/generate", {"cfg": 3.0}), 422, "invalid_request"),
    ("negative timeout", _json("/generate", {"timeout_s": -1}), 422, "invalid_request"),
    # unknown models
    (
        "unknown tokenizer",
        _json("/tokenize", {"images": [GOOD], "model": "nope"}),
        404,
        "unknown_model",
    ),
    (
        "unknown tokenizer (decode)",
        _json("/decode", {"tokens": TOK8, "model": "../../etc"}),
        404,
        "unknown_model",
    ),
    ("unknown generator", _json("/generate", {"model": "sit-nope"}), 404, "unknown_model"),
    ("tokenizer name as generator", _json("/generate", {"model": "tiny"}), 404, "unknown_model"),
    # tokens
    (
        "tokens wrong L",
        _json("/decode", {"tokens": np.zeros((1, 7, 8)).tolist()}),
        422,
        "invalid_tokens",
    ),
    (
        "tokens wrong D",
        _json("/decode", {"tokens": np.zeros((1, 8, 9)).tolist()}),
        422,
        "invalid_tokens",
    ),
    (
        "tokens of other model",
        _json("/decode", {"tokens": TOK8, "model": "tiny16"}),
        422,
        "invalid_tokens",
    ),
    (
        "tokens ragged",
        _json("/decode", {"tokens": [[[0.0] * 8] * 7 + [[0.0] * 3]]}),
        422,
        "invalid_tokens",
    ),
    ("tokens 2-D", _json("/decode", {"tokens": [[0.0] * 8] * 8}), 422, "invalid_request"),
    (
        "tokens NaN",
        _raw(
            "/decode",
            b'{"tokens": [['
            + b",".join([b"[NaN" + b",0" * 7 + b"]"] + [b"[" + b",".join([b"0"] * 8) + b"]"] * 7)
            + b"]]}",
        ),
        422,
        "invalid_tokens",
    ),
    (
        "tokens Infinity",
        _raw(
            "/decode",
            b'{"tokens": [['
            + b",".join([b"[1e400" + b",0" * 7 + b"]"] + [b"[" + b",".join([b"0"] * 8) + b"]"] * 7)
            + b"]]}",
        ),
        422,
        "invalid_tokens",
    ),
    (
        "too many token sets",
        _json("/decode", {"tokens": np.zeros((9, 8, 8)).tolist()}),
        422,
        "too_many_images",
    ),
    (
        "tokens and tokens_b64",
        _json("/decode", {"tokens": TOK8, "tokens_b64": "AAAA", "shape": [1, 8, 8]}),
        422,
        "invalid_tokens",
    ),
    ("no tokens", _json("/decode", {}), 422, "invalid_tokens"),
    (
        "tokens_b64 wrong size",
        _json("/decode", {"tokens_b64": b64(bytes(100)), "shape": [1, 8, 8]}),
        422,
        "invalid_tokens",
    ),
    (
        "tokens_b64 no shape",
        _json("/decode", {"tokens_b64": b64(bytes(256))}),
        422,
        "invalid_tokens",
    ),
    (
        "tokens_b64 bad dtype",
        _json("/decode", {"tokens_b64": b64(bytes(256)), "shape": [1, 8, 8], "dtype": "int8"}),
        422,
        "invalid_request",
    ),
    (
        "tokens_b64 NaN",
        _json(
            "/decode",
            {"tokens_b64": b64(np.full((1, 8, 8), np.nan, "<f4").tobytes()), "shape": [1, 8, 8]},
        ),
        422,
        "invalid_tokens",
    ),
    (
        "tokens_b64 bad base64",
        _json("/decode", {"tokens_b64": "!!!!", "shape": [1, 8, 8]}),
        400,
        "invalid_base64",
    ),
    # generate parameters
    ("class id too big", _json("/generate", {"class_labels": [10]}), 422, "invalid_class"),
    ("class id negative", _json("/generate", {"class_labels": [-1]}), 422, "invalid_class"),
    ("steps 0", _json("/generate", {"steps": 0}), 422, "invalid_request"),
    ("steps over max", _json("/generate", {"steps": 21}), 422, "invalid_steps"),
    ("unknown sampler", _json("/generate", {"sampler": "ddim"}), 422, "unknown_sampler"),
    ("too many images (generate)", _json("/generate", {"num_images": 9}), 422, "too_many_images"),
    (
        "too many class labels",
        _json("/generate", {"class_labels": [0] * 9}),
        422,
        "too_many_images",
    ),
    (
        "num_images mismatch",
        _json("/generate", {"class_labels": [1, 2], "num_images": 3}),
        422,
        "invalid_request",
    ),
    ("negative cfg", _json("/generate", {"cfg_scale": -1}), 422, "invalid_request"),
    ("NaN cfg", _raw("/generate", b'{"cfg_scale": NaN}'), 422, "invalid_request"),
    (
        "guidance interval reversed",
        _json("/generate", {"guidance_interval": [0.8, 0.2]}),
        422,
        "invalid_guidance_interval",
    ),
    (
        "guidance interval out of [0,1]",
        _json("/generate", {"guidance_interval": [0, 2]}),
        422,
        "invalid_guidance_interval",
    ),
    (
        "guidance interval 3 values",
        _json("/generate", {"guidance_interval": [0, 0.5, 1]}),
        422,
        "invalid_request",
    ),
    (
        "seeds count mismatch",
        _json("/generate", {"class_labels": [1, 2], "seeds": [1]}),
        422,
        "invalid_seeds",
    ),
    ("seed and seeds", _json("/generate", {"seed": 1, "seeds": [1]}), 422, "invalid_request"),
    ("negative seed", _json("/generate", {"seed": -5}), 422, "invalid_request"),
    ("huge seed", _json("/generate", {"seed": 2**70}), 422, "invalid_request"),
    (
        "seed overflow",
        _json("/generate", {"seed": 2**63 - 1, "num_images": 2}),
        422,
        "invalid_seeds",
    ),
    # routing
    ("wrong method", {"method": "GET", "url": "/tokenize"}, 405, "method_not_allowed"),
    ("unknown path", {"method": "GET", "url": "/admin"}, 404, "not_found"),
]


@pytest.fixture(scope="module")
def client(api_settings_factory):
    with TestClient(create_app(api_settings_factory())) as c:
        wait_ready(c)
        yield c


def batches_run() -> float:
    """Model batches run so far by this process' brokers (softvq_batch_size observations)."""
    total = 0.0
    for metric in REGISTRY.collect():
        if metric.name == "softvq_batch_size":
            total += sum(s.value for s in metric.samples if s.name == "softvq_batch_size_count")
    return total


@pytest.mark.parametrize("name,kwargs,status,code", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_before_model_work(client, name, kwargs, status, code):
    before = batches_run()
    r = client.request(**kwargs)
    assert r.status_code == status, (r.status_code, r.text[:300])
    body = r.json()
    assert set(body) == {"error", "message"} and body["error"] == code, body
    assert body["message"]
    assert batches_run() == before  # nothing reached a model

    # still healthy, and a good request is unharmed
    assert client.get("/healthz").status_code == 200
    # (no-cache: the point is that the model still runs, not that the cache answers)
    good = client.post("/tokenize", json={"images": [GOOD]}, headers={"Cache-Control": "no-cache"})
    assert good.status_code == 200 and good.json()["shape"] == [1, 8, 8]
    assert batches_run() > before


def test_expired_deadline_is_504(client):
    r = client.post("/generate", json={"num_images": 8, "steps": 20, "timeout_s": 0.0001})
    assert r.status_code == 504 and r.json()["error"] == "timeout"
    assert client.post("/generate", json={"steps": 2}).status_code == 200


def test_pixel_limit_checked_before_decoding(api_settings_factory):
    """The limit refuses from the header: an image just over it is refused although its
    pixels would decode fine, and one at the limit is accepted."""
    settings = api_settings_factory(max_image_pixels=64 * 64, max_image_bytes=10**6)
    pillow_limit = Image.MAX_IMAGE_PIXELS  # create_app sets Pillow's (process-wide) guard
    try:
        with TestClient(create_app(settings)) as c:
            wait_ready(c)
            ok = c.post("/tokenize", json={"images": [b64(png(0, 64, 64))]})
            assert ok.status_code == 200
            r = c.post("/tokenize", json={"images": [b64(png(0, 65, 64))]})
            assert r.status_code == 422 and r.json()["error"] == "image_too_many_pixels"
    finally:
        Image.MAX_IMAGE_PIXELS = pillow_limit


def test_base64_variants_accepted(client):
    data = png(3)
    urlsafe = base64.urlsafe_b64encode(data).decode().rstrip("=")
    data_url = "data:image/png;base64," + base64.b64encode(data).decode()
    wrapped = "\n".join(b64(data)[i : i + 76] for i in range(0, len(b64(data)), 76))
    tokens = [
        client.post("/tokenize", json={"images": [s]}).json()["tokens"]
        for s in (b64(data), urlsafe, data_url, wrapped)
    ]
    assert all(t == tokens[0] for t in tokens)


# --- fuzzing: random JSON at every endpoint never gets a 5xx --------------------------------
FIELDS = {
    "/tokenize": ["images", "model", "format", "timeout_s"],
    "/reconstruct": ["images", "model", "timeout_s"],
    "/decode": ["tokens", "tokens_b64", "shape", "dtype", "model", "timeout_s"],
    "/generate": [
        "class_labels",
        "num_images",
        "seed",
        "seeds",
        "steps",
        "sampler",
        "cfg_scale",
        "guidance_interval",
        "model",
        "timeout_s",
    ],
}


def _json_values():
    from hypothesis import strategies as st

    scalars = (
        st.none()
        | st.booleans()
        | st.integers(-(2**70), 2**70)
        | st.floats(allow_nan=True, allow_infinity=True)
        | st.text(max_size=20)
        | st.sampled_from(["tiny", "sit-tiny", "euler", "heun", "base64", GOOD, "AAAA"])
    )
    return st.recursive(
        scalars,
        lambda c: st.lists(c, max_size=6) | st.dictionaries(st.text(max_size=8), c, max_size=4),
        max_leaves=30,
    )


@pytest.mark.parametrize("path", sorted(FIELDS))
def test_fuzzed_json_never_5xx(client, path):
    import json as jsonlib

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    values = _json_values()
    bodies = st.dictionaries(st.sampled_from(FIELDS[path]), values, max_size=5) | values

    @settings(
        max_examples=50,
        deadline=None,
        derandomize=True,
        database=None,  # no .hypothesis/ folder in the repository
        suppress_health_check=list(HealthCheck),
    )
    @given(body=bodies)
    def check(body):
        # json.dumps writes NaN / Infinity literals, which the server must also survive
        r = client.post(
            path, content=jsonlib.dumps(body), headers={"content-type": "application/json"}
        )
        assert r.status_code < 500, (body, r.status_code, r.text[:300])
        if r.status_code >= 400:
            assert set(r.json()) == {"error", "message"}

    check()
    assert client.get("/healthz").status_code == 200


def test_fuzzed_image_bytes_never_5xx(client):
    """Mangled PNG / JPEG / WebP bytes (real headers, random damage) reach Pillow's decoders:
    every failure is a 4xx, never a 500."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    seeds = [png(7, 20, 20, fmt) for fmt in ("PNG", "JPEG", "WEBP")]

    @st.composite
    def mangled(draw):
        data = bytearray(draw(st.sampled_from(seeds)))
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
        return bytes(data[: draw(st.integers(8, len(data)))])

    @settings(
        max_examples=50,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(data=mangled())
    def check(data):
        r = client.post("/tokenize", files=[("image", ("x", data, "application/octet-stream"))])
        assert r.status_code in (200, 400, 413, 422), (r.status_code, r.text[:200])

    check()
    assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize("limit", [1, 3])
def test_a_burst_of_uploads_decodes_a_bounded_number_at_a_time(
    limit, api_settings_factory, monkeypatch
):
    """Each decode of a large upload holds hundreds of MB: a burst of eight requests decodes
    ``max_concurrent_decodes`` at a time, the others wait, and every one is answered."""
    inside, most, lock = 0, 0, threading.Lock()
    decode = codec.decode_images

    def watched(*args):  # the real decode, counted (and held long enough to overlap)
        nonlocal inside, most
        with lock:
            inside += 1
            most = max(most, inside)
        try:
            time.sleep(0.2)
            return decode(*args)
        finally:
            with lock:
                inside -= 1

    monkeypatch.setattr(codec, "decode_images", watched)
    settings = api_settings_factory(max_concurrent_decodes=limit)
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        with ThreadPoolExecutor(8) as pool:
            codes = list(
                pool.map(
                    lambda i: c.post("/tokenize", json={"images": [b64(png(i))]}).status_code,
                    range(8),
                )
            )
    assert codes == [200] * 8
    assert most == limit if limit == 1 else 1 < most <= limit
