"""The teacher and the alignment losses (issue #14): the teacher trains and resumes exactly,
initialises the encoder, the tokenizer's latent alignment / perceptual terms and the
generator's REPA term are wired (they reach the loss and get gradients), their training-only
heads are not released, and runs with them on resume bit-exactly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import model
from model.training.data import ProceduralShapes
from model.training.generator_trainer import (
    GeneratorTrainConfig,
    generator_loss,
    train_generator,
)
from model.training.teacher import (
    TeacherTrainConfig,
    alignment_loss,
    load_teacher,
    pool_to,
    repeat_to,
    train_teacher,
)
from model.training.tokenizer_trainer import (
    TokenizerTrainConfig,
    build_for_training,
    tokenizer_loss,
    train_tokenizer,
)
from service.cli import main

TINY_VIT = {"embed_dim": 32, "depth": 1, "num_heads": 2}


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def teacher_config(out, **kw) -> TeacherTrainConfig:
    base = dict(
        out=str(out),
        arch="vit",
        image_size=32,
        patch_size=8,
        width=32,
        depth=1,
        num_heads=2,
        steps=6,
        batch_size=8,
        warmup=2,
        ckpt_every=2,
        train_size=400,
    )
    base.update(kw)
    return TeacherTrainConfig(**base)


def tok_config(out, teacher, **kw) -> TokenizerTrainConfig:
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
        teacher=str(teacher),
        align_weight=0.5,
        perceptual_weight=1.0,
    )
    base.update(kw)
    return TokenizerTrainConfig(**base)


def same_weights(a, b) -> bool:
    sa, sb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    torch.set_num_threads(1)  # module-scoped: set up before the autouse one-thread fixture
    train_teacher(teacher_config(root / "vit"), quiet=True)
    train_teacher(teacher_config(root / "cnn", arch="cnn", width=8), quiet=True)
    return root


def test_teacher_trains_resumes_exactly_and_gives_patch_features(tmp_path, teachers):
    cfg = teacher_config(tmp_path / "b")
    train_teacher(cfg, quiet=True, stop_after=3)
    assert not (tmp_path / "b" / "model.safetensors").exists()
    train_teacher(cfg, quiet=True)
    assert same_weights(teachers / "vit", tmp_path / "b")
    images = torch.zeros(2, 3, 32, 32)
    vit, cnn = load_teacher(teachers / "vit"), load_teacher(teachers / "cnn")
    assert vit.patch_features(images).shape == (2, 16, 32)  # (32 / 8)^2 patches
    assert cnn.patch_features(images).shape == (2, 64, 16)  # the stride-4 map, 2 x width
    assert not any(p.requires_grad for p in vit.parameters())


def test_repeat_and_pool_pair_tokens_with_their_patches():
    x = torch.arange(4.0).reshape(1, 4, 1)
    assert repeat_to(x, 8).flatten().tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert pool_to(repeat_to(x, 8), 4).flatten().tolist() == [0, 1, 2, 3]
    assert repeat_to(x, 6).shape == (1, 6, 1) and pool_to(torch.ones(1, 6, 2), 4).shape == (1, 4, 2)
    a = torch.randn(2, 5, 3)
    assert float(alignment_loss(a, a)) == pytest.approx(-1.0)
    assert float(alignment_loss(a, -a)) == pytest.approx(1.0)


def test_vit_teacher_initialises_the_encoder(tmp_path, teachers):
    cfg = tok_config(tmp_path / "t", teachers / "vit", init_from_teacher=True)
    tok, teacher = build_for_training(cfg)
    for k, v in teacher.model.state_dict().items():
        assert torch.equal(tok.encoder.model.state_dict()[k], v), k
    with pytest.raises(ValueError, match="vit teacher"):
        build_for_training(tok_config(tmp_path / "c", teachers / "cnn", init_from_teacher=True))


@pytest.mark.parametrize("arch", ["vit", "cnn"])
def test_tokenizer_alignment_and_perceptual_terms_are_wired(tmp_path, teachers, arch):
    cfg = tok_config(tmp_path / "t", teachers / arch)
    torch.manual_seed(0)
    tok, teacher = build_for_training(cfg)
    images, _ = ProceduralShapes(8, image_size=32).batch(range(8))
    loss, parts = tokenizer_loss(tok, images, cfg, teacher)
    assert {"align", "perc"} <= parts.keys() and -1 <= parts["align"] <= 1 and parts["perc"] > 0
    loss.backward()
    assert tok.projection[0].weight.grad.abs().sum() > 0  # the alignment reaches its head ...
    assert tok.encoder.latent_tokens.grad.abs().sum() > 0  # ... and the encoder
    # Without the teacher terms the total is just the reconstruction + entropy terms.
    plain, plain_parts = tokenizer_loss(tok, images, cfg, None)
    extra = cfg.align_weight * parts["align"] + cfg.perceptual_weight * parts["perc"]
    assert loss.item() == pytest.approx(plain.item() + extra, rel=1e-5)


def test_tokenizer_with_teacher_terms_resumes_exactly_and_drops_the_head(tmp_path, teachers):
    train_tokenizer(tok_config(tmp_path / "a", teachers / "vit"), quiet=True)
    cfg_b = tok_config(tmp_path / "b", teachers / "vit")
    train_tokenizer(cfg_b, quiet=True, stop_after=3)
    train_tokenizer(cfg_b, quiet=True)
    assert same_weights(tmp_path / "a", tmp_path / "b")
    saved = load_file(str(tmp_path / "a" / "model.safetensors"))
    assert not [k for k in saved if k.startswith("projection")]
    model.load_tokenizer(tmp_path / "a")  # a plain tokenizer again


def gen_config(out, tokenizer, teacher, **kw) -> GeneratorTrainConfig:
    base = dict(
        out=str(out),
        tokenizer=str(tokenizer),
        hidden_size=32,
        depth=2,
        num_heads=2,
        steps=6,
        batch_size=16,
        lr=3e-3,
        warmup=2,
        train_size=60,
        ckpt_every=2,
        teacher=str(teacher),
        repa_weight=0.5,
    )
    base.update(kw)
    return GeneratorTrainConfig(**base)


def test_generator_repa_is_wired_resumes_exactly_and_drops_the_head(tmp_path, teachers):
    tok_dir = tmp_path / "tok"
    train_tokenizer(tok_config(tok_dir, teachers / "vit", steps=2), quiet=True)
    history = train_generator(gen_config(tmp_path / "a", tok_dir, teachers / "vit"), quiet=True)
    assert len(history) == 6
    cfg_b = gen_config(tmp_path / "b", tok_dir, teachers / "vit")
    train_generator(cfg_b, quiet=True, stop_after=3)
    train_generator(cfg_b, quiet=True)
    assert same_weights(tmp_path / "a", tmp_path / "b")
    saved = load_file(str(tmp_path / "a" / "model.safetensors"))
    assert not [k for k in saved if k.startswith("projection")]
    gen = model.load_generator(tmp_path / "a")

    # The REPA term reads the hidden states after block repa_block (default depth // 2 = 1):
    # its gradient reaches that block but not the blocks after it.
    from model.training.teacher import projector

    gen.train().requires_grad_(True)
    gen.projection = projector(32, 16, 32)
    x0, y = torch.randn(4, 8, 8), torch.tensor([0, 1, 2, 3])
    target = torch.randn(4, 8, 32)
    cfg = gen_config(tmp_path / "c", tok_dir, teachers / "vit")
    torch.manual_seed(0)
    total, parts = generator_loss(gen, x0, y, target, cfg)
    assert set(parts) == {"fm", "repa"}
    assert total.item() == pytest.approx(parts["fm"] + 0.5 * parts["repa"], rel=1e-5)
    gen.zero_grad()
    hidden = []
    h = gen.blocks[0].register_forward_hook(lambda m, i, o: hidden.append(o))
    gen(x0, torch.full((4,), 0.5), y)
    h.remove()
    repa_only = alignment_loss(gen.projection(hidden[0]), target)
    repa_only.backward()
    assert gen.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert gen.blocks[1].attn.qkv.weight.grad is None


def test_cli_train_teacher_and_flags(tmp_path, capsys):
    t = tmp_path / "teacher"
    common = ["--quiet", "--threads", "1", "--steps", "2", "--batch-size", "4"]
    assert (
        main(
            ["train-teacher", "--out", str(t), "--image-size", "32", "--patch-size", "8"]
            + ["--width", "32", "--depth", "1", "--heads", "2", *common]
        )
        == 0
    )
    tok = tmp_path / "tok"
    argv = ["train-tokenizer", "--out", str(tok), "--image-size", "32", "--tokens", "8"]
    argv += ["--token-dim", "8", "--codebook-size", "16", "--width", "32", "--depth", "1"]
    argv += ["--heads", "2", "--patch-size", "8", *common]
    assert main(argv + ["--align-weight", "0.1"]) == 2  # no --teacher
    assert "--teacher" in capsys.readouterr().err
    flags = ["--teacher", str(t), "--align-weight", "0.1", "--perceptual-weight", "1"]
    assert main(argv + flags + ["--init-from-teacher"]) == 0
    gen_argv = ["train-generator", "--out", str(tmp_path / "gen"), "--tokenizer", str(tok)]
    gen_argv += ["--hidden", "32", "--depth", "2", "--heads", "2", "--train-size", "20"]
    assert main(gen_argv + common + ["--teacher", str(t), "--repa-weight", "0.5"]) == 0
    model.load_generator(tmp_path / "gen")


def test_train_demo_trains_the_teacher_first_when_the_recipe_uses_it(tmp_path, monkeypatch):
    from model.training import recipe

    monkeypatch.setattr(recipe, "TOKENIZERS", {"softvq-demo-64": (8, 8, 4, 16)})
    monkeypatch.setattr(recipe, "TEACHER", {"arch": "cnn", "width": 8})
    monkeypatch.setattr(recipe, "TOKENIZER_VIT", dict(TINY_VIT))
    monkeypatch.setattr(recipe, "GENERATOR", {"hidden_size": 32, "num_heads": 2})
    monkeypatch.setattr(recipe, "GENERATOR_DEPTH", {"sit-demo-64": 2})
    monkeypatch.setattr(recipe, "TOKENIZER_PERCEPTUAL_WEIGHT", 1.0)
    monkeypatch.setattr(recipe, "TOKENIZER_ALIGN_WEIGHT", {"softvq-demo-64": 0.1})
    monkeypatch.setattr(recipe, "GENERATOR_REPA_WEIGHT", {"sit-demo-64": 0.5})
    finished = recipe.train_demo(tmp_path, scale=0.001, quiet=True, parallel=False)
    assert set(finished) == {"judge-classifier", "softvq-demo-64", "sit-demo-64"}
    assert (tmp_path / "teacher" / "model.safetensors").is_file()  # trained, not bundled
    used = json.loads((tmp_path / "softvq-demo-64" / "training.json").read_text())
    assert used["trained_with"]["teacher"] == str(tmp_path / "teacher")
    assert used["trained_with"]["align_weight"] == 0.1
    gen_meta = json.loads((tmp_path / "sit-demo-64" / "training.json").read_text())
    assert gen_meta["trained_with"]["repa_weight"] == 0.5
    # every model records the machine that made it (float results differ between CPUs)
    for name in ("teacher", "judge-classifier", "softvq-demo-64", "sit-demo-64"):
        machine = json.loads((tmp_path / name / "training.json").read_text())["machine"]
        assert set(machine) == {
            "cpu",
            "cpu_family_model",
            "cpu_kernels",
            "threads",
            "torch",
            "python",
        }
        assert machine["cpu"] and machine["threads"] >= 1
    model.load_generator(tmp_path / "sit-demo-64")
