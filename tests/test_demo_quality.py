"""The bundled demo weights (what ``softvq serve`` loads by default) meet the quality bars on a
small sample: reconstruction PSNR on held-out images, class accuracy of guided samples judged
by the separately trained classifier, and samples of one class that are not copies.

The full-size numbers (500 held-out images, 20 samples per class) come from
``softvq evaluate-demo``; see docs/DEMO_MODELS.md.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics

import pytest
import torch

import model
from model import demo
from model.training.classifier import load_judge
from model.training.evaluate import (
    DEMO_BARS,
    GenerationSettings,
    diversity,
    generate_per_class,
    missed_bars,
    reconstruction_psnr,
    reconstruction_quality,
)
from model.training.evaluate_cli import settings_for

# Issue #14's bars, as `softvq evaluate-demo` reads them (issue #4 asked 28 / 26 dB at 64 px;
# the demo models are 32 px since #14).
PSNR_BAR = {name: bars.psnr for name, bars in DEMO_BARS.items()}
# Judged accuracy of generated images with the service's defaults for each generator.
GENERATION_BAR = {gen: DEMO_BARS[tok].accuracy for gen, tok in demo.DEMO_GENERATORS.items()}

# The bundled weights reach every bar (33.0 / 30.7 dB, 98.2 / 91.4 % of reconstructions judged,
# 500 held-out images; generated images judged 90.0 % / 86.0 % of 200 since softvq-demo-64 went
# to 12 000 steps with sit-demo-64 retrained on it, and sit-demo-32 became 128 x 6, in the
# twenty-sixth and twentieth passes; docs/DEMO_MODELS_LOG.md).
# Retrained weights that fall below a bar turn these tests red.


@pytest.fixture(autouse=True, scope="module")
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(min(2, old))
    yield
    torch.set_num_threads(old)


def test_demo_weights_are_bundled_and_small():
    names = [*demo.DEMO_TOKENIZERS, *demo.DEMO_GENERATORS, demo.JUDGE_CLASSIFIER]
    for name in names:
        assert demo.demo_available(name), f"{name} is missing from {demo.DEMO_WEIGHTS_DIR}"
    total = sum(f.stat().st_size for f in demo.DEMO_WEIGHTS_DIR.rglob("*") if f.is_file())
    assert total <= 25 * 2**20
    assert demo.DEMO_GENERATORS[demo.DEFAULT_GENERATOR] == demo.DEFAULT_TOKENIZER


def test_bundled_weights_were_trained_by_the_recipe():
    """``softvq train-demo`` reproduces the bundle only if the recipe still builds the
    training configs the bundled models were trained with (their training.json; the paths
    of the work directory they were trained in aside)."""
    import dataclasses
    import json
    from pathlib import Path

    from model.training import recipe
    from model.training.data import data_set_meta

    # the version of the built-in set they saw (its shape sizes changed between passes)
    for name in [*demo.DEMO_TOKENIZERS, *demo.DEMO_GENERATORS, demo.JUDGE_CLASSIFIER]:
        meta = json.loads((demo.demo_path(name) / "training.json").read_text())
        assert meta["data_set"] == data_set_meta("shapes"), name
    paths = {"out", "tokenizer", "ckpt", "teacher"}
    for name in [*demo.DEMO_TOKENIZERS, *demo.DEMO_GENERATORS]:
        build = recipe.tokenizer_config if name in recipe.TOKENIZERS else recipe.generator_config
        cfg = build(Path("work"), name)
        # a field added to the trainer after the bundle was trained ran at its default
        defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
        meta = json.loads((demo.demo_path(name) / "training.json").read_text())
        trained = {**defaults, **meta["trained_with"]}
        wanted = dataclasses.asdict(cfg)
        assert {k: v for k, v in trained.items() if k not in paths} == {
            k: v for k, v in wanted.items() if k not in paths
        }, name


@pytest.mark.parametrize("name", demo.DEMO_TOKENIZERS)
def test_reconstruction_psnr_on_held_out_images(name):
    tok = model.load_tokenizer(demo.demo_path(name))
    values = reconstruction_psnr(tok, count=64)
    assert statistics.mean(values) >= PSNR_BAR[name]


# Issue #14: the judge names the tokenizers' reconstructions of held-out images (the ceiling
# for generated images). Both are above their bars since the eleventh pass (now 98.2 % / 91.4 % on
# 500 images; docs/DEMO_MODELS.md).
RECON_ACCURACY_BAR = {name: bars.reconstruction_accuracy for name, bars in DEMO_BARS.items()}


@pytest.mark.parametrize("name", demo.DEMO_TOKENIZERS)
def test_reconstruction_quality_judges_the_same_reconstructions(name):
    tok = model.load_tokenizer(demo.demo_path(name))
    judge = load_judge(demo.demo_path(demo.JUDGE_CLASSIFIER))
    values, acc = reconstruction_quality(tok, judge, count=20)
    assert values == reconstruction_psnr(tok, count=20)
    assert 0.0 <= acc <= 1.0 and reconstruction_quality(tok, None, count=4)[1] is None


@pytest.mark.parametrize("name", demo.DEMO_TOKENIZERS)
def test_judge_names_the_reconstructions_of_held_out_images(name):
    tok = model.load_tokenizer(demo.demo_path(name))
    judge = load_judge(demo.demo_path(demo.JUDGE_CLASSIFIER))
    _, acc = reconstruction_quality(tok, judge, count=100)
    assert acc >= RECON_ACCURACY_BAR[name]


@functools.cache
def guided_samples(gen_name: str):
    """(images, labels): 4 samples per class with the generator's own defaults (its
    config.json "sampling", what /generate uses)."""
    tok = model.load_tokenizer(demo.demo_path(demo.DEMO_GENERATORS[gen_name]))
    gen = model.load_generator(demo.demo_path(gen_name))
    settings = settings_for(demo.demo_path(gen_name))
    return generate_per_class(tok, gen, per_class=4, settings=settings, seed=7)


@pytest.mark.parametrize("gen_name", demo.DEMO_GENERATORS)
def test_guided_samples_show_the_class_asked_for(gen_name):
    images, labels = guided_samples(gen_name)
    judge = load_judge(demo.demo_path(demo.JUDGE_CLASSIFIER))
    accuracy = float((judge.predict(images) == labels).float().mean())
    assert accuracy >= GENERATION_BAR[gen_name], f"{gen_name}: judged accuracy {accuracy:.3f}"


@pytest.mark.parametrize("gen_name", demo.DEMO_GENERATORS)
def test_samples_of_one_class_are_not_copies(gen_name):
    images, labels = guided_samples(gen_name)
    assert torch.isfinite(images).all()
    ratios = [v[2] for v in diversity(images, labels).values()]
    assert statistics.mean(ratios) >= 0.5, f"{gen_name}: samples too alike ({ratios})"


def test_judge_recognises_real_held_out_images():
    judge = load_judge(demo.demo_path(demo.JUDGE_CLASSIFIER))
    from model.training.data import ProceduralShapes
    from model.training.evaluate import HELD_OUT_SEED

    # 500 images (200 left the estimate within a few images of the bar); counted in integers
    # (a float32 mean of 190/200 is 0.94999...).
    size = judge.config.image_size
    images, labels = ProceduralShapes(500, seed=HELD_OUT_SEED + 2, image_size=size).batch(
        range(500)
    )
    correct = int((judge.predict(images) == labels).sum())
    assert correct >= 475, f"judge: {correct} / 500 real held-out images right"


def test_noised_latent_diagnostic_starts_at_the_reconstruction_ceiling():
    """t = 0 of the diagnostic must be exactly the judge on reconstructions of the same held-out
    images (nothing noised, nothing integrated); t = 1 is generation from pure noise."""
    from model.training.data import ProceduralShapes
    from model.training.evaluate import HELD_OUT_SEED, accuracy_from_noised_latents

    judge = load_judge(demo.demo_path(demo.JUDGE_CLASSIFIER))
    tok = model.load_tokenizer(demo.demo_path("softvq-demo-32"))
    gen = model.load_generator(demo.demo_path("sit-demo-32"))
    acc = accuracy_from_noised_latents(
        tok, gen, judge, (0.0, 1.0), count=60, settings=GenerationSettings(steps=4)
    )
    held_out = ProceduralShapes(60, seed=HELD_OUT_SEED + 2, image_size=tok.image_size)
    images, labels = held_out.batch(range(60))
    with torch.no_grad():
        recon = tok.decode(tok.encode(images)).clamp(-1, 1)
    assert acc[0.0] == float((judge.predict(recon) == labels).float().mean())
    assert set(acc) == {0.0, 1.0} and 0.0 <= acc[1.0] <= 1.0


def test_demo_bars_are_issue_14s():
    """The one copy of the bars (evaluate-demo and the tests above read it) says what the
    issue says."""
    assert {n: dataclasses.astuple(b) for n, b in DEMO_BARS.items()} == {
        "softvq-demo-64": (26.0, 0.90, 0.85, 0.8),
        "softvq-demo-32": (24.0, 0.85, 0.75, 0.8),
    }


def test_missed_bars_names_each_bar_a_result_falls_below():
    bars = dataclasses.replace(DEMO_BARS["softvq-demo-64"], reconstruction_accuracy=0.95)
    met = {
        "psnr_mean": 30.7,
        # a float32 mean of 190 / 200 (0.94999999): on the bar, not below it
        "reconstruction_accuracy": float((torch.arange(200) < 190).float().mean()),
        "accuracy": 0.85,
        "diversity_ratio_min": 0.8,
    }
    assert missed_bars(met, bars) == []
    low = {**met, "reconstruction_accuracy": 0.838, "diversity_ratio_min": 0.79}
    assert missed_bars(low, bars) == [
        "judged reconstructions 83.8% < 95.0%",
        "lowest class diversity 0.79 < 0.80",
    ]


def test_evaluate_demo_fails_a_pair_below_a_bar(tmp_path):
    """`softvq evaluate-demo` reads the numbers against the bars: with a judge that names
    nothing (one training step), every pair misses its judged bars, the command says which
    and exits 1 (so a script stops before copying retrained weights over the bundle).
    ``--outlines`` adds each pair's outline IoU per class, generated and reconstructed."""
    import json
    import shutil
    import subprocess
    import sys

    from model.training.classifier import train_judge

    for name in [*demo.DEMO_TOKENIZERS, *demo.DEMO_GENERATORS]:
        shutil.copytree(demo.demo_path(name), tmp_path / name)
    train_judge(tmp_path / demo.JUDGE_CLASSIFIER, steps=1, image_size=32, quiet=True)
    out = tmp_path / "quality.json"
    argv = ["evaluate-demo", "--weights-dir", tmp_path, "--psnr-images", 20, "--per-class", 2]
    argv.append("--outlines")  # the outline reading rides along (it needs no judge)
    run = subprocess.run(
        [sys.executable, "-m", "service.cli", *map(str, argv), "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 1, run.stdout + run.stderr
    results = json.loads(out.read_text())
    for pair, r in results.items():
        assert any(m.startswith("judged reconstructions") for m in r["missed_bars"]), pair
        assert not any(m.startswith("PSNR") for m in r["missed_bars"]), pair
    assert run.stdout.count("below the bar: judged reconstructions") == 2
    for pair, r in results.items():
        outlines = r["outline_iou"]
        assert set(outlines) == {"generated", "reconstructed"}, pair
        assert all(len(v) == 10 and all(0 <= x <= 1 for x in v) for v in outlines.values())
        # The bundled decoders keep a circle's outline (0.97-0.98 on 20 per class).
        assert outlines["reconstructed"][0] > 0.9, (pair, outlines)
    assert run.stdout.count("outline IoU, generated (median per class): circle 0.") == 2
