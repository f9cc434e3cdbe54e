"""A worker's liveness: a file its event loop rewrites every second, and the check of it.

    python -m service.liveness [--file PATH]    # exit 0: alive; 1: stuck, frozen or not running
    softvq worker --check                       # the same check through the CLI

Why a file read by an exec probe: prometheus-client serves a worker's ``/metrics`` from its own
thread, so ``/metrics`` answers while the event loop -- which reads jobs, drives the batcher
and beats the heartbeat -- is stuck. Here the loop itself writes the proof, and the check
depends on nothing else: not on Redis (an outage must not restart every worker in a loop; the
worker rides it out by itself and stays live), not on a port. The probes of compose and
Kubernetes run it as ``python3 -m service.liveness``: this module imports the standard library
only (about 0.1 s), where ``softvq worker --check`` first loads the whole CLI, torch included
(seconds of CPU, every probe period).

The file is JSON: ``{"pid", "worker_id", "at": unix time written, "batcher_at": unix time the
batcher last called its job source, "busy": a model call is running, "stuck_after_s"}``,
replaced atomically. The check fails when

- there is no file: no worker loop ever ran here (or it stopped cleanly; a worker removes
  a stale file before it loads its models);
- it is older than ``stuck_after_s``: the event loop is stuck, or the process frozen or gone;
- the batcher has not called its source for ``stuck_after_s`` while no model call runs: the
  loop turns but the batcher does not. (A model call that runs too long is the hang
  watchdog's: it ends the process ``hang_grace_s`` after its jobs' deadlines, exit 70.)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

DEFAULT_FILE = "/tmp/softvq-worker.alive"
FILE_ENV = "SOFTVQ_WORKER_LIVENESS_FILE"  # the setting worker_liveness_file

log = logging.getLogger("softvq.worker")


class LivenessFile:
    """The writer (the worker's event loop calls ``write`` every second)."""

    def __init__(self, path: str, worker_id: str, stuck_after_s: float):
        self.path = path
        self.worker_id = worker_id
        self.stuck_after_s = stuck_after_s
        self._failed = False

    def write(self, busy: bool, batcher_at: float) -> None:
        state = {
            "pid": os.getpid(),
            "worker_id": self.worker_id,
            "at": time.time(),
            "batcher_at": batcher_at,
            "busy": busy,
            "stuck_after_s": self.stuck_after_s,
        }
        tmp = f"{self.path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(state, f)
            os.replace(tmp, self.path)  # a reader never sees half a file
            self._failed = False
        except OSError as e:
            if not self._failed:  # say it once; the probe will fail and say why too
                log.error("cannot write the liveness file %s: %s", self.path, e)
            self._failed = True

    def remove(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("cannot remove the liveness file %s: %s", self.path, e)


def check(path: str, now: float | None = None) -> tuple[bool, str]:
    """(alive, why) of the worker that writes ``path``."""
    now = time.time() if now is None else now
    try:
        with open(path) as f:
            state = json.load(f)
        at, batcher_at = float(state["at"]), float(state["batcher_at"])
        limit = float(state["stuck_after_s"])
        who = f"worker {state.get('worker_id')} (pid {state.get('pid')})"
    except FileNotFoundError:
        return False, f"no liveness file {path}: no worker loop is running here"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return False, f"unreadable liveness file {path}: {e}"
    if now - at > limit:
        return False, f"{who}: event loop stuck, its last beat was {now - at:.1f}s ago"
    if not state.get("busy") and now - batcher_at > limit:
        return False, f"{who}: batcher stuck, no turn for {now - batcher_at:.1f}s"
    return True, f"{who}: alive (beat {now - at:.1f}s ago)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m service.liveness", description="exit 0 when this host's worker is live"
    )
    p.add_argument(
        "--file",
        default=os.environ.get(FILE_ENV) or DEFAULT_FILE,
        help=f"the worker's liveness file (default ${FILE_ENV} or {DEFAULT_FILE})",
    )
    args = p.parse_args(argv)
    ok, why = check(args.file)
    print(why, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
