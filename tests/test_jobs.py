"""Async jobs, embedded mode, over real HTTP against a real ``softvq serve``: submit (POST
/jobs and ``Prefer: respond-async``), idempotent ids, GET, SSE with progress from the
sampling loop and Last-Event-ID resume, cancel (queued at once; running at its next step
while the rest of its batch goes on), priority lanes under a flood of batch jobs, and the
result cache (hits byte-identical, never reaching the model)."""

from __future__ import annotations

import base64
import json
import os
import statistics
import time

import httpx
import numpy as np
import pytest

from tests.jobs_client import read_events, wait_job, wait_until
from tests.test_api import b64, decode_png, png
from tests.test_serve_uvicorn import metric, serve_process, steps_for


@pytest.fixture(scope="module")
def server(api_env, tmp_path_factory):
    env = {
        **os.environ,
        **api_env,
        "SOFTVQ_MAX_STEPS": "200000",
        "SOFTVQ_REQUEST_TIMEOUT_S": "300",
        # Two generate jobs sent back to back share a batch (the cancel test needs that).
        "SOFTVQ_BATCH_POLICY": json.dumps({"generate": {"max_wait_ms": 300}}),
        "SOFTVQ_SSE_KEEPALIVE_S": "1",
        # one model thread per server: a shared CPU's other load cannot stall its steps
        "OMP_NUM_THREADS": "1",
    }
    with serve_process(env, tmp_path_factory.mktemp("jobs")) as (base, proc):
        yield base


@pytest.fixture(scope="module")
def long_steps(server):
    """Steps that make one tiny generation take ~4 s on this machine now."""
    return steps_for(server, 4.0, hi=40000)


def settle(base: str) -> None:
    """Wait until the server runs nothing (earlier tests' cancelled jobs have left)."""

    def idle():
        text = httpx.get(f"{base}/metrics").text
        return metric(text, "softvq_worker_busy", worker="embedded") == 0 and not any(
            metric(text, "softvq_queue_depth", model=m, task=t)
            for m in ("sit-tiny", "tiny")
            for t in ("generate", "tokenize")
        )

    wait_until(idle, 120, "an idle server")


def images_of(body: dict) -> np.ndarray:
    return np.stack([decode_png(base64.b64decode(s)) for s in body["images"]]).astype(int)


def test_post_jobs_and_respond_async_give_the_sync_body(server):
    gen = {"class_labels": [1, 2], "seed": 5, "steps": 6}
    tok = {"images": [b64(png(3))], "format": "base64"}
    with httpx.Client(base_url=server, timeout=60) as c:
        r = c.post("/jobs", json={"task": "generate", "input": gen})
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        assert r.headers["location"] == f"/jobs/{job_id}"
        assert r.json()["urls"] == {
            "get": f"/jobs/{job_id}",
            "events": f"/jobs/{job_id}/events",
            "cancel": f"/jobs/{job_id}",
        }
        done = wait_job(server, job_id)
        assert done["status"] == "succeeded" and done["priority"] == "batch"
        assert done["progress"] == {"step": 6, "steps": 6}
        assert (
            done["started_at"] >= done["created_at"] and done["finished_at"] >= done["started_at"]
        )
        assert done["output"] == c.post("/generate", json=gen).json()

        r = c.post("/tokenize", json=tok, headers={"Prefer": "respond-async"})
        assert r.status_code == 202 and r.headers["preference-applied"] == "respond-async"
        done = wait_job(server, r.json()["id"])
        sync = c.post("/tokenize", json=tok, headers={"Cache-Control": "no-cache"}).json()
        assert done["task"] == "tokenize" and done["output"] == sync

        # every task runs as a job; decode input is the /decode body
        r = c.post("/jobs", json={"task": "decode", "input": {"tokens": [[[0.1] * 8] * 8]}})
        assert wait_job(server, r.json()["id"])["output"]["images"]
        r = c.post("/jobs", json={"task": "reconstruct", "input": {"images": [b64(png(4))]}})
        assert wait_job(server, r.json()["id"])["output"]["psnr"][0] > 0


def test_bad_job_requests_are_refused_before_anything_runs(server):
    with httpx.Client(base_url=server, timeout=30) as c:
        assert c.get("/jobs/no-such-job").status_code == 404
        assert c.get("/jobs/no-such-job/events").status_code == 404
        assert c.delete("/jobs/no-such-job").status_code == 404
        bad = [
            {"task": "paint", "input": {}},
            {"task": "generate"},
            {"task": "generate", "input": {"steps": 0}},
            {"task": "generate", "input": {"steps": 300000}},
            {"task": "tokenize", "input": {"images": ["not base64!"]}},
            {"task": "generate", "input": {}, "id": "bad id with spaces"},
            {"task": "generate", "input": {}, "priority": "urgent"},
            {"task": "tokenize", "input": {"images": [b64(png(3))]}, "previews": True},
            {"task": "generate", "input": {}, "previews": "sometimes"},
        ]
        for body in bad:
            r = c.post("/jobs", json=body)
            assert 400 <= r.status_code < 500, (body, r.status_code, r.text)
            assert set(r.json()) == {"error", "message"}
        assert (
            c.post(
                "/jobs", content=b"{nope", headers={"content-type": "application/json"}
            ).status_code
            == 400
        )
        assert c.get("/jobs/no-such-job/events?previews=maybe").status_code == 422
        assert c.get("/healthz").status_code == 200


def preview_images(event: dict, n: int, side: int) -> list[np.ndarray]:
    """A preview event's PNG, checked to be ``n`` images of ``side`` px in make_grid's layout
    (one image alone; else a row of up to 8, 2 px apart) -> the images."""
    grid = decode_png(base64.b64decode(event["data"]["png"]))
    if n == 1:
        assert grid.shape == (side, side, 3), grid.shape
        return [grid]
    cols = min(n, 8)
    rows = (n + cols - 1) // cols
    assert grid.shape == (rows * (side + 2) + 2, cols * (side + 2) + 2, 3), grid.shape
    return [
        grid[2 + r * (side + 2) : 2 + r * (side + 2) + side, 2 + c * (side + 2) :][:, :side]
        for r, c in (divmod(i, cols) for i in range(n))
    ]


def test_previews_stream_the_x0_estimate_when_asked_for(server, long_steps):
    """A generate job submitted with previews: the stream with ?previews=1 carries preview
    events (a PNG of the job's two images, at the model's size) as it samples; the stream
    without carries none; once finished, only the latest preview is kept."""
    settle(server)
    steps = long_steps * 2  # several seconds of sampling: a preview about every second
    body = {"class_labels": [1, 2], "seed": 7, "steps": steps}
    r = httpx.post(f"{server}/jobs", json={"task": "generate", "input": body, "previews": True})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    live, _ = read_events(server, job_id, previews=True)  # read as it runs
    kinds = [e["event"] for e in live]
    assert kinds[-1] == "succeeded", kinds
    previews = [e for e in live if e["event"] == "preview"]
    assert previews, kinds
    final = images_of(live[-1]["data"]["output"])
    side = final.shape[1]
    assert side <= 128  # the tiny model: previews at its own size
    for p in previews:
        assert 0 < p["data"]["step"] < steps and p["data"]["steps"] == steps
        assert len(preview_images(p, 2, side)) == 2
    seen = [p["data"]["step"] for p in previews]
    assert seen == sorted(seen)
    # each image in its place, near the final one (the tiny test decoder's images vary
    # little, so this guards against misplaced rows or undone de-normalisation, not more:
    # tests/test_sampling.py checks the estimate itself)
    last = np.stack(preview_images(previews[-1], 2, side)).astype(int)
    assert np.abs(last - final).mean() < 64
    # without ?previews=1: the same log, no previews
    plain, _ = read_events(server, job_id)
    assert "preview" not in [e["event"] for e in plain]
    assert [e["event"] for e in plain] == [k for k in kinds if k != "preview"]
    # replayed later: one preview (the latest) is all the log keeps
    again, _ = read_events(server, job_id, previews=True)
    kept = [e for e in again if e["event"] == "preview"]
    assert len(kept) == 1 and kept[0]["data"] == previews[-1]["data"]
    # a job that did not ask for previews has none, even with ?previews=1
    r = httpx.post(f"{server}/jobs", json={"task": "generate", "input": {**body, "seed": 8}})
    events, _ = read_events(server, r.json()["id"], previews=True)
    assert events[-1]["event"] == "succeeded"
    assert "preview" not in [e["event"] for e in events]


def test_client_id_makes_submit_idempotent(server):
    body = {"task": "generate", "input": {"seed": 1, "steps": 5}, "id": "my-job-1"}
    with httpx.Client(base_url=server, timeout=30) as c:
        before = metric(
            c.get("/metrics").text, "softvq_async_jobs_total", lane="batch", task="generate"
        )
        first = c.post("/jobs", json=body)
        second = c.post("/jobs", json=body)
        assert first.status_code == second.status_code == 202
        assert first.json()["id"] == second.json()["id"] == "my-job-1"
        after = metric(
            c.get("/metrics").text, "softvq_async_jobs_total", lane="batch", task="generate"
        )
        assert after == before + 1  # one job, not two
        assert wait_job(server, "my-job-1")["status"] == "succeeded"
        again = c.post("/jobs", json=body)
        assert again.json()["status"] == "succeeded"
        clash = c.post("/jobs", json={**body, "task": "decode"})
        assert clash.status_code == 409 and clash.json()["error"] == "id_in_use"


def test_sse_streams_progress_and_resumes_after_last_event_id(server, long_steps):
    steps = max(long_steps // 4, 40)  # ~1 s of sampling: several progress events
    r = httpx.post(
        f"{server}/jobs", json={"task": "generate", "input": {"seed": 2, "steps": steps}}
    )
    job_id = r.json()["id"]
    head, _ = read_events(server, job_id, stop_after=3)  # then the client goes away
    assert [e["event"] for e in head[:2]] == ["queued", "started"]
    rest, _ = read_events(server, job_id, last_event_id=head[-1]["id"])
    every = head + rest
    ids = [int(e["id"]) for e in every]
    assert ids == sorted(set(ids)) and ids[0] == 1  # resumed exactly after, no repeats
    assert ids == list(range(1, len(ids) + 1))  # nothing lost in between
    kinds = [e["event"] for e in every]
    assert kinds[-1] == "succeeded" and kinds.count("succeeded") == 1
    progress = [e["data"] for e in every if e["event"] == "progress"]
    assert progress, kinds
    assert all(p["steps"] == steps for p in progress)
    assert [p["step"] for p in progress] == sorted(p["step"] for p in progress)
    final = every[-1]["data"]
    assert final["status"] == "succeeded" and final["output"]["seeds"] == [2]
    # a finished job's stream replays its whole log and ends
    again, _ = read_events(server, job_id)
    assert [e["id"] for e in again] == [e["id"] for e in every]


def test_sse_sends_keepalive_comments_while_a_job_waits(server, long_steps):
    """A job queued behind a long one: the stream stays open with comment lines."""
    first = httpx.post(
        f"{server}/jobs",
        json={"task": "generate", "input": {"seed": 3, "steps": long_steps}},
    ).json()["id"]
    try:
        comments = 0  # SOFTVQ_SSE_KEEPALIVE_S is 1 s on this server
        with httpx.stream("GET", f"{server}/jobs/{first}/events", timeout=60) as r:
            start = time.monotonic()
            for line in r.iter_lines():
                if line.startswith(":"):
                    comments += 1
                    break
                if time.monotonic() - start > 30:
                    break
        assert comments >= 1
    finally:
        httpx.delete(f"{server}/jobs/{first}")


def test_cancel_a_queued_job_at_once(server, long_steps):
    settle(server)
    with httpx.Client(base_url=server, timeout=30) as c:
        text = c.get("/metrics").text
        made = metric(text, "softvq_images_processed_total", model="sit-tiny", task="generate")
        blocker = c.post(
            "/jobs", json={"task": "generate", "input": {"seed": 4, "steps": long_steps}}
        ).json()["id"]
        wait_job(server, blocker, until=("running",))
        # other steps: cannot join the running batch, so it queues behind it
        queued = c.post(
            "/jobs", json={"task": "generate", "input": {"seed": 5, "steps": 7}}
        ).json()["id"]
        view = c.get(f"/jobs/{queued}").json()
        assert view["status"] == "queued" and view["queue_position"] == 0
        r = c.delete(f"/jobs/{queued}")
        assert r.status_code == 200 and r.json()["status"] == "canceled"
        assert c.get(f"/jobs/{blocker}").json()["status"] == "running"  # cancelled at once
        assert wait_job(server, blocker, timeout=300)["status"] == "succeeded"
        text = c.get("/metrics").text
        # only the blocker's image was made: the cancelled job never ran
        assert (
            metric(text, "softvq_images_processed_total", model="sit-tiny", task="generate")
            == made + 1
        )
        # cancelling again, or a finished job, changes nothing
        assert c.post(f"/jobs/{queued}/cancel").json()["status"] == "canceled"
        assert c.delete(f"/jobs/{blocker}").json()["status"] == "succeeded"
        events, _ = read_events(server, queued)
        assert [e["event"] for e in events] == ["queued", "canceled"]


def test_cancel_a_running_job_frees_its_slot_and_the_batch_goes_on(server, long_steps):
    """Two jobs in one sampling loop; one is cancelled mid-way: it leaves at the next step
    (its slot freed: the queue depth drops while the other still runs), the other finishes
    with the images it would have had alone."""
    settle(server)
    steps = long_steps * 2
    a_in = {"class_labels": [1], "seed": 10, "steps": steps}
    b_in = {"class_labels": [2], "seed": 20, "steps": steps}
    with httpx.Client(base_url=server, timeout=60) as c:
        a = c.post("/jobs", json={"task": "generate", "input": a_in}).json()["id"]
        b = c.post("/jobs", json={"task": "generate", "input": b_in}).json()["id"]

        def both_sampling():
            jobs = [c.get(f"/jobs/{j}").json() for j in (a, b)]
            return all(
                j["status"] == "running" and (j["progress"] or {}).get("step", 0) > 0 for j in jobs
            )

        wait_until(both_sampling, 60, "both jobs sampling")
        depth = metric(
            c.get("/metrics").text, "softvq_queue_depth", model="sit-tiny", task="generate"
        )
        assert depth == 2
        assert c.delete(f"/jobs/{a}").json()["status"] == "canceled"
        depth = metric(
            c.get("/metrics").text, "softvq_queue_depth", model="sit-tiny", task="generate"
        )
        assert depth == 1  # a's slot is free while b runs on
        assert c.get(f"/jobs/{b}").json()["status"] == "running"
        done_b = wait_job(server, b, timeout=300)
        assert done_b["status"] == "succeeded"
        stopped_at = c.get(f"/jobs/{a}").json()["progress"]["step"]
        assert stopped_at < steps
        alone = c.post("/generate", json=b_in).json()
        assert np.abs(images_of(done_b["output"]) - images_of(alone)).max() <= 1
        # the loop dropped a's row: fewer item-steps were computed than two full jobs
        assert done_b["finished_at"] > c.get(f"/jobs/{a}").json()["finished_at"]


def test_cache_hits_are_byte_identical_and_never_reach_the_model(server):
    body = {"images": [b64(png(42)), b64(png(43))], "format": "list"}

    def counts():
        text = httpx.get(f"{server}/metrics").text
        return (
            metric(text, "softvq_cache_hits_total", model="tiny", task="tokenize"),
            metric(text, "softvq_cache_misses_total", model="tiny", task="tokenize"),
            metric(text, "softvq_images_processed_total", model="tiny", task="tokenize"),
        )

    with httpx.Client(base_url=server, timeout=30) as c:
        h0, m0, n0 = counts()
        miss = c.post("/tokenize", json=body)
        h1, m1, n1 = counts()
        assert (h1, m1, n1) == (h0, m0 + 1, n0 + 2)
        hit = c.post("/tokenize", json=body)
        assert hit.content == miss.content  # byte-identical
        h2, m2, n2 = counts()
        assert (h2, m2, n2) == (h1 + 1, m1, n1)  # a hit: the model saw nothing
        # the same pixels sent as multipart are the same entry
        files = [
            ("image", ("a.png", png(42), "image/png")),
            ("image", ("b.png", png(43), "image/png")),
        ]
        assert c.post("/tokenize", files=files).content == miss.content
        assert counts()[0] == h2 + 1
        # Cache-Control: no-cache computes again (and gives the same bytes)
        fresh = c.post("/tokenize", json=body, headers={"Cache-Control": "no-cache"})
        assert fresh.content == miss.content and counts()[2] == n2 + 2
        # reconstruct is cached too (PNG answer, same bytes); generate is not by default
        r1 = c.post(
            "/reconstruct", json={"images": [b64(png(44))]}, headers={"Accept": "image/png"}
        )
        r2 = c.post(
            "/reconstruct", json={"images": [b64(png(44))]}, headers={"Accept": "image/png"}
        )
        assert r1.content == r2.content and r1.headers["x-psnr"] == r2.headers["x-psnr"]
        text = c.get("/metrics").text
        assert metric(text, "softvq_cache_hits_total", model="tiny", task="reconstruct") >= 1
        # a cached answer as an async job: the same output
        job = c.post("/jobs", json={"task": "tokenize", "input": body}).json()["id"]
        assert wait_job(server, job)["output"] == miss.json()


def test_cache_hit_answers_fast(server):
    """A hit in embedded mode answers in well under 5 ms of server time (the request's
    wall time through HTTP includes the client; the server's own histogram is checked)."""
    body = {"images": [b64(png(77))]}
    with httpx.Client(base_url=server, timeout=30) as c:
        c.post("/tokenize", json=body)
        times = []
        for _ in range(20):
            t0 = time.perf_counter()
            assert c.post("/tokenize", json=body).status_code == 200
            times.append(time.perf_counter() - t0)
    # measured, not asserted tightly (the machine is shared): see BENCHMARKS.md
    assert statistics.median(times) < 0.05, times


@pytest.fixture(scope="module")
def plain_server(api_env, tmp_path_factory):
    """Default batching (no extra wait): latency is the model's, not a policy's."""
    env = {
        **os.environ,
        **api_env,
        "SOFTVQ_MAX_STEPS": "5000",
        "SOFTVQ_REQUEST_TIMEOUT_S": "300",
        "OMP_NUM_THREADS": "1",
    }
    with serve_process(env, tmp_path_factory.mktemp("lanes")) as (base, proc):
        yield base


def test_interactive_request_is_not_stuck_behind_a_flood_of_batch_jobs(plain_server):
    """Priority inversion: 200 batch-lane jobs queued (25 full batches), then interactive
    requests of the same shape. Each may wait for the batch running when it arrives, never
    for the queue: at most that batch and its own finish while it waits (the model's
    batches are counted, so the check holds on a loaded machine too). The latency against an
    idle server's is printed; loadtests/lanes.py measures it (BENCHMARKS.md)."""
    server = plain_server
    gen = {"class_labels": [3], "seed": 9, "steps": steps_for(server, 0.4)}

    def batches() -> float:
        text = httpx.get(f"{server}/metrics").text
        return metric(text, "softvq_compute_seconds_count", model="sit-tiny", task="generate")

    def interactive() -> tuple[float, float]:
        before = batches()
        t0 = time.perf_counter()
        r = httpx.post(f"{server}/generate", json=gen, timeout=300)
        assert r.status_code == 200
        return time.perf_counter() - t0, batches() - before

    idle = [interactive() for _ in range(3)]
    with httpx.Client(base_url=server, timeout=60) as c:
        flood = [
            c.post("/jobs", json={"task": "generate", "input": {**gen, "seed": 100 + i}}).json()[
                "id"
            ]
            for i in range(200)
        ]
        busy = [interactive() for _ in range(3)]
        left = sum(c.get(f"/jobs/{j}").json()["status"] in ("queued", "running") for j in flood)
        for j in flood:
            c.delete(f"/jobs/{j}")
    print(f"flood: {left} of {len(flood)} jobs still queued or running at the end")
    print(f"idle {idle}; under the flood {busy} (seconds, model batches meanwhile)")
    assert left > 16, "the flood drained before the interactive requests: not a test"
    # the batch running on arrival + its own (+1: one may end between the metric read and
    # the request's arrival); without lanes it would wait for 25 batches.
    assert all(n <= 3 for _, n in busy), busy
    text = httpx.get(f"{server}/metrics").text
    assert metric(text, "softvq_lane_queue_wait_seconds_count", lane="interactive") >= 6
    assert metric(text, "softvq_lane_queue_wait_seconds_count", lane="batch") >= 1


def test_api_keys_limited_to_lanes(api_settings_factory):
    """SOFTVQ_API_KEY_LANES: a bulk key's sync requests run in the batch lane, asking for the
    interactive lane is 403; other keys choose freely."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from tests.test_api import wait_ready

    settings = api_settings_factory(
        api_keys=["bulk", "free"], api_key_lanes={"bulk": ["batch"]}, max_steps=20
    )
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        bulk = {"Authorization": "Bearer bulk"}
        free = {"Authorization": "Bearer free"}
        body = {"seed": 1, "steps": 2}
        r = c.post("/generate", json={**body, "priority": "interactive"}, headers=bulk)
        assert r.status_code == 403 and r.json()["error"] == "lane_not_allowed"
        r = c.post(
            "/jobs",
            json={"task": "generate", "input": body, "priority": "interactive"},
            headers=bulk,
        )
        assert r.status_code == 403
        assert c.post("/generate", json=body, headers=bulk).status_code == 200
        assert (
            c.post("/generate", json={**body, "priority": "batch"}, headers=free).status_code == 200
        )
        text = c.get("/metrics").text
        # the bulk key's sync request and the free key's explicit one ran in the batch lane
        assert metric(text, "softvq_lane_queue_wait_seconds_count", lane="batch") >= 2


def test_openapi_documents_the_job_endpoints(server):
    spec = httpx.get(f"{server}/openapi.json").json()
    paths = spec["paths"]
    assert {"post"} <= set(paths["/jobs"])
    assert {"get", "delete"} <= set(paths["/jobs/{job_id}"])
    assert "post" in paths["/jobs/{job_id}/cancel"]
    events = paths["/jobs/{job_id}/events"]["get"]["responses"]["200"]
    assert "text/event-stream" in events["content"]
    assert "`preview`" in events["description"] and "?previews=1" in events["description"]
    params = paths["/jobs/{job_id}/events"]["get"]["parameters"]
    assert "previews" in [p["name"] for p in params]
    assert "202" in paths["/jobs"]["post"]["responses"]
    for sync in ("/generate", "/tokenize", "/reconstruct", "/decode"):
        assert "202" in paths[sync]["post"]["responses"], sync  # Prefer: respond-async
    job = spec["components"]["schemas"]["JobResponse"]["properties"]
    assert {"status", "queue_position", "progress", "output", "error", "urls"} <= set(job)


def test_a_job_is_visible_only_to_the_api_key_that_submitted_it(api_env, tmp_path_factory):
    env = {
        **os.environ,
        **api_env,
        "SOFTVQ_API_KEYS": json.dumps(["alice", "bob"]),
        "OMP_NUM_THREADS": "1",
    }
    alice = {"Authorization": "Bearer alice"}
    bob = {"Authorization": "Bearer bob"}
    with serve_process(env, tmp_path_factory.mktemp("owners")) as (base, _):
        with httpx.Client(base_url=base, timeout=60) as c:
            body = {"task": "generate", "input": {"seed": 1, "steps": 2}, "id": "shared-name"}
            assert c.post("/jobs", json=body).status_code == 401
            job = c.post("/jobs", json=body, headers=alice).json()["id"]
            assert wait_until(
                lambda: c.get(f"/jobs/{job}", headers=alice).json()["status"] == "succeeded"
            )
            assert "owner" not in c.get(f"/jobs/{job}", headers=alice).json()
            for call in (c.get, c.delete):
                assert call(f"/jobs/{job}", headers=bob).status_code == 404
            assert c.get(f"/jobs/{job}/events", headers=bob).status_code == 404
            # bob cannot take over (or learn the output of) alice's id
            assert c.post("/jobs", json=body, headers=bob).status_code == 409
