"""The HTTP API: FastAPI routes over a broker.

Each route is thin: parse -> validate (everything, before any queueing) -> build a Job ->
``await broker.submit(job)`` -> format the answer (JSON, or a bare PNG for
``Accept: image/png``). The broker is the in-process one (models in this process) unless
``settings.redis_url`` is set, in which case workers elsewhere run the jobs.

    app = create_app()                       # settings from SOFTVQ_* env
    app = create_app(settings, registry, broker)   # tests / embedding
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager, suppress

import anyio
import numpy as np
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from . import codec, errors, metrics
from .async_jobs import AsyncJobs
from .auth import AuthMiddleware
from .batcher import exit_for_restart
from .errors import ApiError
from .job_store import make_job_store
from .jobs import Job, JobTimeout
from .jobs_api import accepted_response, install_job_routes, owner_of, wants_async
from .middleware import BodyLimitMiddleware, MetricsMiddleware, RequestIdMiddleware
from .prepare import (
    Prepared,
    no_cache,
    prepare_decode,
    prepare_generate,
    prepare_image_task,
    read_image_request,
)
from .registry import with_workers
from .result_cache import cache_key, make_result_cache
from .schemas import (
    DecodeRequest,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    ImagesResponse,
    JobAccepted,
    ModelsResponse,
    ReconstructRequest,
    ReconstructResponse,
    TokenizeRequest,
    TokenizeResponse,
    WorkersResponse,
)
from .settings import Settings, get_settings

log = logging.getLogger("softvq.api")
# Past its deadline the broker answers JobTimeout itself; this grace only guards against a
# broker that never answers.
DEADLINE_GRACE_S = 5.0


class Service:
    """What the routes share: settings, model registry, broker, and whether we are ready."""

    def __init__(self, settings: Settings, registry=None, broker=None):
        self.settings = settings
        self.registry, self.broker = registry, broker
        self.embedded = settings.redis_url is None
        self.started = False  # broker running: requests are accepted
        self.cache = None  # service/result_cache.py, when caching is on
        self.jobs: AsyncJobs | None = None  # async jobs (POST /jobs)
        self._redis = None  # Redis mode: the client of the job store and the cache
        # The threads that decode uploaded images (made in start: on the event loop): a burst
        # of large uploads waits for one instead of decoding all at once (each holds up to a
        # few hundred MB while it decodes; starlette's own pool would run 40).
        self.decode_slots: anyio.CapacityLimiter | None = None

    async def start(self) -> None:
        from .broker import make_broker
        from .registry import ModelRegistry

        self.decode_slots = anyio.CapacityLimiter(self.settings.max_concurrent_decodes)
        if self.registry is None:
            # Redis mode: the API needs only the models' shapes (config.json), no weights.
            self.registry = await run_in_threadpool(
                ModelRegistry.from_settings, self.settings, load_weights=self.embedded
            )
        if self.broker is None:
            self.broker = make_broker(self.settings, self.registry)
        self.broker.on_fatal = self.fatal
        if not self.embedded:
            from .broker.redis_streams import connect

            self._redis = connect(self.settings.redis_url, max_connections=256)
        self.cache = make_result_cache(self.settings, self._redis)
        self.jobs = AsyncJobs(
            make_job_store(self.settings, self._redis),
            self.run,
            self.broker,
            lease_s=self.settings.job_runner_lease_s,
        )
        await self.jobs.start()
        # The embedded broker warms the models up in the background: /healthz answers at
        # once, /readyz says 503 until the warm-up is done (broker.ready()).
        await self.broker.start()
        self.started = True

    def fatal(self, why: str) -> None:
        """The broker can never run another job (a hung model call; its callers have been
        answered 503). A stuck thread cannot be stopped, so the process must go: exit after a
        second (time for those answers to leave) for the supervisor to restart us, or, with
        ``exit_on_hang`` off, stay up with /healthz 503 for a liveness probe."""
        if not self.settings.exit_on_hang:
            log.critical("%s; /healthz now answers 503 (SOFTVQ_EXIT_ON_HANG=false)", why)
            return
        asyncio.get_running_loop().call_later(1.0, exit_for_restart, why)

    async def stop(self) -> None:
        self.started = False
        if self.broker is not None:
            await self.broker.stop()  # graceful: finishes the jobs it holds
            if self.jobs is not None:
                await self.jobs.stop()  # their results stored
            ok, why = self.broker.alive()
            if not ok:
                exit_for_restart(why)
        if self._redis is not None:
            await self._redis.aclose(close_connection_pool=True)

    # --- helpers of the routes ----------------------------------------------------------
    def tokenizer(self, name: str | None, request: Request):
        entry = self.registry.tokenizer(name)  # UnknownModel -> 404
        request.state.model = entry.name
        return entry

    def generator(self, name: str | None, request: Request):
        entry = self.registry.generator(name)
        request.state.model = entry.name
        return entry

    def check_count(self, n: int, what: str = "images") -> None:
        limit = self.settings.max_images_per_request
        if n > limit:
            raise ApiError(422, "too_many_images", f"{n} {what}; at most {limit} per request")

    async def run(self, job: Job, use_cache: bool = True) -> dict:
        """A job's result: from the result cache when it holds it (no worker sees the job),
        else from the broker (and then cached). ``use_cache`` False (``Cache-Control:
        no-cache``) skips the lookup only."""
        cache = self.cache if job.task in self.settings.cache_tasks else None
        if cache is None:
            return await self.broker.submit(job)
        key = await run_in_threadpool(cache_key, job)  # hashes the pixels: off the loop
        labels = {"model": job.model, "task": job.task}
        if use_cache:
            hit = await cache.get(key)
            if hit is not None:
                metrics.CACHE_HITS.labels(**labels).inc()
                return hit
        metrics.CACHE_MISSES.labels(**labels).inc()
        metrics.CACHE_HITS.labels(**labels)  # exported from 0, for the hit ratio's rate()
        result = await self.broker.submit(job)
        await cache.put(key, result)
        return result

    async def submit(self, request: Request, job: Job, use_cache: bool = True) -> dict:
        """Run ``job`` (cache, then broker); drop it if the client disconnects first."""
        if not self.started:
            raise ApiError(503, "not_ready", "service is starting", {"Retry-After": "1"})
        work = asyncio.ensure_future(self.run(job, use_cache))
        watch = asyncio.ensure_future(_wait_disconnect(request))
        budget = max(0.0, job.deadline - time.time()) + DEADLINE_GRACE_S
        try:
            done, _ = await asyncio.wait(
                {work, watch}, timeout=budget, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            watch.cancel()
            if not work.done():
                work.cancel()  # the broker drops queued work of a cancelled waiter
                with suppress(asyncio.CancelledError, Exception):
                    await work
        if work in done:
            return work.result()  # raises the broker's JobError, if any
        if watch in done:
            raise ApiError(499, "client_disconnected", "client closed the connection")
        raise JobTimeout("deadline passed")


async def _wait_disconnect(request: Request) -> None:
    """Returns when the client disconnects. The body was read already, so the server's
    ``receive`` blocks until then (or until the response is sent)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


# --- answering ------------------------------------------------------------------------------
def wants_png(request: Request) -> bool:
    """``Accept`` prefers image/png over JSON (by q-value, then by order)."""
    best, best_q = None, -1.0
    for part in request.headers.get("accept", "").split(","):
        media, *opts = [p.strip() for p in part.split(";")]
        q = 1.0
        for o in opts:
            if o.startswith("q="):
                try:
                    q = float(o[2:])
                except ValueError:
                    q = 0.0
        if media in ("image/png", "application/json") and q > best_q:
            best, best_q = media, q
    return best == "image/png"


async def png_response(images: np.ndarray, headers: dict[str, str]) -> Response:
    data = await run_in_threadpool(codec.png_single_or_grid, images)  # CPU work: off the loop
    return Response(data, media_type="image/png", headers=headers)


async def answer(svc: Service, request: Request, prep: Prepared):
    """Run a prepared job: async (202 and a job) when the request asks with ``Prefer:
    respond-async``, else wait and answer as JSON or, for ``Accept: image/png``, a PNG."""
    use_cache = not no_cache(request)
    if wants_async(request):
        if not svc.started:
            raise ApiError(503, "not_ready", "service is starting", {"Retry-After": "1"})
        record, _ = await svc.jobs.accept(prep, use_cache, owner_of(request, svc.settings))
        return accepted_response(record)
    result = await svc.submit(request, prep.job, use_cache)
    if prep.render_png is not None and wants_png(request):
        images, headers = prep.render_png(result)
        return await png_response(images, headers)
    # Up to B*L*D floats to list, or PNGs to encode: CPU work, off the event loop.
    return JSONResponse(await run_in_threadpool(prep.render_json, result))


def image_request_body(schema: type[BaseModel]) -> dict:
    """OpenAPI requestBody for routes that take JSON or multipart images."""
    multipart = {
        "type": "object",
        "properties": {
            "image": {"type": "array", "items": {"type": "string", "format": "binary"}},
            "model": {"type": "string"},
            "timeout_s": {"type": "number", "exclusiveMinimum": 0},
        },
        "required": ["image"],
    }
    if "format" in schema.model_fields:
        multipart["properties"]["format"] = {"type": "string", "enum": ["list", "base64"]}
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": schema.model_json_schema()},
                "multipart/form-data": {"schema": multipart},
            },
        }
    }


ERRORS = {
    code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 413, 415, 422, 429, 503, 504)
}
# The sync endpoints also answer 202 with a job for ``Prefer: respond-async``.
SYNC_RESPONSES = {
    **ERRORS,
    202: {
        "description": "with `Prefer: respond-async`: the job was accepted (`Location: "
        "/jobs/{id}`); see POST /jobs",
        "model": JobAccepted,
    },
}


# --- the app ----------------------------------------------------------------------------------
def create_app(settings: Settings | None = None, registry=None, broker=None) -> FastAPI:
    settings = settings or get_settings()
    # Pillow's own bomb guard at our limit (it errors at twice this); codec checks first.
    Image.MAX_IMAGE_PIXELS = settings.max_image_pixels
    svc = Service(settings, registry, broker)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await svc.start()
        try:
            yield
        finally:
            await svc.stop()

    app = FastAPI(
        title="softvq-serve",
        version="0.1.0",
        description="SoftVQ-VAE tokenizers and SiT generators over HTTP. Every error is "
        '`{"error": code, "message": text}`.',
        lifespan=lifespan,
    )
    app.state.service = svc
    errors.install(app)

    @app.get("/healthz", responses={503: {"model": ErrorResponse}})
    async def healthz():
        """Alive: 200 while the process can serve, 503 once a model call has hung (only a
        restart helps; see SOFTVQ_HANG_GRACE_S)."""
        ok, why = svc.broker.alive() if svc.broker is not None else (True, "ok")
        if not ok:
            return errors.error_response(503, "unhealthy", why)
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"model": ErrorResponse}})
    async def readyz():
        """Models loaded and warm (embedded) / Redis reachable with a live worker."""
        why = "starting"
        if svc.started:
            try:
                ok, why = await svc.broker.ready()
            except Exception as e:  # a probe answers, whatever the broker's state
                ok, why = False, f"broker check failed: {e}"
            if ok:
                return {"status": "ready"}
        return errors.error_response(503, "not_ready", why, {"Retry-After": "1"})

    @app.get("/metrics", include_in_schema=False)
    async def metrics_endpoint():
        await _refresh_gauges(svc)
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/models", response_model=ModelsResponse)
    async def list_models():
        """Served tokenizers and generators: shapes, and the backend, device and dtype the
        live workers run them with (``workers``: how many replicas serve each)."""
        if svc.registry is None or svc.broker is None:
            raise ApiError(503, "not_ready", "service is starting", {"Retry-After": "1"})
        return with_workers(svc.registry.info(), await svc.broker.workers())

    @app.get("/workers", response_model=WorkersResponse)
    async def list_workers():
        """The processes running jobs (embedded: this one; Redis: every live worker)."""
        if svc.broker is None:
            raise ApiError(503, "not_ready", "service is starting", {"Retry-After": "1"})
        return {"workers": await svc.broker.workers()}

    @app.post(
        "/tokenize",
        response_model=TokenizeResponse,
        responses=SYNC_RESPONSES,
        openapi_extra=image_request_body(TokenizeRequest),
    )
    async def tokenize(request: Request):
        """Images -> continuous tokens (B, L, D) and code indices (B, G, L/G)."""
        asynchronous = wants_async(request)
        req, blobs = await read_image_request(request, TokenizeRequest, svc)
        prep = await prepare_image_task(svc, request, "tokenize", req, blobs, asynchronous)
        return await answer(svc, request, prep)

    @app.post(
        "/reconstruct",
        response_model=ReconstructResponse,
        responses=SYNC_RESPONSES,
        openapi_extra=image_request_body(ReconstructRequest),
    )
    async def reconstruct(request: Request):
        """Images -> tokens -> images, with PSNR per image. ``Accept: image/png`` -> a PNG."""
        asynchronous = wants_async(request)
        req, blobs = await read_image_request(request, ReconstructRequest, svc)
        prep = await prepare_image_task(svc, request, "reconstruct", req, blobs, asynchronous)
        return await answer(svc, request, prep)

    @app.post("/decode", response_model=ImagesResponse, responses=SYNC_RESPONSES)
    async def decode(body: DecodeRequest, request: Request):
        """Tokens (B, L, D) -> images. ``Accept: image/png`` -> a PNG (a grid when B > 1)."""
        prep = prepare_decode(svc, request, body, wants_async(request))
        return await answer(svc, request, prep)

    @app.post("/generate", response_model=GenerateResponse, responses=SYNC_RESPONSES)
    async def generate(body: GenerateRequest, request: Request):
        """Class-conditional images. Every field has a default; the seeds used are returned.
        ``Accept: image/png`` -> a PNG (seeds and classes in the X-Seeds / X-Class-Labels
        headers)."""
        prep = prepare_generate(svc, request, body, wants_async(request))
        return await answer(svc, request, prep)

    install_job_routes(app, svc)

    # The browser playground (issue #17): the page at / and its files under /playground/.
    from .playground import mount_playground

    mount_playground(app)

    # Outermost last: metrics see everything (413, 401 included); CORS headers go on errors
    # too; auth and the body limit refuse before the body is parsed.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(AuthMiddleware, settings=settings)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=[
                "Authorization",
                "Content-Type",
                "Accept",
                "Prefer",
                "Cache-Control",
                "Last-Event-ID",
            ],
            expose_headers=[
                "Location",
                "Retry-After",
                "X-Request-ID",
                "X-Model",
                "X-Seeds",
                "X-Class-Labels",
                "X-Class-Names",
                "X-PSNR",
            ],
        )
    app.add_middleware(MetricsMiddleware)
    app.add_middleware(RequestIdMiddleware)
    return app


async def _refresh_gauges(svc: Service) -> None:
    """Queue depths and live workers, read from the broker at scrape time (best effort: a
    scrape must not fail because Redis is down)."""
    broker, reg = svc.broker, svc.registry
    if broker is None or reg is None or not svc.started:
        return
    pairs = reg.streams()  # every (model, task), from the task table
    try:
        # Redis: ready() counts fresh worker heartbeats into WORKERS_ALIVE. Embedded: the
        # one in-process worker is alive when the broker is ready.
        ok, _ = await broker.ready()
        if svc.embedded:
            metrics.WORKERS_ALIVE.set(1 if ok else 0)
        for name, task in pairs:
            metrics.QUEUE_DEPTH.labels(name, task).set(await broker.queue_depth(name, task))
    except Exception as e:
        log.debug("gauge refresh failed: %s", e)
