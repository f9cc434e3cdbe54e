"""A real API server or worker process whose tiny tokenizer hangs for good on one input.

Fault injection for tests/test_hang.py, like ``Watched`` in tests/test_batcher.py: the
tokenizer's real runner is wrapped so that a batch holding an all-black image (every value
-1.0) blocks its thread forever, as a wedged device or a deadlock would. Everything else is
the shipped path: settings from the SOFTVQ_* environment, the registry, ``create_app`` under
uvicorn, or ``run_worker``.

    python -m tests.hang_harness serve --port P
    python -m tests.hang_harness [worker] --worker-id W   (as ``python -m service.worker``)
"""

from __future__ import annotations

import argparse
import threading

import torch

POISON = -1.0  # an all-black image


class HangsOnBlack:
    """A tokenizer runner that never returns from a batch holding an all-black image."""

    def __init__(self, runner):
        self.runner = runner
        self.stuck = threading.Event()  # never set

    def encode(self, x: torch.Tensor):
        if x.ndim == 4 and bool((x == POISON).all(dim=(1, 2, 3)).any()):
            self.stuck.wait()
        return self.runner.encode(x)

    def __getattr__(self, name):  # decode, warmup, backend, ...: the real runner
        return getattr(self.runner, name)


def poisoned_registry(settings):
    from service.registry import ModelRegistry

    registry = ModelRegistry.from_settings(settings)
    for entry in registry.tokenizers.values():
        entry.runner = HangsOnBlack(entry.runner)
    return registry


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("role", nargs="?", default="worker", choices=["serve", "worker"])
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--worker-id", default=None)
    args = p.parse_args()

    from service.settings import Settings

    settings = Settings()
    if args.role == "serve":
        import uvicorn

        from service.app import create_app

        app = create_app(settings, registry=poisoned_registry(settings))
        uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")
    else:
        from service.worker import run_worker

        run_worker(settings, args.worker_id, registry=poisoned_registry(settings))


if __name__ == "__main__":
    main()
