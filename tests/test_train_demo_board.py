"""What train-demo shows while its stages train side by side (model/training/board.py).

Each stage used to draw its own tqdm bar on the one terminal line they shared: the bars took
turns there and a stage's "saved ..." landed inside another's bar. The terminal is checked as
a person sees it: the bytes go through a terminal emulator (pyte), and the screen is read."""

from __future__ import annotations

import fcntl
import io
import json
import os
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pyte

from model.training.board import Board, PublishedBar, bar_line, duration

ROOT = Path(__file__).resolve().parents[1]


class Terminal(io.StringIO):
    """A stream that says it is a terminal; ``screen()`` is what a terminal shows of it."""

    def isatty(self) -> bool:
        return True

    def screen(self, columns: int = 100, lines: int = 30) -> list[str]:
        screen = pyte.Screen(columns, lines)
        stream = pyte.Stream(screen)
        stream.feed(self.getvalue().replace("\n", "\r\n"))  # a tty's output processing
        return [line.rstrip() for line in screen.display]


def test_durations_read_like_a_person_would_say_them():
    assert [duration(s) for s in (4, 59, 61, 1020, 3600, 5760)] == [
        "4 s",
        "59 s",
        "1 min",
        "17 min",
        "1 h 0 min",
        "1 h 36 min",
    ]


def test_a_published_bar_writes_its_state_for_the_board(tmp_path):
    bar = PublishedBar(tmp_path, total=100, start=10, desc="tokenizer softvq-demo-64", every=0.0)
    state = json.loads((tmp_path / f"{os.getpid()}.json").read_text())
    assert (state["n"], state["total"], state["state"]) == (10, 100, "running")
    time.sleep(0.05)
    bar.update(5)
    bar.set_postfix({"l1": "0.0720"}, refresh=False)
    bar.update(5)
    bar.close()
    state = json.loads((tmp_path / f"{os.getpid()}.json").read_text())
    assert (state["n"], state["state"], state["postfix"]) == (20, "done", "l1=0.0720")
    assert state["rate"] > 0
    line = bar_line({**state, "state": "running", "rate": 2.0, "elapsed": 120.0})
    assert line.startswith("tokenizer softvq-demo-64  20/100 (20 %), 2.00 steps/s, 2 min in")
    assert "40 s left" in line and line.endswith("[l1=0.0720]")


def _running(work: Path, desc: str, n: int, pid: int | None = None) -> None:
    record = {"desc": desc, "n": n, "total": 100, "rate": 1.0, "elapsed": 5.0}
    record.update(state="running", postfix="")
    (work / "progress" / f"{pid or os.getpid()}.json").write_text(json.dumps(record))


def test_the_board_keeps_stage_output_whole_and_its_bars_below_it(tmp_path):
    (tmp_path / "progress").mkdir()
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "1.log").write_text("an earlier run's line\n")
    term = Terminal()
    board = Board(tmp_path, stream=term, elapsed=lambda: (90.0, 90.0), interval=3600)
    board.start()
    _running(tmp_path, "tokenizer softvq-demo-64", 10)
    _running(tmp_path, "generator sit-demo-32", 3, pid=2**22 + 1)  # no such process: stale
    board.tick()
    with (tmp_path / "logs" / "7.log").open("a") as log:
        log.write("saved runs/softvq-demo-32 (vq_mean 0.00153, vq_std 0.08915)\nhalf a li")
    board.tick()
    _running(tmp_path, "tokenizer softvq-demo-64", 30)
    with (tmp_path / "logs" / "7.log").open("a") as log:
        log.write("ne, then the rest\n")
    board.tick()
    shown = [line for line in term.screen() if line]
    assert shown == [
        "saved runs/softvq-demo-32 (vq_mean 0.00153, vq_std 0.08915)",
        "half a line, then the rest",
        "train-demo: 2 min",
        "  tokenizer softvq-demo-64  30/100 (30 %), 1.00 steps/s, 5 s in, 1 min left",
    ]
    board.stop()
    assert [line for line in term.screen() if line] == shown[:2]  # the board is taken off


def test_without_a_terminal_the_board_prints_lines_not_redraws(tmp_path):
    log = io.StringIO()
    board = Board(tmp_path, stream=log, elapsed=lambda: (30.0, 630.0), status_every=0.0)
    board.start()
    _running(tmp_path, "generator sit-demo-64", 40)
    (tmp_path / "logs" / "9.log").write_text("chain-64: 2 thread(s) from now on\n")
    board.tick()
    board.stop()
    text = log.getvalue()
    assert "\r" not in text and "\x1b" not in text
    assert text.splitlines()[0] == "chain-64: 2 thread(s) from now on"
    assert text.splitlines()[1] == (
        "train-demo: 30 s this run, 10 min in all | "
        "generator sit-demo-64  40/100 (40 %), 1.00 steps/s, 5 s in, 1 min left"
    )


def test_a_stage_process_writes_its_output_to_its_log(tmp_path):
    code = (
        "import sys; from model.training.board import publish_to, published_dir;"
        f"publish_to({str(tmp_path)!r}); print('saved x'); print('warned', file=sys.stderr);"
        "print(published_dir())"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and done.stdout == "" and done.stderr == "", done
    (log,) = (tmp_path / "logs").glob("*.log")
    assert log.read_text() == f"saved x\nwarned\n{tmp_path / 'progress'}\n"


def test_train_demo_on_a_terminal_shows_whole_lines(tmp_path):
    """A real smoke-scale train-demo (its stages in spawned processes) on a pseudo-terminal;
    the screen a person would see at the end."""
    columns, rows = 160, 200  # tall enough that nothing scrolls away
    leader, follower = os.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    cmd = [sys.executable, "-m", "service.cli", "train-demo", "--scale", "0.001"]
    cmd += ["--work-dir", str(tmp_path / "run"), "--out-dir", str(tmp_path / "out")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdin=follower, stdout=follower, stderr=follower)
    os.close(follower)
    raw = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the other end closed
            break
        if not chunk:
            break
        raw += chunk
    os.close(leader)
    assert proc.wait(600) == 0, raw.decode(errors="replace")[-3000:]
    screen = pyte.Screen(columns, rows)
    pyte.Stream(screen).feed(raw.decode("utf-8", "replace"))
    shown = [line.rstrip() for line in screen.display if line.strip()]
    text = "\n".join(shown)
    assert b"it/s" not in raw  # no tqdm bar from the stage processes
    saved = [line for line in shown if "saved " in line]
    names = ("teacher", "softvq-demo-32", "softvq-demo-64", "sit-demo-32", "sit-demo-64")
    for name in names:  # each stage's "saved" line whole, at the start of its own line
        assert any(line.startswith(f"saved {tmp_path / 'run' / name}") for line in saved), text
    assert len(saved) == len(names), text
    assert any(line.startswith("train-demo: done on cpu") for line in shown), text
    assert shown[-1].startswith("read them against the bars"), text
    assert not any(line.startswith("  tokenizer") or "steps/s" in line for line in shown), text
    assert b"train-demo: " in raw and b"\x1b[" in raw  # the board was drawn while it ran
    assert (tmp_path / "run" / "logs").is_dir()
