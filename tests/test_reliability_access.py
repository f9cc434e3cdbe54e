"""Access control and hostile input against real processes (``softvq serve --redis``) over
real sockets.

- API keys: 401 without a valid bearer token (probes stay open); the per-key token bucket
  lives in Redis, so TWO API processes share it: the second replica sees what the first one
  spent. CORS comes from configuration, on successes and refusals alike.
- Model directories are confined to SOFTVQ_MODEL_ROOT: a configuration escaping it (``..``
  or a symlink) is refused at start-up; a model name in a request is only a registry key.
- Hostile input is refused with a 4xx before anything is queued (these APIs have no worker at
  all, and the job streams stay empty): a Content-Length over the limit is answered 413
  before a byte of the body is sent, a streamed body is cut off soon after the limit, a PNG
  whose header claims 50 000 x 50 000 pixels is refused from its header, deeply nested JSON,
  wrong content types and malformed multipart get their 4xx.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import subprocess
import time
import zlib

import httpx
import pytest
import redis

from loadtests.soak import Stack, softvq_command
from tests.tiny_models import save_tiny_pair

pytestmark = pytest.mark.redis

KEYS = ["key-a", "key-b"]
ORIGIN = "https://app.example"
BODY_LIMIT = 1_000_000


def wait_healthy(stack: Stack, name: str, timeout: float = 120) -> None:
    stack._wait(
        lambda: httpx.get(f"{stack.url(name)}/healthz", timeout=2).status_code == 200,
        timeout,
        f"{name} alive",
    )


@pytest.fixture(scope="module")
def replicas(api_env, tmp_path_factory):
    """Two API processes on one Redis, API keys, a shared rate limit and CORS; no worker."""
    env = {
        **api_env,
        "SOFTVQ_API_KEYS": json.dumps(KEYS),
        "SOFTVQ_RATE_LIMIT_PER_S": "0.05",
        "SOFTVQ_RATE_LIMIT_BURST": "3",
        "SOFTVQ_CORS_ORIGINS": json.dumps([ORIGIN]),
        "SOFTVQ_MAX_BODY_BYTES": str(BODY_LIMIT),
    }
    stack = Stack(env, tmp_path_factory.mktemp("replicas"))
    try:
        stack.redis.start()
        stack.spawn_api("api1")
        stack.spawn_api("api2")
        wait_healthy(stack, "api1")
        wait_healthy(stack, "api2")
        yield stack
    finally:
        for name in stack.procs:
            print(f"--- {name} ---\n{stack.log(name, 1500)}")
        stack.close()


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# --- API keys, shared rate limit, CORS -----------------------------------------------------------
def test_bearer_key_required_and_rate_limit_shared_by_two_api_processes(replicas):
    one, two = replicas.url("api1"), replicas.url("api2")
    for base in (one, two):
        r = httpx.get(f"{base}/models")
        assert r.status_code == 401 and r.json()["error"] == "unauthorized"
        assert r.headers["www-authenticate"] == "Bearer"
        assert httpx.get(f"{base}/models", headers=auth("nope")).status_code == 401
        assert httpx.get(f"{base}/models", headers={"Authorization": "key-a"}).status_code == 401
        assert httpx.get(f"{base}/healthz").status_code == 200  # probes stay open
    # key-a has a burst of 3, refilled every 20 s: replica 2 sees what replica 1 spent
    codes = [httpx.get(f"{b}/models", headers=auth("key-a")).status_code for b in (one, two, one)]
    assert codes == [200, 200, 200]
    r = httpx.get(f"{two}/models", headers=auth("key-a"))
    assert r.status_code == 429 and r.json()["error"] == "rate_limited"
    assert int(r.headers["retry-after"]) >= 1
    assert httpx.get(f"{one}/models", headers=auth("key-a")).status_code == 429
    # buckets are per key; the bucket is stored under a hash, never the key itself
    assert httpx.get(f"{two}/models", headers=auth("key-b")).status_code == 200
    r = redis.Redis.from_url(replicas.redis_url)
    names = [k.decode() for k in r.scan_iter("softvq:ratelimit:*")]
    r.close()
    assert len(names) == 2 and not any(k in n for n in names for k in KEYS)


def test_cors_from_configuration_on_answers_and_refusals(replicas):
    base = replicas.url("api1")
    pre = httpx.options(
        f"{base}/generate",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "Authorization, Content-Type",
        },
    )
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in pre.headers["access-control-allow-headers"].lower()
    # a refusal carries the header too, so a browser app can read why
    r = httpx.get(f"{base}/models", headers={"Origin": ORIGIN})
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == ORIGIN
    r = httpx.get(f"{base}/healthz", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers
    pre = httpx.options(
        f"{base}/generate",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-origin" not in pre.headers


# --- hostile input, over real sockets ------------------------------------------------------------
def raw_request(port: int, head: bytes, body_chunks=(), read_timeout: float = 10) -> tuple:
    """Send ``head`` then the chunks (stopping early if the server answers or closes);
    returns (status, response bytes, body bytes sent)."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as s:
        s.sendall(head)
        s.setblocking(False)
        answer = b""
        for chunk in body_chunks:
            try:
                answer += s.recv(65536)
            except BlockingIOError:
                pass
            if answer:
                break
            try:
                s.sendall(chunk)
                sent += len(chunk)
            except (BrokenPipeError, ConnectionResetError, BlockingIOError):
                break
        s.setblocking(True)
        s.settimeout(read_timeout)
        try:
            while b"\r\n\r\n" not in answer or len(answer) < answer.find(b"\r\n\r\n") + 4 + 10:
                data = s.recv(65536)
                if not data:
                    break
                answer += data
        except (TimeoutError, ConnectionResetError):
            pass
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1") else None
    return status, answer, sent


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (with a few bytes of image data)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(bytes(1 + 3 * 64))
    sig = b"\x89PNG\r\n\x1a\n"
    return sig + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def open_api(api_env, tmp_path_factory):
    """One API process without keys or rate limits (hostile bodies need a free pass), no
    worker: anything that reached a queue would sit in Redis, where the test looks."""
    env = {**api_env, "SOFTVQ_MAX_BODY_BYTES": str(BODY_LIMIT), "SOFTVQ_MAX_IMAGE_BYTES": "500000"}
    stack = Stack(env, tmp_path_factory.mktemp("open-api"))
    try:
        stack.redis.start()
        stack.spawn_api("api")
        wait_healthy(stack, "api")
        yield stack
    finally:
        print(stack.log("api", 1500))
        stack.close()


def test_hostile_bodies_get_4xx_and_nothing_is_queued(open_api):
    base, port = open_api.url(), open_api.ports["api"]
    bomb = png_claiming(50_000, 50_000)
    rss_before = open_api.rss_bytes("api")

    # Content-Length over the limit: 413 with nothing of the body sent
    head = (
        f"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {10**9}\r\n\r\n"
    ).encode()
    t0 = time.monotonic()
    status, answer, _ = raw_request(port, head)
    assert status == 413 and b"body_too_large" in answer, answer[:300]
    assert time.monotonic() - t0 < 5

    # a chunked body that never ends: 413 soon after the limit, the rest is never read
    head = (
        b"POST /decode HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    piece = b"A" * 65536
    chunks = (b"%x\r\n%s\r\n" % (len(piece), piece) for _ in range(64 * BODY_LIMIT // len(piece)))
    status, answer, sent = raw_request(port, head, chunks)
    assert status == 413 and b"body_too_large" in answer, answer[:300]
    # What the client gets out before the cut-off includes the loopback socket buffers
    # (several MB with autotuning); a server that read the whole body would take all 64 MB.
    assert sent < 16 * BODY_LIMIT, sent

    cases = [
        # (request kwargs, status, error code)
        (
            {"json": {"images": [base64.b64encode(bomb).decode()]}},
            422,
            "image_too_many_pixels",
        ),
        ({"files": [("image", ("bomb.png", bomb, "image/png"))]}, 422, "image_too_many_pixels"),
        (
            {"content": b"[" * 100_000, "headers": {"content-type": "application/json"}},
            400,
            "invalid_json",
        ),
        (
            {"content": b'{"a":' * 50_000, "headers": {"content-type": "application/json"}},
            400,
            "invalid_json",
        ),
        ({"content": b"<xml/>", "headers": {"content-type": "application/xml"}}, 415, None),
        ({"content": b"images=1", "headers": {"content-type": "text/plain"}}, 415, None),
        (
            {
                "content": b'--b\r\nContent-Disposition: form-data; name="image"\r\n\r\nabc',
                "headers": {"content-type": "multipart/form-data; boundary=b"},
            },
            None,
            None,
        ),
        (
            {"content": b"garbage", "headers": {"content-type": "multipart/form-data"}},
            None,
            None,
        ),
    ]
    with httpx.Client(base_url=base, timeout=30) as c:
        for kwargs, status, code in cases:
            for path in ("/tokenize", "/reconstruct"):
                t0 = time.monotonic()
                resp = c.post(path, **kwargs)
                what = (path, str(kwargs)[:80], resp.status_code, resp.text[:200])
                assert 400 <= resp.status_code < 500, what
                if status is not None:
                    assert resp.status_code == status, what
                body = resp.json()
                assert set(body) == {"error", "message"}, what
                if code is not None:
                    assert body["error"] == code, what
                assert time.monotonic() - t0 < 10, what
        # nested JSON and a wrong type on the JSON-only endpoints too
        for path in ("/decode", "/generate"):
            resp = c.post(
                path, content=b"[" * 100_000, headers={"content-type": "application/json"}
            )
            assert 400 <= resp.status_code < 500, (path, resp.text[:200])
        assert (
            c.post("/decode", json={"tokens": [[[1.0] * 8] * 8], "model": "../../etc"}).json()[
                "error"
            ]
            == "unknown_model"
        )
        assert c.get("/healthz").status_code == 200

    # nothing reached a queue, and the bomb never expanded in the API's memory
    r = redis.Redis.from_url(open_api.redis_url)
    assert sum(r.xlen(k) for k in r.scan_iter("softvq:jobs:*")) == 0
    r.close()
    assert open_api.rss_bytes("api") - rss_before < 100 * 2**20  # 50k x 50k RGB is 7.5 GB


# --- model directories confined to the root -------------------------------------------------------
def test_model_dirs_outside_the_root_are_refused_at_start(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    save_tiny_pair(outside, "tiny")
    save_tiny_pair(root, "ok")
    (root / "link").symlink_to(outside / "tiny")  # inside by name, outside in fact
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("SOFTVQ_")}
    base_env |= {"SOFTVQ_MODEL_ROOT": str(root), "SOFTVQ_DEVICE": "cpu", "SOFTVQ_BACKEND": "eager"}
    for escape in ("../outside/tiny", str(outside / "tiny"), "link"):
        env = {**base_env, "SOFTVQ_TOKENIZERS": json.dumps({"t": escape})}
        p = subprocess.run(
            [*softvq_command(), "serve", "--port", "1"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert p.returncode == 2, (escape, p.returncode, p.stderr[-500:])
        assert "outside model_root" in p.stderr, p.stderr[-500:]
