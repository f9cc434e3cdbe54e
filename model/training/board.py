"""train-demo's progress on one terminal.

train-demo trains its stages in processes side by side. A tqdm bar in each wrote to the same
terminal line, so the bars took turns on it (a flicker between two stages for hours) and a
stage's "saved ..." landed in the middle of another's bar. So the stage processes *publish*
instead: a progress bar there writes a small JSON file (``progress/<pid>.json``), and the
process's output goes to a log (``logs/<pid>.log``), both in the work directory. The main
process is the only one that writes to the terminal: ``Board`` forwards the stages' log
lines and keeps, below them, one line per running bar (step, rate, time left), redrawn in
place on a terminal; where the output is not a terminal (a log file, docker logs) it prints
that as one status line a minute instead of carriage-return redraws.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import threading
import time
from pathlib import Path

from .loop import process_alive, write_json

PROGRESS_DIR = "progress"
LOGS_DIR = "logs"

_published: Path | None = None  # set in a stage process by publish_to()


def publish_to(work: str | Path) -> None:
    """In a train-demo stage process: bars publish to ``work/progress`` and everything the
    process writes (prints, warnings, a traceback) goes to ``work/logs/<pid>.log``."""
    global _published
    work = Path(work)
    _published = work / PROGRESS_DIR
    _published.mkdir(parents=True, exist_ok=True)
    (work / LOGS_DIR).mkdir(parents=True, exist_ok=True)
    log = os.open(work / LOGS_DIR / f"{os.getpid()}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
        os.dup2(log, stream.fileno())
        # Python chose block buffering or not when the stream was a terminal; a line at a time
        # is what the board forwards.
        stream.reconfigure(line_buffering=True)
    os.close(log)


def published_dir() -> Path | None:
    """Where this process's bars publish (None: it draws tqdm bars as usual)."""
    return _published


class PublishedBar:
    """The part of tqdm the trainers use (``update``, ``set_postfix``, ``close``), written to
    ``<directory>/<pid>.json`` at most every ``every`` seconds instead of drawn."""

    def __init__(self, directory: Path, total: int, start: int, desc: str, every: float = 2.0):
        self.path = Path(directory) / f"{os.getpid()}.json"
        self.desc, self.total, self.n = desc, int(total), int(start)
        self.every = every
        self.rate: float | None = None  # steps per second, smoothed over about 20 s
        self.postfix = ""
        self._t0 = self._t_last = time.monotonic()
        self._n_last = self.n
        self._write("running")

    def update(self, k: int = 1) -> None:
        self.n += k
        now = time.monotonic()
        dt = now - self._t_last
        if dt >= self.every:
            step_rate = (self.n - self._n_last) / dt
            alpha = 1.0 - math.exp(-dt / 20.0)
            self.rate = (
                step_rate if self.rate is None else self.rate + alpha * (step_rate - self.rate)
            )
            self._t_last, self._n_last = now, self.n
            self._write("running")

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def close(self) -> None:
        self._write("done")

    def _write(self, state: str) -> None:
        record = {
            "desc": self.desc,
            "n": self.n,
            "total": self.total,
            "rate": self.rate,
            "elapsed": round(time.monotonic() - self._t0, 1),
            "state": state,
            "postfix": self.postfix,
        }
        write_json(self.path, record)


def duration(seconds: float) -> str:
    """42 s, 17 min, 1 h 36 min."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60} min"


def bar_line(bar: dict) -> str:
    """One running bar: 'tokenizer softvq-demo-64  2404/12000 (20 %), 1.66 steps/s, 24 min
    in, 1 h 36 min left  [l1=0.0720, ...]'."""
    n, total = bar["n"], bar["total"]
    line = f"{bar['desc']}  {n}/{total} ({100 * n // max(1, total)} %)"
    rate = bar.get("rate")
    if rate:
        line += f", {rate:.2f} steps/s, {duration(bar['elapsed'])} in"
        line += f", {duration((total - n) / rate)} left"
    else:
        line += f", {duration(bar['elapsed'])} in"
    if bar.get("postfix"):
        line += f"  [{bar['postfix']}]"
    return line


class Board:
    """The main process's view of the stages: forwards their log lines to ``stream`` and shows
    the running bars under them (see the module docstring). ``elapsed`` gives the footer's
    (this run, every run) seconds. Use as a context manager; a background thread ticks every
    ``interval`` seconds."""

    def __init__(
        self,
        work: str | Path,
        stream=None,
        elapsed=None,
        interval: float = 1.0,
        status_every: float = 60.0,
    ):
        self.progress = Path(work) / PROGRESS_DIR
        self.logs = Path(work) / LOGS_DIR
        self.stream = stream if stream is not None else sys.stdout
        self.tty = self.stream.isatty()
        self.elapsed = elapsed
        self.interval = interval
        self.status_every = status_every
        self._offsets: dict[Path, int] = {}
        self._partial: dict[Path, bytes] = {}
        self._drawn = 0  # board lines on the terminal below the forwarded output
        self._next_status = time.monotonic() + status_every
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Board:
        """Forget the bars of earlier runs and skip what their logs already hold."""
        self.progress.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        for old in self.progress.glob("*"):
            old.unlink(missing_ok=True)
        for log in self.logs.glob("*.log"):
            self._offsets[log] = log.stat().st_size
        self._thread = threading.Thread(target=self._run, name="board", daemon=True)
        self._thread.start()
        return self

    def stop(self, forward: bool = True) -> None:
        """Stop ticking and take the board off the terminal. ``forward``: print what the logs
        still hold first (not when the run was stopped: the stages' last words then are
        their interruption, which stays in ``logs/``; after a stage failed, they are)."""
        if self._stop.is_set():
            return  # stopped already (train-demo stops it first when a run is stopped)
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        lines = self._new_lines() if forward else []
        self._emit(lines, [])

    def __enter__(self) -> Board:
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.stop(forward=not isinstance(exc, KeyboardInterrupt | SystemExit))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.tick()

    def tick(self) -> None:
        self._emit(self._new_lines(), self.running_bars())

    def running_bars(self) -> list[dict]:
        bars = []
        for path in sorted(self.progress.glob("*.json")):
            if not path.stem.isdigit() or not process_alive(int(path.stem)):
                continue  # a stage process gone (killed) leaves its last state behind
            try:
                bar = json.loads(path.read_text())
            except (OSError, ValueError):
                continue  # replaced between glob and read
            if bar.get("state") == "running":
                bars.append(bar)
        return bars

    def _new_lines(self) -> list[str]:
        lines = []
        for log in sorted(self.logs.glob("*.log")):
            start = self._offsets.get(log, 0)
            with log.open("rb") as f:
                f.seek(start)
                data = f.read()
            self._offsets[log] = start + len(data)
            data = self._partial.pop(log, b"") + data
            *complete, rest = data.split(b"\n")
            if rest:
                self._partial[log] = rest
            lines += [line.decode("utf-8", "replace").rstrip("\r") for line in complete]
        return [line for line in lines if line.strip()]

    def _footer(self) -> str:
        if self.elapsed is None:
            return "train-demo"
        this_run, in_all = self.elapsed()
        if abs(in_all - this_run) < 1:
            return f"train-demo: {duration(this_run)}"
        return f"train-demo: {duration(this_run)} this run, {duration(in_all)} in all"

    def _emit(self, lines: list[str], bars: list[dict]) -> None:
        out = []
        if self.tty:
            width = shutil.get_terminal_size((100, 24)).columns - 1
            if self._drawn:
                out.append(f"\x1b[{self._drawn}F\x1b[J")  # up to the board's first line, clear
            out += [line + "\n" for line in lines]
            board = ([self._footer()] + ["  " + bar_line(b) for b in bars]) if bars else []
            out += [line[:width] + "\n" for line in board]
            self._drawn = len(board)
        else:
            out += [line + "\n" for line in lines]
            now = time.monotonic()
            if bars and now >= self._next_status:
                self._next_status = now + self.status_every
                out.append(" | ".join([self._footer()] + [bar_line(b) for b in bars]) + "\n")
        if out:
            self.stream.write("".join(out))
            self.stream.flush()
