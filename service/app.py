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
import json
import logging
import math
import secrets
import time
from contextlib import asynccontextmanager, suppress

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

import model as models

from . import codec, errors, metrics
from .auth import AuthMiddleware
from .batcher import exit_for_restart
from .errors import ApiError
from .jobs import Job, JobTimeout
from .middleware import BodyLimitMiddleware, MetricsMiddleware, RequestIdMiddleware
from .registry import with_workers
from .schemas import (
    MAX_SEED,
    DecodeRequest,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    ImagesResponse,
    ModelsResponse,
    ReconstructRequest,
    ReconstructResponse,
    TokenizeRequest,
    TokenizeResponse,
    WorkersResponse,
)
from .settings import Settings, get_settings

log = logging.getLogger("softvq.api")

DEFAULT_STEPS = 50
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

    async def start(self) -> None:
        from .broker import make_broker
        from .registry import ModelRegistry

        if self.registry is None:
            # Redis mode: the API needs only the models' shapes (config.json), no weights.
            self.registry = await run_in_threadpool(
                ModelRegistry.from_settings, self.settings, load_weights=self.embedded
            )
        if self.broker is None:
            self.broker = make_broker(self.settings, self.registry)
        self.broker.on_fatal = self.fatal
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
            ok, why = self.broker.alive()
            if not ok:
                exit_for_restart(why)

    # --- helpers of the routes ----------------------------------------------------------
    def tokenizer(self, name: str | None, request: Request):
        entry = self.registry.tokenizer(name)  # UnknownModel -> 404
        request.state.model = entry.name
        return entry

    def generator(self, name: str | None, request: Request):
        entry = self.registry.generator(name)
        request.state.model = entry.name
        return entry

    def deadline(self, timeout_s: float | None) -> float:
        limit = self.settings.request_timeout_s
        return time.time() + (min(timeout_s, limit) if timeout_s else limit)

    def check_count(self, n: int, what: str = "images") -> None:
        limit = self.settings.max_images_per_request
        if n > limit:
            raise ApiError(422, "too_many_images", f"{n} {what}; at most {limit} per request")

    async def submit(self, request: Request, job: Job) -> dict:
        """Run ``job`` on the broker; drop it if the client disconnects first."""
        if not self.started:
            raise ApiError(503, "not_ready", "service is starting", {"Retry-After": "1"})
        work = asyncio.ensure_future(self.broker.submit(job))
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


# --- request parsing ------------------------------------------------------------------------
def _validate(schema: type[BaseModel], data) -> BaseModel:
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise RequestValidationError(
            [{**err, "loc": ("body", *err["loc"])} for err in e.errors(include_url=False)]
        ) from None


async def read_json(request: Request) -> object:
    body = await request.body()
    if not body:
        raise ApiError(422, "invalid_request", "empty body; expected JSON")
    try:
        return await run_in_threadpool(json.loads, body)  # up to max_body_bytes: off the loop
    except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
        raise ApiError(400, "invalid_json", "body is not valid JSON") from None


async def run_image_task(request: Request, schema: type[BaseModel], task: str, svc: Service):
    """Parse an image request, decode its images for the chosen tokenizer and run ``task``
    on them -> (validated request, tokenizer entry, result)."""
    req, blobs = await read_image_request(request, schema, svc)
    tok = svc.tokenizer(req.model, request)
    images = await _decode_images(svc, blobs, tok.image_size)
    job = Job(
        tok.name, task, {"images": images, "n": len(blobs)}, deadline=svc.deadline(req.timeout_s)
    )
    return req, tok, await svc.submit(request, job)


async def read_image_request(request: Request, schema: type[BaseModel], svc: Service):
    """JSON with base64 ``images``, or multipart with ``image`` files (and plain fields)
    -> (validated request, encoded images: raw bytes or base64 text)."""
    s = svc.settings
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        form = await request.form(
            max_files=s.max_images_per_request + 1, max_fields=16, max_part_size=64 * 1024
        )
        files, fields = [], {}
        for key, value in form.multi_items():
            if isinstance(value, str):
                fields[key] = value
            elif key in ("image", "images"):
                files.append(value)
            else:
                raise ApiError(422, "invalid_request", f"unexpected file field {key!r}")
        if not files:
            raise ApiError(422, "invalid_request", "multipart body has no 'image' file")
        svc.check_count(len(files))
        req = _validate(schema, {**fields, "images": ["-"] * len(files)})
        blobs = []
        for f in files:
            data = await f.read(s.max_image_bytes + 1)
            if len(data) > s.max_image_bytes:
                raise ApiError(
                    413, "image_too_large", f"{f.filename}: over {s.max_image_bytes} bytes"
                )
            blobs.append(data)
        return req, blobs
    if ctype not in ("application/json", ""):
        raise ApiError(
            415, "unsupported_media_type", "send application/json or multipart/form-data"
        )
    req = _validate(schema, await read_json(request))
    svc.check_count(len(req.images))
    return req, req.images  # base64 text: decoded with the pixels, in a worker thread


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


ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 415, 422, 429, 503, 504)}


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
        responses=ERRORS,
        openapi_extra=image_request_body(TokenizeRequest),
    )
    async def tokenize(request: Request):
        """Images -> continuous tokens (B, L, D) and code indices (B, G, L/G)."""
        req, tok, result = await run_image_task(request, TokenizeRequest, "tokenize", svc)
        # Up to B*L*D floats to list and serialise: CPU work, off the event loop.
        return await run_in_threadpool(_tokenize_answer, tok.name, result, req.format)

    @app.post(
        "/reconstruct",
        response_model=ReconstructResponse,
        responses=ERRORS,
        openapi_extra=image_request_body(ReconstructRequest),
    )
    async def reconstruct(request: Request):
        """Images -> tokens -> images, with PSNR per image. ``Accept: image/png`` -> a PNG."""
        req, tok, result = await run_image_task(request, ReconstructRequest, "reconstruct", svc)
        # JSON has no Infinity: a pixel-identical reconstruction reports null.
        psnr = [float(p) if p is not None and math.isfinite(p) else None for p in result["psnr"]]
        if wants_png(request):
            psnr_text = ",".join("inf" if p is None else f"{p:.2f}" for p in psnr)
            return await png_response(result["images"], {"X-Model": tok.name, "X-PSNR": psnr_text})
        images_b64 = await run_in_threadpool(codec.png_b64_list, result["images"])
        return JSONResponse({"model": tok.name, "images": images_b64, "psnr": psnr})

    @app.post("/decode", response_model=ImagesResponse, responses=ERRORS)
    async def decode(body: DecodeRequest, request: Request):
        """Tokens (B, L, D) -> images. ``Accept: image/png`` -> a PNG (a grid when B > 1)."""
        tok = svc.tokenizer(body.model, request)
        s = svc.settings
        tokens = codec.parse_tokens(
            body.tokens,
            body.tokens_b64,
            body.shape,
            body.dtype,
            tok.num_tokens,
            tok.token_dim,
            s.max_images_per_request,
            s.max_body_bytes,
        )
        job = Job(
            tok.name,
            "decode",
            {"tokens": tokens, "n": tokens.shape[0]},
            deadline=svc.deadline(body.timeout_s),
        )
        result = await svc.submit(request, job)
        if wants_png(request):
            return await png_response(result["images"], {"X-Model": tok.name})
        images_b64 = await run_in_threadpool(codec.png_b64_list, result["images"])
        return JSONResponse({"model": tok.name, "images": images_b64})

    @app.post("/generate", response_model=GenerateResponse, responses=ERRORS)
    async def generate(body: GenerateRequest, request: Request):
        """Class-conditional images. Every field has a default; the seeds used are returned.
        ``Accept: image/png`` -> a PNG (seeds and classes in the X-Seeds / X-Class-Labels
        headers)."""
        gen = svc.generator(body.model, request)
        labels, seeds, params = _generate_inputs(body, gen, svc)
        job = Job(
            gen.name,
            "generate",
            {"labels": labels, "seeds": seeds, "cfg_scale": body.cfg_scale, "n": len(labels)},
            params=params,
            deadline=svc.deadline(body.timeout_s),
        )
        result = await svc.submit(request, job)
        parameters = {**params, "cfg_scale": body.cfg_scale}
        if wants_png(request):
            return await png_response(
                result["images"],
                {
                    "X-Model": gen.name,
                    "X-Seeds": ",".join(map(str, seeds)),
                    "X-Class-Labels": ",".join(map(str, labels)),
                    **(
                        {"X-Class-Names": ",".join(gen.class_names[y] for y in labels)}
                        if gen.class_names
                        else {}
                    ),
                },
            )
        images_b64 = await run_in_threadpool(codec.png_b64_list, result["images"])
        return JSONResponse(
            {
                "model": gen.name,
                "images": images_b64,
                "class_labels": labels,
                "class_names": [gen.class_names[y] for y in labels] if gen.class_names else None,
                "seeds": seeds,
                "parameters": parameters,
            }
        )

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
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "Accept"],
            expose_headers=[
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


def _tokenize_answer(name: str, result: dict, fmt: str) -> JSONResponse:
    tokens = np.asarray(result["tokens"], dtype=np.float32)  # (B, L, D)
    body = {
        "model": name,
        "shape": list(tokens.shape),
        "dtype": "float32",
        "indices": np.asarray(result["indices"]).tolist(),  # (B, G, L/G)
    }
    if fmt == "base64":
        body["tokens_b64"] = codec.tokens_b64(tokens)
    else:
        body["tokens"] = tokens.tolist()
    return JSONResponse(body)


async def _decode_images(svc: Service, blobs: list[bytes], size: int) -> np.ndarray:
    s = svc.settings
    return await run_in_threadpool(
        codec.decode_images, blobs, size, s.max_image_bytes, s.max_image_pixels
    )


def class_id(label: int | str, gen) -> int:
    """A class id, or a class name (case-insensitive) of the generator's class_names."""
    if isinstance(label, int):
        return label
    names = gen.class_names or []
    lowered = [n.lower() for n in names]
    if label.strip().lower() in lowered:
        return lowered.index(label.strip().lower())
    if not names:
        raise ApiError(
            422,
            "invalid_class",
            f"{gen.name} has no class names; use ids 0..{gen.num_classes - 1}",
        )
    raise ApiError(
        422, "invalid_class", f"unknown class {label!r}; {gen.name} knows: {', '.join(names)}"
    )


def _generate_inputs(body: GenerateRequest, gen, svc: Service):
    """Validated (labels, seeds, params) of a /generate request; 422 on anything off."""
    s = svc.settings
    if body.class_labels is not None:
        n = len(body.class_labels)
        if body.num_images is not None and body.num_images != n:
            raise ApiError(
                422, "invalid_request", f"num_images={body.num_images} but {n} class_labels"
            )
    else:
        n = body.num_images or (len(body.seeds) if body.seeds else 1)
    svc.check_count(n)

    if body.seeds is not None and body.seed is not None:
        raise ApiError(422, "invalid_request", "send 'seed' or 'seeds', not both")
    if body.seeds is not None:
        if len(body.seeds) != n:
            raise ApiError(422, "invalid_seeds", f"{len(body.seeds)} seeds for {n} images")
        if any(not 0 <= x <= MAX_SEED for x in body.seeds):
            raise ApiError(422, "invalid_seeds", f"seeds must lie in [0, {MAX_SEED}]")
        seeds = list(body.seeds)
    else:
        seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
        if seed + n - 1 > MAX_SEED:
            raise ApiError(422, "invalid_seeds", f"seed + {n - 1} exceeds {MAX_SEED}")
        seeds = [seed + i for i in range(n)]

    if body.class_labels is not None:
        labels = [class_id(c, gen) for c in body.class_labels]
        bad = [c for c in labels if not 0 <= c < gen.num_classes]
        if bad:
            raise ApiError(
                422, "invalid_class", f"class ids {bad[:5]} outside [0, {gen.num_classes})"
            )
    else:  # random classes, reproducible from the first seed
        rng = np.random.default_rng(seeds[0])
        labels = rng.integers(0, gen.num_classes, size=n).tolist()

    steps = body.steps if body.steps is not None else min(DEFAULT_STEPS, s.max_steps)
    if not 1 <= steps <= s.max_steps:
        raise ApiError(422, "invalid_steps", f"steps={steps} outside [1, {s.max_steps}]")
    if body.sampler not in models.SAMPLERS:
        raise ApiError(
            422,
            "unknown_sampler",
            f"sampler {body.sampler!r}; choose one of {list(models.SAMPLERS)}",
        )
    lo, hi = body.guidance_interval
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 <= lo <= hi <= 1):
        raise ApiError(
            422,
            "invalid_guidance_interval",
            f"guidance_interval [{lo}, {hi}] must satisfy 0 <= lo <= hi <= 1",
        )
    params = {
        "steps": steps,
        "sampler": body.sampler,
        "guidance_interval": [lo, hi],
        "path": "linear",
    }
    return labels, seeds, params


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
