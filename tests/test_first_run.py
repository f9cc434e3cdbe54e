"""The first run, as README tells a newcomer (issue #12).

- README's first command exactly as written (``softvq serve``: no flags, no ``SOFTVQ_*``), in a
  fresh HOME and temp directory (empty ONNX / decision / inductor caches), on the bundled demo
  models with the default ``auto`` backend: ready on eager within seconds, answers /generate
  and /tokenize, settles its backends in the background; then a second start on the warm
  cache; then the same with ``softvq serve --redis URL`` + one ``softvq worker``.
- The whole default registry (4 demo models) and the default buckets under ``compile`` and
  ``onnx`` on an empty cache: every model proven and swapped in, none refused, and every task
  answers from the model thread afterwards.
- Compiled graphs of several models of one class, built in one thread and run in another (the
  recompile limit that broke the first run), and backends that fail: refused in one log line,
  recorded, not retried, eager keeps serving.
- A batcher that dies is a liveness failure: /healthz 503 with the reason, exit status 70.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from model import backends
from service.batcher import EXIT_HUNG
from tests.redis_server import RedisServer, free_port, free_ports
from tests.test_api import png
from tests.test_serve_uvicorn import softvq_command
from tests.tiny_models import make_tokenizer

README_PORT = 8000  # README's first command takes the default port


def newcomer_env(home: Path) -> dict[str, str]:
    """This machine's environment as a new user has it: no SOFTVQ_*, an empty HOME (so an
    empty ~/.cache/softvq) and an empty temp directory (so an empty inductor cache)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOFTVQ_")}
    env.pop("XDG_CACHE_HOME", None)
    (home / "tmp").mkdir(parents=True, exist_ok=True)
    env.update(HOME=str(home), TMPDIR=str(home / "tmp"))
    return env


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@contextlib.contextmanager
def process(args: list[str], env: dict[str, str], log_path: Path):
    """A real ``softvq`` process; SIGTERM (then kill) on exit, its log's tail printed."""
    log = open(log_path, "w+")
    proc = subprocess.Popen(
        [*softvq_command(), *args], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.seek(0)
        print(f"--- {' '.join(args)} ---\n{log.read()[-4000:]}")
        log.close()


def wait_ready(base: str, procs: list[subprocess.Popen], timeout: float, pid=None) -> float:
    """Seconds until /readyz answers 200 (a process that exits fails the test). ``pid``: the
    answer must come from that process (GET /workers), not another server on the port."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        for p in procs:
            assert p.poll() is None, f"{p.args} exited with {p.returncode}"
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                if pid is not None:
                    (me,) = httpx.get(f"{base}/workers", timeout=2).json()["workers"]
                    assert me["pid"] == pid, f"port answered by another server (pid {me['pid']})"
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"not ready within {timeout}s")


def wait_log(path: Path, text: str, timeout: float, proc: subprocess.Popen) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if text in path.read_text(errors="replace"):
            return
        assert proc.poll() is None, f"exited with {proc.returncode} before {text!r}"
        time.sleep(1)
    raise AssertionError(f"{text!r} not logged within {timeout}s")


def use_like_a_newcomer(base: str) -> None:
    """README's curl calls: /generate (PNG) and /tokenize of an image."""
    r = httpx.post(
        f"{base}/generate",
        json={"class_labels": [0, 3, 6], "seed": 0, "cfg_scale": 2.0},
        headers={"Accept": "image/png"},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png" and r.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert r.headers["x-class-labels"] == "0,3,6"
    image = png(np.random.default_rng(0).integers(0, 256, (80, 96, 3), dtype=np.uint8))
    r = httpx.post(f"{base}/tokenize", files={"image": ("a.png", image)}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "softvq-demo-64" and body["shape"] == [1, 64, 16]


# --- README's first command ----------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_readme_first_command_serves_on_a_fresh_machine(tmp_path):
    if not port_free(README_PORT):
        pytest.skip(f"port {README_PORT} is taken: README's command needs it")
    env = newcomer_env(tmp_path / "home")
    base = f"http://127.0.0.1:{README_PORT}"
    times = {}
    for start in ("first", "warm"):
        log = tmp_path / f"serve-{start}.log"
        with process(["serve"], env, log) as proc:
            times[start] = wait_ready(base, [proc], timeout=60, pid=proc.pid)
            use_like_a_newcomer(base)
            models = httpx.get(f"{base}/models").json()
            assert {m["name"] for m in models["tokenizers"]} == {"softvq-demo-32", "softvq-demo-64"}
            # The auto backend proves compile and onnx in the background, then settles.
            wait_log(log, "backends settled", timeout=900, proc=proc)
            use_like_a_newcomer(base)  # whatever was swapped in answers too
            text = log.read_text()
            assert "Traceback" not in text and "refused" not in text, text[-3000:]
        assert proc.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises SIGTERM
    decisions = json.loads((tmp_path / "home/.cache/softvq/auto_backend.json").read_text())
    assert len(decisions) == 4 and all(not d["refused"] for d in decisions.values())
    # Warm start: decisions come from the cache, nothing is timed again.
    assert "auto: " not in (tmp_path / "serve-warm.log").read_text()
    # Seconds are for the benchmark (python -m loadtests.time_to_ready, README), not asserted
    # here: a shared CI machine's load decides them.
    print(f"time to ready: {times}")


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.timeout(600)
def test_readme_redis_mode_serves_on_a_fresh_machine(tmp_path):
    """``softvq serve --redis URL`` + one ``softvq worker --redis URL``, newcomer's env."""
    env = newcomer_env(tmp_path / "home")
    port, metrics_port = free_ports(2)
    base = f"http://127.0.0.1:{port}"
    server = RedisServer().start()
    try:
        with (
            process(
                ["worker", "--redis", server.url, "--metrics-port", str(metrics_port)],
                env,
                tmp_path / "worker.log",
            ) as worker,
            process(
                ["serve", "--redis", server.url, "--port", str(port)], env, tmp_path / "api.log"
            ) as api,
        ):
            took = wait_ready(base, [worker, api], timeout=90)
            use_like_a_newcomer(base)
            workers = httpx.get(f"{base}/workers").json()
            assert len(workers["workers"]) == 1, workers
            print(f"redis mode: ready after {took:.1f}s")
        assert worker.returncode == 0 and api.returncode in (0, -signal.SIGTERM)
    finally:
        server.close()


# --- the default registry under each compiled backend -----------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("backend", ["compile", "onnx"])
def test_demo_registry_proves_every_model_on_an_empty_cache(backend, tmp_path):
    from service.executor import Executor
    from service.jobs import Job
    from service.registry import ModelRegistry
    from service.settings import Settings

    settings = Settings(
        _env_file=None, device="cpu", dtype="float32", backend=backend, cache_dir=str(tmp_path)
    )
    reg = ModelRegistry.from_settings(settings)
    assert len(reg.tokenizers) == 2 and len(reg.generators) == 2
    model_thread = ThreadPoolExecutor(1)
    model_thread.submit(reg.warmup).result()
    reg.start_tuning()  # its own thread, as in the service
    assert reg.tuned.wait(1500)
    runners = [e.runner for e in [*reg.tokenizers.values(), *reg.generators.values()]]
    assert [r.backend for r in runners] == [backend] * 4
    decisions = (
        json.loads((tmp_path / "auto_backend.json").read_text())
        if (tmp_path / "auto_backend.json").exists()
        else {}
    )
    assert not any(d.get("refused") for d in decisions.values())
    served = reg.served()
    assert {v["backend"] for v in served.values()} == {backend}

    # Every task, run by the model thread (not the thread that compiled), at odd sizes.
    ex = Executor(reg)
    rng = np.random.default_rng(0)
    jobs = []
    for name, t in reg.tokenizers.items():
        S = t.image_size
        imgs = rng.integers(0, 256, (3, 3, S, S)).astype(np.float32) / 127.5 - 1
        tokens = rng.standard_normal((5, t.num_tokens, t.token_dim)).astype(np.float32)
        jobs += [
            [Job(name, "tokenize", {"images": imgs, "n": 3})],
            [Job(name, "reconstruct", {"images": imgs[:1], "n": 1})],
            [Job(name, "decode", {"tokens": tokens, "n": 5})],
        ]
    for name in reg.generators:
        payload = {"labels": [1, 2, 3], "seeds": [0, 1, 2], "cfg_scale": 2.0, "n": 3}
        params = {"steps": 3, "sampler": "euler", "guidance_interval": [0.0, 1.0]}
        jobs.append([Job(name, "generate", payload, {**params, "path": "linear"})])
    for batch in jobs:
        (out,) = model_thread.submit(ex.run, batch).result()
        assert isinstance(out, dict), out
    model_thread.shutdown()


# --- the recompile limit ----------------------------------------------------------------------
@pytest.mark.slow
def test_compiled_models_of_one_class_run_in_another_thread():
    """Five tokenizers of different shapes (as the demo's 32 x 32 and 64 x 16), each compiled
    for a batch of one and a dynamic batch (the CPU's compile): 10 compiled variants of the one
    code object DecodeGraph.forward, more than dynamo's default limit of 8. Built here, run in
    another thread, where a limit set at build time does not hold (the old code failed exactly
    so: FailOnRecompileLimitHit)."""
    buckets = [1, 2, 3]
    shapes = [(8, 8), (16, 4), (4, 16), (8, 4), (16, 8)]
    toks = [make_tokenizer(tokens=n, dim=d) for n, d in shapes]
    runners = [backends.build_runner("tokenizer", t, "compile", buckets=buckets) for t in toks]
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(3, t.num_tokens, t.token_dim, generator=g) for t in toks]

    def decode_all():
        return [r.decode(x[:b]) for r, x in zip(runners, inputs) for b in buckets]

    with ThreadPoolExecutor(1) as other:
        outs = other.submit(decode_all).result()
    for k, (tok, x) in enumerate(zip(toks, inputs)):
        torch.testing.assert_close(outs[3 * k + 2], tok.decode(x), atol=1e-4, rtol=1e-4)


# --- refusals -----------------------------------------------------------------------------
def test_a_failing_backend_is_refused_recorded_and_not_retried(
    engine_settings_factory, tmp_path, caplog
):
    """ONNX Runtime cannot run bfloat16 on the CPU: a real failure. The models keep serving
    on eager, the refusal is logged in one line and cached, and the next start does not try
    again."""
    from service.registry import ModelRegistry

    settings = engine_settings_factory(backend="onnx", dtype="bfloat16", cache_dir=str(tmp_path))
    for attempt in (1, 2):
        caplog.clear()
        reg = ModelRegistry.from_settings(settings)
        reg.warmup()
        reg.tune_backends()
        assert reg.tuned.is_set()
        assert {e.runner.backend for e in [*reg.tokenizers.values(), *reg.generators.values()]} == {
            "eager"
        }
        tokens, _ = reg.tokenizer("tiny").runner.encode(torch.zeros(1, 3, 32, 32))
        assert tokens.shape == (1, 8, 8)
        lines = [r.getMessage() for r in caplog.records if "backend onnx" in r.getMessage()]
        assert len(lines) == 2  # one per model
        want = "refused" if attempt == 1 else "is not tried again"
        assert all(want in line and "float32" in line for line in lines), lines
    decisions = json.loads((tmp_path / "auto_backend.json").read_text())
    assert len(decisions) == 2
    assert all("onnx" in d["refused"] for d in decisions.values())


def test_a_backend_that_disagrees_with_eager_is_refused(tmp_path):
    """A runner whose outputs are not eager's (here: other weights) never serves."""
    tok = make_tokenizer(seed=0)
    eager = backends.build_runner("tokenizer", tok, "eager", buckets=[1, 4])
    other = make_tokenizer(seed=5)

    def build(name):
        return backends.build_runner("tokenizer", other, "eager", buckets=[1, 4])

    choice = backends.choose_backend("tokenizer", "t", eager, "compile", build, cache_dir=tmp_path)
    assert choice.runner is eager and "disagrees with eager" in choice.refused["compile"]

    # auto over a failing build: eager serves, the failure is cached
    def broken(name):
        raise RuntimeError(f"{name} cannot be built here\nsecond line")

    choice = backends.choose_backend("tokenizer", "t", eager, "auto", broken, cache_dir=tmp_path)
    assert choice.runner is eager
    assert choice.refused["onnx"] == "RuntimeError: onnx cannot be built here"


# --- a dead batcher -------------------------------------------------------------------------
def test_a_dead_batcher_fails_liveness_and_exits_for_a_restart(api_env, tmp_path):
    """Warm-up that can never succeed (a bucket of a billion images: the allocation fails)
    kills the batcher: /healthz 503 with the reason, then exit status 70. With
    SOFTVQ_EXIT_ON_HANG=false the process stays up, unhealthy, for a liveness probe."""
    env = {**os.environ, **api_env, "SOFTVQ_BATCH_BUCKETS": "[1, 1000000000]"}
    for stay_up in (False, True):
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        run_env = {**env, "SOFTVQ_EXIT_ON_HANG": "false"} if stay_up else env
        args = ["serve", "--port", str(port)]
        with process(args, run_env, tmp_path / f"dead-{stay_up}.log") as proc:
            if not stay_up:
                assert proc.wait(60) == EXIT_HUNG
                assert "batcher stopped" in (tmp_path / "dead-False.log").read_text()
                continue
            end = time.monotonic() + 60
            while time.monotonic() < end:
                with contextlib.suppress(httpx.HTTPError):
                    r = httpx.get(f"{base}/healthz", timeout=2)
                    if r.status_code == 503:
                        break
                time.sleep(0.2)
            assert r.status_code == 503 and r.json()["error"] == "unhealthy"
            assert "batcher stopped" in r.json()["message"]
            assert httpx.get(f"{base}/readyz").status_code == 503
            r = httpx.post(f"{base}/decode", json={"tokens": [[[0.0] * 8] * 8]})
            assert r.status_code == 503 and r.json()["error"] == "broker_unavailable"


def test_model_package_imports_nothing_from_service():
    root = Path(__file__).resolve().parents[1] / "model"
    offenders = [
        str(p.relative_to(root.parent))
        for p in root.rglob("*.py")
        if any(
            line.lstrip().startswith(("from service", "import service"))
            for line in p.read_text().splitlines()
        )
    ]
    assert offenders == []
