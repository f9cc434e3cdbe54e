"""Per-model sampling defaults (issue #14 item 2): a generator's config.json may name the
/generate settings it draws best with ("sampling": steps, sampler, cfg_scale,
guidance_interval). GET /models lists them; a request that leaves a field out gets the
model's value, one that names it gets its own; a malformed block refuses the model;
evaluate-demo judges with the same defaults."""

from __future__ import annotations

import argparse
import json

import pytest
from fastapi.testclient import TestClient

from model.sampling import DEFAULT_SETTINGS, sampling_settings
from model.training.evaluate_cli import settings_for
from model.training.recipe import set_sampling
from service.app import create_app
from service.registry import ModelRegistry, RegistryError
from tests.test_api import wait_ready
from tests.tiny_models import save_tiny_pair

OWN = {"steps": 7, "sampler": "heun", "cfg_scale": 2.5, "guidance_interval": [0.1, 0.9]}


def settings_with(api_settings_factory, root, name="tiny"):
    return api_settings_factory(
        model_root=str(root),
        tokenizers={name: name},
        generators={f"sit-{name}": {"path": f"sit-{name}", "tokenizer": name}},
        default_tokenizer=name,
        default_generator=f"sit-{name}",
    )


@pytest.fixture(scope="module")
def own_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampling")
    save_tiny_pair(root, "tiny")
    set_sampling(root / "sit-tiny", OWN)
    return root


@pytest.fixture(scope="module")
def client(own_root, api_settings_factory):
    with TestClient(create_app(settings_with(api_settings_factory, own_root))) as c:
        wait_ready(c)
        yield c


def test_models_lists_the_generators_sampling_defaults(client):
    (g,) = client.get("/models").json()["generators"]
    assert g["sampling_defaults"] == OWN


def test_a_request_without_settings_samples_with_the_models_defaults(client):
    implicit = client.post("/generate", json={"class_labels": [1, 2], "seed": 3})
    assert implicit.status_code == 200, implicit.text
    explicit = client.post("/generate", json={"class_labels": [1, 2], "seed": 3, **OWN})
    assert implicit.json()["images"] == explicit.json()["images"]
    assert implicit.json()["parameters"] == explicit.json()["parameters"]
    p = implicit.json()["parameters"]
    assert (p["steps"], p["sampler"], p["cfg_scale"]) == (7, "heun", 2.5)
    assert p["guidance_interval"] == [0.1, 0.9]


def test_named_fields_override_the_models_defaults(client):
    r = client.post("/generate", json={"class_labels": [1], "seed": 3, "steps": 2, "cfg_scale": 1})
    p = r.json()["parameters"]
    assert (p["steps"], p["sampler"], p["cfg_scale"]) == (2, "heun", 1.0)
    bad = client.post("/generate", json={"class_labels": [1], "sampler": "ddim"})
    assert bad.status_code == 422 and bad.json()["error"] == "unknown_sampler"


def test_without_a_block_the_service_defaults_apply(api_settings_factory):
    settings = api_settings_factory()
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        assert c.get("/models").json()["generators"][0]["sampling_defaults"] == DEFAULT_SETTINGS
        r = c.post("/generate", json={"class_labels": [0], "seed": 1})
        p = r.json()["parameters"]
        steps = min(50, settings.max_steps)  # capped by the server's limit
        assert (p["steps"], p["sampler"], p["cfg_scale"]) == (steps, "euler", 1.0)


@pytest.mark.parametrize(
    "block",
    [
        {"steps": 0},
        {"steps": 2.5},
        {"sampler": "ddim"},
        {"cfg_scale": -1},
        {"guidance_interval": [0.8, 0.2]},
        {"guidance_interval": [0, 2]},
        {"temperature": 1.0},
        [1, 2],
    ],
)
def test_a_malformed_block_refuses_the_model(block, api_settings_factory, tmp_path):
    save_tiny_pair(tmp_path, "bad")
    path = tmp_path / "sit-bad" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "sampling": block}))
    with pytest.raises(RegistryError, match="sampling"):
        ModelRegistry.from_settings(
            settings_with(api_settings_factory, tmp_path, "bad"), load_weights=False
        )
    with pytest.raises(ValueError):
        sampling_settings(block)


def test_evaluate_demo_judges_with_the_models_defaults(own_root):
    none = argparse.Namespace(steps=None, sampler=None, cfg_scale=None)
    s = settings_for(own_root / "sit-tiny", none)
    assert (s.steps, s.sampler, s.cfg_scale, s.guidance_interval) == (7, "heun", 2.5, (0.1, 0.9))
    named = settings_for(
        own_root / "sit-tiny", argparse.Namespace(steps=3, sampler=None, cfg_scale=1.0)
    )
    assert (named.steps, named.sampler, named.cfg_scale) == (3, "heun", 1.0)


def test_set_sampling_writes_and_removes_the_block(tmp_path):
    save_tiny_pair(tmp_path, "t")
    path = tmp_path / "sit-t" / "config.json"
    set_sampling(tmp_path / "sit-t", OWN)
    assert json.loads(path.read_text())["sampling"] == OWN
    set_sampling(tmp_path / "sit-t", None)
    assert "sampling" not in json.loads(path.read_text())


def test_bundled_generators_carry_the_recipes_sampling_defaults():
    from model import demo
    from model.training import recipe

    assert set(recipe.GENERATOR_SAMPLING) == set(demo.DEMO_GENERATORS)
    for name in demo.DEMO_GENERATORS:
        cfg = json.loads((demo.demo_path(name) / "config.json").read_text())
        assert recipe.GENERATOR_SAMPLING[name]
        assert cfg["sampling"] == recipe.GENERATOR_SAMPLING[name]
        sampling_settings(cfg["sampling"])  # well-formed
