"""The benchmark suite end to end on minute models: every part runs (the HTTP part through
a real uvicorn on 127.0.0.1) and results.json / results.md hold the keys issue #5 lists.
The numbers themselves are not checked: speed is measured by the suite, never asserted."""

from __future__ import annotations

import json

from loadtests import bench


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
