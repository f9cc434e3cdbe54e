"""Priority lanes: interactive work first, bulk work never starved.

Every job has a lane: ``interactive`` (the default of the sync endpoints: someone is
waiting on the answer) or ``batch`` (the default of async jobs, POST /jobs). Either can be
asked for per request (``priority``), and API keys may be limited to lanes
(``SOFTVQ_API_KEY_LANES``).

The rule, applied by the batcher (service/batcher.py) whenever it picks the next batch to
run among those that are due:

- an interactive batch goes first;
- but after ``SOFTVQ_INTERACTIVE_BURST`` interactive batches in a row while batch-lane work
  was due, one batch-lane batch runs: the batch lane always gets at least one batch in
  ``burst + 1`` (a share rule, so a steady interactive load cannot starve it).

Jobs of different lanes never share a batch (the lane is part of the batching key), so an
interactive request never waits for a bulk job's items to be computed beside it. An
interactive group still waiting for company runs at once when bulk work is due. And while a
batch-lane sampling loop runs, interactive work is run inside it, between two of its steps
(preemption: service/progress.py, ``Batcher._preempt``), so an interactive request waits
one bulk step, not a whole bulk batch. In Redis
mode each lane has its own streams (``{p}:jobs:{model}:{task}`` interactive, the same with
``:batch`` appended for the batch lane) and workers read the interactive ones first.
"""

from __future__ import annotations

from .jobs import Job

LANES = ("interactive", "batch")
INTERACTIVE, BATCH = LANES


def lane_rank(job: Job) -> int:
    """0 for interactive, 1 for batch (lower runs first)."""
    return 1 if job.priority == BATCH else 0


class LanePicker:
    """Which due group runs next (the rule in the module docstring)."""

    def __init__(self, interactive_burst: int):
        self.burst = interactive_burst
        self.in_a_row = 0  # interactive batches run while batch-lane work was due

    def pick(self, due: list[tuple[float, int, tuple]]) -> tuple:
        """``due``: (oldest job's arrival, lane rank, group key) of every due group."""
        interactive = [d for d in due if d[1] == 0]
        batch = [d for d in due if d[1] != 0]
        if interactive and (not batch or self.in_a_row < self.burst):
            self.in_a_row = self.in_a_row + 1 if batch else 0
            return min(interactive)[2]
        self.in_a_row = 0
        return min(batch)[2]
