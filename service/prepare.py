"""From a request to a ``Prepared`` job, one function per task, shared by the sync routes,
``Prefer: respond-async`` and ``POST /jobs``: parse, validate everything (before any
queueing), build the ``Job``, and say how its result renders (the JSON body, or a PNG with
its headers for ``Accept: image/png``). The same validation and the same rendering whichever
way a job comes in, so an async job's ``output`` is exactly the sync endpoint's body.
"""

from __future__ import annotations

import json
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import anyio.to_thread
import numpy as np
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

import model as models

from . import codec
from .auth import bearer_token
from .errors import ApiError
from .jobs import Job
from .lanes import BATCH, INTERACTIVE
from .schemas import (
    MAX_SEED,
    DecodeRequest,
    GenerateRequest,
    ReconstructRequest,
    TokenizeRequest,
)


@dataclass
class Prepared:
    """A validated request: its job, and how its result renders."""

    job: Job
    render_json: Callable[[dict], dict]  # result -> JSON body (CPU work: run off the loop)
    # result -> (uint8 images (n, S, S, 3), headers), for ``Accept: image/png``
    render_png: Callable[[dict], tuple[np.ndarray, dict[str, str]]] | None = None


# --- parsing ----------------------------------------------------------------------------------
def validate(schema: type[BaseModel], data) -> BaseModel:
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


async def read_image_request(request: Request, schema: type[BaseModel], svc):
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
        req = validate(schema, {**fields, "images": ["-"] * len(files)})
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
    return json_image_request(await read_json(request), schema, svc)


def json_image_request(data, schema: type[BaseModel], svc):
    req = validate(schema, data)
    svc.check_count(len(req.images))
    return req, req.images  # base64 text: decoded with the pixels, in a worker thread


def no_cache(request: Request) -> bool:
    """``Cache-Control: no-cache`` (or no-store): skip the result cache's lookup."""
    value = request.headers.get("cache-control", "").lower()
    return "no-cache" in value or "no-store" in value


def lane(svc, request: Request, req, asynchronous: bool) -> str:
    """The request's lane: its ``priority``, else interactive (sync) / batch (async); an API
    key limited to lanes (``SOFTVQ_API_KEY_LANES``) defaults to its first and is refused
    (403) any other."""
    default = BATCH if asynchronous else INTERACTIVE
    allowed = svc.settings.api_key_lanes.get(bearer_token(request.scope.get("headers", [])))
    if allowed:
        if req.priority is not None and req.priority not in allowed:
            raise ApiError(
                403, "lane_not_allowed", f"this API key may use the lanes {allowed} only"
            )
        default = default if default in allowed else allowed[0]
    return req.priority or default


def deadline(svc, timeout_s: float | None, asynchronous: bool) -> float:
    """Sync: the request timeout (a request may only shorten it). Async: the job timeout."""
    limit = svc.settings.job_timeout_s if asynchronous else svc.settings.request_timeout_s
    return time.time() + (min(timeout_s, limit) if timeout_s else limit)


# --- the tasks --------------------------------------------------------------------------------
async def prepare_image_task(
    svc, request: Request, task: str, req, blobs, asynchronous: bool
) -> Prepared:
    """tokenize / reconstruct: decode the images for the chosen tokenizer."""
    tok = svc.tokenizer(req.model, request)
    s = svc.settings
    decode = partial(
        codec.decode_images, blobs, tok.image_size, s.max_image_bytes, s.max_image_pixels
    )
    images = await anyio.to_thread.run_sync(decode, limiter=svc.decode_slots)
    job = Job(
        tok.name,
        task,
        {"images": images, "n": len(blobs)},
        deadline=deadline(svc, req.timeout_s, asynchronous),
        priority=lane(svc, request, req, asynchronous),
    )
    if task == "tokenize":
        fmt = req.format
        return Prepared(job, lambda result: tokenize_body(tok.name, result, fmt))

    def reconstruct_png(result):
        psnr = _psnr(result)
        text = ",".join("inf" if p is None else f"{p:.2f}" for p in psnr)
        return result["images"], {"X-Model": tok.name, "X-PSNR": text}

    return Prepared(
        job,
        lambda result: {
            "model": tok.name,
            "images": codec.png_b64_list(result["images"]),
            "psnr": _psnr(result),
        },
        reconstruct_png,
    )


def _psnr(result) -> list[float | None]:
    # JSON has no Infinity: a pixel-identical reconstruction reports null.
    return [float(p) if p is not None and math.isfinite(p) else None for p in result["psnr"]]


def tokenize_body(name: str, result: dict, fmt: str) -> dict:
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
    return body


def prepare_decode(svc, request: Request, body: DecodeRequest, asynchronous: bool) -> Prepared:
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
        deadline=deadline(svc, body.timeout_s, asynchronous),
        priority=lane(svc, request, body, asynchronous),
    )
    return Prepared(
        job,
        lambda result: {"model": tok.name, "images": codec.png_b64_list(result["images"])},
        lambda result: (result["images"], {"X-Model": tok.name}),
    )


def prepare_generate(svc, request: Request, body: GenerateRequest, asynchronous: bool) -> Prepared:
    gen = svc.generator(body.model, request)
    labels, seeds, params = generate_inputs(body, gen, svc)
    cfg_scale = params.pop("cfg_scale")
    job = Job(
        gen.name,
        "generate",
        {"labels": labels, "seeds": seeds, "cfg_scale": cfg_scale, "n": len(labels)},
        params=params,
        deadline=deadline(svc, body.timeout_s, asynchronous),
        priority=lane(svc, request, body, asynchronous),
    )
    parameters = {**params, "cfg_scale": cfg_scale}
    names = [gen.class_names[y] for y in labels] if gen.class_names else None

    def as_json(result):
        return {
            "model": gen.name,
            "images": codec.png_b64_list(result["images"]),
            "class_labels": labels,
            "class_names": names,
            "seeds": seeds,
            "parameters": parameters,
        }

    def as_png(result):
        headers = {
            "X-Model": gen.name,
            "X-Seeds": ",".join(map(str, seeds)),
            "X-Class-Labels": ",".join(map(str, labels)),
        }
        if names:
            headers["X-Class-Names"] = ",".join(names)
        return result["images"], headers

    return Prepared(job, as_json, as_png)


async def prepare_json(svc, request: Request, task: str, data, asynchronous: bool) -> Prepared:
    """A task's JSON body (POST /jobs' ``input``) -> its prepared job."""
    if task in ("tokenize", "reconstruct"):
        schema = TokenizeRequest if task == "tokenize" else ReconstructRequest
        req, blobs = json_image_request(data, schema, svc)
        return await prepare_image_task(svc, request, task, req, blobs, asynchronous)
    if task == "decode":
        return prepare_decode(svc, request, validate(DecodeRequest, data), asynchronous)
    return prepare_generate(svc, request, validate(GenerateRequest, data), asynchronous)


# --- /generate's inputs -----------------------------------------------------------------------
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


def generate_inputs(body: GenerateRequest, gen, svc):
    """Validated (labels, seeds, params) of a /generate request; 422 on anything off.
    ``params`` holds every sampling setting, the request's or else the generator's default."""
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

    # Fields the request leaves out take the generator's defaults (config.json "sampling").
    d = gen.sampling
    steps = body.steps if body.steps is not None else min(d["steps"], s.max_steps)
    if not 1 <= steps <= s.max_steps:
        raise ApiError(422, "invalid_steps", f"steps={steps} outside [1, {s.max_steps}]")
    sampler = body.sampler if body.sampler is not None else d["sampler"]
    if sampler not in models.SAMPLERS:
        raise ApiError(
            422,
            "unknown_sampler",
            f"sampler {sampler!r}; choose one of {list(models.SAMPLERS)}",
        )
    cfg_scale = body.cfg_scale if body.cfg_scale is not None else d["cfg_scale"]
    lo, hi = (
        body.guidance_interval if body.guidance_interval is not None else d["guidance_interval"]
    )
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 <= lo <= hi <= 1):
        raise ApiError(
            422,
            "invalid_guidance_interval",
            f"guidance_interval [{lo}, {hi}] must satisfy 0 <= lo <= hi <= 1",
        )
    params = {
        "steps": steps,
        "sampler": sampler,
        "guidance_interval": [lo, hi],
        "path": "linear",
        "cfg_scale": cfg_scale,
    }
    return labels, seeds, params
