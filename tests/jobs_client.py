"""Client helpers for the async job API (tests/test_jobs*.py): poll a job, read its SSE
stream with a small parser of the text/event-stream format."""

from __future__ import annotations

import json
import time

import httpx


def wait_job(base: str, job_id: str, until=("succeeded", "failed", "canceled"), timeout=120):
    """Poll GET /jobs/{id} until its status is in ``until`` -> the job."""
    end = time.monotonic() + timeout
    while True:
        r = httpx.get(f"{base}/jobs/{job_id}", timeout=30)
        assert r.status_code == 200, r.text
        job = r.json()
        if job["status"] in until:
            return job
        if time.monotonic() > end:
            raise AssertionError(f"job {job_id} still {job['status']} after {timeout}s")
        time.sleep(0.05)


def wait_until(check, timeout: float = 60, what: str = "condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def read_events(
    base: str,
    job_id: str,
    last_event_id: str | None = None,
    stop_after: int | None = None,
    previews: bool = False,
):
    """The SSE events of a job as dicts {id, event, data (parsed JSON)}, read until the
    stream ends (or ``stop_after`` events, then the connection is dropped); also returns
    how many keep-alive comment lines were seen. ``previews``: ask for ``preview`` events."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    url = f"{base}/jobs/{job_id}/events" + ("?previews=1" if previews else "")
    events, comments, current = [], 0, {}
    with httpx.stream("GET", url, headers=headers, timeout=120) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith(":"):
                comments += 1
                continue
            if not line:
                if current:
                    current["data"] = json.loads(current.get("data", "null"))
                    events.append(current)
                    current = {}
                    if stop_after is not None and len(events) >= stop_after:
                        break
                continue
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "data" and "data" in current:
                current["data"] += "\n" + value
            else:
                current[field] = value
    return events, comments
