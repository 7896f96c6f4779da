"""The engine computes what transformers computes, given the weights the engine holds.

The reference is transformers' fp32 Qwen3.5-MoE whose weights are replaced by the converted model's
own (dequantized / widened), so quantization error is out of the comparison and any difference is
the engine's arithmetic. Run with `pytest -s tests/test_parity.py` to see the error table; set
FLASHMOE_TEST_DEVICE=cuda to check the CUDA backend against the same references.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import TinyModels, reference_model

import flashmoe_native as fm
from flashmoe_native import format as fmt

DEVICE = os.environ.get("FLASHMOE_TEST_DEVICE", "cpu")
N_TOKENS = 64
N_GREEDY = 12
REL_TOL = 1e-3
VOCAB = 256

# (shape, layout, wrapper): every shape in both layouts, the hub's VLM wrapper for some
CASES = [
    ("A", "fused", "text"),
    ("A", "per_expert", "vlm"),
    ("B", "fused", "vlm"),
    ("B", "per_expert", "text"),
    ("C", "fused", "vlm"),
    ("C", "per_expert", "text"),
]

# worst relative L2 error per bit width seen in this session, printed at the end of the module
MAX_REL_ERROR: dict[str, float] = {}


def record(key: str, value: float) -> None:
    MAX_REL_ERROR[key] = max(MAX_REL_ERROR.get(key, 0.0), value)


@pytest.fixture(scope="module", autouse=True)
def error_summary() -> Iterator[None]:
    yield
    if MAX_REL_ERROR:
        print("\nparity summary (max relative L2 error of logits per position):")
        for key in sorted(MAX_REL_ERROR):
            print(f"  {key:44s} {MAX_REL_ERROR[key]:.3e}")


def token_ids(seed: int = 1234, n: int = N_TOKENS) -> list[int]:
    return np.random.default_rng(seed).integers(0, VOCAB, n).tolist()


def rel_errors(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """Relative L2 error of each row (position)."""
    return np.linalg.norm(got - want, axis=-1) / np.linalg.norm(want, axis=-1)


@functools.cache
def reference_run(model_dir: Path, experts_per_token: int | None = None) -> tuple:
    """(logits at every position of token_ids(), greedy continuation) from transformers."""
    model = reference_model(model_dir, experts_per_token)
    ids = token_ids()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].numpy()
        seq = list(ids)
        greedy = []
        next_token = int(logits[-1].argmax())
        for _ in range(N_GREEDY):
            greedy.append(next_token)
            seq.append(next_token)
            next_token = int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
    return logits, greedy


def engine_run(engine: fm.Engine, ids: list[int]) -> tuple[np.ndarray, list[int]]:
    """Step token by token: logits at every position, then a greedy continuation."""
    logits = np.stack([engine.step(t) for t in ids])
    greedy = []
    next_token = int(logits[-1].argmax())
    for _ in range(N_GREEDY):
        greedy.append(next_token)
        next_token = int(engine.step(next_token).argmax())
    return logits, greedy


@pytest.mark.parametrize("bits", [16, 8, 4])
@pytest.mark.parametrize(("shape", "layout", "wrapper"), CASES)
def test_logits_match_transformers_at_every_position(
    tiny_models: TinyModels, shape: str, layout: str, wrapper: str, bits: int
) -> None:
    model_dir = tiny_models.converted(bits, shape, layout, wrapper=wrapper)
    want, want_greedy = reference_run(model_dir)
    engine = fm.Engine(model_dir, device=DEVICE)
    got, got_greedy = engine_run(engine, token_ids())
    errors = rel_errors(got, want)
    record(f"{bits}-bit", float(errors.max()))
    record(f"{bits}-bit shape {shape}", float(errors.max()))
    print(
        f"parity shape={shape} layout={layout} wrapper={wrapper} bits={bits} "
        f"max_rel_err={errors.max():.3e} greedy={got_greedy}"
    )
    assert errors.max() < REL_TOL, f"worst position {errors.argmax()}: {errors.max():.3e}"
    assert got_greedy == want_greedy
    assert engine.position == N_TOKENS + N_GREEDY


@pytest.mark.parametrize("shape", ["A", "B", "C"])
def test_16_bit_conversion_stays_close_to_the_original_fp32_model(
    tiny_models: TinyModels, shape: str
) -> None:
    original = tiny_models.text_model(shape)
    with torch.no_grad():
        want = original(input_ids=torch.tensor([token_ids()])).logits[0].numpy()
    engine = fm.Engine(tiny_models.converted(16, shape), device=DEVICE)
    errors = rel_errors(np.stack([engine.step(t) for t in token_ids()]), want)
    record(f"16-bit vs original fp32, median, shape {shape}", float(np.median(errors)))
    record(f"16-bit vs original fp32, max, shape {shape}", float(errors.max()))
    print(
        f"bf16 conversion vs original fp32 shape={shape}: median rel err {np.median(errors):.3e}, "
        f"max {errors.max():.3e} (a max far above the median is a routing flip)"
    )
    # bf16 weights carry ~2^-9 relative error each; far more means the conversion lost something
    assert np.median(errors) < 2e-2


@pytest.mark.parametrize(("shape", "k"), [("A", 1), ("B", 2), ("B", 3)])
def test_fewer_experts_per_token_match_transformers_with_that_top_k(
    tiny_models: TinyModels, shape: str, k: int
) -> None:
    model_dir = tiny_models.converted(4, shape, "fused")
    assert k < fmt.load_manifest(model_dir)["config"]["num_experts_per_tok"]
    want, want_greedy = reference_run(model_dir, k)
    engine = fm.Engine(model_dir, device=DEVICE, experts_per_token=k)
    got, got_greedy = engine_run(engine, token_ids())
    errors = rel_errors(got, want)
    record(f"4-bit experts_per_token={k} shape {shape}", float(errors.max()))
    assert errors.max() < REL_TOL
    assert got_greedy == want_greedy
    # and it really ran fewer experts than the model's top-k
    full, _ = reference_run(model_dir)
    assert rel_errors(got, full).max() > 1e-2


@pytest.mark.parametrize("bits", [16, 4])
@pytest.mark.parametrize("shape", ["A", "B"])
def test_prefill_then_step_equals_stepping_token_by_token(
    tiny_models: TinyModels, shape: str, bits: int
) -> None:
    model_dir = tiny_models.converted(bits, shape)
    ids = token_ids()
    stepper = fm.Engine(model_dir, device=DEVICE)
    stepped = np.stack([stepper.step(t) for t in ids])

    engine = fm.Engine(model_dir, device=DEVICE)
    first = engine.prefill(ids[:37])
    assert engine.position == 37
    second = engine.prefill(ids[37:50])  # a second chunk continues the same sequence
    assert engine.position == 50
    rest = np.stack([engine.step(t) for t in ids[50:]])
    got = np.concatenate([first[None], second[None], rest])
    positions = [36, 49, *range(50, len(ids))]
    errors = rel_errors(got, stepped[positions])
    record(f"prefill vs step {bits}-bit shape {shape}", float(errors.max()))
    # bf16 weights leave only float32 summation order between the two paths; quantized matrices
    # may use reduced-precision activations, bounded by the parity budget against transformers
    assert errors.max() < (1e-5 if bits == 16 else REL_TOL)
    want, _ = reference_run(model_dir)
    assert rel_errors(got, want[positions]).max() < REL_TOL


def test_reset_starts_the_same_sequence_again(tiny_models: TinyModels) -> None:
    engine = fm.Engine(tiny_models.converted(8, "B"), device=DEVICE)
    ids = token_ids(3, 20)
    first = np.stack([engine.step(t) for t in ids])
    engine.reset()
    assert engine.position == 0
    again = np.stack([engine.step(t) for t in ids])
    np.testing.assert_array_equal(again, first)
    assert engine.config == fmt.load_manifest(tiny_models.converted(8, "B"))["config"]


@pytest.mark.parametrize("direct_io", [False, True])
@pytest.mark.parametrize("k", [None, 1, 3])
def test_first_token_reads_exactly_k_expert_blocks_per_layer(
    tiny_models: TinyModels, k: int | None, direct_io: bool
) -> None:
    model_dir = tiny_models.converted(4, "B")
    manifest = fmt.load_manifest(model_dir)
    experts = manifest["experts"]
    assert experts["block_bytes"] < experts["block_stride"], "shape B should have padded blocks"
    layers = manifest["config"]["num_hidden_layers"]
    per_token = k or manifest["config"]["num_experts_per_tok"]
    engine = fm.Engine(model_dir, device=DEVICE, experts_per_token=k, direct_io=direct_io)
    engine.step(5)
    stats = engine.stats()
    # one token routes to `per_token` distinct experts in each layer, each read once and whole:
    # O_DIRECT reads the 4 KiB-aligned stride, buffered reads stop at the block's last byte
    per_block = experts["block_stride"] if direct_io else experts["block_bytes"]
    assert stats["experts_loaded"] == layers * per_token
    assert stats["expert_bytes_read"] == layers * per_token * per_block
    assert stats["tokens"] == 1
    assert set(stats["ms"]) >= {"mixer", "router", "expert_io_wait", "expert_compute", "lm_head"}


@pytest.mark.parametrize("k", [0, 5, -1])
def test_experts_per_token_outside_one_to_top_k_is_refused(tiny_models: TinyModels, k: int) -> None:
    with pytest.raises(ValueError, match="experts_per_token"):
        fm.Engine(tiny_models.converted(4, "B"), device=DEVICE, experts_per_token=k)
