"""A tiny generated model (with its trained tokenizer and ChatML template) shared by the coordinator tests."""

from pathlib import Path

import pytest

from shared.make_model import make_model
from shared.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("coordinator") / "tiny.gguf"
    make_model(path, arch="qwen3moe", preset="tiny", dtype="f32", seed=0)
    return path


@pytest.fixture(scope="session")
def tokenizer(tiny_model) -> Tokenizer:
    return Tokenizer.from_gguf(tiny_model)
