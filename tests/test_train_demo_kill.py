"""`softvq train-demo` killed and run again (issue #14: "resumable: kill it and run it again").

The real command in a real process, the real recipe at a tiny scale: stopped with SIGTERM
(kill, a container or service stop), with Ctrl-C (SIGINT to its process group) and with
SIGKILL while both chains train, none of its training processes may live on (an orphan would
train beside the next run, on the same checkpoints and on cores that run counts as free);
the fourth run resumes and finishes, and the work directory's wall clock counts all four.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.jobs_client import wait_until

SCALE = "0.002"  # seconds per stage: enough to be killed mid-chain
REPO = Path(__file__).resolve().parent.parent


def children(pid: int) -> set[int]:
    """Live processes whose parent is ``pid`` (Linux /proc)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def start(work: Path, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "service.cli", "train-demo", "--quiet", "--scale", SCALE]
    cmd += ["--work-dir", str(work / "run"), "--out-dir", str(work / "out"), "--threads", "2"]
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        stdout=log.open("a"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, for the Ctrl-C case
        # a shell's background job ignores SIGINT, and so would the command: not Ctrl-C
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def kill_mid_chain(proc: subprocess.Popen, work: Path, sig: int, group: bool = False) -> None:
    """Wait until both chains hold their core leases (the tokenizers train), send ``sig`` to
    the main process alone (or, ``group``, to all of them, as a terminal's Ctrl-C does), and
    check that every training process is gone soon after."""
    leases = work / "run" / "cores"

    def both_chains() -> set[int]:
        pids = {int(p.name) for p in leases.glob("*") if p.name.isdigit()}
        return pids if len(pids) == 2 and all(map(running, pids)) else set()

    try:
        wait_until(both_chains, 240, "both chains to start")
        workers = children(proc.pid)
    except AssertionError:
        proc.kill()
        raise
    assert len(workers) >= 2, workers  # the pool: judge/teacher process and the chains
    if group:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    code = proc.wait(60)
    assert code == {signal.SIGTERM: 143, signal.SIGINT: 130}.get(sig, -sig), code
    wait_until(lambda: not any(map(running, workers)), 15, f"{workers} to exit")


@pytest.mark.timeout(900)
def test_train_demo_stopped_three_ways_leaves_no_orphans_and_resumes_to_the_end(tmp_path):
    log = tmp_path / "train-demo.log"
    try:
        kill_mid_chain(start(tmp_path, log), tmp_path, signal.SIGTERM)
        # SIGTERM unwinds: the run's wall time is written on the way out, and the user told
        assert json.loads((tmp_path / "run" / "wall.json").read_text())["runs"] == 1
        assert "the same command resumes it" in log.read_text()
        kill_mid_chain(start(tmp_path, log), tmp_path, signal.SIGINT, group=True)
        graceful = log.read_text()
        assert graceful.count("the same command resumes it") == 2, graceful
        # stopped stages die quietly (no traceback, no semaphore reported leaked); only a
        # SIGKILL of the main process, which cannot clean up, may leave Python's warning
        assert "Traceback" not in graceful and "leaked" not in graceful, graceful
        kill_mid_chain(start(tmp_path, log), tmp_path, signal.SIGKILL)
        last = start(tmp_path, log)
        assert last.wait(600) == 0
    except BaseException:
        print(log.read_text()[-4000:])
        raise
    assert json.loads((tmp_path / "run" / "wall.json").read_text())["runs"] == 4
    out = tmp_path / "out"
    for name in ("judge-classifier", "softvq-demo-32", "softvq-demo-64", "sit-demo-32"):
        assert (out / name / "model.safetensors").is_file(), name
    assert (out / "sit-demo-64" / "model.safetensors").is_file()
    assert "train-demo: done" in log.read_text()
    assert not os.listdir(tmp_path / "run" / "cores")  # every lease released
