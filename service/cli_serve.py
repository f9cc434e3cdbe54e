"""``softvq serve`` and ``softvq worker``.

    softvq serve                         # API + embedded worker, bundled demo weights
    softvq serve --redis redis://h:6379  # API only; jobs go to Redis Streams
    softvq serve --compare cpu           # + the speed-comparison profile (service/compare.py)
    softvq serve --models DIR            # the models softvq train-demo --out-dir DIR wrote
    softvq worker --redis redis://h:6379 --metrics-port 9100
    softvq worker --check                # liveness probe of this host's worker: exit 0 / 1

Everything else comes from ``SOFTVQ_*`` environment variables (service/settings.py); the
flags override them.
"""

from __future__ import annotations

import logging

from model.usage import UsageError


def _settings(**overrides):
    from pydantic import ValidationError

    from .settings import Settings

    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as e:
        raise UsageError(f"bad configuration: {e}") from None


def _check_models(settings) -> None:
    """Fail fast with one line when the configured models cannot be found (reads only
    config.json files; the weights load in the server)."""
    from .registry import ModelRegistry

    try:
        ModelRegistry.from_settings(settings, load_weights=False)
    except Exception as e:  # CheckpointError, UnknownModel, a refused path...
        raise UsageError(f"cannot serve the configured models: {e}") from None


def cmd_serve(args) -> int:
    import uvicorn

    from .app import create_app

    settings = _settings(
        host=args.host,
        port=args.port,
        redis_url=args.redis,
        compare=args.compare,
        models_dir=args.models,
    )
    _check_models(settings)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    app = create_app(settings)
    # On SIGTERM uvicorn stops accepting, lets in-flight requests finish (up to the request
    # timeout), then runs the lifespan's shutdown, which stops the broker gracefully.
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=int(settings.request_timeout_s) + 5,
        proxy_headers=args.proxy_headers,
        access_log=args.access_log,
    )
    from .batcher import leave_past_tuner

    leave_past_tuner(app.state.service.registry, "server")  # stopped cleanly
    return 0


def cmd_worker(args) -> int:
    if args.check:
        # The worker's event loop rewrites its liveness file every second; stale or missing
        # means stuck, frozen or not running (service/liveness.py). Redis is not asked.
        from .liveness import check

        ok, why = check(args.liveness_file or _settings().worker_liveness_file)
        print(f"softvq worker --check: {why}")
        return 0 if ok else 1
    from .worker import run_worker

    settings = _settings(
        redis_url=args.redis,
        metrics_port=args.metrics_port,
        worker_liveness_file=args.liveness_file,
        compare=args.compare,
        models_dir=args.models,
    )
    if not settings.redis_url:
        raise UsageError("a worker needs --redis URL (or SOFTVQ_REDIS_URL)")
    _check_models(settings)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    run_worker(settings, worker_id=args.worker_id, metrics_port=settings.metrics_port)
    return 0


def register(sub) -> None:
    p = sub.add_parser("serve", help="run the HTTP API (with an embedded worker unless --redis)")
    p.add_argument("--host", help="bind address (default SOFTVQ_HOST or 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default SOFTVQ_PORT or 8000)")
    p.add_argument("--redis", metavar="URL", help="Redis URL: API only, jobs go to workers")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument(
        "--proxy-headers",
        action="store_true",
        help="trust X-Forwarded-For (behind a reverse proxy)",
    )
    p.add_argument("--no-access-log", dest="access_log", action="store_false")
    _models_flags(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("worker", help="run a Redis Streams worker")
    p.add_argument("--redis", metavar="URL", help="Redis URL (default SOFTVQ_REDIS_URL)")
    p.add_argument(
        "--metrics-port", type=int, help="port of /metrics (default SOFTVQ_METRICS_PORT)"
    )
    p.add_argument("--worker-id", help="consumer name in the group (default: host-pid)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument(
        "--liveness-file",
        metavar="PATH",
        help="file the worker's loop rewrites every second (default SOFTVQ_WORKER_LIVENESS_FILE)",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="liveness probe: exit 0 if the worker writing --liveness-file is live, else 1"
        " (stuck event loop or batcher, frozen, or not running); does not contact Redis",
    )
    _models_flags(p)
    p.set_defaults(func=cmd_worker)


def _models_flags(p) -> None:
    p.add_argument(
        "--models",
        metavar="DIR",
        help="serve the tokenizers and generators in DIR (SOFTVQ_MODELS_DIR), e.g. what"
        " softvq train-demo --data FOLDER --out-dir DIR trained on your images",
    )
    p.add_argument(
        "--compare",
        choices=["cpu", "gpu"],
        help="speed-comparison profile (SOFTVQ_COMPARE): also serve random-weight SiT on 32 and"
        " 64 tokens + SoftVQ decoders and SiT/2 + SD-VAE at the benchmark's cpu or gpu sizes",
    )
