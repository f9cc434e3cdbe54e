"""The speed-comparison profile (``SOFTVQ_COMPARE=cpu|gpu``, ``softvq serve --compare``):
three random-weight generators at the benchmark's sizes (model/speed_reference.py), served
side by side through the same endpoints, batcher, brokers and metrics as any model:

    ref-sit-1d-32   SiT on 32 SoftVQ tokens  -> ref-softvq-32's ViT decoder
    ref-sit-1d-64   SiT on 64 SoftVQ tokens  -> ref-softvq-64's ViT decoder
    ref-sit-2d-256  SiT/2 on 4x32x32 latents -> ref-sd-vae (diffusers AutoencoderKL)

They are written once, as ordinary checkpoint directories marked ``"speed_reference": true``,
under ``$SOFTVQ_CACHE_DIR/compare-{cpu|gpu}/`` (deterministic seeds, so the API and every
worker of a Redis deployment hold the same models), and then load like released weights.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

BASELINE = "ref-sit-2d-256"
# Generator -> the tokenizer or SD-VAE that decodes it (the streams deploy files scale on).
REFERENCE_GENERATORS = {
    "ref-sit-1d-32": "ref-softvq-32",
    "ref-sit-1d-64": "ref-softvq-64",
    BASELINE: "ref-sd-vae",
}


@dataclass
class CompareModels:
    tokenizers: dict[str, str]
    vaes: dict[str, str]
    generators: dict[str, tuple[str, str]]
    default_tokenizer: str = "ref-softvq-32"
    default_generator: str = "ref-sit-1d-32"


def compare_models(kind: str, cache_dir: str | None) -> CompareModels:
    from model.speed_reference import SIZES

    if kind not in SIZES:
        raise ValueError(f"compare profile {kind!r}: expected one of {sorted(SIZES)}")
    root = Path(cache_dir or Path.home() / ".cache" / "softvq") / f"compare-{kind}"
    sizes = SIZES[kind]
    tokenizers, generators = {}, {}
    for L in (32, 64):
        tokenizers[f"ref-softvq-{L}"] = str(
            _materialise(root / f"softvq-{L}", _tokenizer(sizes, L))
        )
        generators[f"ref-sit-1d-{L}"] = (
            str(_materialise(root / f"sit-1d-{L}", _sit_1d(sizes, L))),
            f"ref-softvq-{L}",
        )
    vae = str(_materialise(root / "sd-vae", _sd_vae(sizes)))
    generators[BASELINE] = (str(_materialise(root / "sit-2d-256", _sit_2d(sizes))), "ref-sd-vae")
    return CompareModels(tokenizers, {"ref-sd-vae": vae}, generators)


def _materialise(path: Path, write) -> Path:
    """``write(tmp_dir)`` into a temporary sibling, renamed into place: a concurrent process
    (another worker on a shared volume) sees a whole directory or none."""
    if path.is_dir():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        write(tmp)
        os.rename(tmp, path)
    except OSError:
        if not path.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _mark(path: Path) -> None:
    cfg = path / "config.json"
    d = json.loads(cfg.read_text())
    d["speed_reference"] = True
    cfg.write_text(json.dumps(d, indent=1) + "\n")


def _tokenizer(sizes, L: int):
    def write(path: Path) -> None:
        from model.loading import save_tokenizer
        from model.speed_reference import random_softvq

        width, depth, heads, D = sizes.vit_1d[L]
        save_tokenizer(random_softvq(sizes.image_size, L, D, (width, depth, heads)), path)
        _mark(path)

    return write


def _sit_1d(sizes, L: int):
    def write(path: Path) -> None:
        from model.loading import save_generator
        from model.speed_reference import random_sit_1d

        gen = random_sit_1d(L, sizes.vit_1d[L][3], sizes.sit, sizes.num_classes)
        save_generator(gen, path)
        _mark(path)

    return write


def _sit_2d(sizes):
    def write(path: Path) -> None:
        from model.loading import save_generator
        from model.speed_reference import random_sit_2d

        save_generator(random_sit_2d(sizes.latent_side, sizes.sit, sizes.num_classes), path)
        _mark(path)

    return write


def _sd_vae(sizes):
    def write(path: Path) -> None:
        from model.sd_vae import random_sd_vae, save_sd_vae

        save_sd_vae(random_sd_vae(sizes.sd_width_scale, sample_size=sizes.image_size), path)

    return write
