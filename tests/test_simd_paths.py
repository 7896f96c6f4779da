"""Every x86 SIMD path the machine supports computes the same model: each is run in its own
process (the path is chosen once, at load) and compared with the transformers reference."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import TinyModels, reference_model

SCRIPT = """
import json, sys
import numpy as np
import flashmoe_native as fm
engine = fm.Engine(sys.argv[1])
ids = json.loads(sys.argv[2])
np.save(sys.argv[3], np.stack([engine.step(t) for t in ids]))
print(engine.device)
"""


@pytest.mark.parametrize("path", ["avx512", "avx2", "generic"])
@pytest.mark.parametrize("bits", [8, 4])
def test_simd_path_matches_transformers(
    tiny_models: TinyModels, tmp_path: Path, path: str, bits: int
) -> None:
    model_dir = tiny_models.converted(bits, "A")
    ids = np.random.default_rng(9).integers(0, 256, 24).tolist()
    out = tmp_path / "logits.npy"
    env = {**os.environ, "FLASHMOE_SIMD": path}
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(model_dir), json.dumps(ids), str(out)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    device = run.stdout.strip()
    if path not in device:
        pytest.skip(f"this CPU has no {path}: the engine runs {device}")
    with torch.no_grad():
        want = reference_model(model_dir)(input_ids=torch.tensor([ids])).logits[0].numpy()
    got = np.load(out)
    errors = np.linalg.norm(got - want, axis=-1) / np.linalg.norm(want, axis=-1)
    assert errors.max() < 1e-3, f"{device}: {errors.max():.2e}"
