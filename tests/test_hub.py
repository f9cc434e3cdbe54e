"""``hf://OWNER/REPO[@REVISION][/PATH]`` model paths, offline: HF_HUB_OFFLINE=1 and a Hugging
Face cache this test lays out itself (the layout huggingface_hub writes: refs/<revision> holds
the commit, snapshots/<commit>/ the files). No network is ever touched."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest.importorskip("huggingface_hub")

from service.hub import parse_hub_path, resolve_hub_path  # noqa: E402
from service.jobs import Job  # noqa: E402
from service.registry import ModelRegistry, RegistryError  # noqa: E402
from service.tasks import TASKS  # noqa: E402
from tests.tiny_models import save_tiny_pair  # noqa: E402

SIT2D = Path(__file__).parent / "fixtures" / "official-tiny" / "sit2d"


def add_to_cache(cache: Path, repo: str, revision: str, files: dict[str, Path]) -> Path:
    """Put ``files`` (path in repo -> source) into the cache as commit ``revision`` resolves."""
    commit = f"{abs(hash((repo, revision))):040x}"[:40]
    root = cache / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / commit
    for name, src in files.items():
        (snap / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, snap / name)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / revision).write_text(commit)
    return snap


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    models = tmp_path / "made"
    tok_dir, gen_dir = save_tiny_pair(models, "tiny", tokens=8, dim=8, image_size=32, seed=0)
    files = lambda d: {p.name: p for p in Path(d).iterdir()}  # noqa: E731
    add_to_cache(cache, "SoftVQVAE/softvq-tiny", "main", files(tok_dir))
    add_to_cache(cache, "SoftVQVAE/sit-tiny_softvq-tiny", "v1", files(gen_dir))
    add_to_cache(
        cache,
        "someone/sit-baselines",
        "main",
        {f"SiT-tiny-2/{p.name}": p for p in SIT2D.iterdir() if p.name != "io.safetensors"},
    )
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_parse():
    assert parse_hub_path("hf://SoftVQVAE/softvq-l-64") == ("SoftVQVAE/softvq-l-64", None, None)
    assert parse_hub_path("hf://a/b@v1.0/sub/SiT-XL-2-256x256.pt") == (
        "a/b",
        "v1.0",
        "sub/SiT-XL-2-256x256.pt",
    )
    for bad in ("hf://just-a-name", "hf://a/b/../../etc", "hf://a b/c"):
        with pytest.raises(ValueError):
            parse_hub_path(bad)


def test_offline_cache_resolves_revisions_and_subfolders(hub_cache):
    tok = resolve_hub_path("hf://SoftVQVAE/softvq-tiny")
    assert (tok / "config.json").is_file() and hub_cache in tok.parents
    gen = resolve_hub_path("hf://SoftVQVAE/sit-tiny_softvq-tiny@v1")
    assert (gen / "model.safetensors").is_file()
    sub = resolve_hub_path("hf://someone/sit-baselines/SiT-tiny-2")
    assert (sub / "config.json").is_file()
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE"):
        resolve_hub_path("hf://SoftVQVAE/not-downloaded")
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE"):
        resolve_hub_path("hf://SoftVQVAE/sit-tiny_softvq-tiny@v2")  # that revision is absent


def test_registry_serves_hub_models_offline(hub_cache, engine_settings_factory):
    settings = engine_settings_factory(
        tokenizers={"tiny": "hf://SoftVQVAE/softvq-tiny"},
        generators={"sit-tiny": {"path": "hf://SoftVQVAE/sit-tiny_softvq-tiny@v1", "tokenizer": "tiny"}},
        model_root=str(hub_cache.parent / "elsewhere"),  # Hub paths are not under it: allowed
    )  # fmt: skip
    reg = ModelRegistry.from_settings(settings)
    assert reg.generators["sit-tiny"].path.is_relative_to(hub_cache)
    task = TASKS["generate"]
    job = Job("sit-tiny", "generate", {"n": 1, "labels": [1], "seeds": [0]}, {"steps": 2})
    out = task.run(reg, "sit-tiny", task.collate([job]))
    assert out["images"].shape == (1, 32, 32, 3)

    missing = engine_settings_factory(tokenizers={"tiny": "hf://SoftVQVAE/gone"}, generators={})
    with pytest.raises(RegistryError, match="huggingface-cli download SoftVQVAE/gone"):
        ModelRegistry.from_settings(missing)
