"""softvq-serve's models: SoftVQ-VAE tokenizers, SiT generators and their samplers.

Pure PyTorch; nothing here imports web code. The public API:

    tok = load_tokenizer(dir)                 # released layout: config.json + model.safetensors
    tokens = tok.encode(images)               # (B, 3, S, S) in [-1, 1] -> (B, L, D)
    images = tok.decode(tokens)               # (B, L, D) -> (B, 3, S, S), unclamped
    gen = load_generator(dir)
    v = gen(x, t, y)                          # velocity (B, L, D)
    z = sample(gen, noise, labels, steps)     # normalised latents
    images = generate(tok, gen, labels, seeds, steps=..., cfg_scale=...)
"""

from .loading import (
    CheckpointError,
    load_generator,
    load_tokenizer,
    save_generator,
    save_tokenizer,
)
from .pipeline import generate, sample_latents, seeded_noise
from .sampling import PATHS, SAMPLERS, sample
from .sit import SIT_SIZES, GeneratorConfig, SiT, SiT2D, build_generator
from .tokenizer import SoftVQTokenizer, TokenizerConfig

__all__ = [
    "PATHS",
    "SAMPLERS",
    "SIT_SIZES",
    "CheckpointError",
    "GeneratorConfig",
    "SiT",
    "SiT2D",
    "SoftVQTokenizer",
    "TokenizerConfig",
    "build_generator",
    "generate",
    "load_generator",
    "load_tokenizer",
    "sample",
    "sample_latents",
    "save_generator",
    "save_tokenizer",
    "seeded_noise",
]
