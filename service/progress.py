"""Progress and cancellation of a running batch, between the model thread and the event loop.

The sampler calls ``BatchProgress.on_step`` on the model thread after every step
(model.sampling's ``on_step``); it must not slow the loop, so it only stores the step and,
when a job of the batch has been cancelled, tells the sampler which rows to keep. The event
loop (service/batcher.py) reads ``step`` every ``PROGRESS_EVERY_S`` to report it, and marks
jobs cancelled with ``cancel`` when their caller gave up (DELETE /jobs/{id}, a disconnected
client): the sampler drops their rows at its next step, the other jobs of the batch go on.

Preemption: while a batch-lane loop samples, the event loop may hand it a batch of
interactive jobs (``offer_guest``); the model thread runs that batch between two steps of
the bulk loop and goes on, so an interactive request waits one step, not a whole bulk batch
(service/lanes.py).

Only attribute reads and writes cross threads (atomic under the GIL); the cancelled set is
replaced, never mutated, so the model thread always sees a whole one; the guest hand-over
takes a lock.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future

import torch

from .jobs import Job

# How often the event loop forwards a running batch's step (the SSE stream's rate).
PROGRESS_EVERY_S = 0.25
# How often the event loop looks for interactive work while a batch-lane loop samples.
PREEMPT_POLL_S = 0.02


class BatchProgress:
    """One model call's jobs, the step their sampling loop is at, and who was cancelled."""

    def __init__(self, jobs: list[Job]):
        self.jobs = jobs
        self.step = 0
        self.steps = 0
        self._cancel: frozenset[str] = frozenset()
        self.dropped: set[str] = set()  # ids whose rows left the loop
        # Row r of the loop's current state belongs to job owner[r].
        self._owner: list[str] = []
        self._live: frozenset[str] = frozenset()
        # Preemption: a batch handed over by the event loop, run between two steps.
        self.guest_runner = None  # set by the executor: jobs -> outcomes
        self._guest: tuple[list[Job], Future] | None = None
        self._guest_lock = threading.Lock()
        self.sampling = False  # on_step has been called: guests can be run

    def offer_guest(self, jobs: list[Job]) -> Future:
        """Called on the event loop: run ``jobs`` at the loop's next step. The future gets
        their outcomes; ``take_back`` withdraws them if the loop ends first."""
        fut: Future = Future()
        with self._guest_lock:
            self._guest = (jobs, fut)
        return fut

    def take_back(self) -> list[Job] | None:
        """The guest not yet started (the loop ended first), withdrawn; None if it ran."""
        with self._guest_lock:
            guest, self._guest = self._guest, None
        return guest[0] if guest else None

    def _run_guest(self) -> None:
        with self._guest_lock:
            guest, self._guest = self._guest, None
        if guest is None:
            return
        jobs, fut = guest
        try:
            fut.set_result(self.guest_runner(jobs))
        except BaseException as e:  # noqa: BLE001 - handed to the event loop
            fut.set_exception(e)

    def begin(self, jobs: list[Job]) -> None:
        """A (sub-)batch starts sampling (the executor may split a batch after a failure)."""
        self._owner = [j.id for j in jobs for _ in range(j.size)]
        self._live = frozenset(j.id for j in jobs)
        self.step = self.steps = 0

    def cancel(self, ids: set[str]) -> None:
        """Called on the event loop: drop these jobs' rows at the next step."""
        if ids - self._cancel:
            self._cancel = self._cancel | ids

    def on_step(self, step: int, steps: int, x: torch.Tensor):
        self.step, self.steps = step, steps
        self.sampling = True
        if self._guest is not None and step < steps:
            self._run_guest()
        cancel = self._cancel
        if not cancel or not (cancel & self._live):
            return None
        keep = [r for r, owner in enumerate(self._owner) if owner not in cancel]
        self.dropped |= self._live & cancel
        self._live = self._live - cancel
        self._owner = [self._owner[r] for r in keep]
        return keep

    def kept_rows(self, jobs: list[Job]) -> list[int]:
        """Rows (of the sub-batch ``jobs``) whose job was not dropped."""
        rows, r = [], 0
        for job in jobs:
            if job.id not in self.dropped:
                rows.extend(range(r, r + job.size))
            r += job.size
        return rows
