"""Proving a backend before it serves, and ``auto``: keep the fastest proven one.

A backend other than eager serves a model only once it is *proven*: built (compiled,
exported), warmed up at every batch bucket, and in agreement with eager on random inputs
(relative error of the outputs within 1e-4 in float32, 2e-2 in bfloat16 / float16: issue #5's
tolerances), checked at the largest bucket and at a padded size. A backend that fails any of
that is refused with one log line and its reason; it never takes the model down.

``choose_backend`` does this for the backend a user asked for (``compile`` / ``onnx``), or for
every available one (``auto``), timing the proven ones against eager at the largest bucket and
keeping the fastest. Its decisions and refusals are cached on disk per model, device, dtype,
buckets and torch version (``auto_backend.json`` in the cache directory), so the next start
proves only the winner again (no timing) and never retries a backend that failed here; delete
the file to measure again. When measuring is off (``measure=False``) ``auto`` tries
``AUTO_DEFAULTS``, the winners measured by the benchmark suite (BENCHMARKS.md).

The service runs this in the background while eager already serves (service/registry.py):
building and warming run beside the model thread, only the short timing holds ``timing_lock``
so no batch runs at the same time.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .bucketing import normalize_buckets
from .onnxrt import default_cache_dir, model_hash, onnx_usable, tmp_suffix

log = logging.getLogger(__name__)

# What `auto` tries without timing (measure=False). cpu: ONNX Runtime was the best or within
# noise of the best tokenizer backend in every CPU benchmark run (BENCHMARKS.md) and builds
# in seconds; it needs float32, so bfloat16 falls back to eager. cuda: not yet measured;
# compile (CUDA graphs, max-autotune) is the expected winner.
AUTO_DEFAULTS = {"cpu": "onnx", "cuda": "compile"}
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}
DECISIONS_FILE = "auto_backend.json"


def available_backends(dtype: torch.dtype, device: torch.device) -> list[str]:
    """Backends that can run a model of this dtype on this device, eager first."""
    return ["eager", "compile"] + (["onnx"] if onnx_usable(dtype, device) else [])


@dataclass
class Choice:
    """What serves a model, and why."""

    runner: object
    timings: dict[str, float] = field(default_factory=dict)  # seconds per call, largest bucket
    refused: dict[str, str] = field(default_factory=dict)  # backend -> one-line reason
    cached: bool = False  # taken from the decision cache (not timed this time)

    @property
    def backend(self) -> str:
        return self.runner.backend


# --- one backend, proven ----------------------------------------------------------------------
def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def probe_calls(kind: str, runner, batch: int) -> dict[str, Callable[[object], torch.Tensor]]:
    """Named calls on fixed random inputs of ``batch`` rows, for comparing two runners."""
    g = torch.Generator().manual_seed(1234 + batch)
    if kind == "tokenizer":
        tok = runner.tok
        images = torch.rand(batch, 3, tok.image_size, tok.image_size, generator=g) * 2 - 1
        tokens = torch.randn(batch, tok.num_tokens, tok.token_dim, generator=g)
        return {
            f"encode@{batch}": lambda r: r.encode(images)[0],
            f"decode@{batch}": lambda r: r.decode(tokens),
        }
    x = torch.randn(batch, *runner.input_shape(), generator=g)
    t = torch.rand(batch, generator=g)
    y = torch.randint(0, runner.num_classes + 1, (batch,), generator=g)  # null class included
    return {f"velocity@{batch}": lambda r: r(x, t, y)}


def check_agreement(kind: str, candidate, eager) -> None:
    """ValueError unless candidate's outputs match eager's at the largest bucket and at a
    size that needs padding."""
    tol = TOLERANCE.get(eager.dtype, 2e-2)
    top = max(candidate.buckets)
    for batch in sorted({top, min(3, top)}):
        for name, call in probe_calls(kind, eager, batch).items():
            err = _rel_err(call(candidate), call(eager))
            if not err <= tol:  # also catches NaN
                raise ValueError(f"disagrees with eager on {name}: relative error {err:.2e}")


def time_call(fn: Callable[[], object], device: torch.device, reps: int = 3) -> float:
    """Median seconds of fn() after one untimed call."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def bench_call(kind: str, runner) -> Callable[[], object]:
    """The timed call: decode (tokenizers) or one velocity (generators) at the largest bucket."""
    top = max(runner.buckets)
    if kind == "tokenizer":
        tokens = torch.zeros(top, runner.tok.num_tokens, runner.tok.token_dim)
        return lambda: runner.decode(tokens)
    x = torch.zeros(top, *runner.input_shape())
    t, y = torch.full((top,), 0.5), torch.zeros(top, dtype=torch.long)
    return lambda: runner(x, t, y)


def prove(kind: str, build: Callable[[], object], eager) -> object:
    """Build a runner, warm it up at every bucket, check it against eager. Raises on failure."""
    runner = build()
    runner.warmup(eager.buckets)
    check_agreement(kind, runner, eager)
    return runner


# --- the decision cache -----------------------------------------------------------------------
class DecisionCache:
    """``auto_backend.json``: per model key, the winner, its timings and the refusals."""

    def __init__(self, cache_dir: str | Path | None):
        self.path = Path(cache_dir or default_cache_dir()) / DECISIONS_FILE

    @staticmethod
    def key(kind: str, module: nn.Module, device: torch.device, dtype, buckets) -> str:
        dev = (
            torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else f"cpu{torch.get_num_threads()}"
        )
        b = "-".join(str(x) for x in normalize_buckets(buckets))
        torch_ver = torch.__version__.split("+")[0]
        return f"{kind}-{model_hash(module)}-{dev}-{dtype}-b{b}-torch{torch_ver}"

    def load(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def get(self, key: str) -> dict:
        entry = self.load().get(key)
        return entry if isinstance(entry, dict) else {}

    def update(self, key: str, **fields) -> None:
        """Merge fields into the key's entry (read-modify-write, atomic replace)."""
        decisions = self.load()
        entry = decisions.get(key) if isinstance(decisions.get(key), dict) else {}
        refused = {**entry.get("refused", {}), **fields.pop("refused", {})}
        decisions[key] = {**entry, **fields, "refused": refused}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(tmp_suffix())
            tmp.write_text(json.dumps(decisions, indent=1))
            os.replace(tmp, self.path)
        except OSError as e:
            log.warning("could not cache the backend decision in %s: %s", self.path, e)


# --- choosing -----------------------------------------------------------------------------------
def choose_backend(
    kind: str,
    name: str,
    eager,
    requested: str,
    build: Callable[[str], object],
    *,
    cache_dir: str | Path | None = None,
    measure: bool = True,
    timing_lock=None,
) -> Choice:
    """The runner that should serve model ``name`` (``eager`` is already built and warm).

    ``requested``: eager | compile | onnx | auto. ``build(backend)`` makes an unwarmed runner.
    Never raises for a backend's failure: a refused backend leaves eager serving.
    """
    module = eager.tok if kind == "tokenizer" else eager.gen
    device, dtype = eager.device, eager.dtype
    if requested == "eager":
        return Choice(eager)
    cache = DecisionCache(cache_dir)
    key = cache.key(kind, module, device, dtype, eager.buckets)
    known = cache.get(key)
    refused_before = known.get("refused", {})
    lock = timing_lock if timing_lock is not None else nullcontext()

    if requested == "auto":
        available = available_backends(dtype, device)
        if known.get("backend") in available:
            candidates, cached = [known["backend"]], True
        elif not measure:
            default = AUTO_DEFAULTS.get(device.type, "eager")
            candidates, cached = [default if default in available else "eager"], False
        else:
            candidates, cached = [b for b in available if b != "eager"], False
    else:
        candidates, cached = [requested], False

    choice = Choice(eager, cached=cached)
    if cached:
        choice.timings = dict(known.get("seconds", {}))
    proven = {}
    for backend in candidates:
        if backend == "eager":
            continue
        if backend in refused_before:
            log.warning(
                "%s %s: backend %s is not tried again (it failed here before: %s; delete %s "
                "to retry); eager serves",
                kind,
                name,
                backend,
                refused_before[backend],
                cache.path,
            )
            choice.refused[backend] = refused_before[backend]
            continue
        t0 = time.perf_counter()
        try:
            proven[backend] = prove(kind, lambda b=backend: build(b), eager)
        except Exception as e:  # noqa: BLE001 - any failure refuses this backend only
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            log.warning("%s %s: backend %s refused (%s); eager serves", kind, name, backend, reason)
            choice.refused[backend] = reason
            continue
        log.info(
            "%s %s: backend %s proven in %.1fs (warm at buckets %s, agrees with eager)",
            kind,
            name,
            backend,
            time.perf_counter() - t0,
            list(eager.buckets),
        )

    if requested == "auto" and not cached and measure and proven:
        with lock:
            choice.timings["eager"] = time_call(bench_call(kind, eager), device)
            for backend, runner in proven.items():
                choice.timings[backend] = time_call(bench_call(kind, runner), device)
        best = min(choice.timings, key=choice.timings.get)
        log.info("auto: %s %s -> %s (seconds per call: %s)", kind, name, best, choice.timings)
        choice.runner = eager if best == "eager" else proven[best]
    elif proven:
        choice.runner = next(iter(proven.values()))

    if requested == "auto" and measure and not cached:
        cache.update(key, backend=choice.backend, seconds=choice.timings, refused=choice.refused)
    elif choice.refused:
        cache.update(key, refused=choice.refused)
    return choice
