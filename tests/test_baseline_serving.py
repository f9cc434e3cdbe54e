"""The 2-D latent-diffusion baseline served beside SoftVQ by a real ``softvq serve`` over HTTP:
the SiT authors' layout (tests/fixtures/official-tiny/sit2d) decoded by an SD-VAE (diffusers'
AutoencoderKL), and the compare profile's three speed references, through the same endpoints,
batcher and metrics."""

from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

import model
from model.images import tensor_to_uint8
from model.pipeline import sample_latents
from tests.test_api import decode_png as decode_png_bytes
from tests.test_serve_uvicorn import metric, serve_process
from tests.tiny_models import save_tiny_pair

pytest.importorskip("diffusers")
from model.sd_vae import load_sd_vae, random_sd_vae, save_sd_vae  # noqa: E402

SIT2D = Path(__file__).parent / "fixtures" / "official-tiny" / "sit2d"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("baseline-models")
    save_tiny_pair(root, "tiny", tokens=8, dim=8, image_size=32, seed=0)
    shutil.copytree(SIT2D, root / "sit2d")
    save_sd_vae(random_sd_vae(width_scale=0.0625, layers_per_block=1, sample_size=64), root / "vae")
    return root


def baseline_env(api_env, root) -> dict[str, str]:
    return {
        **os.environ,
        **api_env,
        "SOFTVQ_MODEL_ROOT": str(root),
        "SOFTVQ_TOKENIZERS": json.dumps({"tiny": "tiny"}),
        "SOFTVQ_VAES": json.dumps({"sd-vae-tiny": "vae"}),
        "SOFTVQ_GENERATORS": json.dumps(
            {
                "sit-tiny": {"path": "sit-tiny", "tokenizer": "tiny"},
                "sit2d-tiny": {"path": "sit2d", "tokenizer": "sd-vae-tiny"},
            }
        ),
        "SOFTVQ_DEFAULT_TOKENIZER": "tiny",
        "SOFTVQ_DEFAULT_GENERATOR": "sit-tiny",
        "SOFTVQ_BATCH_BUCKETS": "[1, 2]",
        "SOFTVQ_MAX_BATCH_SIZE": "4",
    }


@pytest.fixture(scope="module")
def server(api_env, root, tmp_path_factory):
    env = {
        **baseline_env(api_env, root),
        "SOFTVQ_COMPARE": "cpu",
        "SOFTVQ_CACHE_DIR": str(tmp_path_factory.mktemp("cache")),
    }
    with serve_process(env, tmp_path_factory.mktemp("serve")) as (base, _):
        yield base


def decode_png(b64: str) -> np.ndarray:
    return decode_png_bytes(base64.b64decode(b64))


def reference_images(root: Path, labels, seeds, steps) -> np.ndarray:
    """SiT/2 sampled by model.sample (through the t -> 1 - t flip), decoded by AutoencoderKL
    after dividing by the scaling factor, in this process."""
    gen = model.load_generator(root / "sit2d")
    vae = load_sd_vae(root / "vae")
    with torch.no_grad():
        z = sample_latents(gen, labels, seeds, steps=steps)
        return tensor_to_uint8(vae.decode(z / vae.scaling_factor))


def generate(base: str, **body) -> httpx.Response:
    return httpx.post(f"{base}/generate", json=body, timeout=120)


def test_models_lists_the_baseline_and_marks_speed_references(server):
    info = httpx.get(f"{server}/models", timeout=10).json()
    gens = {g["name"]: g for g in info["generators"]}
    assert set(gens) == {
        "sit-tiny",
        "sit2d-tiny",
        "ref-sit-1d-32",
        "ref-sit-1d-64",
        "ref-sit-2d-256",
    }
    b = gens["sit2d-tiny"]
    assert b["family"] == "latent-2d" and b["tokenizer"] == "sd-vae-tiny"
    assert b["image_size"] == 64 and b["latent_shape"] == [4, 8, 8] and b["num_tokens"] == 16
    assert b["speed_reference"] is False and "note" not in b
    assert gens["sit-tiny"]["family"] == "softvq"
    for name in ("ref-sit-1d-32", "ref-sit-1d-64", "ref-sit-2d-256"):
        g = gens[name]
        assert g["speed_reference"] is True and "noise" in g["note"], g
        assert g["image_size"] == 256 and g["num_classes"] == 1000
    assert gens["ref-sit-2d-256"]["latent_shape"] == [4, 32, 32]
    assert gens["ref-sit-2d-256"]["num_tokens"] == 256
    assert (gens["ref-sit-1d-32"]["num_tokens"], gens["ref-sit-1d-64"]["num_tokens"]) == (32, 64)
    vaes = {v["name"]: v for v in info["vaes"]}
    assert vaes["sd-vae-tiny"]["scaling_factor"] == pytest.approx(0.18215)
    assert set(vaes) == {"sd-vae-tiny", "ref-sd-vae"}
    # the SD-VAE is a decoder of generators, not a tokenizer of the tokenizer endpoints
    assert {t["name"] for t in info["tokenizers"]} == {"tiny", "ref-softvq-32", "ref-softvq-64"}


def test_generate_on_the_baseline_is_the_reference_math(server, root):
    """The served image = SiT/2 sampled by model.sample (through the t -> 1 - t flip) and
    decoded by AutoencoderKL after dividing by the scaling factor, in this process."""
    r = generate(server, model="sit2d-tiny", class_labels=[3, 7], seeds=[5, 6], steps=3)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "sit2d-tiny" and body["seeds"] == [5, 6]
    served = np.stack([decode_png(b) for b in body["images"]])
    assert served.shape == (2, 64, 64, 3)

    want = reference_images(root, [3, 7], [5, 6], steps=3)
    assert np.abs(served.astype(int) - want.astype(int)).max() <= 1

    # an image does not depend on its batch: seed 6 alone is the second image above
    alone = generate(server, model="sit2d-tiny", class_labels=[7], seeds=[6], steps=3)
    assert np.abs(decode_png(alone.json()["images"][0]).astype(int) - served[1]).max() <= 1


def test_bad_requests_to_the_baseline_are_4xx(server):
    r = generate(server, model="sit2d-tiny", class_labels=[10], seed=0, steps=2)
    assert r.status_code == 422 and r.json()["error"] == "invalid_class"
    r = httpx.post(
        f"{server}/decode", json={"model": "sd-vae-tiny", "tokens": [[[0.0] * 8] * 8]}, timeout=10
    )
    assert r.status_code == 404 and r.json()["error"] == "unknown_model"
    # the server is unharmed
    assert generate(server, model="sit2d-tiny", num_images=1, seed=1, steps=1).status_code == 200


def test_compare_profile_generates_with_all_three_and_exports_the_families(server):
    for name in ("ref-sit-1d-32", "ref-sit-1d-64", "ref-sit-2d-256"):
        r = generate(server, model=name, num_images=2, seed=0, steps=1, cfg_scale=1.5)
        assert r.status_code == 200, r.text
        assert decode_png(r.json()["images"][0]).shape == (256, 256, 3)
    text = httpx.get(f"{server}/metrics", timeout=10).text
    fam = "softvq_generator_family"  # labels as the client writes them: sorted
    assert (
        metric(text, fam, family="latent-2d", model="ref-sit-2d-256", speed_reference="true") == 1
    )
    assert metric(text, fam, family="latent-2d", model="sit2d-tiny", speed_reference="false") == 1
    assert metric(text, fam, family="softvq", model="ref-sit-1d-32", speed_reference="true") == 1
    for name in ("ref-sit-1d-32", "ref-sit-2d-256"):
        assert metric(text, "softvq_images_processed_total", model=name, task="generate") >= 2
        assert metric(text, "softvq_compute_seconds_sum", model=name, task="generate") > 0


def test_loadtests_compare_reads_the_speedup_off_the_served_metrics(server, tmp_path, capsys):
    """loadtests.compare end to end on the compare profile (a few seconds, 1 step): every
    generator driven, its images and model seconds read from /metrics, ratios to the 2-D
    baseline written. The numbers themselves are not checked (speed is benchmarked)."""
    from loadtests import compare

    out = tmp_path / "compare"
    argv = ["--url", server, "--duration", "2", "--rounds", "1", "--concurrency", "2"]
    assert compare.main([*argv, "--steps", "1", "--out", str(out)]) == 0
    report = json.loads((out / "compare.json").read_text())
    assert report["baseline"] == "ref-sit-2d-256"
    res = report["results"]
    assert set(res) == {"ref-sit-1d-32", "ref-sit-1d-64", "ref-sit-2d-256"}
    for r in res.values():
        assert r["images"] > 0 and r["images_per_s"] > 0 and r["model_s_per_image"] > 0
        assert r["requests_ok"] > 0 and not r["errors"]
    assert res["ref-sit-2d-256"]["model_time_speedup_vs_2d"] == pytest.approx(1.0)
    assert res["ref-sit-2d-256"]["throughput_ratio_vs_2d"] == pytest.approx(1.0)
    md = (out / "compare.md").read_text()
    assert "| ref-sit-1d-32 |" in md and md in capsys.readouterr().out
    assert report["meta"]["command"].startswith("python -m loadtests.compare --url")


@pytest.mark.redis
def test_the_baseline_runs_through_redis_workers(api_env, root, redis_server, tmp_path):
    """Redis mode: the API (shapes only: it reads the SD-VAE's config.json, loads no weights)
    queues the 2-D job, a ``softvq worker`` runs SiT/2 + the SD-VAE and answers."""
    import subprocess

    from tests.redis_server import free_port
    from tests.test_serve_uvicorn import softvq_command

    env = {**baseline_env(api_env, root), "SOFTVQ_REDIS_URL": redis_server.url}
    mport = free_port()
    log = open(tmp_path / "worker.log", "w+")
    worker = subprocess.Popen(
        [*softvq_command(), "worker", "--metrics-port", str(mport), "--log-level", "warning"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        with serve_process(env, tmp_path) as (base, _):  # ready = a live worker
            r = generate(base, model="sit2d-tiny", class_labels=[1], seeds=[9], steps=2)
            assert r.status_code == 200, r.text
            got = decode_png(r.json()["images"][0])
            want = reference_images(root, [1], [9], steps=2)[0]
            assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
            info = httpx.get(f"{base}/models", timeout=10).json()
            (b,) = [g for g in info["generators"] if g["name"] == "sit2d-tiny"]
            assert b["workers"] == 1 and b["family"] == "latent-2d"
            text = httpx.get(f"http://127.0.0.1:{mport}/metrics", timeout=10).text
            labels = {"model": "sit2d-tiny", "task": "generate"}
            assert metric(text, "softvq_images_processed_total", **labels) == 1
    finally:
        worker.kill()
        worker.wait(10)
        log.seek(0)
        print(log.read()[-3000:])
        log.close()
