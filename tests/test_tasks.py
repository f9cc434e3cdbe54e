"""Issue #13 items 1 and 4: one table of tasks, per-task batching policy, uint8 payloads.

- the task table (service/tasks.py) is the single place: ``registry.streams()``, the
  executor, the batcher and the wire format all follow it, and an added entry is served
  without touching any of them;
- each (model, task) batches by its own policy (``SOFTVQ_BATCH_POLICY``);
- images travel as uint8 pixels, a quarter of float32's bytes, and give the results the
  float32 payloads gave (float32 payloads, as queued by an older API, still run).

Real tiny models, the real executor and batcher; a real redis-server and worker process for
the wire.
"""

from __future__ import annotations

import asyncio
import io
import time

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from model.images import pil_to_tensor
from service import codec
from service.batcher import Batcher
from service.executor import Executor
from service.jobs import InvalidJob, Job
from service.registry import ModelRegistry
from service.serialization import dump_job, load_job
from service.settings import Settings
from service.tasks import (
    TASKS,
    BatchPolicy,
    ImageTask,
    check_images,
    largest_batch,
    resolve_policy,
    unit_range,
)
from tests.test_batcher import (
    GEN_PARAMS,
    ListSource,
    RecordingExecutor,
    decode_job,
    gen_job,
    run_broker,
    tok_job,
)

torch.set_num_threads(1)


def pixels(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """(n, 3, size, size) uint8, as service.codec hands them to a job."""
    return np.random.default_rng(seed).integers(0, 256, (n, 3, size, size), dtype=np.uint8)


def as_float(u8: np.ndarray) -> np.ndarray:
    """The same pixels as the API sent them before: float32 in [-1, 1] (pil_to_tensor)."""
    return (u8.astype(np.float32) / 127.5 - 1.0).astype(np.float32)


def u8_job(n: int = 1, seed: int = 0, task: str = "tokenize") -> Job:
    return Job("tiny", task, {"images": pixels(n, seed=seed), "n": n})


# --- the table is the single place ------------------------------------------------------------
def test_streams_cover_exactly_the_task_table(engine_registry):
    pairs = engine_registry.streams()
    assert len(pairs) == len(set(pairs))
    assert {t for _, t in pairs} == set(TASKS)
    want = {(m, name) for name, task in TASKS.items() for m in task.models(engine_registry)}
    assert set(pairs) == want
    assert want == {
        *((t, k) for t in engine_registry.tokenizers for k in TASKS if k != "generate"),
        *((g, "generate") for g in engine_registry.generators),
    }
    # The API (shapes only, no weights) derives the same pairs.
    shapes = ModelRegistry.from_settings(engine_registry.settings, load_weights=False)
    assert shapes.streams() == pairs


class MeanPixel(ImageTask):
    """A task added for the test: the mean pixel of each image (no model call)."""

    name = "mean-pixel"

    def run(self, registry, model, images):
        return {"mean": images.mean(dim=(1, 2, 3)).numpy().astype(np.float64)}


def test_a_new_task_is_one_entry_of_the_table(
    engine_registry, engine_settings_factory, monkeypatch
):
    monkeypatch.setitem(TASKS, "mean-pixel", MeanPixel())
    settings = engine_settings_factory(
        max_wait_ms=0, batch_policy={"mean-pixel": {"max_wait_ms": 300, "max_batch_size": 3}}
    )
    assert ("tiny", "mean-pixel") in engine_registry.streams()
    jobs = [Job("tiny", "mean-pixel", {"images": pixels(1, seed=i), "n": 1}) for i in range(4)]
    assert load_job(dump_job(jobs[0])).task == "mean-pixel"  # the wire knows it too

    async def body(broker, ex):
        return await asyncio.gather(*(broker.submit(j) for j in jobs)), ex

    results, ex = run_broker(engine_registry, settings, body)
    for job, r in zip(jobs, results, strict=True):
        want = unit_range(job.payload["images"]).mean().item()
        assert r["mean"].shape == (1,) and abs(r["mean"][0] - want) < 1e-6
    assert [len(b) for b in ex.batches] == [3, 1]  # its own policy: batches of 3


def test_an_unknown_task_fails_alone_as_invalid(engine_registry):
    outcomes = Executor(engine_registry).run([Job("tiny", "nope", {"n": 1})])
    assert isinstance(outcomes[0], InvalidJob) and "unknown task" in str(outcomes[0])


# --- per-task batching policy -----------------------------------------------------------------
def test_policy_resolves_model_task_over_task_over_global():
    s = Settings(
        max_batch_size=16,
        max_wait_ms=5,
        batch_policy={
            "generate": {"max_wait_ms": 20},
            "sit-demo-64/generate": {"max_batch_size": 8},
            "demo/x/tokenize": {"max_wait_ms": 0},  # a model name with a slash
        },
    )
    assert resolve_policy(s, "sit-demo-64", "generate") == BatchPolicy(8, 20.0)
    assert resolve_policy(s, "sit-other", "generate") == BatchPolicy(16, 20.0)
    assert resolve_policy(s, "sit-demo-64", "tokenize") == BatchPolicy(16, 5.0)
    assert resolve_policy(s, "demo/x", "tokenize") == BatchPolicy(16, 0.0)
    assert TASKS["generate"].policy(s, "sit-demo-64") == BatchPolicy(8, 20.0)
    assert largest_batch(s) == 16
    assert largest_batch(Settings(batch_policy={"decode": {"max_batch_size": 64}})) == 64


def test_policy_settings_from_the_environment_and_refused_keys(monkeypatch):
    monkeypatch.setenv(
        "SOFTVQ_BATCH_POLICY",
        '{"generate": {"max_wait_ms": 20}, "sit-demo-64/generate": {"max_batch_size": 8}}',
    )
    s = Settings()
    assert resolve_policy(s, "sit-demo-64", "generate") == BatchPolicy(8, 20.0)
    monkeypatch.delenv("SOFTVQ_BATCH_POLICY")
    for bad in (
        {"gen": {"max_wait_ms": 1}},  # not a task
        {"/generate": {"max_wait_ms": 1}},  # no model before the slash
        {"generate": {"max_wait": 1}},  # not a field
        {"generate": {"max_batch_size": 0}},
        {"generate": {"max_wait_ms": -1}},
    ):
        with pytest.raises(ValidationError):
            Settings(batch_policy=bad)


def test_a_generate_group_waits_its_own_time_while_tokenize_runs_at_once(
    engine_registry, engine_settings_factory
):
    settings = engine_settings_factory(
        max_wait_ms=0, batch_policy={"generate": {"max_wait_ms": 500}}
    )
    batcher = Batcher(settings, Executor(engine_registry), ListSource([]), worker_id="t")
    g, t = gen_job([1], [1]), tok_job(1, 1)
    batcher.add(g)
    batcher.add(t)
    key, wait = batcher._next_due()
    assert key is not None and key[1] == "tokenize" and wait is None
    assert batcher._take(key) == [t]
    key, wait = batcher._next_due()  # only generate is left: not due for ~0.5 s
    assert key is None and 0.3 < wait <= 0.5
    batcher.pool.shutdown()

    # Through the embedded broker: a generate job sent 100 ms after another joins its batch;
    # tokenize jobs sent meanwhile ran alone, each at once.
    g1, g2 = gen_job([1], [1]), gen_job([2], [2])
    t1, t2 = tok_job(1, 1), tok_job(1, 2)

    async def body(broker, ex):
        a = asyncio.create_task(broker.submit(g1))
        b = asyncio.create_task(broker.submit(t1))
        t0 = time.monotonic()
        await b
        tokenize_s = time.monotonic() - t0
        c = asyncio.create_task(broker.submit(t2))
        await asyncio.sleep(0.1)
        d = asyncio.create_task(broker.submit(g2))
        await asyncio.gather(a, c, d)
        return tokenize_s, ex

    tokenize_s, ex = run_broker(engine_registry, settings, body)
    assert [[j.id for j in b] for b in ex.batches] == [[t1.id], [t2.id], [g1.id, g2.id]]
    assert tokenize_s < 0.5  # did not wait for the generate group's 500 ms


def test_a_per_task_max_batch_size_caps_its_batches(engine_registry, engine_settings_factory):
    settings = engine_settings_factory(
        max_batch_size=8,
        max_wait_ms=200,
        batch_policy={"tokenize": {"max_batch_size": 2}, "tiny/decode": {"max_batch_size": 3}},
    )
    jobs = [tok_job(1, i) for i in range(5)] + [decode_job(1, i) for i in range(5)]
    jobs += [tok_job(1, i, "reconstruct") for i in range(5)]

    async def body(broker, ex):
        await asyncio.gather(*(broker.submit(j) for j in jobs))
        return ex

    ex = run_broker(engine_registry, settings, body)
    sizes = {
        task: [len(b) for b in ex.batches if b[0].task == task]
        for task in ("tokenize", "decode", "reconstruct")
    }
    assert sizes == {"tokenize": [2, 2, 1], "decode": [3, 2], "reconstruct": [5]}


def test_a_per_model_override_applies_to_that_model_only(engine_registry, engine_settings_factory):
    settings = engine_settings_factory(
        max_batch_size=8,
        max_wait_ms=0,
        batch_policy={"sit-tiny/generate": {"max_batch_size": 2}, "other/generate": {}},
    )
    batcher = Batcher(settings, Executor(engine_registry), ListSource([]), worker_id="t")
    for i in range(3):
        batcher.add(gen_job([i], [i], cfg=2.0))  # guided: 2 slots each
    key, _ = batcher._next_due()
    assert len(batcher._take(key)) == 1  # 2 slots = one guided item
    assert batcher.policy(gen_job([0], [0])) == BatchPolicy(2, 0.0)
    assert batcher.policy(tok_job()) == BatchPolicy(8, 0.0)
    batcher.pool.shutdown()


# --- uint8 payloads ---------------------------------------------------------------------------
def png(size: int, seed: int) -> bytes:
    img = np.random.default_rng(seed).integers(0, 256, (size + 7, size + 3, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def test_the_api_decodes_to_uint8_and_the_task_maps_it_as_pil_to_tensor_did():
    blobs = [png(32, i) for i in range(3)]  # not square: resized and cropped on the way
    u8 = codec.decode_images(blobs, 32, 1 << 20, 1 << 20)
    assert u8.dtype == np.uint8 and u8.shape == (3, 3, 32, 32) and u8.flags.c_contiguous
    for i, blob in enumerate(blobs):
        with Image.open(io.BytesIO(blob)) as img:
            old = pil_to_tensor(img, 32)  # what the API put in the job before
        assert torch.equal(unit_range(u8[i : i + 1])[0], old)  # bit for bit
    f32 = as_float(u8)
    assert torch.equal(unit_range(f32), torch.from_numpy(f32))  # float32 passes through


@pytest.mark.parametrize("size", [64, 256])
def test_a_serialised_job_carries_a_byte_per_pixel_value(size):
    u8 = pixels(4, size)
    entry = len(dump_job(Job("m", "tokenize", {"images": u8, "n": 4})))
    old = len(dump_job(Job("m", "tokenize", {"images": as_float(u8), "n": 4})))
    raw = 4 * 3 * size * size
    assert raw < entry < raw + 1024  # the pixels and a small header
    assert old > 4 * raw  # float32: four bytes a value
    back = load_job(dump_job(Job("m", "tokenize", {"images": u8, "n": 4})))
    assert back.payload["images"].dtype == np.uint8
    np.testing.assert_array_equal(back.payload["images"], u8)


def test_uint8_jobs_give_the_results_float32_jobs_gave(engine_registry):
    ex = Executor(engine_registry)
    u8 = pixels(3, seed=4)
    for task in ("tokenize", "reconstruct"):
        new = ex.run([Job("tiny", task, {"images": u8, "n": 3})])[0]
        old = ex.run([Job("tiny", task, {"images": as_float(u8), "n": 3})])[0]
        assert new.keys() == old.keys()
        for k in new:
            np.testing.assert_allclose(np.asarray(new[k]), np.asarray(old[k]), atol=1e-6)
    # Old and new payloads in one batch: each converted on its own, one model call.
    mixed = [
        Job("tiny", "tokenize", {"images": u8[:1], "n": 1}),
        Job("tiny", "tokenize", {"images": as_float(u8[1:]), "n": 2}),
    ]
    one = ex.run([Job("tiny", "tokenize", {"images": u8, "n": 3})])[0]
    got = ex.run(mixed)
    np.testing.assert_allclose(
        np.concatenate([got[0]["tokens"], got[1]["tokens"]]), one["tokens"], atol=1e-5
    )


def test_image_payloads_are_checked(engine_registry):
    ex = Executor(engine_registry)
    bad = {
        "int16": pixels(1).astype(np.int16),
        "float64": as_float(pixels(1)).astype(np.float64),
        "shape": pixels(1, size=16),
        "channels last": pixels(1).transpose(0, 2, 3, 1).copy(),
        "count": pixels(2),
        "nan": np.full((1, 3, 32, 32), np.nan, np.float32),
    }
    outcomes = ex.run([Job("tiny", "tokenize", {"images": x, "n": 1}) for x in bad.values()])
    for what, out in zip(bad, outcomes, strict=True):
        assert isinstance(out, InvalidJob), what
    with pytest.raises(InvalidJob, match="uint8 or float32"):
        check_images([[0]], (1, 3, 32, 32))


@pytest.mark.redis
def test_uint8_jobs_through_redis_and_a_worker_match_float32_ones(
    redis_server, spawn_worker, engine_settings_factory
):
    from service.broker import make_broker
    from tests.test_redis_broker import wait_ready

    spawn_worker(redis_server.url, "w0", max_wait_ms=5)
    settings = engine_settings_factory(redis_url=redis_server.url)
    u8 = pixels(2, seed=9)
    jobs = [
        Job("tiny", task, {"images": images, "n": 2})
        for task in ("tokenize", "reconstruct")
        for images in (u8, as_float(u8))
    ]
    jobs.append(Job("sit-tiny", "generate", gen_payload(), GEN_PARAMS | {"steps": 2}))

    async def main():
        broker = make_broker(settings, ModelRegistry.from_settings(settings, load_weights=False))
        await broker.start()
        try:
            await wait_ready(broker)
            return [await broker.submit(j) for j in jobs]
        finally:
            await broker.stop()

    tok_new, tok_old, rec_new, rec_old, gen = asyncio.run(asyncio.wait_for(main(), 120))
    np.testing.assert_allclose(tok_new["tokens"], tok_old["tokens"], atol=1e-6)
    np.testing.assert_array_equal(tok_new["indices"], tok_old["indices"])
    np.testing.assert_array_equal(rec_new["images"], rec_old["images"])
    np.testing.assert_allclose(rec_new["psnr"], rec_old["psnr"], atol=1e-6)
    assert gen["images"].shape == (1, 32, 32, 3) and gen["images"].dtype == np.uint8


def gen_payload() -> dict:
    return {"labels": [1], "seeds": [1], "cfg_scale": 1.0, "n": 1}


def test_uint8_and_float32_jobs_share_a_batch_and_match(engine_registry, engine_settings_factory):
    """The shipped executor on uint8 jobs through the embedded broker, batched with float32
    ones: results as a float32-only batch gave them."""
    settings = engine_settings_factory(max_wait_ms=200)
    u8 = pixels(4, seed=2)
    new = [Job("tiny", "reconstruct", {"images": u8[i : i + 1], "n": 1}) for i in range(2)]
    old = [Job("tiny", "reconstruct", {"images": as_float(u8[i : i + 1]), "n": 1}) for i in (2, 3)]

    async def body(broker, ex):
        return await asyncio.gather(*(broker.submit(j) for j in new + old)), ex

    results, ex = run_broker(engine_registry, settings, body, RecordingExecutor(engine_registry))
    assert [len(b) for b in ex.batches] == [4]  # one group, whatever the payload dtype
    alone = Executor(engine_registry).run(
        [Job("tiny", "reconstruct", {"images": as_float(u8), "n": 4})]
    )[0]
    got = np.concatenate([r["images"] for r in results])
    np.testing.assert_array_equal(got, alone["images"])
