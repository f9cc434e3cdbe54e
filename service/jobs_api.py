"""The async job routes: submit, look up, stream, cancel (service/async_jobs.py runs them).

    POST   /jobs                 {"task", "input", "id"?, "priority"?, "previews"?} -> 202
    POST   /{task} + Prefer: respond-async                             -> the same 202
    GET    /jobs/{id}            the job (output when succeeded)
    GET    /jobs/{id}/events     Server-Sent Events; Last-Event-ID resumes; ?previews=1
    DELETE /jobs/{id}            cancel (also POST /jobs/{id}/cancel)

Shapes follow Replicate's prediction object and Cog's ``Prefer: respond-async``; events are
ComfyUI-like (``progress`` {step, steps}); ``queue_position`` as fal has it.

Previews are asked for twice, on purpose: ``previews: true`` at submission makes the model
thread render them (a decode about every second: a cost only those jobs pay), and
``?previews=1`` on the stream sends them (a plain stream stays small, whatever the job).
"""

from __future__ import annotations

import json
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse

from .auth import bearer_token, caller_id
from .errors import ApiError
from .job_store import TERMINAL, JobRecord
from .prepare import no_cache, prepare_json, read_json, validate
from .schemas import ErrorResponse, JobAccepted, JobRequest, JobResponse

# How long one read of the event log waits before the loop looks again.
EVENT_POLL_S = 1.0
# Record fields a client never sees: its deadline, the API key hash, the replica running it.
INTERNAL_FIELDS = ("deadline", "owner", "runner")

NOT_FOUND = {404: {"model": ErrorResponse, "description": "unknown or expired job id"}}


def wants_async(request: Request) -> bool:
    """``Prefer: respond-async`` (RFC 7240), as Cog takes it."""
    prefs = request.headers.get("prefer", "")
    return any(p.split("=")[0].strip().lower() == "respond-async" for p in prefs.split(","))


def urls(job_id: str) -> dict[str, str]:
    return {
        "get": f"/jobs/{job_id}",
        "events": f"/jobs/{job_id}/events",
        "cancel": f"/jobs/{job_id}",
    }


def owner_of(request: Request, settings) -> str | None:
    """Who may see a job: the hash of the request's API key (None when keys are off). Jobs
    of one key are invisible (404) to the others."""
    if not settings.api_keys:
        return None
    return caller_id(bearer_token(request.scope.get("headers", [])), None)


def accepted_response(record: JobRecord) -> JSONResponse:
    body = {"id": record.id, "status": record.status, "urls": urls(record.id)}
    return JSONResponse(
        body,
        status_code=202,
        headers={"Location": f"/jobs/{record.id}", "Preference-Applied": "respond-async"},
    )


def install_job_routes(app: FastAPI, svc) -> None:
    async def view(record: JobRecord) -> dict:
        body = record.model_dump(exclude=set(INTERNAL_FIELDS))
        body["queue_position"] = (
            await svc.broker.queue_position(record.id) if record.status == "queued" else None
        )
        body["urls"] = urls(record.id)
        return body

    async def found(job_id: str, request: Request) -> JobRecord:
        if svc.jobs is None:
            raise ApiError(503, "not_ready", "service is starting", {"Retry-After": "1"})
        record = await svc.jobs.get(job_id)
        if record is None or record.owner != owner_of(request, svc.settings):
            raise ApiError(404, "not_found", f"no job {job_id!r} (unknown, or expired)")
        return record

    @app.post(
        "/jobs",
        status_code=202,
        response_model=JobAccepted,
        responses={
            **{c: {"model": ErrorResponse} for c in (400, 401, 403, 404, 409, 413, 422, 429, 503)}
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": JobRequest.model_json_schema()}},
            }
        },
    )
    async def submit_job(request: Request):
        """Run any task as a job: 202 at once with its id and URLs (``Location: /jobs/{id}``).
        ``input`` is that task's endpoint body. A client ``id`` makes this idempotent: the
        same id again returns the same job. Default lane: ``batch``."""
        if not svc.started:
            raise ApiError(503, "not_ready", "service is starting", {"Retry-After": "1"})
        req = validate(JobRequest, await read_json(request))
        if req.previews and req.task != "generate":
            raise ApiError(422, "invalid_request", "previews are for generate jobs only")
        owner = owner_of(request, svc.settings)
        if req.id is not None:
            existing = await svc.jobs.get(req.id)
            if existing is not None:
                if existing.task != req.task or existing.owner != owner:
                    raise ApiError(
                        409, "id_in_use", f"job {req.id!r} exists for task {existing.task!r}"
                    )
                return accepted_response(existing)
        data = dict(req.input)
        if req.priority is not None:
            data["priority"] = req.priority
        prep = await prepare_json(svc, request, req.task, data, asynchronous=True)
        if req.id is not None:
            prep.job.id = req.id
        prep.job.previews = req.previews
        record, _ = await svc.jobs.accept(prep, use_cache=not no_cache(request), owner=owner)
        return accepted_response(record)

    @app.get("/jobs/{job_id}", response_model=JobResponse, responses=NOT_FOUND)
    async def get_job(job_id: str, request: Request):
        """The job: status, queue position while queued, progress {step, steps} while a
        generation samples, and ``output`` (the sync endpoint's body) once succeeded or
        ``error`` once failed. Kept ``SOFTVQ_JOB_TTL_S`` after it ends."""
        return await view(await found(job_id, request))

    @app.get(
        "/jobs/{job_id}/events",
        responses={
            200: {
                "description": "text/event-stream: `queued`, `started`, `progress` "
                "({step, steps}, at most every 250 ms), with `?previews=1` also `preview` "
                "({step, steps, png: base64 PNG of the current estimate of the images, each "
                "at most 128 px, side by side} about every second, for a generate job "
                "submitted with `previews: true`; only the latest is kept for a resume), "
                "then one of `succeeded` | `failed` | `canceled` carrying the final job, "
                "after which the stream ends. Each event has an id; reconnect with "
                "`Last-Event-ID` to resume after it.",
                "content": {"text/event-stream": {}},
            },
            **NOT_FOUND,
        },
    )
    async def job_events(job_id: str, request: Request, previews: bool = False):
        """Server-Sent Events of the job, from its start (or after ``Last-Event-ID``).
        ``previews=1``: include `preview` events (see ``previews`` of POST /jobs)."""
        await found(job_id, request)
        after = request.headers.get("last-event-id") or request.query_params.get("after")
        store = svc.jobs.store

        async def stream():
            last, settled, looked = after, False, time.monotonic()
            while True:
                events = await store.events(job_id, last, EVENT_POLL_S)
                for ev in events:
                    last = ev.id
                    if ev.event == "preview" and not (previews and ev.data):
                        continue  # not asked for, or superseded by a later one
                    # internal fields (a record's deadline and owner) stay inside
                    data = {k: v for k, v in ev.data.items() if k not in INTERNAL_FIELDS}
                    if ev.event in TERMINAL:
                        data["urls"] = urls(job_id)
                    yield {"id": ev.id, "event": ev.event, "data": json.dumps(data)}
                    if ev.event in TERMINAL:
                        return
                # Through the jobs, not the store: a job nothing can finish any more (its
                # replica died, its deadline passed) fails now, and its terminal event is
                # read on the next turn. Also while events flow: a worker still writes the
                # progress of a job whose replica died.
                if not events or time.monotonic() - looked >= EVENT_POLL_S:
                    looked = time.monotonic()
                    record = await svc.jobs.get(job_id)
                    # Expired meanwhile, or past its terminal event (a state and its event
                    # are written together: nothing more will come).
                    if record is None or (settled and record.status in TERMINAL):
                        return
                    settled = record.status in TERMINAL

        return EventSourceResponse(stream(), ping=svc.settings.sse_keepalive_s)

    async def cancel(job_id: str, request: Request):
        await found(job_id, request)
        record = await svc.jobs.cancel(job_id)
        if record is None:
            raise ApiError(404, "not_found", f"no job {job_id!r} (unknown, or expired)")
        return await view(record)

    @app.delete("/jobs/{job_id}", response_model=JobResponse, responses=NOT_FOUND)
    async def cancel_job(job_id: str, request: Request):
        """Cancel: a queued job at once, a running generation at its next sampling step (the
        other jobs of its batch go on). A finished job is returned unchanged."""
        return await cancel(job_id, request)

    @app.post("/jobs/{job_id}/cancel", response_model=JobResponse, responses=NOT_FOUND)
    async def cancel_job_post(job_id: str, request: Request):
        """The same as DELETE /jobs/{id}, for clients that cannot send DELETE."""
        return await cancel(job_id, request)
