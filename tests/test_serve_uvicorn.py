"""``softvq serve`` as a real process under uvicorn on a free port, tiny models from SOFTVQ_*
environment variables, every endpoint over real HTTP (httpx); a client that disconnects has
its queued work dropped; SIGTERM finishes in-flight requests before exiting."""

from __future__ import annotations

import base64
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

from tests.redis_server import free_port
from tests.test_api import b64, decode_png, png


def softvq_command() -> list[str]:
    exe = shutil.which("softvq")
    return [exe] if exe else [sys.executable, "-m", "service.cli"]


def wait_http_ready(base: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("server not ready in time")


@contextlib.contextmanager
def serve_process(env: dict[str, str], log_dir, args: tuple[str, ...] = ()):
    """``softvq serve [args]`` on a free port with ``env``; yields (base URL, process) once
    /readyz answers 200. On exit: SIGTERM (kill after 30 s) and the log's tail printed."""
    port = free_port()
    log = open(log_dir / "serve.log", "w+")
    proc = subprocess.Popen(
        [*softvq_command(), "serve", "--port", str(port), "--log-level", "warning", *args],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http_ready(base, proc)
        yield base, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.seek(0)
        print(log.read()[-3000:])
        log.close()


def metric(text: str, name: str, **labels) -> float:
    """The value of one sample in Prometheus text output (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        m = re.match(r"^(\w+)(\{[^}]*\})? (\S+)$", line)
        if m and m.group(1) == name and (m.group(2) or "{}")[1:-1] == want:
            return float(m.group(3))
    return 0.0


def steps_for(base: str, seconds: float, lo: int = 20, hi: int = 5000) -> int:
    """Sampling steps that make one /generate image take about ``seconds`` on this machine
    now (timed through the API, so tests hold the model long enough on any CPU).

    The first call is thrown away (it may load, compile or page in the model: timed as a
    step cost it made every job far too short); each length is timed twice and the faster
    taken (a neighbour's burst only ever slows a call); the long length grows until the
    difference is at least 0.3 s, so HTTP noise of tens of ms cannot dominate it. The
    result cache is skipped: a hit would time nothing."""

    def timed(steps: int) -> float:
        best = float("inf")
        for _ in range(2):
            t0 = time.perf_counter()
            r = httpx.post(
                f"{base}/generate",
                json={"steps": steps, "seed": 0},
                headers={"Cache-Control": "no-cache"},
                timeout=120,
            )
            assert r.status_code == 200, r.text
            best = min(best, time.perf_counter() - t0)
        return best

    timed(lo)  # warm-up
    short, n = timed(lo), 4 * lo
    while True:
        span = timed(n) - short
        if span >= 0.3 or n >= hi:
            break
        n = min(hi, 4 * n)
    per_step = max(span / (n - lo), 1e-5)
    return int(min(hi, max(lo, seconds / per_step)))


@pytest.fixture(scope="module")
def server(api_env, tmp_path_factory):
    env = {
        **os.environ,
        **api_env,
        "SOFTVQ_MAX_STEPS": "5000",
        "SOFTVQ_REQUEST_TIMEOUT_S": "300",
        "SOFTVQ_CORS_ORIGINS": "[]",
    }
    with serve_process(env, tmp_path_factory.mktemp("serve")) as (base, proc):
        yield base, proc


def test_every_endpoint_over_http(server):
    base, _ = server
    with httpx.Client(base_url=base, timeout=60) as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        assert c.get("/readyz").json() == {"status": "ready"}
        models = c.get("/models").json()
        assert [t["name"] for t in models["tokenizers"]] == ["tiny", "tiny16"]
        assert c.get("/docs").status_code == 200
        assert "/generate" in c.get("/openapi.json").json()["paths"]

        blobs = [png(1), png(2)]
        tok = c.post("/tokenize", json={"images": [b64(b) for b in blobs]}).json()
        assert tok["shape"] == [2, 8, 8]
        files = [("image", ("a.png", blobs[0], "image/png"))]
        multi = c.post("/tokenize", files=files, data={"format": "base64"}).json()
        raw = np.frombuffer(base64.b64decode(multi["tokens_b64"]), "<f4").reshape(1, 8, 8)
        # batch of 1 vs 2: equal up to float rounding
        np.testing.assert_allclose(raw, np.asarray(tok["tokens"][:1], dtype=np.float32), atol=1e-5)

        dec = c.post("/decode", json={"tokens": tok["tokens"]}).json()
        assert len(dec["images"]) == 2
        assert decode_png(base64.b64decode(dec["images"][0])).shape == (32, 32, 3)
        b64tok = {"tokens_b64": multi["tokens_b64"], "shape": [1, 8, 8]}
        r = c.post("/decode", json=b64tok, headers={"Accept": "image/png"})
        assert r.headers["content-type"] == "image/png"
        diff = decode_png(r.content).astype(int) - decode_png(base64.b64decode(dec["images"][0]))
        assert np.abs(diff).max() <= 1

        rec = c.post("/reconstruct", json={"images": [b64(blobs[0])]}).json()
        assert len(rec["images"]) == 1 and rec["psnr"][0] > 0

        gen = c.post("/generate", json={"class_labels": [1, 2], "seed": 7, "steps": 3}).json()
        assert gen["seeds"] == [7, 8] and len(gen["images"]) == 2
        r = c.post("/generate", json={"steps": 2}, headers={"Accept": "image/png"})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert r.headers["x-seeds"].isdigit()

        bad = c.post("/decode", json={"tokens": [[[float("0")] * 8] * 3]})
        assert bad.status_code == 422 and bad.json()["error"] == "invalid_tokens"
        assert c.post("/generate", json={"steps": 5001}).status_code == 422
        assert c.get("/healthz").status_code == 200

        text = c.get("/metrics").text
        assert (
            metric(text, "softvq_requests_total", endpoint="/tokenize", model="tiny", status="200")
            >= 2
        )
        assert (
            metric(text, "softvq_requests_total", endpoint="/decode", model="tiny", status="422")
            == 1
        )
        assert metric(text, "softvq_images_processed_total", model="sit-tiny", task="generate") >= 3


def test_disconnected_client_work_is_dropped(server):
    """A long job holds the model; a second job queues behind it; its client gives up while
    the long job still runs. The server sees the disconnect and the queued job is dropped
    unrun (499 in the metrics, none of its images made)."""
    base, _ = server
    for seconds in (3.0, 8.0, 20.0):  # longer when the machine turned out faster than timed
        if _abandon_queued_job(base, steps_for(base, seconds)):
            return
    pytest.fail("could not keep the model busy long enough to queue a job behind it")


def _abandon_queued_job(base: str, steps: int) -> bool:
    """False when the long job ended too early for the check to mean anything."""

    def generate_metrics():
        text = httpx.get(f"{base}/metrics").text
        return (
            metric(text, "softvq_images_processed_total", model="sit-tiny", task="generate"),
            metric(
                text, "softvq_requests_total", endpoint="/generate", model="sit-tiny", status="499"
            ),
            metric(text, "softvq_queue_depth", model="sit-tiny", task="generate"),
        )

    images_before, gone_before, _ = generate_metrics()
    long_status = []

    def long_request():
        body = {"class_labels": [1], "steps": steps, "seed": 1}
        long_status.append(httpx.post(f"{base}/generate", json=body, timeout=300).status_code)

    long_job = threading.Thread(target=long_request)
    long_job.start()
    end = time.monotonic() + 30  # until the long job is in
    while generate_metrics()[2] < 1 and time.monotonic() < end:
        time.sleep(0.02)
    try:  # different steps: it cannot join the long batch, so it waits behind it
        body = {"class_labels": [2, 3], "steps": steps - 1}
        httpx.post(f"{base}/generate", json=body, timeout=0.5)
        long_job.join(300)
        return False  # answered within 0.5 s: the model was already free
    except httpx.ReadTimeout:
        pass  # the client gives up and closes the connection
    time.sleep(0.3)  # the server notices the disconnect well within this
    held = long_job.is_alive()
    long_job.join(300)
    time.sleep(0.3)
    images, gone, depth = generate_metrics()
    if not held:
        return False
    assert long_status == [200]
    assert gone == gone_before + 1
    assert depth == 0
    assert images == images_before + 1  # the long job's image; the abandoned two never ran
    return True


def test_sigterm_finishes_in_flight_requests(server):
    """Last in this module: it stops the server."""
    base, proc = server
    result = {}

    def in_flight(steps):
        r = httpx.post(f"{base}/generate", json={"class_labels": [4], "steps": steps}, timeout=300)
        result["status"], result["n"] = r.status_code, len(r.json().get("images", []))

    for seconds in (2.0, 6.0, 20.0):
        result.clear()
        t = threading.Thread(target=in_flight, args=(steps_for(base, seconds),))
        t.start()
        time.sleep(0.5)
        if t.is_alive():  # still computing: now stop the server under it
            break
        t.join()
    else:
        pytest.fail("could not keep a request in flight")
    proc.send_signal(signal.SIGTERM)
    t.join(300)
    assert result == {"status": 200, "n": 1}
    # uvicorn re-raises the signal after its graceful shutdown: exit by SIGTERM, not a crash
    assert proc.wait(60) in (0, -signal.SIGTERM)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{base}/healthz", timeout=2)
