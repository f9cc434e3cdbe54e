"""The released layout loads as-is and reproduces the reference implementation's outputs."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import model
from model.tokenizer import reference_index_layout

FIXTURES = Path(__file__).parent / "fixtures" / "official-tiny"
TOL = 1e-4


@pytest.fixture(scope="module")
def tok():
    return model.load_tokenizer(FIXTURES / "tokenizer")


@pytest.fixture(scope="module")
def tok_io():
    return load_file(str(FIXTURES / "tokenizer" / "io.safetensors"))


@pytest.fixture(scope="module")
def gen():
    return model.load_generator(FIXTURES / "sit")


@pytest.fixture(scope="module")
def sit_io():
    return load_file(str(FIXTURES / "sit" / "io.safetensors"))


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a.float() - b.float()).abs().max())


def test_tiny_overrides_define_the_architecture(tok):
    assert tok.encoder.model.embed_dim == 64 and len(tok.encoder.model.blocks) == 2
    assert tok.decoder.model.embed_dim == 96 and len(tok.decoder.model.blocks) == 2
    assert (tok.num_tokens, tok.token_dim, tok.image_size) == (8, 8, 64)
    assert tok.vq_mean == pytest.approx(0.01) and tok.vq_std == pytest.approx(0.07)


def test_encoder_pre_quant(tok, tok_io):
    with torch.no_grad():
        out = tok.encode_pre_quant(tok_io["image"])
    assert max_err(out, tok_io["encoder_out_pre_quant"]) < TOL


def test_quantized_and_code_indices(tok, tok_io):
    with torch.no_grad():
        z_q, idx = tok.encode(tok_io["image"], return_indices=True)
    assert max_err(z_q, tok_io["quantized"]) < TOL
    assert idx.shape == tok_io["code_indices"].shape == (2, 4, 2)
    assert torch.equal(reference_index_layout(idx), tok_io["code_indices"])
    # Our own layout is per image: image 0 alone gives the same indices as in the batch.
    _, idx0 = tok.encode(tok_io["image"][:1], return_indices=True)
    assert torch.equal(idx0[0], idx[0])


def test_reconstruction(tok, tok_io):
    with torch.no_grad():
        rec = tok.decode(tok.encode(tok_io["image"]))
    assert max_err(rec, tok_io["reconstruction"]) < TOL


def test_decode_other_latents(tok, tok_io):
    with torch.no_grad():
        out = tok.decode(tok_io["decode_input"])
    assert max_err(out, tok_io["decode_output"]) < TOL


def test_sit_velocity(gen, sit_io):
    assert gen.num_classes == 10
    with torch.no_grad():
        v = gen(sit_io["x"], sit_io["t"], sit_io["y"])  # y holds the null label 10
    assert max_err(v, sit_io["velocity"]) < TOL


@pytest.mark.parametrize("case", ["euler_nocfg", "euler_cfg", "heun_cfg"])
def test_samplers(gen, sit_io, case):
    c = json.loads((FIXTURES / "sit" / "sampler_cases.json").read_text())[case]
    out = model.sample(
        gen,
        sit_io["noise"],
        sit_io["labels"],
        c["num_steps"],
        sampler="heun" if c["heun"] else "euler",
        cfg_scale=c["cfg_scale"],
        guidance_interval=(c.get("guidance_low", 0.0), c.get("guidance_high", 1.0)),
    )
    assert max_err(out, sit_io[case]) < TOL
