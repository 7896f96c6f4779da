"""An engine whose model files break while it runs reports it and refuses to go on from a half
updated state; reset() makes it usable again."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from tiny_models import TinyModels

import flashmoe_native as fm


def test_a_failed_expert_read_names_the_file_and_needs_a_reset(
    tiny_models: TinyModels, tmp_path: Path
) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_models.converted(4, "A"), model_dir)
    experts = model_dir / "experts.bin"
    engine = fm.Engine(model_dir)
    want = engine.step(3)
    engine.reset()

    original = experts.read_bytes()
    os.truncate(experts, 4096)  # the file shrinks under the open engine
    with pytest.raises(RuntimeError, match="experts.bin.*layer"):
        engine.step(3)
    with pytest.raises(RuntimeError, match=r"reset\(\) or restore\(\)"):
        engine.step(3)
    with pytest.raises(RuntimeError, match=r"reset\(\) or restore\(\)"):
        engine.prefill([1, 2, 3])

    experts.write_bytes(original)
    engine.reset()
    np.testing.assert_array_equal(engine.step(3), want)
