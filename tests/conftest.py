"""Shared fixtures: tiny Qwen3.5-MoE checkpoints and their conversions, built once per session."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tiny_models import TinyModels

# One thread: the reference models are tiny, and with the 2 cores oversubscribed two OpenMP
# threads spin at every barrier (measured 27 s instead of 0.4 s for the same 13 forwards).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    """Builder of tiny checkpoints (tiny_models.checkpoint) and conversions (.converted)."""
    return TinyModels(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture
def model_copy(tiny_models: TinyModels, tmp_path: Path) -> Callable[..., Path]:
    """A private copy of a converted tiny model, free to corrupt: model_copy(bits=4, shape="A")."""

    def make(bits: int = 4, shape: str = "A", **kwargs: object) -> Path:
        src = tiny_models.converted(bits, shape, **kwargs)
        dst = tmp_path / f"{src.name}-copy"
        shutil.copytree(src, dst)
        return dst

    return make
