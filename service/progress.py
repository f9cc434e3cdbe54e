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

Previews: for jobs submitted with ``previews`` (POST /jobs), ``on_step`` asks the sampler for
its x0 estimate at most every ``PREVIEW_EVERY_S`` (and, on a slow decoder, so that previews
take at most ``PREVIEW_MAX_SHARE`` of the loop's time), decodes those jobs' rows with the
decoder the task set (``decode``) and keeps one small PNG per job (``Preview``) for the
event loop to collect (``take_previews``) and report with the progress. A batch where no job
asked pays one attribute test per step.

Only attribute reads and writes cross threads (atomic under the GIL); the cancelled set is
replaced, never mutated, so the model thread always sees a whole one; the guest hand-over
takes a lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from model.images import tensor_to_uint8

from . import codec
from .jobs import Job

log = logging.getLogger(__name__)

# How often the event loop forwards a running batch's step (the SSE stream's rate).
PROGRESS_EVERY_S = 0.25
# How often the event loop looks for interactive work while a batch-lane loop samples.
PREEMPT_POLL_S = 0.02
# At most how often the model thread renders a preview of the x0 estimate, and the largest
# share of the loop's time previews may take (a slow decoder spaces them further apart).
PREVIEW_EVERY_S = 1.0
PREVIEW_MAX_SHARE = 0.1
# Largest side of one image in a preview PNG.
PREVIEW_MAX_SIDE = 128


@dataclass
class Preview:
    """A job's images as the loop estimated them at ``step`` of ``steps``: one PNG (a grid
    when the job has several images), each image at most PREVIEW_MAX_SIDE px."""

    step: int
    steps: int
    png: bytes


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
        # Previews: latents (n, ...) -> images (n, 3, S, S) in [-1, 1], set by the task.
        self.decode: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._want: frozenset[str] = frozenset()  # live jobs that asked for previews
        self._next_preview = 0.0  # monotonic time of the next preview
        self._previews: dict[str, Preview] = {}  # job id -> the latest render's preview
        self._taken: dict[str, Preview] = self._previews  # the render the loop last took

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
        self._want = frozenset(j.id for j in jobs if j.previews and j.tracked)
        self._next_preview = time.monotonic() + PREVIEW_EVERY_S
        self.step = self.steps = 0

    def cancel(self, ids: set[str]) -> None:
        """Called on the event loop: drop these jobs' rows at the next step."""
        if ids - self._cancel:
            self._cancel = self._cancel | ids

    def on_step(self, step: int, steps: int, x: torch.Tensor, x0=None):
        self.step, self.steps = step, steps
        self.sampling = True
        if self._want and x0 is not None and step < steps:
            now = time.monotonic()
            if now >= self._next_preview and self.decode is not None:
                try:
                    self._render_previews(step, steps, x0)
                except Exception as e:  # noqa: BLE001 - a preview is advisory: the batch goes on
                    log.warning("previews stopped for this batch: %s: %s", type(e).__name__, e)
                    self._want = frozenset()
                cost = time.monotonic() - now
                self._next_preview = now + max(PREVIEW_EVERY_S, cost / PREVIEW_MAX_SHARE)
        if self._guest is not None and step < steps:
            self._run_guest()
        cancel = self._cancel
        if not cancel or not (cancel & self._live):
            return None
        keep = [r for r, owner in enumerate(self._owner) if owner not in cancel]
        self.dropped |= self._live & cancel
        self._live = self._live - cancel
        self._want = self._want - cancel
        self._owner = [self._owner[r] for r in keep]
        return keep

    def _render_previews(self, step: int, steps: int, x0) -> None:
        """Decode the x0 estimate of the rows of jobs that asked for previews; one PNG each."""
        want = self._want - self._cancel
        rows = [r for r, owner in enumerate(self._owner) if owner in want]
        if not rows:
            return
        est = x0()
        images = tensor_to_uint8(self.decode(est[torch.as_tensor(rows, device=est.device)]))
        previews, at = {}, 0
        # a job's rows are contiguous and in order (``begin``; drops keep the order)
        for job_id in dict.fromkeys(self._owner[r] for r in rows):
            n = sum(1 for r in rows if self._owner[r] == job_id)
            png = codec.preview_png(images[at : at + n], PREVIEW_MAX_SIDE)
            previews[job_id] = Preview(step, steps, png)
            at += n
        self._previews = previews  # replaced whole, never mutated: the loop reads it

    def take_previews(self) -> dict[str, Preview]:
        """Called on the event loop: the previews rendered since the last call ({} if
        none)."""
        latest = self._previews
        if latest is self._taken:
            return {}
        self._taken = latest
        return latest

    def kept_rows(self, jobs: list[Job]) -> list[int]:
        """Rows (of the sub-batch ``jobs``) whose job was not dropped."""
        rows, r = [], 0
        for job in jobs:
            if job.id not in self.dropped:
                rows.extend(range(r, r + job.size))
            r += job.size
        return rows
