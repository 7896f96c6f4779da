"""Benchmarks: `python -m pytest bench` (pytest-benchmark). Not part of the test suite.

FLASHMOE_BENCH_DIR  where synthetic models are cached (default ~/.cache/flashmoe-bench)
FLASHMOE_BENCH_LAYERS  layers of the 35B-A3B-shaped model (default 4)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from synthetic import qwen35_35b_a3b, write_synthetic_model  # noqa: E402


@pytest.fixture(scope="session")
def synthetic_35b_a3b() -> Path:
    layers = int(os.environ.get("FLASHMOE_BENCH_LAYERS", "4"))
    root = Path(os.environ.get("FLASHMOE_BENCH_DIR", Path.home() / ".cache" / "flashmoe-bench"))
    return write_synthetic_model(root / f"qwen35-35b-a3b-{layers}l-q4", qwen35_35b_a3b(layers))
