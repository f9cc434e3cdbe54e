"""Loading released directories: prefixes, dropped heads, clear errors, safe formats."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import model
from model import CheckpointError

FIXTURES = Path(__file__).parent / "fixtures" / "official-tiny"


def copy_fixture(tmp_path: Path, which: str = "tokenizer") -> Path:
    dst = tmp_path / which
    shutil.copytree(FIXTURES / which, dst)
    (dst / "io.safetensors").unlink()
    return dst


def rewrite(d: Path, fn) -> None:
    state = load_file(str(d / "model.safetensors"))
    save_file(fn(state), str(d / "model.safetensors"))


def reference_reconstruction() -> torch.Tensor:
    io = load_file(str(FIXTURES / "tokenizer" / "io.safetensors"))
    return io["image"], io["reconstruction"]


def test_orig_mod_prefix_and_training_heads(tmp_path):
    d = copy_fixture(tmp_path)

    def training_checkpoint(state):
        out = {f"_orig_mod.{k}": v for k, v in state.items()}
        out["repa_model.blocks.0.weight"] = torch.zeros(3, 3)
        out["projection.0.weight"] = torch.zeros(4, 4)
        return out

    rewrite(d, training_checkpoint)
    tok = model.load_tokenizer(d)
    image, rec = reference_reconstruction()
    with torch.no_grad():
        assert (tok.decode(tok.encode(image)) - rec).abs().max() < 1e-4


def test_unknown_config_fields_are_ignored(tmp_path):
    d = copy_fixture(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["some_future_field"] = {"x": 1}
    (d / "config.json").write_text(json.dumps(cfg))
    assert model.load_tokenizer(d).num_tokens == 8


def test_missing_key_is_named(tmp_path):
    d = copy_fixture(tmp_path)
    rewrite(d, lambda s: {k: v for k, v in s.items() if k != "quant_conv.bias"})
    with pytest.raises(CheckpointError, match="missing keys.*quant_conv.bias"):
        model.load_tokenizer(d)


def test_unexpected_key_is_named(tmp_path):
    d = copy_fixture(tmp_path, "sit")
    rewrite(d, lambda s: {**s, "blocks.9.attn.qkv.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"unexpected keys.*blocks\.9\.attn\.qkv\.weight"):
        model.load_generator(d)


def test_misshaped_key_is_named_with_shapes(tmp_path):
    d = copy_fixture(tmp_path, "sit")
    rewrite(d, lambda s: {**s, "x_embedder.weight": torch.zeros(64, 9)})
    with pytest.raises(
        CheckpointError, match=r"x_embedder.weight: checkpoint \(64, 9\) vs model \(64, 8\)"
    ):
        model.load_generator(d)


def test_bad_directories(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        model.load_tokenizer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        model.load_tokenizer(tmp_path / "empty")
    d = copy_fixture(tmp_path)
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights file"):
        model.load_tokenizer(d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        model.load_tokenizer(d)


def test_torch_state_dict_loads_with_weights_only(tmp_path):
    d = copy_fixture(tmp_path, "sit")
    state = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    torch.save({"model": state}, d / "model.pt")
    gen = model.load_generator(d)
    assert gen.num_classes == 10


def test_pickled_objects_are_refused(tmp_path):
    d = copy_fixture(tmp_path, "sit")
    (d / "model.safetensors").unlink()

    class Evil:
        def __reduce__(self):
            return (print, ("pickle code ran",))

    torch.save({"model": Evil()}, d / "model.pt")
    with pytest.raises(Exception, match="(?i)weights.only|unsupported|global"):
        model.load_generator(d)


def test_save_and_load_round_trip(tmp_path, tiny_tokenizer, tiny_generator):
    tok_dir = model.save_tokenizer(tiny_tokenizer, tmp_path / "tok")
    gen_dir = model.save_generator(tiny_generator, tmp_path / "gen")
    tok, gen = model.load_tokenizer(tok_dir), model.load_generator(gen_dir)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(
            tok.decode(tok.encode(x)), tiny_tokenizer.decode(tiny_tokenizer.encode(x))
        )
        z, t, y = torch.randn(2, 8, 8), torch.rand(2), torch.tensor([1, 10])
        assert torch.equal(gen(z, t, y), tiny_generator(z, t, y))
    assert json.loads((gen_dir / "config.json").read_text())["null_class"] == 10


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_precisions(dtype):
    tok = model.load_tokenizer(FIXTURES / "tokenizer", dtype=dtype)
    gen = model.load_generator(FIXTURES / "sit", dtype=dtype)
    image, rec = reference_reconstruction()
    with torch.no_grad():
        out = tok.decode(tok.encode(image))
        z = model.sample(gen, torch.randn(2, 8, 8), torch.tensor([1, 2]), 4, cfg_scale=1.5)
    assert out.dtype == dtype and torch.isfinite(out.float()).all()
    rel = (out.float() - rec).norm() / rec.norm()
    assert rel < (1e-5 if dtype == torch.float32 else 5e-2)
    assert torch.isfinite(z).all()


def test_token_and_image_validation(tiny_tokenizer):
    with pytest.raises(ValueError, match=r"\(B, 8, 8\)"):
        tiny_tokenizer.decode(torch.zeros(1, 8, 4))
    with pytest.raises(ValueError, match=r"\(B, 8, 8\)"):
        tiny_tokenizer.decode(torch.zeros(8, 8))
    bad = torch.zeros(1, 8, 8)
    bad[0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        tiny_tokenizer.decode(bad)
    bad[0, 3, 3] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        tiny_tokenizer.decode(bad)
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        tiny_tokenizer.encode(torch.zeros(1, 3, 64, 64))


def test_generator_tokenizer_mismatch(tiny_generator):
    from tests.tiny_models import make_tokenizer

    tok16 = make_tokenizer(tokens=16)
    with pytest.raises(ValueError, match="generator works on"):
        model.generate(tok16, tiny_generator, [0], [0], steps=1)
