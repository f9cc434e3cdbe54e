"""Class names (issue #14 item 5): a generator's config.json may name its classes; GET /models
lists them and /generate takes names as well as ids; an unknown name is a 422 naming the valid
ones. The bundled demo generators name the shapes of their data set."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from model import demo
from model.training.data import CLASSES
from service.app import create_app
from service.registry import ModelRegistry, RegistryError
from tests.test_api import wait_ready
from tests.tiny_models import save_tiny_pair

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.fixture(scope="module")
def named_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("named")
    save_tiny_pair(root, "tiny")
    cfg_path = root / "sit-tiny" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    assert cfg["num_classes"] == 10
    cfg_path.write_text(json.dumps({**cfg, "class_names": NAMES}))
    return root


@pytest.fixture(scope="module")
def client(named_root, api_settings_factory):
    settings = api_settings_factory(
        model_root=str(named_root),
        tokenizers={"tiny": "tiny"},
        generators={"sit-tiny": {"path": "sit-tiny", "tokenizer": "tiny"}},
        default_tokenizer="tiny",
        default_generator="sit-tiny",
    )
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        yield c


def test_models_lists_class_names(client):
    (g,) = client.get("/models").json()["generators"]
    assert g["class_names"] == NAMES and g["num_classes"] == 10


def test_generate_takes_names_and_ids(client):
    body = {"class_labels": ["three", 7, "One"], "seed": 1, "steps": 2}
    r = client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["class_labels"] == [3, 7, 1] and out["class_names"] == ["three", "seven", "one"]
    # The same images as by ids alone.
    by_id = client.post("/generate", json={**body, "class_labels": [3, 7, 1]}).json()
    assert by_id["images"] == out["images"]
    png = client.post("/generate", json=body, headers={"Accept": "image/png"})
    assert png.headers["x-class-labels"] == "3,7,1"
    assert png.headers["x-class-names"] == "three,seven,one"


def test_unknown_name_is_a_422_naming_the_valid_ones(client):
    r = client.post("/generate", json={"class_labels": ["circle"], "steps": 2})
    assert r.status_code == 422
    err = r.json()
    assert err["error"] == "invalid_class" and "'circle'" in err["message"]
    assert all(n in err["message"] for n in NAMES)


def test_names_on_a_generator_without_names_is_a_422(api_settings_factory):
    with TestClient(create_app(api_settings_factory())) as c:
        wait_ready(c)
        assert c.get("/models").json()["generators"][0]["class_names"] is None
        r = c.post("/generate", json={"class_labels": ["circle"], "steps": 2})
        assert r.status_code == 422 and r.json()["error"] == "invalid_class"
        assert "no class names" in r.json()["message"]


def test_bad_class_names_refuse_the_model(named_root, api_settings_factory, tmp_path):
    save_tiny_pair(tmp_path, "bad")
    cfg_path = tmp_path / "sit-bad" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "class_names": ["a", "A"] + NAMES[2:]}))
    settings = api_settings_factory(
        model_root=str(tmp_path),
        tokenizers={"bad": "bad"},
        generators={"sit-bad": {"path": "sit-bad", "tokenizer": "bad"}},
        default_tokenizer="bad",
        default_generator="sit-bad",
    )
    with pytest.raises(RegistryError, match="class_names"):
        ModelRegistry.from_settings(settings, load_weights=False)


def test_demo_generators_name_their_shapes():
    for name in demo.DEMO_GENERATORS:
        cfg = json.loads((demo.demo_path(name) / "config.json").read_text())
        assert cfg["class_names"] == list(CLASSES)
