"""The recipe of the bundled demo models: every size and step count, in one place.

``train_demo`` runs it from scratch (or resumes it) in a work directory: the judge
classifier, then for 32 and 64 tokens a tokenizer and a generator on its latents. Each stage
is skipped when its finished model is already in the work directory, and each stage resumes
from its own checkpoint, so the whole thing can be killed and restarted at any point.
"""

from __future__ import annotations

import time
from pathlib import Path

from .. import demo
from .classifier import train_judge
from .generator_trainer import GeneratorTrainConfig, train_generator
from .tokenizer_trainer import TokenizerTrainConfig, train_tokenizer

# Sizes chosen so the whole recipe fits an hour on two shared CPU cores and still clears the
# quality bars (see docs/DEMO_MODELS.md for the numbers).
JUDGE_STEPS = 500
TOKENIZERS = {
    # name: (tokens L, token width D, steps)
    "softvq-demo-32": (32, 16, 1500),
    "softvq-demo-64": (64, 8, 1500),
}
TOKENIZER_VIT = {"embed_dim": 96, "depth": 3, "num_heads": 4}
GENERATOR = {"hidden_size": 128, "depth": 4, "num_heads": 4}
GENERATOR_STEPS = 3000
GENERATOR_TRAIN_SIZE = 10_000


def _done(path: Path) -> bool:
    return (path / "model.safetensors").is_file() and (path / "training.json").is_file()


def train_demo(work: Path, scale: float = 1.0, quiet: bool = False) -> dict[str, Path]:
    """Train everything into ``work``; returns {bundled name: finished model directory}."""
    work.mkdir(parents=True, exist_ok=True)
    steps = lambda n: max(2, int(n * scale))  # noqa: E731
    finished: dict[str, Path] = {}
    log = work / "times.txt"

    def timed(name: str, fn) -> None:
        t0 = time.time()
        fn()
        with log.open("a") as f:
            f.write(f"{name}\t{time.time() - t0:.1f}s\n")

    judge = work / demo.JUDGE_CLASSIFIER
    if not _done(judge):
        timed(
            demo.JUDGE_CLASSIFIER, lambda: train_judge(judge, steps=steps(JUDGE_STEPS), quiet=quiet)
        )
    finished[demo.JUDGE_CLASSIFIER] = judge

    for tok_name, (L, D, tok_steps) in TOKENIZERS.items():
        tok_dir = work / tok_name
        if not _done(tok_dir):
            cfg = TokenizerTrainConfig(
                out=str(tok_dir),
                num_tokens=L,
                token_dim=D,
                enc=dict(TOKENIZER_VIT),
                dec=dict(TOKENIZER_VIT),
                steps=steps(tok_steps),
                ckpt=str(work / "ckpt" / f"{tok_name}.pt"),
            )
            timed(tok_name, lambda cfg=cfg: train_tokenizer(cfg, quiet=quiet))
        finished[tok_name] = tok_dir

    for gen_name, tok_name in demo.DEMO_GENERATORS.items():
        gen_dir = work / gen_name
        if not _done(gen_dir):
            cfg = GeneratorTrainConfig(
                out=str(gen_dir),
                tokenizer=str(work / tok_name),
                steps=steps(GENERATOR_STEPS),
                train_size=GENERATOR_TRAIN_SIZE if scale >= 1 else 200,
                ckpt=str(work / "ckpt" / f"{gen_name}.pt"),
                **GENERATOR,
            )
            timed(gen_name, lambda cfg=cfg: train_generator(cfg, quiet=quiet))
        finished[gen_name] = gen_dir
    return finished
