"""Every Prometheus metric the API and workers export, in one place.

Conventions: seconds, ``_total`` counters; labels ``model``, ``task``, ``endpoint``.
Tasks are ``tokenize``, ``decode``, ``reconstruct`` and ``generate``. The Grafana dashboards
and alert rules in ``deploy/`` query exactly these names.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

REQUESTS = Counter(
    "softvq_requests_total",
    "HTTP requests by endpoint, model and status code",
    ["endpoint", "model", "status"],
)
REQUEST_LATENCY = Histogram(
    "softvq_request_duration_seconds",
    "End-to-end request latency",
    ["endpoint", "model"],
    buckets=LATENCY_BUCKETS,
)
QUEUE_WAIT = Histogram(
    "softvq_queue_wait_seconds",
    "Time a job waited before its batch started",
    ["model", "task"],
    buckets=LATENCY_BUCKETS,
)
COMPUTE_TIME = Histogram(
    "softvq_compute_seconds",
    "Model time of one batch",
    ["model", "task"],
    buckets=LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram(
    "softvq_batch_size",
    "Items (images or token sets) per model batch",
    ["model", "task"],
    buckets=BATCH_BUCKETS,
)
QUEUE_DEPTH = Gauge("softvq_queue_depth", "Jobs waiting, per model and task", ["model", "task"])
LANE_DEPTH = Gauge(
    "softvq_lane_queue_depth", "Jobs waiting, per model, task and lane", ["model", "task", "lane"]
)
LANE_WAIT = Histogram(
    "softvq_lane_queue_wait_seconds",
    "Time a job waited before its batch started, per lane (interactive, batch)",
    ["lane"],
    buckets=LATENCY_BUCKETS,
)
GUEST_BATCHES = Counter(
    "softvq_preempting_batches_total",
    "Interactive batches run between two steps of a batch-lane sampling loop",
    ["worker"],
)
CACHE_HITS = Counter(
    "softvq_cache_hits_total", "Results answered from the result cache", ["model", "task"]
)
CACHE_MISSES = Counter(
    "softvq_cache_misses_total", "Cacheable requests the cache did not hold", ["model", "task"]
)
JOBS_SUBMITTED = Counter(
    "softvq_async_jobs_total",
    "Async jobs (POST /jobs) accepted, by task and lane",
    ["task", "lane"],
)
IMAGES = Counter(
    "softvq_images_processed_total", "Images encoded, decoded or generated", ["model", "task"]
)
TOKENS = Counter(
    "softvq_tokens_processed_total", "Latent tokens produced or consumed", ["model", "task"]
)
JOB_RETRIES = Counter(
    "softvq_job_retries_total",
    "Jobs delivered again after a worker died or failed",
    ["model", "task"],
)
JOBS_FAILED = Counter(
    "softvq_jobs_failed_total",
    "Jobs that ended in an error for their caller",
    ["model", "task", "reason"],
)
WORKER_BUSY = Gauge("softvq_worker_busy", "1 while the worker runs a batch, else 0", ["worker"])
WORKER_BUSY_SECONDS = Counter(
    "softvq_worker_busy_seconds_total", "Seconds a worker spent running batches", ["worker"]
)
MODEL_HANGS = Counter(
    "softvq_model_hangs_total",
    "Model calls that never returned (past their jobs' deadlines plus the hang grace)",
    ["worker"],
)
WORKERS_ALIVE = Gauge("softvq_workers_alive", "Workers with a fresh heartbeat (API's view)")
MODEL_INFO = Gauge(
    "softvq_model_info",
    "Served models (value 1)",
    ["model", "kind", "tokens", "dim", "backend", "device", "dtype"],
)
GENERATOR_FAMILY = Gauge(
    "softvq_generator_family",
    "Served generators (value 1) by family: softvq = SiT on 1-D tokens, latent-2d = the 2-D"
    " baseline (SiT/2 + SD-VAE); speed_reference = random weights (the compare profile)."
    " deploy/prometheus/recording.yml divides by the latent-2d models' seconds per image",
    ["model", "family", "speed_reference"],
)
GPU_MEMORY = Gauge("softvq_gpu_memory_bytes", "GPU memory by torch", ["device", "kind"])
