"""Load and save checkpoints in the released layout: a directory with ``config.json`` and
``model.safetensors``. The project's own models use the same layout (small ones through
``_tiny_overrides``), so one loader serves both.

Weights load only through safetensors, or ``torch.load(weights_only=True)`` for a ``.pt`` /
``.bin`` state dict; never through pickle.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .sit import GeneratorConfig, SiTBackbone, build_generator
from .tokenizer import SoftVQTokenizer, TokenizerConfig

# Training-only weights in released files, dropped on load.
DROPPED_PREFIXES = ("repa_model.", "projection.")
# Present in checkpoints but unused at inference.
IGNORED_KEYS = ("decoder.model.patch_embed.",)
WEIGHT_FILES = ("model.safetensors", "model.pt", "model.bin", "pytorch_model.bin")


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message names what is wrong."""


def read_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (expected config.json + model.safetensors)")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path}: no config.json")
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from e


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    for name in WEIGHT_FILES:
        f = path / name
        if not f.is_file():
            continue
        if f.suffix == ".safetensors":
            state = load_file(str(f))
        else:
            state = torch.load(f, map_location="cpu", weights_only=True)
            state = state.get("model", state.get("state_dict", state))
        return clean_state_dict(state)
    raise CheckpointError(f"{path}: no weights file (looked for {', '.join(WEIGHT_FILES)})")


def clean_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip torch.compile's ``_orig_mod.`` prefixes and drop training-only heads."""
    out = {}
    for k, v in state.items():
        k = k.replace("_orig_mod.", "")
        if k.startswith(DROPPED_PREFIXES):
            continue
        out[k] = v
    return out


def load_into(module: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Strict load that names every missing, unexpected or misshaped key."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state and not k.startswith(IGNORED_KEYS)]
    unexpected = [k for k in state if k not in expected]
    misshaped = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {missing[:20]}" + (" ..." if len(missing) > 20 else ""))
    if unexpected:
        problems.append(
            f"unexpected keys: {unexpected[:20]}" + (" ..." if len(unexpected) > 20 else "")
        )
    if misshaped:
        problems.append("misshaped: " + "; ".join(misshaped[:20]))
    if problems:
        raise CheckpointError(f"{where}: " + " | ".join(problems))
    module.load_state_dict(state, strict=False)


def _build_and_load(path: str | Path, build, device, dtype) -> nn.Module:
    """Build the architecture on the meta device (no memory, no random init), then fill it
    from the checkpoint; move to ``device``/``dtype``; eval mode, no gradients."""
    state = read_state_dict(path)
    with torch.device("meta"):
        module = build()
    module = module.to_empty(device="cpu")
    load_into(module, state, str(path))
    _zero_unloaded(module, state)
    module = module.to(device=device or "cpu")
    if dtype is not None:
        module = module.to(dtype=dtype)
    return module.eval().requires_grad_(False)


def load_tokenizer(path: str | Path, device=None, dtype=None) -> SoftVQTokenizer:
    """A released (or project-trained) tokenizer directory -> SoftVQTokenizer in eval mode."""
    cfg = TokenizerConfig.from_dict(read_config(path))
    return _build_and_load(path, lambda: SoftVQTokenizer(cfg), device, dtype)


def load_generator(path: str | Path, device=None, dtype=None) -> SiTBackbone:
    """A SiT directory -> SiT (1-D) or SiT2D in eval mode."""
    cfg = GeneratorConfig.from_dict(read_config(path))
    return _build_and_load(path, lambda: build_generator(cfg), device, dtype)


def _zero_unloaded(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Parameters legitimately absent from a checkpoint (the unused decoder patch embedding)
    would be uninitialised memory after ``to_empty``; make them zeros."""
    for k, p in module.state_dict().items():
        if k not in state:
            p.zero_()


def save_model(module: nn.Module, config: dict, path: str | Path) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (float32 weights, contiguous)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    state = {k: v.detach().float().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(state, str(path / "model.safetensors"))
    return path


def save_tokenizer(tok: SoftVQTokenizer, path: str | Path) -> Path:
    return save_model(tok, tok.config.to_dict(), path)


def save_generator(gen: SiTBackbone, path: str | Path) -> Path:
    return save_model(gen, gen.config.to_dict(), path)
