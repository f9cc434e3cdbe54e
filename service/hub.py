"""Model paths on the Hugging Face Hub: ``hf://OWNER/REPO[@REVISION][/PATH/IN/REPO]``.

    hf://SoftVQVAE/softvq-l-64                    a tokenizer repo (config.json + weights)
    hf://stabilityai/sd-vae-ft-ema@main           an SD-VAE (diffusers AutoencoderKL)
    hf://OWNER/REPO/SiT-XL-2-256x256.pt           one file of a repo (a released SiT)

Fetched with ``huggingface_hub`` (the optional extra ``pip install -e ".[hub]"``) into its
cache (``HF_HOME`` / ``HF_HUB_CACHE``), only the files a model needs (configs, safetensors,
.pt). With ``HF_HUB_OFFLINE=1`` nothing is fetched: the path must already be in the cache
(``huggingface-cli download`` on a machine with the network, then copy the cache).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

PREFIX = "hf://"
_HUB = re.compile(r"^hf://(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<rev>[\w.-]+))?(?:/(?P<sub>.+))?$")
# What a model directory needs; never the .bin duplicates or training checkpoints beside them.
_PATTERNS = ("*.json", "*.safetensors")


def is_hub_path(path: str) -> bool:
    return str(path).startswith(PREFIX)


def parse_hub_path(path: str) -> tuple[str, str | None, str | None]:
    """-> (repo id, revision or None, path inside the repo or None)."""
    m = _HUB.match(path)
    if not m or ".." in (m["sub"] or "").split("/"):
        raise ValueError(f"{path!r}: a Hub model path is hf://OWNER/REPO[@REVISION][/PATH/IN/REPO]")
    return m["repo"], m["rev"], m["sub"]


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def cache_dir() -> str | None:
    """HF_HUB_CACHE, else HF_HOME/hub, read now (huggingface_hub reads them once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None


def resolve_hub_path(path: str) -> Path:
    """The local path of a Hub model: downloaded into the cache if missing (online), or
    found there (``HF_HUB_OFFLINE=1``). Raises ValueError naming what is missing."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError as e:
        raise ImportError(f'{path}: Hub paths need huggingface_hub: pip install -e ".[hub]"') from e
    repo, revision, sub = parse_hub_path(path)
    if sub and sub.endswith(".pt"):
        patterns = [sub]
    else:
        patterns = [f"{sub}/{p}" if sub else p for p in _PATTERNS]
    try:
        root = snapshot_download(
            repo,
            revision=revision,
            allow_patterns=patterns,
            cache_dir=cache_dir(),
            local_files_only=offline(),
        )
    except LocalEntryNotFoundError as e:
        raise ValueError(
            f"{path}: not in the Hugging Face cache and HF_HUB_OFFLINE=1 (or no network);"
            f" fetch it first: huggingface-cli download {repo}"
            + (f" --revision {revision}" if revision else "")
        ) from e
    except (HfHubHTTPError, OSError) as e:
        raise ValueError(f"{path}: cannot fetch from the Hub ({e})") from e
    local = Path(root) / sub if sub else Path(root)
    if not local.exists():
        raise ValueError(f"{path}: {sub!r} is not in {repo}" + (f"@{revision}" if revision else ""))
    return local
