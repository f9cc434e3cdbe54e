"""Where the bundled demo weights live, and their names.

The service serves these by default. They are trained by the project itself
(``softvq train-tokenizer`` / ``softvq train-generator``) on its procedural shapes data set.
"""

from __future__ import annotations

from pathlib import Path

DEMO_WEIGHTS_DIR = Path(__file__).parent / "demo_weights"

# name -> (kind, tokenizer it pairs with, for generators)
DEMO_TOKENIZERS = ("softvq-demo-32", "softvq-demo-64")
DEMO_GENERATORS = {"sit-demo-32": "softvq-demo-32", "sit-demo-64": "softvq-demo-64"}
DEFAULT_TOKENIZER = "softvq-demo-64"
DEFAULT_GENERATOR = "sit-demo-64"


def demo_path(name: str) -> Path:
    return DEMO_WEIGHTS_DIR / name


def demo_available(name: str) -> bool:
    p = demo_path(name)
    return (p / "config.json").is_file() and (p / "model.safetensors").is_file()


# The small CNN that judges generated images in the quality checks (not served).
JUDGE_CLASSIFIER = "judge-classifier"
