"""Request and response bodies of the HTTP API (pydantic v2).

Limits that depend on settings or on the chosen model (images per request, steps, class
ids, token shapes) are checked by the routes, which know both; the static checks here only
bound what can be parsed at all. Unknown fields are refused so a typo ("cfg" for
"cfg_scale") is an error, not a silently ignored option.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_SEED = 2**63 - 1
MAX_LIST = 4096  # a sanity bound on any list; the real per-request limit is a setting


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- requests --------------------------------------------------------------------------
Lane = Literal["interactive", "batch"]


class TimeoutField(Strict):
    timeout_s: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="per-request deadline in seconds; can only shorten the server's default",
    )
    priority: Lane | None = Field(
        None,
        description="lane: 'interactive' (default of the sync endpoints) is served before"
        " 'batch' (default of async jobs); see README 'Long jobs'",
    )


class TokenizeRequest(TimeoutField):
    images: list[str] = Field(
        ...,
        min_length=1,
        max_length=MAX_LIST,
        description="base64 PNG / JPEG / WebP / AVIF / HEIC images",
    )
    model: str | None = Field(
        None, max_length=200, description="tokenizer name (default: server's)"
    )
    format: Literal["list", "base64"] = Field(
        "list", description="'list': nested token lists; 'base64': little-endian float32 bytes"
    )


class ReconstructRequest(TimeoutField):
    images: list[str] = Field(..., min_length=1, max_length=MAX_LIST)
    model: str | None = Field(None, max_length=200)


class DecodeRequest(TimeoutField):
    tokens: list[list[list[float]]] | None = Field(
        None, max_length=MAX_LIST, description="nested (B, L, D) list"
    )
    tokens_b64: str | None = Field(None, description="little-endian bytes of a (B, L, D) array")
    shape: list[int] | None = Field(None, min_length=3, max_length=3, description="[B, L, D]")
    dtype: Literal["float32", "float16", "bfloat16", "float64"] = "float32"
    model: str | None = Field(None, max_length=200)


class GenerateRequest(TimeoutField):
    class_labels: list[int | str] | None = Field(
        None,
        min_length=1,
        max_length=MAX_LIST,
        description="one image per class: an id, or a name from GET /models' class_names",
    )
    num_images: int | None = Field(
        None, ge=1, le=MAX_LIST, description="images with classes drawn from a seeded RNG"
    )
    seed: int | None = Field(
        None, ge=0, le=MAX_SEED, description="image i uses seed + i (default: random)"
    )
    seeds: list[int] | None = Field(None, min_length=1, max_length=MAX_LIST)
    # Left out: the generator's own defaults (GET /models' sampling_defaults; config.json
    # "sampling"), else 50 steps, euler, no guidance, the whole interval.
    steps: int | None = Field(
        None, ge=1, description="sampling steps (default: the model's, else 50; capped)"
    )
    sampler: str | None = Field(
        None,
        max_length=50,
        description="euler | heun | euler-maruyama (default: the model's, else euler)",
    )
    cfg_scale: float | None = Field(
        None,
        ge=0,
        allow_inf_nan=False,
        description="classifier-free guidance scale; 1.0 = no guidance (costs half as much);"
        " default: the model's, else 1.0",
    )
    guidance_interval: tuple[float, float] | None = Field(
        None,
        description="[lo, hi] in [0, 1]: guidance applies for t in this range (default: the"
        " model's, else [0, 1])",
    )
    model: str | None = Field(None, max_length=200, description="generator name")


TaskName = Literal["tokenize", "reconstruct", "decode", "generate"]
JOB_ID_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"


class JobRequest(Strict):
    task: TaskName
    input: dict = Field(
        description="the JSON body of that task's endpoint (images as base64 for tokenize and"
        " reconstruct)"
    )
    id: str | None = Field(
        None,
        pattern=JOB_ID_PATTERN,
        description="your own id (idempotent: the same id again returns the same job)",
    )
    priority: Lane | None = Field(None, description="lane (default 'batch')")
    previews: bool = Field(
        False,
        description="generate only: while it samples, render a small PNG of the current"
        " estimate of the images about every second, streamed as `preview` events by"
        " GET /jobs/{id}/events?previews=1 (off by default: it costs a decode each time)",
    )


# --- responses ------------------------------------------------------------------------------
class ErrorResponse(BaseModel):
    error: str
    message: str


class TokenizeResponse(BaseModel):
    model: str
    shape: list[int]
    dtype: str
    tokens: list[list[list[float]]] | None = None
    tokens_b64: str | None = None
    indices: list[list[list[int]]]


class ImagesResponse(BaseModel):
    model: str
    images: list[str] = Field(description="base64 PNG per image")


class ReconstructResponse(ImagesResponse):
    psnr: list[float | None] = Field(description="dB per image (null if pixel-identical)")


class GenerateResponse(ImagesResponse):
    class_labels: list[int]
    class_names: list[str] | None = Field(None, description="when the generator names them")
    seeds: list[int]
    parameters: dict


class ModelsResponse(BaseModel):
    tokenizers: list[dict]
    generators: list[dict]
    vaes: list[dict] = []  # SD-VAEs decoding the 2-D baseline's latents


class WorkersResponse(BaseModel):
    workers: list[dict] = Field(
        description="processes running jobs: id, host, pid, started (epoch s), busy, batches,"
        " served {model: {backend, device, dtype}}"
    )


class JobUrls(BaseModel):
    get: str
    events: str
    cancel: str


class JobAccepted(BaseModel):
    id: str
    status: str
    urls: JobUrls


class JobProgress(BaseModel):
    step: int
    steps: int


class JobResponse(BaseModel):
    id: str
    task: str
    model: str
    priority: str
    status: Literal["queued", "running", "succeeded", "failed", "canceled"]
    queue_position: int | None = Field(
        None, description="while queued: jobs of the same model and task ahead of it"
    )
    progress: JobProgress | None = Field(None, description="generate: the sampling step")
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    output: dict | None = Field(None, description="when succeeded: the sync endpoint's body")
    error: ErrorResponse | None = Field(None, description="when failed")
    urls: JobUrls
