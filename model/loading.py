"""Load and save checkpoints in the released layout: a directory with ``config.json`` and
``model.safetensors``. The project's own models use the same layout (small ones through
``_tiny_overrides``), so one loader serves both.

The SiT authors' released 2-D generator (``SiT-XL-2-256x256.pt``: a bare state dict, or one
under ``"ema"``) loads as it is, as a file or in a directory without ``config.json``: its
architecture is read off the weights' shapes (``infer_sit_config``).

Weights load only through safetensors, or ``torch.load(weights_only=True)`` for a ``.pt`` /
``.bin`` state dict; never through pickle.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .sit import SIT_SIZES, GeneratorConfig, SiTBackbone, build_generator
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


def weights_file(path: str | Path) -> Path:
    """The weights of a checkpoint: ``path`` itself when it is a file, else the first of
    ``WEIGHT_FILES`` in the directory, else its only ``*.pt`` (a released SiT file)."""
    path = Path(path)
    if path.is_file():
        return path
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            return path / name
    pts = sorted(path.glob("*.pt")) if path.is_dir() else []
    if len(pts) == 1:
        return pts[0]
    raise CheckpointError(
        f"{path}: no weights file (looked for {', '.join(WEIGHT_FILES)} or a single *.pt)"
    )


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    f = weights_file(path)
    if f.suffix == ".safetensors":
        state = load_file(str(f))
    else:
        try:
            state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # not a zip/pickle state dict, or one needing arbitrary code
            raise CheckpointError(f"{f}: not a weights-only PyTorch state dict ({e})") from e
        for wrapper in ("ema", "model", "state_dict"):  # training checkpoints nest the weights
            if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
                state = state[wrapper]
                break
    if not isinstance(state, dict):
        raise CheckpointError(f"{f}: holds no state dict")
    return clean_state_dict(state)


def infer_sit_config(state: dict[str, torch.Tensor]) -> GeneratorConfig:
    """A 2-D SiT's config from the SiT authors' key layout: patch, channels and width from
    ``x_embedder.proj``, grid from ``pos_embed``, classes from the label table (one row is
    the null class), learned sigma from the output width; heads from the published sizes
    (``SIT_SIZES``). Their code's time convention (t = 0 noise) is implied."""
    try:
        hidden, channels, p, _ = state["x_embedder.proj.weight"].shape
        positions = state["pos_embed"].shape[1]
        rows = state["y_embedder.embedding_table.weight"].shape[0]
        out = state["final_layer.linear.weight"].shape[0]
        mlp = state["blocks.0.mlp.fc1.weight"].shape[0]
    except KeyError as e:
        raise CheckpointError(
            f"not a SiT/DiT 2-D state dict (no {e.args[0]}) and no config.json"
        ) from e
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    heads = {(d, h): n for d, h, n in SIT_SIZES.values()}.get((depth, hidden))
    grid = math.isqrt(positions)
    if (
        heads is None
        or grid * grid != positions
        or out not in (p * p * channels * k for k in (1, 2))
    ):
        raise CheckpointError(
            f"a SiT state dict of depth {depth}, hidden {hidden}, {positions} positions and"
            f" {out} outputs is not a published size: give it a config.json"
        )
    return GeneratorConfig(
        input_size=grid * p,
        in_channels=channels,
        hidden_size=hidden,
        depth=depth,
        num_heads=heads,
        num_classes=rows - 1,
        mlp_ratio=mlp / hidden,
        patch_size=p,
        vae_1d=False,
        learn_sigma=out == 2 * p * p * channels,
        time_convention="noise_at_0",
    )


def read_generator_config(path: str | Path) -> tuple[GeneratorConfig, dict]:
    """(config, raw config.json) of a generator directory; for a released SiT file (or a
    directory with no config.json) the config read off the weights and an empty dict."""
    path = Path(path)
    if path.is_dir() and (path / "config.json").is_file():
        raw = read_config(path)
        return GeneratorConfig.from_dict(raw), raw
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    return infer_sit_config(read_state_dict(path)), {}


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
    """A SiT directory (or released SiT-XL/2 ``.pt`` file) -> SiT (1-D) or SiT2D in eval
    mode."""
    cfg, _ = read_generator_config(path)
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
