"""Every endpoint through FastAPI's TestClient: the real app, the in-process broker and tiny
random models (real math). Answers are checked against direct model calls."""

from __future__ import annotations

import base64
import io
import time

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

import model
from model.images import load_image
from service.app import create_app


def png(seed: int, w: int = 40, h: int = 36, fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def wait_ready(client: TestClient, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if client.get("/readyz").status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError(f"not ready: {client.get('/readyz').json()}")


def decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.fixture(scope="module")
def client(api_settings_factory):
    app = create_app(api_settings_factory())
    with TestClient(app) as c:
        wait_ready(c)
        yield c


@pytest.fixture(scope="module")
def tok(api_model_root):
    return model.load_tokenizer(api_model_root / "tiny")


@pytest.fixture(scope="module")
def gen(api_model_root):
    return model.load_generator(api_model_root / "sit-tiny")


# --- probes, models, docs, metrics -------------------------------------------------------
def test_health_ready_models_docs(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}
    info = client.get("/models").json()
    toks = {t["name"]: t for t in info["tokenizers"]}
    gens = {g["name"]: g for g in info["generators"]}
    assert set(toks) == {"tiny", "tiny16"} and set(gens) == {"sit-tiny", "sit-tiny16"}
    assert toks["tiny16"]["num_tokens"] == 16 and toks["tiny"]["token_dim"] == 8
    assert gens["sit-tiny"]["num_classes"] == 10 and gens["sit-tiny"]["tokenizer"] == "tiny"
    for entry in [*toks.values(), *gens.values()]:
        assert {"image_size", "backend", "device", "dtype"} <= set(entry)
        assert (entry["backend"], entry["device"], entry["dtype"]) == ("eager", "cpu", "float32")
        assert entry["workers"] == 1  # embedded: this process
    (me,) = client.get("/workers").json()["workers"]
    assert me["id"] == "embedded" and me["busy"] is False and me["batches"] >= 0
    assert set(me["served"]) == {*toks, *gens}
    assert me["served"]["sit-tiny"] == {"backend": "eager", "device": "cpu", "dtype": "float32"}
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/tokenize", "/decode", "/reconstruct", "/generate", "/models", "/workers"} <= set(
        paths
    )
    body = paths["/tokenize"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(body)


def test_metrics_count_requests_and_errors(client):
    client.post("/tokenize", json={"images": [b64(png(0))]})
    client.post("/tokenize", json={"images": [b64(png(0))], "model": "no-such-model"})
    text = client.get("/metrics").text
    assert 'softvq_requests_total{endpoint="/tokenize",model="tiny",status="200"}' in text
    assert 'softvq_requests_total{endpoint="/tokenize",model="",status="404"}' in text
    assert 'softvq_request_duration_seconds_count{endpoint="/tokenize",model="tiny"}' in text
    assert 'softvq_queue_depth{model="tiny",task="tokenize"} 0.0' in text
    assert "softvq_model_info{" in text


def test_request_id_echoed_or_made(client):
    r = client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    made = client.get("/healthz").headers["x-request-id"]
    assert len(made) == 32 and made != client.get("/healthz").headers["x-request-id"]
    big = client.post("/tokenize", content=b"x" * 2_000_000, headers={"X-Request-ID": "r1"})
    assert big.status_code == 413 and big.headers["x-request-id"] == "r1"
    odd = client.get("/healthz", headers={"X-Request-ID": "x" * 500})
    assert odd.headers["x-request-id"] != "x" * 500


# --- /tokenize ------------------------------------------------------------------------------
def test_tokenize_equals_direct_model_call(client, tok):
    blobs = [png(1), png(2, 64, 20), png(3, fmt="JPEG"), png(4, fmt="WEBP")]
    r = client.post("/tokenize", json={"images": [b64(b) for b in blobs]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "tiny" and body["shape"] == [4, 8, 8] and body["dtype"] == "float32"
    images = torch.stack([load_image(b, 32) for b in blobs])
    with torch.inference_mode():
        want, want_idx = tok.encode(images, return_indices=True)
    got = np.asarray(body["tokens"], dtype=np.float32)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5)
    assert np.asarray(body["indices"]).shape == (4, 4, 2)
    assert (np.asarray(body["indices"]) == want_idx.numpy()).mean() > 0.95  # ties may flip


def test_avif_and_heic_are_tokenized_as_the_cli_reads_them(client, tok):
    blobs = [png(11, fmt="AVIF"), png(12, 48, 64, fmt="HEIF")]
    r = client.post("/tokenize", json={"images": [b64(b) for b in blobs]})
    assert r.status_code == 200, r.text
    with torch.inference_mode():
        want = tok.encode(torch.stack([load_image(b, 32) for b in blobs]))
    np.testing.assert_allclose(np.asarray(r.json()["tokens"], np.float32), want.numpy(), atol=1e-5)


def test_a_phone_photo_is_tokenized_as_it_is_shown(client):
    """A JPEG from a phone held upright is stored sideways with an EXIF orientation tag (6);
    the service reads it as browsers show it: the same tokens as the upright image."""
    stored = np.random.default_rng(9).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    tagged, upright, sideways = io.BytesIO(), io.BytesIO(), io.BytesIO()
    Image.fromarray(stored).save(tagged, "PNG", exif=exif)
    Image.fromarray(np.ascontiguousarray(np.rot90(stored, -1))).save(upright, "PNG")
    Image.fromarray(stored).save(sideways, "PNG")  # the stored pixels, no tag
    blobs = [b64(b.getvalue()) for b in (tagged, upright, sideways)]
    r = client.post("/tokenize", json={"images": blobs})
    assert r.status_code == 200, r.text
    tokens = np.asarray(r.json()["tokens"], dtype=np.float32)
    np.testing.assert_array_equal(tokens[0], tokens[1])
    assert not np.array_equal(tokens[0], tokens[2])


def test_tokenize_base64_format_and_multipart(client, tok):
    blobs = [png(5), png(6)]
    as_list = client.post("/tokenize", json={"images": [b64(b) for b in blobs]}).json()
    r = client.post("/tokenize", json={"images": [b64(b) for b in blobs], "format": "base64"})
    body = r.json()
    assert "tokens" not in body and body["shape"] == [2, 8, 8]
    raw = np.frombuffer(base64.b64decode(body["tokens_b64"]), dtype="<f4").reshape(body["shape"])
    np.testing.assert_array_equal(raw, np.asarray(as_list["tokens"], dtype=np.float32))

    files = [
        ("image", ("a.png", blobs[0], "image/png")),
        ("image", ("b.png", blobs[1], "image/png")),
    ]
    r = client.post("/tokenize", files=files, data={"model": "tiny"})
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(
        np.asarray(r.json()["tokens"], dtype=np.float32),
        np.asarray(as_list["tokens"], dtype=np.float32),
    )


def test_tokenize_second_model_by_name(client):
    r = client.post("/tokenize", json={"images": [b64(png(7))], "model": "tiny16"})
    assert r.status_code == 200
    assert r.json()["model"] == "tiny16" and r.json()["shape"] == [1, 16, 8]


# --- /decode ---------------------------------------------------------------------------------
def test_decode_list_and_b64_equal_direct_model(client, tok):
    tokens = torch.randn(2, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = model.images.tensor_to_uint8(tok.decode(tokens))
    r = client.post("/decode", json={"tokens": tokens.tolist()})
    assert r.status_code == 200, r.text
    imgs = [decode_png(base64.b64decode(s)) for s in r.json()["images"]]
    assert len(imgs) == 2 and imgs[0].shape == (32, 32, 3)
    assert np.abs(np.stack(imgs).astype(int) - want.astype(int)).max() <= 1

    for dtype, np_dtype in (("float32", "<f4"), ("float16", "<f2"), ("float64", "<f8")):
        raw = tokens.numpy().astype(np_dtype).tobytes()
        r = client.post(
            "/decode", json={"tokens_b64": b64(raw), "shape": [2, 8, 8], "dtype": dtype}
        )
        assert r.status_code == 200, (dtype, r.text)
        got = np.stack([decode_png(base64.b64decode(s)) for s in r.json()["images"]])
        assert np.abs(got.astype(int) - want.astype(int)).max() <= (1 if dtype != "float16" else 8)
    # bfloat16: the top 16 bits of float32
    bf16 = (tokens.numpy().astype("<f4").view("<u4") >> 16).astype("<u2").tobytes()
    r = client.post(
        "/decode", json={"tokens_b64": b64(bf16), "shape": [2, 8, 8], "dtype": "bfloat16"}
    )
    assert r.status_code == 200 and len(r.json()["images"]) == 2


def test_decode_accept_png_gives_grid(client):
    tokens = np.zeros((3, 8, 8)).tolist()
    r = client.post("/decode", json={"tokens": tokens}, headers={"Accept": "image/png"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    grid = Image.open(io.BytesIO(r.content))
    assert grid.size == (3 * 34 + 2, 36)  # make_grid: 3 columns of 32 px with 2 px padding
    r = client.post("/decode", json={"tokens": tokens[:1]}, headers={"Accept": "image/png"})
    assert Image.open(io.BytesIO(r.content)).size == (32, 32)


# --- /reconstruct ----------------------------------------------------------------------------
def test_reconstruct_json_png_and_multipart(client, tok):
    blobs = [png(8), png(9)]
    r = client.post("/reconstruct", json={"images": [b64(b) for b in blobs]})
    assert r.status_code == 200, r.text
    body = r.json()
    images = torch.stack([load_image(b, 32) for b in blobs])
    with torch.inference_mode():
        rec = tok.decode(tok.encode(images))
    want_psnr = model.images.psnr(rec, images)
    np.testing.assert_allclose(body["psnr"], want_psnr, atol=0.05)
    got = np.stack([decode_png(base64.b64decode(s)) for s in body["images"]])
    assert np.abs(got.astype(int) - model.images.tensor_to_uint8(rec).astype(int)).max() <= 1

    r = client.post(
        "/reconstruct",
        files=[("image", ("x.png", blobs[0], "image/png"))],
        headers={"Accept": "image/png"},
    )
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size == (32, 32)
    assert float(r.headers["x-psnr"]) == pytest.approx(want_psnr[0], abs=0.05)


# --- /generate ---------------------------------------------------------------------------------
def test_generate_matches_direct_pipeline(client, tok, gen):
    req = {
        "class_labels": [3, 7],
        "seed": 11,
        "steps": 4,
        "sampler": "heun",
        "cfg_scale": 2.0,
        "guidance_interval": [0.0, 0.8],
    }
    r = client.post("/generate", json=req)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["seeds"] == [11, 12] and body["class_labels"] == [3, 7]
    assert body["parameters"] == {
        "steps": 4,
        "sampler": "heun",
        "cfg_scale": 2.0,
        "guidance_interval": [0.0, 0.8],
        "path": "linear",
    }
    want = model.images.tensor_to_uint8(
        model.generate(
            tok,
            gen,
            [3, 7],
            [11, 12],
            steps=4,
            sampler="heun",
            cfg_scale=2.0,
            guidance_interval=(0.0, 0.8),
        )
    )
    got = np.stack([decode_png(base64.b64decode(s)) for s in body["images"]])
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 2
    # deterministic: the same request gives the same images
    again = client.post("/generate", json=req).json()
    assert again["images"] == body["images"]


def test_generate_defaults_random_classes_and_seeds(client):
    r = client.post("/generate", json={"steps": 2})
    body = r.json()
    assert r.status_code == 200 and len(body["images"]) == 1 and len(body["seeds"]) == 1
    assert body["parameters"]["sampler"] == "euler" and body["parameters"]["cfg_scale"] == 1.0
    assert body["model"] == "sit-tiny"

    a = client.post("/generate", json={"num_images": 4, "seed": 5, "steps": 2}).json()
    b = client.post("/generate", json={"num_images": 4, "seed": 5, "steps": 2}).json()
    assert a["class_labels"] == b["class_labels"] and a["seeds"] == [5, 6, 7, 8]
    assert all(0 <= c < 10 for c in a["class_labels"])
    # image i depends on its own seed only: seeds [6] alone reproduces image 1 of the batch
    one = client.post(
        "/generate", json={"class_labels": [a["class_labels"][1]], "seeds": [6], "steps": 2}
    ).json()
    x = decode_png(base64.b64decode(one["images"][0])).astype(int)
    y = decode_png(base64.b64decode(a["images"][1])).astype(int)
    assert np.abs(x - y).max() <= 2

    r = client.post(
        "/generate",
        json={"num_images": 2, "model": "sit-tiny16", "steps": 2, "sampler": "euler-maruyama"},
    )
    assert r.status_code == 200 and r.json()["model"] == "sit-tiny16"


def test_generate_accept_png_returns_seeds_in_headers(client):
    r = client.post(
        "/generate",
        json={"class_labels": [1, 2], "seed": 3, "steps": 2},
        headers={"Accept": "image/png"},
    )
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.headers["x-seeds"] == "3,4" and r.headers["x-class-labels"] == "1,2"
    assert Image.open(io.BytesIO(r.content)).size == (2 * 34 + 2, 36)
    # JSON preferred by q-value -> JSON
    r = client.post(
        "/generate", json={"steps": 2}, headers={"Accept": "image/png;q=0.5, application/json"}
    )
    assert r.headers["content-type"].startswith("application/json")


# --- access: API keys, rate limit, CORS --------------------------------------------------------
def test_api_keys_rate_limit_and_cors(api_settings_factory):
    settings = api_settings_factory(
        api_keys=["secret-1", "secret-2"],
        rate_limit_per_s=0.5,
        rate_limit_burst=3,
        cors_origins=["https://example.test"],
    )
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        assert c.get("/healthz").status_code == 200  # probes stay open
        r = c.get("/models")
        assert r.status_code == 401 and r.json()["error"] == "unauthorized"
        assert c.get("/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        key1 = {"Authorization": "Bearer secret-1"}
        codes = [c.get("/models", headers=key1).status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        r = c.get("/models", headers=key1)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"] == "rate_limited"
        # buckets are per key
        assert c.get("/models", headers={"Authorization": "Bearer secret-2"}).status_code == 200
        # CORS preflight and headers on answers
        r = c.options(
            "/generate",
            headers={"Origin": "https://example.test", "Access-Control-Request-Method": "POST"},
        )
        assert r.headers["access-control-allow-origin"] == "https://example.test"
        r = c.get("/healthz", headers={"Origin": "https://example.test"})
        assert r.headers["access-control-allow-origin"] == "https://example.test"
        r = c.get("/healthz", headers={"Origin": "https://evil.test"})
        assert "access-control-allow-origin" not in r.headers
