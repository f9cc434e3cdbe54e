"""Each released architecture has exactly the parameter names, shapes and count of
official_layouts.json. Built on the meta device: no memory, fast."""

import json
import re
from pathlib import Path

import pytest
import torch

import model

LAYOUTS = json.loads((Path(__file__).parent / "fixtures" / "official_layouts.json").read_text())
OTHER_BLOCKS = re.compile(r"blocks\.([1-9]\d*)\.")


def build(name: str, spec: dict) -> torch.nn.Module:
    with torch.device("meta"):
        if name.startswith("sit"):
            L, D = (64, 32) if "64x32" in name else (32, 64)
            cfg = model.GeneratorConfig(input_size=L, in_channels=D, num_classes=1000)
            return model.build_generator(cfg)
        cfg = model.TokenizerConfig(
            image_size=spec["image_size"],
            encoder_model=spec["encoder"],
            decoder_model=spec["decoder"],
            num_latent_tokens=spec["num_latent_tokens"],
            codebook_embed_dim=spec["codebook_embed_dim"],
            num_codebooks=spec["num_codebooks"],
            codebook_size=spec["codebook_size"],
            tau=spec["tau"],
        )
        return model.SoftVQTokenizer(cfg)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_layout(name):
    spec = LAYOUTS[name]
    m = build(name, spec)
    state = m.state_dict()
    block0 = {k: list(v.shape) for k, v in state.items() if not OTHER_BLOCKS.search(k)}
    assert block0 == spec["keys"]
    assert sum(v.numel() for v in state.values()) == spec["params"]
    if "depth" in spec:
        assert len(m.blocks) == spec["depth"]
    else:
        assert len(m.encoder.model.blocks) == spec["encoder_blocks"]
        assert len(m.decoder.model.blocks) == spec["decoder_blocks"]


def test_sit_sizes_match_the_spec():
    for size, (depth, hidden, heads) in model.SIT_SIZES.items():
        with torch.device("meta"):
            gen = model.build_generator(
                model.GeneratorConfig(depth=depth, hidden_size=hidden, num_heads=heads)
            )
        assert len(gen.blocks) == depth, size
    with torch.device("meta"):
        xl = model.build_generator(model.GeneratorConfig())
    n = sum(p.numel() for p in xl.parameters())
    assert 670e6 < n < 680e6  # "675M params"
