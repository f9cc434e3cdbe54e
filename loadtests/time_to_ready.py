"""Time to ready of README's first command, as a newcomer runs it.

    python -m loadtests.time_to_ready                 # a fresh HOME each run (empty caches)
    python -m loadtests.time_to_ready --home DIR      # reuse DIR: the warm-cache start
    python -m loadtests.time_to_ready --settle        # also wait until the backends settle

Starts ``softvq serve`` (no flags, no SOFTVQ_* variables, port 8000) with HOME and TMPDIR in a
fresh or given directory, polls /readyz until 200 and prints the seconds; with ``--settle``
it then waits for the "backends settled" log line (the background proving of the default
``auto`` backend) and prints that too. Stops the server with SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--home", help="HOME to use (kept); default: a fresh one, removed after")
    p.add_argument("--settle", action="store_true", help="also wait for the backends to settle")
    p.add_argument("--timeout", type=float, default=900)
    args = p.parse_args(argv)

    home = Path(args.home) if args.home else Path(tempfile.mkdtemp(prefix="softvq-home-"))
    (home / "tmp").mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOFTVQ_")}
    env.pop("XDG_CACHE_HOME", None)
    env.update(HOME=str(home), TMPDIR=str(home / "tmp"))
    exe = shutil.which("softvq")
    cmd = [exe] if exe else [sys.executable, "-m", "service.cli"]
    log_path = home / "serve.log"
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([*cmd, "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        while not ready("http://127.0.0.1:8000/readyz"):
            if proc.poll() is not None or time.monotonic() - t0 > args.timeout:
                print(log_path.read_text()[-2000:], file=sys.stderr)
                return 1
            time.sleep(0.1)
        print(f"ready after {time.monotonic() - t0:.1f} s")
        if args.settle:
            while "backends settled" not in log_path.read_text():
                if proc.poll() is not None or time.monotonic() - t0 > args.timeout:
                    return 1
                time.sleep(0.5)
            line = next(x for x in log_path.read_text().splitlines() if "backends settled" in x)
            print(f"settled after {time.monotonic() - t0:.1f} s: {line.split('settled')[1]}")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        if not args.home:
            shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
