"""The configured backend of every served model, proven in the background and swapped in.

Every model first serves on eager (ready as soon as it is loaded and warm). ``BackendTuner``
then, in its own thread, builds the configured backend of each model, warms it at every bucket,
checks it against eager and (``auto``) times it (model.backends.auto), and swaps the winner in
between two batches under the registry's lock, relabelling ``softvq_model_info``. A backend
that fails is logged and skipped: eager keeps serving whatever happens.
"""

from __future__ import annotations

import logging
import threading
import time

from model.backends import build_runner, choose_backend

log = logging.getLogger(__name__)


class BackendTuner:
    def __init__(self, registry):
        self.registry = registry
        self.done = threading.Event()  # set once every model is settled
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self) -> None:
        """Prove the configured backend of every model in a background thread and swap it in
        (``run``); eager serves meanwhile. No-op for ``eager``."""
        reg = self.registry
        if not reg.loaded or self._thread is not None:
            return
        if reg.backend == "eager":
            self.done.set()
            return
        self._thread = threading.Thread(target=self.run, name="softvq-backend-tuner", daemon=True)
        self._thread.start()

    def run(self) -> None:
        """For each model: build the configured backend, warm it up at every bucket, check it
        against eager, time it (``auto``), and swap the winner in between two batches (under
        the registry's lock). Never raises."""
        reg = self.registry
        if not reg.loaded:
            raise RuntimeError("tuning needs a registry built with load_weights=True")
        entries = [("tokenizer", e) for e in reg.tokenizers.values()]
        entries += [("generator", e) for e in reg.generators.values()]
        t0 = time.perf_counter()
        for kind, entry in entries:
            if self._stop.is_set():
                log.info("backend tuning stopped before %s (shutting down)", entry.name)
                break
            try:
                self._tune(kind, entry)
            except Exception:  # noqa: BLE001 - a bug here must not take serving down
                log.exception("backend tuning of %s failed; it stays on eager", entry.name)
        self.done.set()
        log.info(
            "backends settled in %.1fs: %s",
            time.perf_counter() - t0,
            ", ".join(f"{e.name}={e.runner.backend}" for _, e in entries),
        )

    def stop(self, wait_s: float = 2.0) -> bool:
        """Ask the tuner to stop after the model it is proving; True once it has ended (or
        never ran). A compile or export in progress cannot be interrupted: a process that must
        exit while this is False should not run the interpreter's finalisation under it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(wait_s)
            return not self._thread.is_alive()
        return True

    def _tune(self, kind: str, entry) -> None:
        reg = self.registry
        eager = entry.runner
        if reg.backend == "eager" or eager.backend != "eager":
            return
        cache_dir, buckets = reg.settings.cache_dir, reg.buckets
        choice = choose_backend(
            kind,
            entry.name,
            eager,
            reg.backend,
            lambda b: build_runner(kind, entry.model, b, buckets=buckets, cache_dir=cache_dir),
            cache_dir=cache_dir,
            timing_lock=reg.lock,
        )
        if choice.runner is eager:
            return
        with reg.lock:  # between two batches: the executor holds it for a whole batch
            reg.swap_runner(kind, entry, choice.runner)
        log.info(
            "%s %s now runs on %s (was eager)%s",
            kind,
            entry.name,
            choice.backend,
            f"; seconds per call {choice.timings}" if choice.timings else "",
        )
