"""The benchmark suite end to end on minute models: every part runs (the HTTP part through
a real uvicorn on 127.0.0.1) and results.json / results.md hold the keys issue #5 lists.
The numbers themselves are not checked: speed is measured by the suite, never asserted."""

from __future__ import annotations

import json

from loadtests import bench, decode_photos
from tests.test_serve_uvicorn import serve_process


def test_bench_tiny_preset_writes_all_results(tmp_path, capsys):
    out = tmp_path / "bench"
    assert bench.main(["--preset", "tiny", "--out", str(out)]) == 0
    progress = capsys.readouterr().err
    assert "a. generation" in progress and "c-e. HTTP service" in progress

    r = json.loads((out / "results.json").read_text())
    gen = r["generation"]
    assert set(gen["images_per_s"]) == {"1d_32", "1d_64", "2d_256"}
    assert set(gen["speedup"]) == {"32_vs_256", "64_vs_256"}
    assert all(v > 0 for v in gen["images_per_s"].values())
    # the 2-D pipeline runs more FLOPs per image than either 1-D one (counted, not assumed)
    assert gen["flop_ratio"]["32_vs_256"] > 1 and gen["flop_ratio"]["64_vs_256"] > 1
    for part in ("decode", "encode"):
        assert set(r["backends"][part]) == {"eager", "onnx"}
        assert all(v > 0 for v in r["backends"][part].values())
    assert 0 < r["backends"]["decode_flops_fraction"]
    assert r["service_efficiency"] > 0 and r["batching_gain"] > 0
    for level in ("load_50", "load_90"):
        lat = r["latency_ms"][level]
        assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"]

    md = (out / "results.md").read_text()
    assert (
        "## a. Generation" in md
        and "## b. Tokenizer backends" in md
        and "## c-e. HTTP service" in md
    )
    assert r["meta"]["command"].startswith("python -m loadtests.bench --preset tiny")


def test_bench_bfloat16_paths_run_on_the_cpu(tmp_path):
    """The gpu preset runs in bfloat16; its dtype paths are exercised here, on minute models,
    so a lent GPU's few minutes are not lost to a dtype bug. ONNX Runtime has no bfloat16 on
    the CPU: that backend is recorded as skipped, not fatal."""
    out = tmp_path / "bench"
    assert bench.main(["--preset", "tiny", "--dtype", "bfloat16", "--out", str(out)]) == 0
    r = json.loads((out / "results.json").read_text())
    assert r["meta"]["dtype"] == "bfloat16"
    assert all(v > 0 for v in r["generation"]["images_per_s"].values())
    assert set(r["backends"]["decode"]) == {"eager"} and "onnx" in r["backends"]["errors"]
    assert r["service_efficiency"] > 0 and r["batching_gain"] > 0


def test_decode_photos_times_both_ways_and_reads_them_close(tmp_path):
    out = tmp_path / "decode.json"
    decode_photos.main(["--reps", "1", "--json", str(out)])
    rows = json.loads(out.read_text())
    assert len(rows) == len(decode_photos.PHOTOS) * len(decode_photos.SIZES)
    assert all(r["whole_ms"] > 0 and r["scaled_ms"] > 0 for r in rows)
    # The scaled decode reads the picture decoded whole (quality, not speed, is checked here).
    assert min(r["psnr_db"] for r in rows) > 45


def test_decode_photos_times_the_whole_request_against_running_servers(api_env, tmp_path):
    out = tmp_path / "http.json"
    env = {  # the tests' limits are smaller than a phone photo (tests/conftest.py)
        **api_env,
        "SOFTVQ_MAX_IMAGE_BYTES": str(16 * 2**20),
        "SOFTVQ_MAX_BODY_BYTES": str(32 * 2**20),
        "SOFTVQ_MAX_IMAGE_PIXELS": "25000000",
    }
    with serve_process(env, tmp_path) as (base, _):
        decode_photos.main(["--url", base, "--url", base, "--reps", "1", "--json", str(out)])
        rows = json.loads(out.read_text())
        assert len(rows) == 2 * len(decode_photos.PHOTOS)
        assert all(r["url"] == base and r["reconstruct_ms"] > 0 for r in rows)
        decode_photos.main(["--url", base, "--burst", "2", "--json", str(out)])
    rows = json.loads(out.read_text())
    assert len(rows) == 2 and all(r["answered_200"] == 2 for r in rows)
    assert all(0 < r["idle_mb"] <= r["peak_mb"] for r in rows)
