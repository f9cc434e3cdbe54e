"""Shared fixtures. Add yours below; do not rewrite others'."""

from __future__ import annotations

import pytest

from tests.tiny_models import make_generator, make_tokenizer, save_tiny_pair


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_generator():
    return make_generator()


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory):
    """{"tokenizer": dir, "generator": dir} of a tiny pair named "tiny" / "sit-tiny"."""
    tok_dir, gen_dir = save_tiny_pair(tmp_path_factory.mktemp("models"))
    return {"tokenizer": tok_dir, "generator": gen_dir}
