"""Previews on the model thread (service/progress.py): a real tiny generator samples through
``sample_latents`` with ``BatchProgress.on_step``, a real tiny tokenizer decodes the x0
estimate. Only jobs that asked get a preview, of their own rows; a decoder that fails stops
the previews, never the batch. Over HTTP: tests/test_jobs.py, tests/test_jobs_redis.py."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import torch
from PIL import Image

import service.progress as progress_mod
from model.images import tensor_to_uint8
from model.pipeline import sample_latents
from service import codec
from service.jobs import Job
from service.progress import BatchProgress
from tests.tiny_models import make_generator, make_tokenizer


def png_array(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.fixture
def every_step(monkeypatch):
    """A preview at every step (the real spacing is about a second)."""
    monkeypatch.setattr(progress_mod, "PREVIEW_EVERY_S", 0.0)
    monkeypatch.setattr(progress_mod, "PREVIEW_MAX_SHARE", 1e9)


def run(jobs, decode, steps=6, cancel_at=None, seen=None):
    """Sample the jobs' rows (one label and seed per image) with a BatchProgress -> (the
    latents, every take_previews() after each step). ``seen``: a list to get each step's
    x0 estimate of every row, decoded here."""
    gen = make_generator()
    progress = BatchProgress(jobs)
    progress.begin(jobs)
    progress.decode = decode
    taken = []

    def on_step(step, n, x, x0):
        if seen is not None:
            seen.append(tensor_to_uint8(decode(x0())))
        keep = progress.on_step(step, n, x, x0)
        taken.append(progress.take_previews())
        if cancel_at is not None and step == cancel_at[0]:
            progress.cancel({cancel_at[1]})
        return keep

    n = sum(j.size for j in jobs)
    z = sample_latents(gen, list(range(n)), list(range(100, 100 + n)), steps, on_step=on_step)
    return z, taken


def test_only_jobs_that_asked_get_previews_of_their_own_rows(every_step):
    tok = make_tokenizer()

    def decode(z):
        return tok.decode(z.float() * tok.vq_std + tok.vq_mean).float()

    a = Job("sit", "generate", {"n": 2}, tracked=True, previews=True)
    b = Job("sit", "generate", {"n": 1}, tracked=True)  # did not ask
    c = Job("sit", "generate", {"n": 1}, tracked=True, previews=True)
    seen = []
    z, taken = run([a, b, c], decode, cancel_at=(3, c.id), seen=seen)
    assert z.shape[0] == 3  # c's row left the loop at step 4
    assert all(not t for t in taken[-1:])  # nothing at the last step: the result follows
    rendered = taken[:-1]
    assert all(set(t) <= {a.id, c.id} for t in rendered)
    assert all(a.id in t for t in rendered)
    assert [c.id in t for t in rendered] == [True, True, True, False, False]
    S = tok.image_size  # 32: under 128 px, previews are at full size (PNG: lossless)
    for i, t in enumerate(rendered):
        assert (t[a.id].step, t[a.id].steps) == (i + 1, 6)
        # each job's own rows of that step's estimate: a has rows 0-1, c row 3 (b is 2)
        grid = png_array(t[a.id].png)
        assert grid.shape == (S + 4, 2 * (S + 2) + 2, 3)  # two images side by side
        np.testing.assert_array_equal(grid[2 : 2 + S, 2 : 2 + S], seen[i][0])
        np.testing.assert_array_equal(grid[2 : 2 + S, S + 4 : 2 * S + 4], seen[i][1])
        if c.id in t:
            np.testing.assert_array_equal(png_array(t[c.id].png), seen[i][3])
    assert seen[0][0].std() > 0  # pictures, not blanks
    assert np.abs(seen[0][0].astype(int) - seen[0][1].astype(int)).max() > 0


def test_a_failing_decoder_stops_previews_not_the_batch(every_step, caplog):
    def decode(z):
        raise RuntimeError("decoder gone")

    jobs = [Job("sit", "generate", {"n": 2}, tracked=True, previews=True)]
    with caplog.at_level(logging.WARNING, logger="service.progress"):
        z, taken = run(jobs, decode)
    gen = make_generator()
    plain = sample_latents(gen, [0, 1], [100, 101], 6)
    torch.testing.assert_close(z, plain)
    assert not any(taken)
    assert "previews stopped for this batch: RuntimeError: decoder gone" in caplog.text


def test_preview_png_downscales_each_image_to_128_px():
    images = (np.random.default_rng(0).random((3, 256, 256, 3)) * 255).astype(np.uint8)
    grid = png_array(codec.preview_png(images, 128))
    assert grid.shape == (128 + 4, 3 * (128 + 2) + 2, 3)
    one = png_array(codec.preview_png(images[:1], 128))
    assert one.shape == (128, 128, 3)
    small = png_array(codec.preview_png(images[:1, :64, :64], 128))
    assert small.shape == (64, 64, 3)  # never upscaled
    # each tile is its image, downscaled (box filter: the means agree)
    tile = grid[2:130, 2 + 130 : 2 + 130 + 128].astype(float)
    assert abs(tile.mean() - images[1].mean()) < 1.0
