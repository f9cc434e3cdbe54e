"""Shared fixtures. Add yours below; do not rewrite others'."""

from __future__ import annotations

import pytest

from tests.tiny_models import make_generator, make_tokenizer, save_tiny_pair


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_generator():
    return make_generator()


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory):
    """{"tokenizer": dir, "generator": dir} of a tiny pair named "tiny" / "sit-tiny"."""
    tok_dir, gen_dir = save_tiny_pair(tmp_path_factory.mktemp("models"))
    return {"tokenizer": tok_dir, "generator": gen_dir}


# --- API fixtures (service/app.py tests) ------------------------------------------------
@pytest.fixture(scope="session")
def api_model_root(tmp_path_factory):
    """Two tiny tokenizer + generator pairs under one root: "tiny" (8 tokens of 8 dims,
    32 px) with "sit-tiny", and "tiny16" (16 tokens) with "sit-tiny16"."""
    root = tmp_path_factory.mktemp("api-models")
    save_tiny_pair(root, "tiny", tokens=8, dim=8, image_size=32, seed=0)
    save_tiny_pair(root, "tiny16", tokens=16, dim=8, image_size=32, seed=10)
    return root


@pytest.fixture(scope="session")
def api_env(api_model_root):
    """SOFTVQ_* environment that serves the tiny models (for ``softvq serve`` subprocesses)."""
    import json

    root = api_model_root
    return {
        "SOFTVQ_MODEL_ROOT": str(root),
        "SOFTVQ_TOKENIZERS": json.dumps({"tiny": "tiny", "tiny16": "tiny16"}),
        "SOFTVQ_GENERATORS": json.dumps(
            {
                "sit-tiny": {"path": "sit-tiny", "tokenizer": "tiny"},
                "sit-tiny16": {"path": "sit-tiny16", "tokenizer": "tiny16"},
            }
        ),
        "SOFTVQ_DEFAULT_TOKENIZER": "tiny",
        "SOFTVQ_DEFAULT_GENERATOR": "sit-tiny",
        "SOFTVQ_DEVICE": "cpu",
        "SOFTVQ_DTYPE": "float32",
        # The default (auto) times every backend at start-up: right for users, minutes of
        # compiling across the suite's servers. Tests that want it set it themselves.
        "SOFTVQ_BACKEND": "eager",
        "SOFTVQ_MAX_WAIT_MS": "5",
        "SOFTVQ_BATCH_BUCKETS": "[1, 2, 4, 8]",
        "SOFTVQ_MAX_BATCH_SIZE": "8",
        "SOFTVQ_MAX_IMAGES_PER_REQUEST": "8",
        "SOFTVQ_MAX_STEPS": "20",
        "SOFTVQ_MAX_IMAGE_PIXELS": "1000000",
        "SOFTVQ_MAX_IMAGE_BYTES": "200000",
        "SOFTVQ_MAX_BODY_BYTES": "1000000",
        "SOFTVQ_REQUEST_TIMEOUT_S": "30",
    }


@pytest.fixture(scope="session")
def api_settings_factory(api_env):
    """``make(**overrides) -> Settings`` for the tiny models (env-free: explicit values)."""
    import json

    from service.settings import Settings

    base = {k.removeprefix("SOFTVQ_").lower(): v for k, v in api_env.items()}
    for k in ("tokenizers", "generators", "batch_buckets"):
        base[k] = json.loads(base[k])

    def make(**overrides) -> Settings:
        return Settings(**{**base, **overrides})

    return make


# --- engine fixtures (registry, batcher, brokers, workers) ------------------------------
@pytest.fixture
def redis_server():
    """A fresh real ``redis-server`` on a free port (killed at the end): ``.url``,
    ``.kill()``, ``.restart()``. See tests/redis_server.py."""
    from tests.redis_server import RedisServer

    server = RedisServer().start()
    yield server
    server.close()


@pytest.fixture(scope="session")
def engine_settings_factory(tiny_model_dirs):
    """``make(**overrides) -> Settings`` serving tokenizer "tiny" and generator "sit-tiny"
    on the CPU in float32, with small batches (env-free: explicit values)."""
    from service.settings import Settings

    base = {
        "tokenizers": {"tiny": str(tiny_model_dirs["tokenizer"])},
        "generators": {
            "sit-tiny": {"path": str(tiny_model_dirs["generator"]), "tokenizer": "tiny"}
        },
        "device": "cpu",
        "dtype": "float32",
        "backend": "eager",
        "max_batch_size": 8,
        "max_wait_ms": 20,
        "batch_buckets": [1, 2, 4, 8],
        "max_steps": 50,
    }

    def make(**overrides) -> Settings:
        return Settings(**{**base, **overrides})

    return make


@pytest.fixture
def spawn_worker(engine_settings_factory):
    """``spawn(redis_url, worker_id, metrics_port=None, module="service.worker", **settings)
    -> Popen`` of a real worker process (``python -m <module>``) on the tiny models; all are
    killed at the end of the test. The process env carries the settings as SOFTVQ_* variables."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    procs = []
    root = Path(__file__).resolve().parent.parent

    def spawn(
        redis_url: str,
        worker_id: str,
        metrics_port: int | None = None,
        module: str = "service.worker",
        **overrides,
    ):
        s = engine_settings_factory(redis_url=redis_url, **overrides)
        env = {k: v for k, v in os.environ.items() if not k.startswith("SOFTVQ_")}
        for field, value in s.model_dump().items():
            if value is None:
                continue
            if isinstance(value, (dict, list)):
                value = json.dumps(value)
            env[f"SOFTVQ_{field.upper()}"] = str(value)
        env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(root))
        cmd = [sys.executable, "-m", module, "--worker-id", worker_id]
        if metrics_port:
            cmd += ["--metrics-port", str(metrics_port)]
        proc = subprocess.Popen(cmd, env=env, cwd=root)
        procs.append(proc)
        return proc

    yield spawn
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=10)


@pytest.fixture
def engine_registry(engine_settings_factory):
    """A fresh, warmed-up ModelRegistry of the tiny models (tests may wrap its runners)."""
    from service.registry import ModelRegistry

    reg = ModelRegistry.from_settings(engine_settings_factory())
    reg.warmup()
    return reg
