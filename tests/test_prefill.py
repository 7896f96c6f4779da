"""Batched prefill: chunks of the prompt run as matrix products, each expert read once per chunk,
and the result is the state that stepping token by token reaches."""

from __future__ import annotations

import os

import numpy as np
import pytest
from tiny_models import TinyModels, routed_experts

import flashmoe_native as fm
from flashmoe_native import format as fmt

DEVICE = os.environ.get("FLASHMOE_TEST_DEVICE", "cpu")
VOCAB = 256


def prompt(n: int, seed: int = 21) -> list[int]:
    return np.random.default_rng(seed).integers(0, VOCAB, n).tolist()


def greedy(engine: fm.Engine, logits: np.ndarray, n: int) -> list[int]:
    out = []
    for _ in range(n):
        out.append(int(logits.argmax()))
        logits = engine.step(out[-1])
    return out


@pytest.mark.parametrize("bits", [16, 8, 4])
@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_prefill_in_chunks_equals_stepping(tiny_models: TinyModels, bits: int, chunk: int) -> None:
    model_dir = tiny_models.converted(bits, "B")
    ids = prompt(40)
    stepper = fm.Engine(model_dir, device=DEVICE)
    for t in ids[:-1]:
        stepper.step(t)
    want = stepper.step(ids[-1])
    engine = fm.Engine(model_dir, device=DEVICE, prefill_chunk=chunk)
    got = engine.prefill(ids)
    assert engine.position == len(ids)
    assert engine.stats()["prefill_chunks"] == -(-len(ids) // chunk)
    if DEVICE == "cpu":
        # same kernels, same summation order per token: bit for bit what stepping gives
        np.testing.assert_array_equal(got, want)
    else:
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-4
    # the state after prefill is the stepped state: the continuations agree token for token
    assert greedy(engine, got, 10) == greedy(stepper, want, 10)


@pytest.mark.parametrize("chunk", [8, 30])
def test_each_expert_is_read_once_per_chunk(tiny_models: TinyModels, chunk: int) -> None:
    if DEVICE != "cpu":
        pytest.skip("tests/test_cuda.py counts the reads of the CUDA device cache")
    model_dir = tiny_models.converted(16, "B")
    manifest = fmt.load_manifest(model_dir)
    ids = prompt(60, seed=5)
    routing = routed_experts(model_dir, ids)
    unique = sum(
        len(set().union(*per_token[start : start + chunk]))
        for per_token in routing
        for start in range(0, len(ids), chunk)
    )
    engine = fm.Engine(model_dir, device=DEVICE, prefill_chunk=chunk)
    engine.prefill(ids)
    stats = engine.stats()
    block = manifest["experts"]["block_bytes"]
    assert stats["prefill_unique_experts"] == unique
    assert stats["prefill_experts_loaded"] == unique
    assert stats["prefill_expert_bytes_read"] == unique * block
    assert stats["expert_bytes_read"] == unique * block
    # far fewer than one read per token and expert, which is what stepping costs
    k = manifest["config"]["num_experts_per_tok"]
    assert unique < len(routing) * len(ids) * k


def test_direct_reads_start_while_the_mixer_runs(tiny_models: TinyModels) -> None:
    """With O_DIRECT and a chunk of many routings per expert the reads of each layer's first
    experts are queued before its router runs: same logits as stepping, no extra reads."""
    if DEVICE != "cpu":
        pytest.skip("CPU read pool")
    model_dir = tiny_models.converted(4, "B")
    ids = prompt(60, seed=8)  # 240 routings over 16 experts per layer: every expert is chosen
    stepper = fm.Engine(model_dir, device=DEVICE)
    for t in ids[:-1]:
        stepper.step(t)
    engine = fm.Engine(model_dir, device=DEVICE, direct_io=True, prefill_chunk=64)
    np.testing.assert_array_equal(engine.prefill(ids), stepper.step(ids[-1]))
    stats = engine.stats()
    assert stats["prefill_experts_loaded"] == stats["prefill_unique_experts"]


def test_prefill_chunk_is_validated(tiny_models: TinyModels) -> None:
    with pytest.raises(ValueError, match="prefill_chunk"):
        fm.Engine(tiny_models.converted(4, "A"), device=DEVICE, prefill_chunk=0)


def test_snapshot_restores_the_sequence_and_refuses_foreign_states(tiny_models: TinyModels) -> None:
    model_dir = tiny_models.converted(8, "A")
    engine = fm.Engine(model_dir, device=DEVICE)
    engine.prefill(prompt(20))
    state = engine.snapshot()
    assert state.position == 20 and state.nbytes > 0
    want = engine.step(7)
    engine.reset()
    engine.restore(state)
    assert engine.position == 20
    np.testing.assert_array_equal(engine.step(7), want)
    other = fm.Engine(tiny_models.converted(8, "B"), device=DEVICE)
    with pytest.raises(ValueError, match="another model"):
        other.restore(state)


def test_blocks_in_the_page_cache_are_used_in_place_with_the_same_result(
    tiny_models: TinyModels,
) -> None:
    if DEVICE != "cpu":
        pytest.skip("the CUDA backend keeps its own expert cache on the GPU")
    model_dir = tiny_models.converted(4, "B")
    (model_dir / "experts.bin").read_bytes()  # now in the page cache
    ids = prompt(16, seed=4)
    mapped = fm.Engine(model_dir, device=DEVICE)
    read = fm.Engine(model_dir, device=DEVICE, direct_io=True)  # O_DIRECT never maps
    for t in ids:
        np.testing.assert_array_equal(mapped.step(t), read.step(t))
    mapped_stats, read_stats = mapped.stats(), read.stats()
    assert read_stats["experts_cached"] == 0
    assert 0 < mapped_stats["experts_cached"] <= mapped_stats["experts_loaded"]
    assert mapped_stats["experts_loaded"] == read_stats["experts_loaded"]
