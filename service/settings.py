"""All configuration in one place: environment variables with the prefix ``SOFTVQ_``.

Model maps are JSON in the environment, e.g.
``SOFTVQ_TOKENIZERS='{"softvq-l-64": "/models/softvq-l-64"}'`` and
``SOFTVQ_GENERATORS='{"sit-xl-l64": {"path": "/models/sit-xl-l64", "tokenizer": "softvq-l-64"}}'``.
Relative paths resolve against ``SOFTVQ_MODEL_ROOT``; ``hf://OWNER/REPO[@REVISION]`` paths come
from the Hugging Face Hub's cache (service/hub.py). Left empty, the bundled demo models
are served.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .liveness import DEFAULT_FILE as DEFAULT_LIVENESS_FILE


class GeneratorSpec(BaseModel):
    path: str
    tokenizer: str  # a tokenizer's name, or an SD-VAE's (``vaes``) for a 2-D generator


class BatchPolicyOverride(BaseModel):
    """One entry of ``batch_policy``: the fields it sets; the others come from the next
    broader level (model/task -> task -> the global max_batch_size / max_wait_ms)."""

    model_config = ConfigDict(extra="forbid")
    max_batch_size: int | None = Field(None, ge=1)
    max_wait_ms: float | None = Field(None, ge=0)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SOFTVQ_", extra="ignore")

    # --- models -----------------------------------------------------------------------
    model_root: str | None = Field(
        None,
        description="directory that relative model paths resolve against; model dirs must lie under it when set",
    )
    models_dir: str | None = Field(
        None,
        description=(
            "a directory of model directories, as softvq train-demo --out-dir writes them:"
            " every tokenizer in it, and every generator with its tokenizer there, served"
            " under its directory's name (beside SOFTVQ_TOKENIZERS / SOFTVQ_GENERATORS)"
        ),
    )
    tokenizers: dict[str, str] = Field(
        default_factory=dict, description="tokenizer name -> directory"
    )
    vaes: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "SD-VAE name -> diffusers AutoencoderKL directory (config.json +"
            " diffusion_pytorch_model.safetensors): the decoder of 2-D generators, which name"
            " it as their tokenizer"
        ),
    )
    generators: dict[str, GeneratorSpec] = Field(
        default_factory=dict,
        description=(
            "generator name -> {path, tokenizer}; path: a directory, or a released SiT .pt"
            " file; tokenizer: a tokenizer, or an SD-VAE for a 2-D generator"
        ),
    )
    compare: Literal["cpu", "gpu"] | None = Field(
        None,
        description=(
            "speed-comparison profile: also serve three random-weight generators at the"
            " benchmark's sizes (SiT on 32 and 64 tokens + SoftVQ decoders, SiT/2 on 4x32x32"
            " latents + SD-VAE); cpu = 1/4-width preset, gpu = SiT-XL, SoftVQ-L/-B, full"
            " SD-VAE. Their images are noise"
        ),
    )
    default_tokenizer: str | None = Field(
        None, description="tokenizer used when a request names none"
    )
    default_generator: str | None = Field(
        None, description="generator used when a request names none"
    )
    device: str = Field(
        "auto", description="'auto' (cuda when available), 'cpu', 'cuda', 'cuda:1', ..."
    )
    dtype: str = Field(
        "auto",
        description="'auto' (bfloat16 on GPU, float32 on CPU), 'float32', 'bfloat16', 'float16'",
    )
    backend: str = Field(
        "auto",
        description=(
            "execution backend: auto (prove compile and onnx against eager and time them, keep"
            " the fastest; the choice is cached) | eager | compile | onnx. Models serve on eager"
            " at once; the chosen backend is swapped in per model once proven, in the background"
        ),
    )
    cache_dir: str | None = Field(
        None,
        description="ONNX exports and backend decisions (default ~/.cache/softvq)",
    )
    cuda_graphs: bool = Field(
        True,
        description="on CUDA with the eager backend, replay each sampling loop as one CUDA graph",
    )

    # --- batching and queues ----------------------------------------------------------------
    max_batch_size: int = Field(
        16, ge=1, description="most items run in one model call (guidance counts double)"
    )
    max_wait_ms: float = Field(5.0, ge=0, description="how long a batch waits to fill")
    batch_policy: dict[str, BatchPolicyOverride] = Field(
        default_factory=dict,
        description=(
            "per-task batching, keyed 'task' or 'model/task' (tasks: tokenize, decode,"
            " reconstruct, generate), each {max_batch_size?, max_wait_ms?}; a field left out"
            " comes from the broader key, then from max_batch_size / max_wait_ms. E.g."
            ' {"generate": {"max_wait_ms": 20}, "sit-demo-64/generate": {"max_batch_size": 8}}'
        ),
    )
    batch_buckets: list[int] = Field(
        default_factory=lambda: [1, 2, 4, 8, 16],
        description="batch sizes compiled graphs are built for",
    )
    queue_max: int = Field(
        256, ge=1, description="bound on queued jobs per model and task; past it 429"
    )
    request_timeout_s: float = Field(
        60.0, gt=0, description="default per-request deadline; a request may ask for less"
    )

    # --- redis mode -------------------------------------------------------------------
    redis_url: str | None = Field(None, description="Redis URL; unset = embedded in-process queue")
    stream_prefix: str = Field(
        "softvq", description="key prefix of streams, results and heartbeats"
    )
    visibility_timeout_s: float = Field(
        30.0, gt=0, description="idle time after which another worker claims a job"
    )
    max_attempts: int = Field(
        3, ge=1, description="deliveries of a job before its caller gets an error"
    )
    result_ttl_s: float = Field(120.0, gt=0, description="how long an unread result stays in Redis")
    worker_liveness_file: str = Field(
        DEFAULT_LIVENESS_FILE,
        description=(
            "file a worker's event loop rewrites every second; `softvq worker --check` (the"
            " liveness probe) fails when it is stale. One per worker: set it per process when"
            " several workers share a filesystem"
        ),
    )
    worker_stuck_after_s: float = Field(
        30.0,
        gt=0,
        description=(
            "a worker whose event loop, or whose batcher outside a model call, has not turned"
            " for this long fails `softvq worker --check`"
        ),
    )

    # --- async jobs (POST /jobs), lanes and the result cache -------------------------------
    job_ttl_s: float = Field(
        3600.0, gt=0, description="how long a finished async job's record and result are kept"
    )
    job_max_kept: int = Field(
        10000,
        ge=1,
        description="embedded mode: most job records kept in memory (oldest finished go first)",
    )
    job_timeout_s: float = Field(
        3600.0,
        gt=0,
        description="deadline of an async job (from submission); past it the job fails with 504",
    )
    job_runner_lease_s: float = Field(
        15.0,
        gt=0,
        description=(
            "Redis mode: each API replica renews a lease this long while it runs async jobs;"
            " a job whose replica's lease lapsed (the process died) is reported failed"
            " (`runner_lost`) by any other replica instead of waiting for its deadline"
        ),
    )
    sse_keepalive_s: float = Field(
        10.0, gt=0, description="a comment line this often keeps a quiet event stream open"
    )
    interactive_burst: int = Field(
        4,
        ge=1,
        description=(
            "lanes: while batch-lane work is due, at most this many interactive batches run in"
            " a row before one batch-lane batch does (batch work is never starved)"
        ),
    )
    cache_tasks: list[str] = Field(
        default_factory=lambda: ["tokenize", "reconstruct"],
        description="tasks whose results are cached (any of tokenize, reconstruct, decode, generate)",
    )
    cache_max_bytes: int = Field(
        256 * 1024 * 1024,
        ge=0,
        description="embedded: bytes of results the in-memory LRU keeps (0 = no cache)",
    )
    cache_max_entry_bytes: int = Field(
        16 * 1024 * 1024, ge=0, description="results larger than this are never cached"
    )
    cache_ttl_s: float = Field(
        3600.0, gt=0, description="how long a cached result lives (Redis mode: key TTL)"
    )

    # --- hung model calls ---------------------------------------------------------------
    hang_grace_s: float = Field(
        60.0,
        gt=0,
        description=(
            "a model call still running this long after the last deadline of its jobs is hung:"
            " its jobs fail over (Redis) or get 503 (embedded) and the process reports unhealthy"
        ),
    )
    exit_on_hang: bool = Field(
        True,
        description=(
            "after a hung model call, exit (code 70) so a supervisor restarts the process;"
            " false: stay up with /healthz 503 for a liveness probe to act on"
        ),
    )

    # --- limits -------------------------------------------------------------------------
    max_body_bytes: int = Field(32 * 1024 * 1024, description="largest request body (413 past it)")
    max_image_bytes: int = Field(16 * 1024 * 1024, description="largest single encoded image")
    max_image_pixels: int = Field(
        25_000_000,
        description="largest decoded image (width x height): a 24 MP phone photo fits",
    )
    max_concurrent_decodes: int = Field(
        2,
        ge=1,
        description=(
            "images the API decodes at once (others wait): a 24 MP PNG with alpha holds"
            " ~470 MB while it decodes, so this bounds the API's memory"
        ),
    )
    max_images_per_request: int = Field(32, ge=1, description="images or tokens per request")
    max_steps: int = Field(250, ge=1, description="largest 'steps' of /generate")

    # --- network and access ---------------------------------------------------------------
    host: str = Field("127.0.0.1", description="address the API binds")
    port: int = Field(8000, description="port of the API")
    metrics_port: int = Field(9100, description="port of a worker's /metrics")
    api_keys: list[str] = Field(default_factory=list, description="bearer tokens; empty = no auth")
    api_key_lanes: dict[str, list[Literal["interactive", "batch"]]] = Field(
        default_factory=dict,
        description=(
            'API key -> the lanes its jobs may use, e.g. {"bulk-key": ["batch"]}: that key\'s'
            " requests default to its first lane and asking for another is 403; unlisted keys"
            " may use both"
        ),
    )
    rate_limit_per_s: float = Field(0.0, ge=0, description="per-key request rate (0 = unlimited)")
    rate_limit_burst: int = Field(20, ge=1, description="per-key burst")
    cors_origins: list[str] = Field(default_factory=list, description="allowed CORS origins")

    @field_validator("cache_tasks")
    @classmethod
    def _cache_tasks_known(cls, tasks: list[str]):
        known = ("tokenize", "reconstruct", "decode", "generate")
        bad = [t for t in tasks if t not in known]
        if bad:
            raise ValueError(f"cache_tasks {bad}: tasks are {list(known)}")
        return tasks

    @field_validator("batch_policy")
    @classmethod
    def _known_tasks(cls, policy: dict[str, BatchPolicyOverride]):
        from .tasks import TASKS  # the task table (imports torch): only when a policy is set

        for key in policy:
            model, slash, task = key.rpartition("/")
            if task not in TASKS or (slash and not model):
                raise ValueError(
                    f"batch_policy key {key!r}: expected 'task' or 'model/task' with task one"
                    f" of {list(TASKS)}"
                )
        return policy

    def resolve(self, path: str) -> Path:
        p = Path(path)
        if not p.is_absolute() and self.model_root:
            p = Path(self.model_root) / p
        return p.resolve()


@lru_cache
def get_settings() -> Settings:
    return Settings()
