"""Training: losses go down, checkpoints resume exactly, latent statistics are measured,
the CLI trains on a user's folder of class sub-folders."""

from __future__ import annotations

import json
import platform
import re
import statistics

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import model
from model.pipeline import sample_latents
from model.training.classifier import load_judge, train_judge
from model.training.data import RADIUS_RANGE, ProceduralShapes
from model.training.generator_trainer import GeneratorTrainConfig, sample_time, train_generator
from model.training.tokenizer_trainer import (
    TokenizerTrainConfig,
    measure_latent_stats,
    train_tokenizer,
)
from service.cli import main

TINY_VIT = {"embed_dim": 32, "depth": 1, "num_heads": 2}


def tok_config(out, **kw) -> TokenizerTrainConfig:
    base = dict(
        out=str(out),
        image_size=32,
        num_tokens=8,
        token_dim=8,
        codebook_size=32,
        patch_size=8,
        enc=dict(TINY_VIT),
        dec=dict(TINY_VIT),
        steps=6,
        batch_size=8,
        lr=3e-3,
        warmup=2,
        ckpt_every=2,
        stats_images=40,
        train_size=400,
    )
    base.update(kw)
    return TokenizerTrainConfig(**base)


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def same_weights(a, b) -> bool:
    sa, sb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_tokenizer_loss_goes_down(tmp_path):
    history = train_tokenizer(tok_config(tmp_path / "tok", steps=60, ckpt_every=1000), quiet=True)
    losses = [loss for _, loss in history]
    assert statistics.mean(losses[-10:]) < 0.7 * statistics.mean(losses[:5])


def test_tokenizer_resumes_exactly_and_stores_latent_stats(tmp_path):
    straight = tok_config(tmp_path / "a")
    train_tokenizer(straight, quiet=True)
    resumed = tok_config(tmp_path / "b")
    train_tokenizer(resumed, quiet=True, stop_after=3)  # "killed" after step 3 (ckpt at 2, 3)
    assert not (tmp_path / "b" / "model.safetensors").exists()
    train_tokenizer(resumed, quiet=True)
    assert same_weights(tmp_path / "a", tmp_path / "b")

    tok = model.load_tokenizer(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg["vq_std"] != 1.0  # measured, not the default
    data = ProceduralShapes(400, seed=0, image_size=32)
    mean, std = measure_latent_stats(tok, data, 40)
    assert cfg["vq_mean"] == pytest.approx(mean) and cfg["vq_std"] == pytest.approx(std)
    images, _ = data.batch(range(40))
    z = tok.encode(images)
    assert float(z.std()) == pytest.approx(std, rel=1e-3)

    # where it was trained, down to what tells two "AMD EPYC" machines apart
    machine = json.loads((tmp_path / "a" / "training.json").read_text())["machine"]
    assert machine["cpu_kernels"] == torch.backends.cpu.get_cpu_capability()
    if platform.machine() == "x86_64":  # other CPUs' /proc/cpuinfo names other fields
        assert re.fullmatch(r"\d+/\d+", machine["cpu_family_model"]), machine
    assert machine["cpu"] and machine["threads"] == torch.get_num_threads()


@pytest.fixture(scope="module")
def trained_tiny_tokenizer(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tok"
    train_tokenizer(tok_config(out, steps=4), quiet=True)
    return out


def gen_config(out, tokenizer, **kw) -> GeneratorTrainConfig:
    base = dict(
        out=str(out),
        tokenizer=str(tokenizer),
        hidden_size=32,
        depth=1,
        num_heads=2,
        steps=6,
        batch_size=32,
        lr=3e-3,
        warmup=2,
        train_size=100,
        ckpt_every=2,
    )
    base.update(kw)
    return GeneratorTrainConfig(**base)


def test_generator_loss_goes_down(tmp_path, trained_tiny_tokenizer):
    cfg = gen_config(tmp_path / "gen", trained_tiny_tokenizer, steps=80, ckpt_every=1000)
    history = train_generator(cfg, quiet=True)
    losses = [loss for _, loss in history]
    assert statistics.mean(losses[-10:]) < 0.8 * statistics.mean(losses[:5])
    gen = model.load_generator(tmp_path / "gen")
    tok = model.load_tokenizer(trained_tiny_tokenizer)
    assert (gen.num_tokens, gen.token_dim) == (tok.num_tokens, tok.token_dim)
    assert gen.num_classes == 10 and gen.config.tokenizer == "tok"
    # The saved generator runs through the public pipeline, guidance included.
    images = model.generate(tok, gen, [0, 3], [1, 2], steps=2, cfg_scale=2.0)
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()


def test_generator_resumes_exactly(tmp_path, trained_tiny_tokenizer):
    train_generator(gen_config(tmp_path / "a", trained_tiny_tokenizer), quiet=True)
    cfg_b = gen_config(tmp_path / "b", trained_tiny_tokenizer)
    train_generator(cfg_b, quiet=True, stop_after=3)
    train_generator(cfg_b, quiet=True)
    assert same_weights(tmp_path / "a", tmp_path / "b")


def test_generator_starts_from_a_finished_one(tmp_path, trained_tiny_tokenizer):
    first = gen_config(tmp_path / "a", trained_tiny_tokenizer, depth=2, steps=60, ckpt_every=1000)
    fresh = [loss for _, loss in train_generator(first, quiet=True)]
    # Depth 1 asked for, depth 2 started from: the starting model's shape wins. With a zero
    # learning rate nothing moves, so the result is the start, bit for bit.
    more = gen_config(
        tmp_path / "b", trained_tiny_tokenizer, steps=4, lr=0.0, init_from=str(tmp_path / "a")
    )
    started = [loss for _, loss in train_generator(more, quiet=True)]
    assert same_weights(tmp_path / "a", tmp_path / "b")
    assert model.load_generator(tmp_path / "b").config.depth == 2
    # It starts where the first run ended, not where a fresh model starts.
    assert statistics.mean(started) < 0.8 * statistics.mean(fresh[:4])
    trained_with = json.loads((tmp_path / "b" / "training.json").read_text())["trained_with"]
    assert trained_with["init_from"] == str(tmp_path / "a") and trained_with["depth"] == 2


def test_cli_refuses_to_start_from_a_generator_for_other_latents(
    tmp_path, trained_tiny_tokenizer, capsys
):
    tok = model.load_tokenizer(trained_tiny_tokenizer)
    other = model.SiT(
        model.GeneratorConfig(
            input_size=tok.num_tokens,
            in_channels=tok.token_dim,
            hidden_size=32,
            depth=1,
            num_heads=2,
            num_classes=3,
        )
    )
    model.save_generator(other, tmp_path / "three-classes")
    args = ["train-generator", "--out", str(tmp_path / "g"), "--tokenizer"]
    args += [str(trained_tiny_tokenizer), "--train-size", "100", "--steps", "2", "--quiet"]
    assert main([*args, "--init-from", str(tmp_path / "nowhere")]) == 2
    assert "--init-from" in capsys.readouterr().err
    assert main([*args, "--init-from", str(tmp_path / "three-classes")]) == 2
    err = capsys.readouterr().err
    assert "3 classes" in err and "10 classes" in err and "Traceback" not in err
    assert not (tmp_path / "g" / "model.safetensors").exists()


def test_generator_latents_are_normalised_with_the_tokenizer_stats(
    tmp_path, trained_tiny_tokenizer
):
    cfg = gen_config(tmp_path / "g", trained_tiny_tokenizer, steps=1)
    train_generator(cfg, quiet=True)
    cached = load_file(str(cfg.latents_path()))
    tok = model.load_tokenizer(trained_tiny_tokenizer)
    images, labels = ProceduralShapes(100, seed=0, image_size=32).batch(range(100))
    expected = (tok.encode(images) - tok.vq_mean) / tok.vq_std
    torch.testing.assert_close(cached["latents"], expected)
    assert torch.equal(cached["labels"], labels)
    # Measured on the same training images, so the normalised latents are ~zero-mean, unit-std.
    assert abs(float(expected.mean())) < 0.1 and float(expected.std()) == pytest.approx(1, abs=0.1)


def test_judge_trains_and_round_trips(tmp_path):
    acc = train_judge(tmp_path / "judge", steps=3, batch_size=8, image_size=32, quiet=True)
    assert 0.0 <= acc <= 1.0
    judge = load_judge(tmp_path / "judge")
    meta = json.loads((tmp_path / "judge" / "training.json").read_text())
    assert meta["data_set"] == {"name": "shapes", "radius_range": list(RADIUS_RANGE)}
    assert meta["machine"]["threads"] == torch.get_num_threads()
    assert meta["machine"]["cpu"] and meta["machine"]["torch"] == torch.__version__
    images, _ = ProceduralShapes(6, image_size=32).batch(range(6))
    assert judge.predict(images).shape == (6,)


def test_cli_trains_on_a_folder_of_class_folders(tmp_path):
    data = tmp_path / "data"
    for name, rgb in {"red": (220, 20, 20), "blue": (20, 20, 220), "green": (20, 220, 20)}.items():
        (data / name).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (48, 40), tuple(c + 7 * i for c in rgb)).save(data / name / f"{i}.png")
    tok_dir, gen_dir = tmp_path / "tok", tmp_path / "gen"
    common = ["--data", str(data), "--quiet", "--threads", "1", "--steps", "3"]
    assert (
        main(
            [
                "train-tokenizer",
                "--out",
                str(tok_dir),
                "--image-size",
                "32",
                "--tokens",
                "8",
                "--token-dim",
                "8",
                "--codebook-size",
                "16",
                "--width",
                "32",
                "--depth",
                "1",
                "--heads",
                "2",
                "--batch-size",
                "4",
                *common,
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "train-generator",
                "--out",
                str(gen_dir),
                "--tokenizer",
                str(tok_dir),
                "--hidden",
                "32",
                "--depth",
                "1",
                "--heads",
                "2",
                "--batch-size",
                "8",
                *common,
            ]
        )
        == 0
    )
    gen = model.load_generator(gen_dir)
    assert gen.num_classes == 3
    for trained in (tok_dir, gen_dir):
        meta = json.loads((trained / "training.json").read_text())
        assert meta["classes"] == ["blue", "green", "red"]
        assert meta["data_set"] == {"name": "folder", "path": str(data.resolve())}


def test_cli_rejects_missing_data_folder(tmp_path, capsys):
    code = main(
        [
            "train-tokenizer",
            "--out",
            str(tmp_path / "t"),
            "--data",
            str(tmp_path / "nope"),
            "--quiet",
        ]
    )
    assert code == 2
    assert "--data" in capsys.readouterr().err


def test_sincos_position_init_is_the_2d_table(tmp_path):
    from model.sit import sincos_2d
    from model.tokenizer import SoftVQTokenizer
    from model.training.tokenizer_trainer import init_for_small_widths

    cfg = tok_config(tmp_path / "t")
    tok = SoftVQTokenizer(cfg.model_config())
    init_for_small_widths(tok, 0.5, "sincos")
    for vit in (tok.encoder.model, tok.decoder.model):
        assert torch.equal(vit.pos_embed[0, 0], torch.zeros(vit.embed_dim))
        torch.testing.assert_close(vit.pos_embed[0, 1:], sincos_2d(vit.embed_dim, vit.grid).float())
    with pytest.raises(ValueError, match="pos_init"):
        init_for_small_widths(tok, 0.5, "bogus")
    # A sincos run trains and resumes like any other.
    history = train_tokenizer(tok_config(tmp_path / "s", pos_init="sincos"), quiet=True)
    assert len(history) == 6


def train_on_class_means(cfg, num_classes: int, L: int = 8, D: int = 8) -> torch.Tensor:
    """Write the trainer's latent cache with a toy whose answer is known (500 latents, each a
    class mean + noise 0.05), train on it; return the means (classes, L, D)."""
    g = torch.Generator().manual_seed(0)
    means = torch.randn(num_classes, L, D, generator=g)
    labels = torch.arange(500) % num_classes
    latents = means[labels] + 0.05 * torch.randn(500, L, D, generator=g)
    cfg.latents_path().parent.mkdir(parents=True, exist_ok=True)
    save_file({"latents": latents, "labels": labels}, str(cfg.latents_path()))
    train_generator(cfg, quiet=True)
    return means


def test_generator_samples_land_at_their_class_mean(tmp_path, trained_tiny_tokenizer):
    """End to end on a toy whose answer is known: latents = a class mean + small noise, the
    project's trainer (lognormal t, label dropout, EMA release), then the service's sampling
    path with /generate's defaults (Euler, 50 steps, no guidance) and with guidance. A wrong
    time convention, velocity sign, label / null-class mix-up or a non-EMA release would
    leave the samples at noise or at the wrong class."""
    num_classes = 10
    cfg = gen_config(
        tmp_path / "gen",
        trained_tiny_tokenizer,
        hidden_size=64,
        depth=2,
        steps=400,
        warmup=20,
        ema_decay=0.99,
        train_size=500,
        ckpt_every=1000,
    )
    means = train_on_class_means(cfg, num_classes)
    gen = model.load_generator(tmp_path / "gen")
    asked = torch.arange(40) % num_classes
    for cfg_scale in (1.0, 3.0):
        z = sample_latents(gen, asked, list(range(40)), cfg_scale=cfg_scale)
        dist = ((z[:, None] - means[None]) ** 2).mean((2, 3))  # (40, classes)
        assert torch.equal(dist.argmin(1), asked), cfg_scale
        if cfg_scale == 1.0:  # guidance overshoots past the mean by design
            # At the asked class's mean (within-class variance 0.0025), far from others (~2).
            assert float(dist[torch.arange(40), asked].mean()) < 0.1


def test_generator_with_a_class_prior_trains_on_whitened_latents(tmp_path, trained_tiny_tokenizer):
    """class_prior_rank: the trainer fits the prior to its latent cache, trains on whitened
    coordinates, ships the prior in the generator; sampling maps back to each class."""
    num_classes = 10
    cfg = gen_config(
        tmp_path / "gen",
        trained_tiny_tokenizer,
        hidden_size=32,
        depth=1,
        steps=50,
        warmup=5,
        train_size=500,
        ckpt_every=1000,
        class_prior_rank=4,
    )
    means = train_on_class_means(cfg, num_classes)
    gen = model.load_generator(tmp_path / "gen")
    assert gen.config.prior_rank == 4
    assert torch.allclose(gen.prior.mean, means, atol=0.05)  # 50 latents a class, noise 0.05
    asked = torch.arange(40) % num_classes
    z = sample_latents(gen, asked, list(range(40)), cfg_scale=3.0)
    dist = ((z[:, None] - means[None]) ** 2).mean((2, 3))
    assert torch.equal(dist.argmin(1), asked)


def test_training_time_distributions():
    torch.manual_seed(0)
    uniform, lognormal = sample_time(20_000, "uniform"), sample_time(20_000, "lognormal")
    assert 0 < float(uniform.min()) and float(uniform.max()) < 1
    # lognormal (sigmoid of a standard normal) puts ~8 % of t above 0.8, uniform 20 %
    assert float((uniform > 0.8).float().mean()) == pytest.approx(0.2, abs=0.02)
    assert float((lognormal > 0.8).float().mean()) == pytest.approx(0.082, abs=0.01)
    with pytest.raises(ValueError, match="time distribution"):
        sample_time(4, "cosine")


def test_core_share_hands_a_finished_process_cores_to_the_others(tmp_path):
    """train-demo's processes divide the cores by live leases: a process that ends (here a
    real one, killed) gives its share to those still training; dead leases count for nothing."""
    import subprocess
    import sys

    from model.training.loop import CoreShare

    before = torch.get_num_threads()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (tmp_path / str(other.pid)).touch()  # a training process side by side
        (tmp_path / "999999999").touch()  # a lease left by a killed run (no such pid)
        share = CoreShare(tmp_path, cores=4)
        with share:
            assert share.lease.is_file()
            assert torch.get_num_threads() == 2
            other.kill()
            other.wait()
            share.rebalance()  # looks at the leases every 5 s at most: not yet
            assert torch.get_num_threads() == 2
            share.rebalance(force=True)
            assert torch.get_num_threads() == 4
        assert not share.lease.exists()
        CoreShare.clear(tmp_path)
        assert not any(tmp_path.iterdir())
    finally:
        other.kill()
        torch.set_num_threads(before)


@pytest.mark.slow
def test_train_demo_runs_its_processes_side_by_side_and_releases_their_cores(tmp_path):
    """The default (parallel) train-demo at a smoke scale, real spawned processes: every model
    finished, every stage timed, no lease left behind, runs timed as a whole, and the stages
    every other model depends on reproducible."""
    from model.training.recipe import train_demo

    finished = train_demo(tmp_path, scale=0.001, quiet=True, cores=2)
    expected = {"judge-classifier", "softvq-demo-32", "sit-demo-32", "softvq-demo-64"}
    assert set(finished) == expected | {"sit-demo-64"}
    for path in finished.values():
        assert (path / "model.safetensors").is_file()
    stages = {line.split("\t")[0] for line in (tmp_path / "times.txt").read_text().splitlines()}
    assert stages == set(finished) | {"teacher"}
    assert not any((tmp_path / "cores").iterdir())
    model.load_generator(finished["sit-demo-64"])
    first = json.loads((tmp_path / "wall.json").read_text())
    assert first["runs"] == 1 and first["seconds"] > 0
    train_demo(tmp_path, scale=0.001, quiet=True, cores=2)  # everything done: only checks
    again = json.loads((tmp_path / "wall.json").read_text())
    assert again["runs"] == 2 and again["seconds"] > first["seconds"]
    # The teacher and the tokenizers train on fixed thread counts, so a second run from
    # scratch makes them bit for bit again (only the generators' threads follow the timing).
    other = train_demo(tmp_path / "again", scale=0.001, quiet=True, cores=2)
    for name in ["softvq-demo-32", "softvq-demo-64"]:
        a = load_file(str(finished[name] / "model.safetensors"))
        b = load_file(str(other[name] / "model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    a = load_file(str(tmp_path / "teacher" / "model.safetensors"))
    b = load_file(str(tmp_path / "again" / "teacher" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_run_clock_adds_up_runs_even_a_killed_one(tmp_path):
    """A run killed with SIGKILL still leaves its time (to within one beat) for the next run
    to add to."""
    import subprocess
    import sys
    import time

    from model.training.loop import RunClock

    path = tmp_path / "wall.json"
    code = (
        "import sys, time; from model.training.loop import RunClock\n"
        f"with RunClock({str(path)!r}, every=0.05):\n    time.sleep(60)\n"
    )
    killed = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if path.is_file() and json.loads(path.read_text())["seconds"] >= 0.5:
                break
            time.sleep(0.05)
    finally:
        killed.kill()
        killed.wait()
    lost = json.loads(path.read_text())
    assert lost["runs"] == 1 and lost["seconds"] >= 0.5
    with RunClock(path, every=0.05) as clock:
        time.sleep(0.2)
        assert clock.total() >= lost["seconds"] + 0.2
    both = json.loads(path.read_text())
    assert both["runs"] == 2 and both["seconds"] >= lost["seconds"] + 0.2


def test_a_scaled_recipe_sizes_its_sets_with_its_steps():
    """``train-demo --scale``: the generator's training set and the images a tokenizer's
    latent statistics are measured on shrink with the steps (a tenth at 0.1), down to a
    smoke run's floor; the full recipe keeps its sizes."""
    from pathlib import Path

    from model.training import recipe

    def sizes(scale):
        gen = recipe.generator_config(Path("w"), "sit-demo-64", scale)
        tok = recipe.tokenizer_config(Path("w"), "softvq-demo-64", scale)
        return gen.train_size, tok.stats_images, gen.steps

    assert sizes(1.0) == (20000, 2000, 32000)
    assert sizes(0.1) == (2000, 200, 3200)
    assert sizes(0.001) == (100, 50, 32)


def test_a_scaled_recipe_keeps_a_judge_that_can_read_it():
    """The judge measures a quick run, so ``--scale`` shortens it ten times less: full length
    from 0.1 (its 80 steps there named 37 % of a folder's held-out images)."""
    from model.training import recipe

    assert recipe.judge_steps(1.0) == recipe.judge_steps(0.1) == recipe.JUDGE_STEPS == 800
    assert recipe.judge_steps(0.01) == 80 and recipe.judge_steps(0.0005) == 4
