"""Training on a GPU (issue #14: "on a lent GPU, train there"): the device is chosen, or
refused, before any work; on a CUDA host every trainer runs there, resumes there (also from a
checkpoint written on the CPU) and releases CPU weights that load anywhere.

The CUDA tests run only where torch sees a GPU (CI has none; they were run on one, see
docs/DEMO_MODELS_LOG.md, twenty-seventh pass). Imports from ``service`` stay inside the tests that need them, so this
file runs on a machine with only the model's packages."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import model
from model.training.classifier import load_judge, train_judge
from model.training.generator_trainer import GeneratorTrainConfig, train_generator
from model.training.loop import training_device
from model.training.teacher import TeacherTrainConfig, load_teacher, train_teacher
from model.training.tokenizer_trainer import TokenizerTrainConfig, train_tokenizer
from model.usage import UsageError

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this host has a CUDA GPU")
TINY_VIT = {"embed_dim": 32, "depth": 1, "num_heads": 2}


def test_device_names():
    assert training_device("cpu") == torch.device("cpu")
    assert training_device(None) == training_device("auto")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert training_device("auto").type == expected
    for bad in ("tpu", "nonsense", "mps"):
        with pytest.raises(UsageError, match=f"--device {bad}"):
            training_device(bad)


@no_cuda
def test_cuda_is_refused_without_a_gpu_before_any_work(tmp_path, capsys):
    from service.cli import main

    with pytest.raises(UsageError, match="no CUDA GPU"):
        training_device("cuda")
    work = tmp_path / "demo"
    code = main(["train-demo", "--work-dir", str(work), "--scale", "0.001", "--device", "cuda"])
    assert code == 2
    assert "no CUDA GPU" in capsys.readouterr().err
    assert not work.exists()
    out = tmp_path / "tok"
    code = main(["train-tokenizer", "--out", str(out), "--steps", "2", "--device", "cuda:0"])
    assert code == 2 and not out.exists()


def _teacher(out, **kw):
    base = dict(out=str(out), arch="cnn", image_size=32, width=8, steps=6, batch_size=8)
    return TeacherTrainConfig(**{**base, "warmup": 2, "ckpt_every": 2, "train_size": 400, **kw})


def _tokenizer(out, teacher, **kw):
    base = dict(out=str(out), image_size=32, num_tokens=8, token_dim=8, codebook_size=32)
    base.update(patch_size=8, enc=dict(TINY_VIT), dec=dict(TINY_VIT), steps=6, batch_size=8)
    base.update(warmup=2, ckpt_every=2, stats_images=40, train_size=400)
    base.update(teacher=str(teacher), align_weight=0.5, perceptual_weight=0.5)
    return TokenizerTrainConfig(**{**base, **kw})


def _generator(out, tok, teacher, **kw):
    base = dict(out=str(out), tokenizer=str(tok), hidden_size=32, depth=2, num_heads=2)
    base.update(steps=6, batch_size=8, warmup=2, ckpt_every=2, train_size=64)
    base.update(teacher=str(teacher), repa_weight=0.5)
    return GeneratorTrainConfig(**{**base, **kw})


def _machine(path):
    return json.loads((path / "training.json").read_text())["machine"]


@cuda
def test_every_trainer_runs_on_the_gpu_and_releases_cpu_weights(tmp_path):
    teacher = tmp_path / "teacher"
    train_teacher(_teacher(teacher), quiet=True, device="cuda")
    assert _machine(teacher)["device"].startswith("cuda") and _machine(teacher)["gpu"]
    assert load_teacher(teacher).head.weight.device.type == "cpu"

    train_judge(tmp_path / "judge", steps=4, batch_size=8, image_size=32, quiet=True, device="cuda")
    assert _machine(tmp_path / "judge")["device"].startswith("cuda")
    load_judge(tmp_path / "judge")

    # a tokenizer stopped on the CPU resumes on the GPU (the checkpoint holds CPU RNG state
    # only), and one stopped on the GPU resumes there
    tok = tmp_path / "tok"
    train_tokenizer(_tokenizer(tok, teacher), quiet=True, stop_after=2)
    history = train_tokenizer(_tokenizer(tok, teacher), quiet=True, device="cuda")
    assert len(history) == 6 and all(torch.isfinite(torch.tensor(h[1])) for h in history)
    assert _machine(tok)["device"].startswith("cuda")
    assert not [k for k in load_file(str(tok / "model.safetensors")) if k.startswith("projection")]
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    assert model.load_tokenizer(tok).encode(images).shape == (2, 8, 8)

    gen = tmp_path / "gen"
    train_generator(_generator(gen, tok, teacher), quiet=True, stop_after=3, device="cuda")
    history = train_generator(_generator(gen, tok, teacher), quiet=True, device="cuda")
    assert len(history) == 6
    assert _machine(gen)["device"].startswith("cuda")
    sit = model.load_generator(gen)
    assert next(sit.parameters()).device.type == "cpu"
    assert json.loads((gen / "config.json").read_text())["class_names"][0] == "circle"
