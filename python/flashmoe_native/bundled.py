"""The model shipped inside the package, used when no model directory is given.

`tiny-stdlib-moe-q4` is a 12 M-parameter Qwen3.5-MoE (hybrid DeltaNet/gated attention, 32 experts,
top-4 plus a shared expert) trained on the Python standard library's source by
tools/train_tiny_model.py and converted at 4 bits. It is small enough to ship and real enough to
measure: docs/quality.md has its perplexity and routing statistics.
"""

from __future__ import annotations

from pathlib import Path

BUNDLED_MODEL = "tiny-stdlib-moe-q4"


def default_model_path() -> Path:
    """Directory of the bundled 4-bit model (inside the installed package)."""
    return Path(__file__).resolve().parent / "models" / BUNDLED_MODEL
