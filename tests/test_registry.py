"""ModelRegistry: names, shapes, defaults, confinement to model_root, demo fallback."""

from __future__ import annotations

import pytest
import torch

from model import demo
from service import metrics
from service.registry import ModelRegistry, RegistryError, UnknownModel
from tests.tiny_models import save_tiny_pair


def test_loads_models_with_runners_and_info(engine_settings_factory):
    reg = ModelRegistry.from_settings(engine_settings_factory())
    tok, gen = reg.tokenizer(None), reg.generator(None)
    assert (reg.default_tokenizer, reg.default_generator) == ("tiny", "sit-tiny")
    assert (tok.image_size, tok.num_tokens, tok.token_dim, tok.num_codebooks) == (32, 8, 8, 4)
    assert (tok.vq_mean, tok.vq_std) == pytest.approx((0.01, 0.3))
    assert (gen.tokenizer, gen.num_classes, gen.num_tokens, gen.token_dim) == ("tiny", 10, 8, 8)
    tokens, indices = tok.runner.encode(torch.zeros(2, 3, 32, 32))
    assert tokens.shape == (2, 8, 8) and indices.shape == (2, 4, 2)
    assert gen.runner(tokens, torch.ones(2), torch.zeros(2, dtype=torch.long)).shape == (2, 8, 8)
    info = reg.info()
    assert info["tokenizers"] == [
        {
            "name": "tiny",
            "image_size": 32,
            "num_tokens": 8,
            "token_dim": 8,
            "num_codebooks": 4,
            "codebook_size": 64,
            "backend": "eager",
            "device": "cpu",
            "dtype": "float32",
        }
    ]
    g = info["generators"][0]
    assert (g["name"], g["num_classes"], g["tokenizer"], g["image_size"]) == (
        "sit-tiny",
        10,
        "tiny",
        32,
    )
    value = metrics.MODEL_INFO.labels(
        model="sit-tiny",
        kind="generator",
        tokens="8",
        dim="8",
        backend="eager",
        device="cpu",
        dtype="float32",
    )._value.get()
    assert value == 1


def test_unknown_model_is_a_key_error_naming_what_is_served(engine_settings_factory):
    reg = ModelRegistry.from_settings(engine_settings_factory())
    with pytest.raises(UnknownModel) as e:
        reg.tokenizer("nope")
    assert isinstance(e.value, KeyError) and "tiny" in str(e.value)
    with pytest.raises(KeyError):
        reg.generator("tiny")  # a tokenizer's name is not a generator


def test_config_only_registry_has_shapes_but_no_models(engine_settings_factory):
    reg = ModelRegistry.from_settings(engine_settings_factory(), load_weights=False)
    tok = reg.tokenizer("tiny")
    assert tok.runner is None and tok.model is None and tok.num_tokens == 8
    assert reg.generator("sit-tiny").runner is None
    assert not reg.loaded
    with pytest.raises(RuntimeError):
        reg.warmup()


def test_auto_device_and_dtype(engine_settings_factory):
    reg = ModelRegistry.from_settings(engine_settings_factory(device="auto", dtype="auto"))
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert reg.device.type == want
    assert reg.dtype == (torch.bfloat16 if want == "cuda" else torch.float32)
    assert reg.tokenizer(None).model.dtype == reg.dtype


def test_warmup_runs_every_bucket(engine_settings_factory):
    reg = ModelRegistry.from_settings(engine_settings_factory(batch_buckets=[1, 3]))
    seen = []
    runner = reg.tokenizer("tiny").runner
    encode = runner.encode
    runner.encode = lambda x: (seen.append(x.shape[0]), encode(x))[1]
    reg.warmup()
    assert reg.warm and seen == [1, 3]


def test_model_root_confines_directories(tmp_path, engine_settings_factory, tiny_model_dirs):
    root = tmp_path / "root"
    save_tiny_pair(root, "inside")
    ok = engine_settings_factory(
        model_root=str(root),
        tokenizers={"inside": "inside"},
        generators={"sit-inside": {"path": "sit-inside", "tokenizer": "inside"}},
    )
    reg = ModelRegistry.from_settings(ok, load_weights=False)
    assert reg.tokenizer("inside").path == (root / "inside").resolve()
    for bad in ("../elsewhere", str(tiny_model_dirs["tokenizer"]), "inside/../../root2"):
        s = engine_settings_factory(model_root=str(root), tokenizers={"x": bad}, generators={})
        with pytest.raises(RegistryError, match="outside model_root"):
            ModelRegistry.from_settings(s, load_weights=False)


def test_refuses_bad_configurations(tmp_path, engine_settings_factory, tiny_model_dirs):
    save_tiny_pair(tmp_path, "wide", tokens=16, dim=8)
    mismatched = engine_settings_factory(
        tokenizers={"tiny": str(tiny_model_dirs["tokenizer"])},
        generators={"sit-wide": {"path": str(tmp_path / "sit-wide"), "tokenizer": "tiny"}},
    )
    with pytest.raises(RegistryError, match="tokens"):
        ModelRegistry.from_settings(mismatched, load_weights=False)
    orphan = engine_settings_factory(
        generators={"g": {"path": str(tiny_model_dirs["generator"]), "tokenizer": "missing"}}
    )
    with pytest.raises(RegistryError, match="unknown tokenizer"):
        ModelRegistry.from_settings(orphan, load_weights=False)
    with pytest.raises(RegistryError, match="config.json|directory"):
        ModelRegistry.from_settings(
            engine_settings_factory(tokenizers={"t": str(tmp_path / "nothing")}, generators={}),
            load_weights=False,
        )
    with pytest.raises(RegistryError, match="default tokenizer"):
        ModelRegistry.from_settings(
            engine_settings_factory(default_tokenizer="x"), load_weights=False
        )


def test_demo_models_are_the_default(tmp_path, monkeypatch, engine_settings_factory):
    monkeypatch.setattr(demo, "DEMO_WEIGHTS_DIR", tmp_path)
    empty = engine_settings_factory(tokenizers={}, generators={})
    with pytest.raises(RegistryError, match="no models configured"):
        ModelRegistry.from_settings(empty, load_weights=False)
    # Only the 64-token demo pair on disk: it is served, and is the default.
    save_tiny_pair(tmp_path, "softvq-demo-64")  # the generator's config names its tokenizer
    (tmp_path / "sit-softvq-demo-64").rename(tmp_path / "sit-demo-64")
    reg = ModelRegistry.from_settings(empty, load_weights=False)
    assert list(reg.tokenizers) == ["softvq-demo-64"] and list(reg.generators) == ["sit-demo-64"]
    assert (reg.default_tokenizer, reg.default_generator) == ("softvq-demo-64", "sit-demo-64")
    assert reg.generator(None).tokenizer == "softvq-demo-64"


def test_a_models_directory_serves_every_pair_in_it(tmp_path, engine_settings_factory):
    """``SOFTVQ_MODELS_DIR`` / ``softvq serve --models DIR``: a generator pairs with the
    tokenizer its config.json names; other directories there (the judge) are not models."""
    models = tmp_path / "models"
    save_tiny_pair(models, "a")
    save_tiny_pair(models, "b", seed=3)
    (models / "judge-classifier").mkdir()
    (models / "judge-classifier" / "config.json").write_text('{"width": 8}')  # no weights
    (models / "notes.txt").write_text("not a model")
    alone = engine_settings_factory(tokenizers={}, generators={}, models_dir=str(models))
    reg = ModelRegistry.from_settings(alone, load_weights=False)
    assert sorted(reg.tokenizers) == ["a", "b"] and sorted(reg.generators) == ["sit-a", "sit-b"]
    assert reg.generator("sit-b").tokenizer == "b"
    assert (reg.default_tokenizer, reg.default_generator) == ("a", "sit-a")  # the first
    # Beside the configured models; a relative path resolves against model_root.
    beside = engine_settings_factory(models_dir="models", model_root=str(tmp_path))
    with pytest.raises(RegistryError, match="outside model_root"):
        ModelRegistry.from_settings(beside, load_weights=False)  # tiny's dirs lie elsewhere
    beside = engine_settings_factory(models_dir=str(models))
    reg = ModelRegistry.from_settings(beside, load_weights=False)
    assert sorted(reg.tokenizers) == ["a", "b", "tiny"] and reg.default_tokenizer == "tiny"


def test_a_models_directory_that_cannot_be_served_is_refused_in_one_line(
    tmp_path, engine_settings_factory
):
    def refused(models_dir, **kw) -> str:
        settings = engine_settings_factory(models_dir=str(models_dir), **kw)
        with pytest.raises(RegistryError) as e:
            ModelRegistry.from_settings(settings, load_weights=False)
        return str(e.value)

    none = {"tokenizers": {}, "generators": {}}
    assert "not a directory" in refused(tmp_path / "nope", **none)
    (tmp_path / "empty").mkdir()
    assert "no tokenizer in it" in refused(tmp_path / "empty", **none)
    save_tiny_pair(tmp_path / "half", "a")
    (tmp_path / "half" / "a").rename(tmp_path / "half" / "c")  # sit-a's tokenizer renamed
    assert "samples for tokenizer 'a', which is not in" in refused(tmp_path / "half", **none)
    save_tiny_pair(tmp_path / "clash", "tiny")  # the configured tokenizer's name
    assert "named as configured ones: ['sit-tiny', 'tiny']" in refused(tmp_path / "clash")
    (tmp_path / "clash" / "tiny" / "model.safetensors").unlink()
    assert "no weights file" in refused(tmp_path / "clash", **none)
