"""The CUDA backend computes what transformers and the CPU engine compute, in both expert regimes.

Resident: every expert block fits the device cache (the default for these tiny models) and a token
is one CUDA graph. Streaming: `expert_cache_gb` caps the cache at a few blocks, so most routed
experts are read from experts.bin and copied in, and the LRU replacement runs every token.
Skipped, with the reason, where no CUDA GPU can be used.
"""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import TinyModels, reference_model, routed_experts

import flashmoe_native as fm
from flashmoe_native import _core
from flashmoe_native import format as fmt
from flashmoe_native.engine import cuda_available

pytestmark = pytest.mark.skipif(
    not cuda_available(), reason=f"no CUDA backend here: {_core.cuda_unavailable_reason()}"
)

N_TOKENS = 48
REL_TOL = 1e-3
VOCAB = 256
SHAPES = ["A", "B", "C"]


def token_ids(seed: int = 1234, n: int = N_TOKENS) -> list[int]:
    return np.random.default_rng(seed).integers(0, VOCAB, n).tolist()


def rel_errors(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    return np.linalg.norm(got - want, axis=-1) / np.linalg.norm(want, axis=-1)


@functools.cache
def reference_logits(model_dir: Path, experts_per_token: int | None = None) -> np.ndarray:
    model = reference_model(model_dir, experts_per_token)
    with torch.no_grad():
        return model(input_ids=torch.tensor([token_ids()])).logits[0].numpy()


def streaming_gb(model_dir: Path, blocks: float) -> float:
    """A cache budget of `blocks` expert blocks (plus half a block against rounding)."""
    stride = fmt.load_manifest(model_dir)["experts"]["block_stride"]
    return (blocks + 0.5) * stride / 1e9


def engine(model_dir: Path, regime: str, blocks: int | None = None, **kwargs: object) -> fm.Engine:
    """regime "streaming": a cache of `blocks` expert blocks (default k + 1: nearly all misses)."""
    if regime == "streaming":
        k = (
            kwargs.get("experts_per_token")
            or fmt.load_manifest(model_dir)["config"]["num_experts_per_tok"]
        )
        kwargs["expert_cache_gb"] = streaming_gb(model_dir, blocks or k + 1)
    e = fm.Engine(model_dir, device="cuda", **kwargs)
    assert ("resident" in e.device) == (regime == "resident"), e.device
    return e


def step_all(e: fm.Engine, ids: list[int]) -> np.ndarray:
    return np.stack([e.step(t) for t in ids])


@pytest.mark.parametrize("regime", ["resident", "streaming"])
@pytest.mark.parametrize("bits", [16, 8, 4])
@pytest.mark.parametrize("shape", SHAPES)
def test_logits_match_transformers(
    tiny_models: TinyModels, shape: str, bits: int, regime: str
) -> None:
    model_dir = tiny_models.converted(bits, shape, "fused")
    got = step_all(engine(model_dir, regime), token_ids())
    errors = rel_errors(got, reference_logits(model_dir))
    print(f"cuda {regime} shape={shape} bits={bits} max_rel_err={errors.max():.3e}")
    assert errors.max() < REL_TOL, f"worst position {errors.argmax()}: {errors.max():.3e}"


@pytest.mark.parametrize("regime", ["resident", "streaming"])
@pytest.mark.parametrize(("shape", "k"), [("A", 1), ("B", 2), ("B", 3)])
def test_fewer_experts_per_token(tiny_models: TinyModels, shape: str, k: int, regime: str) -> None:
    model_dir = tiny_models.converted(4, shape, "fused")
    got = step_all(engine(model_dir, regime, experts_per_token=k), token_ids())
    assert rel_errors(got, reference_logits(model_dir, k)).max() < REL_TOL
    assert rel_errors(got, reference_logits(model_dir)).max() > 1e-2  # really fewer experts


@pytest.mark.parametrize("bits", [16, 4])
@pytest.mark.parametrize("shape", SHAPES)
def test_cpu_and_cuda_agree(tiny_models: TinyModels, shape: str, bits: int) -> None:
    model_dir = tiny_models.converted(bits, shape, "per_expert")
    ids = token_ids(99)
    cpu = step_all(fm.Engine(model_dir, device="cpu"), ids)
    gpu = step_all(fm.Engine(model_dir, device="cuda"), ids)
    assert rel_errors(gpu, cpu).max() < REL_TOL


@pytest.mark.parametrize("regime", ["resident", "streaming"])
@pytest.mark.parametrize("bits", [16, 8, 4])
def test_batched_prefill_equals_stepping(tiny_models: TinyModels, regime: str, bits: int) -> None:
    """Prompts in chunks of 16 (the streaming cache holds k + 1 blocks: a chunk's experts come in
    several waves) give what stepping gives, to rounding, and leave the same state."""
    model_dir = tiny_models.converted(bits, "B")
    ids = token_ids(7)
    stepped = step_all(engine(model_dir, regime), ids)
    e = engine(model_dir, regime, prefill_chunk=16)
    first = e.prefill(ids[:30])
    second = e.prefill(ids[30:40])
    assert e.position == 40 and e.stats()["prefill_chunks"] == 3
    rest = step_all(e, ids[40:])
    got = np.concatenate([first[None], second[None], rest])
    want = stepped[[29, 39, *range(40, len(ids))]]
    errors = rel_errors(got, want)
    print(f"cuda {regime} bits={bits} prefill vs stepping max_rel_err={errors.max():.3e}")
    assert errors.max() < 1e-5
    assert (got.argmax(axis=1) == want.argmax(axis=1)).all()


@pytest.mark.parametrize("chunk", [8, 60])
def test_prefill_reads_each_missing_expert_once_per_chunk(
    tiny_models: TinyModels, chunk: int
) -> None:
    model_dir = tiny_models.converted(16, "B")
    manifest = fmt.load_manifest(model_dir)
    layers, per_layer = manifest["config"]["num_hidden_layers"], manifest["experts"]["num_experts"]
    ids = token_ids(5, 60)
    unique = [
        len(set().union(*per_token[start : start + chunk]))
        for per_token in routed_experts(model_dir, ids)
        for start in range(0, len(ids), chunk)
    ]
    # every block but one fits: nothing is evicted, the cache starts empty
    e = engine(model_dir, "streaming", layers * per_layer - 1, prefill_chunk=chunk)
    e.prefill(ids)
    s = e.stats()
    assert s["prefill_unique_experts"] == sum(unique)
    assert s["expert_cache_hits"] + s["expert_cache_misses"] == sum(unique)
    assert s["prefill_experts_loaded"] == s["expert_cache_misses"] == s["experts_loaded"]
    block = manifest["experts"]["block_bytes"]
    assert s["prefill_expert_bytes_read"] == s["expert_cache_misses"] * block
    if chunk == len(ids):  # one chunk: each expert any token needs is read exactly once
        assert s["expert_cache_misses"] == sum(unique)


def test_a_failed_read_during_prefill_needs_a_reset(
    tiny_models: TinyModels, tmp_path: Path
) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_models.converted(4, "A"), model_dir)
    experts = model_dir / "experts.bin"
    e = engine(model_dir, "streaming")
    want = e.prefill(token_ids(3, 20))
    e.reset()
    original = experts.read_bytes()
    os.truncate(experts, 4096)  # the file shrinks under the open engine
    with pytest.raises(RuntimeError, match="experts.bin.*layer"):
        e.prefill(token_ids(3, 20))
    with pytest.raises(RuntimeError, match=r"reset\(\) or restore\(\)"):
        e.step(1)
    experts.write_bytes(original)
    e.reset()  # the cache forgot the blocks that never arrived
    np.testing.assert_array_equal(e.prefill(token_ids(3, 20)), want)


def test_failed_reads_during_decode_need_a_reset(tiny_models: TinyModels, tmp_path: Path) -> None:
    # When a miss's read fails, the layer's shared expert has run and counted towards the combine
    # of its rows (the down launch's tail, whose counters wrap every k + 1 counts): after k such
    # failures and reset(), the next tokens must not notice.
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_models.converted(4, "A"), model_dir)
    experts = model_dir / "experts.bin"
    k = fmt.load_manifest(model_dir)["config"]["num_experts_per_tok"]
    ids = token_ids(5, 6)
    want = step_all(engine(model_dir, "streaming"), ids)
    e = engine(model_dir, "streaming")
    original = experts.read_bytes()
    os.truncate(experts, 4096)  # the file shrinks under the open engine
    for _ in range(k):
        with pytest.raises(RuntimeError, match="experts.bin.*layer"):
            e.step(ids[0])
        with pytest.raises(RuntimeError, match=r"reset\(\) or restore\(\)"):
            e.step(ids[0])
        e.reset()
    experts.write_bytes(original)
    np.testing.assert_array_equal(step_all(e, ids), want)


@pytest.mark.parametrize("regime", ["resident", "streaming"])
def test_reset_and_snapshot_give_the_same_bits(tiny_models: TinyModels, regime: str) -> None:
    model_dir = tiny_models.converted(8, "A")
    ids = token_ids(3, 30)
    e = engine(model_dir, regime)
    first = step_all(e, ids)
    e.reset()
    assert e.position == 0
    # the streaming cache is warm now: other hits and misses, the same sums
    np.testing.assert_array_equal(step_all(e, ids), first)
    e.reset()
    step_all(e, ids[:20])
    state = e.snapshot()
    tail = step_all(e, ids[20:])
    step_all(e, ids[:5])  # wander off
    e.restore(state)
    assert e.position == 20
    np.testing.assert_array_equal(step_all(e, ids[20:]), tail)


def test_returned_logits_stay_the_callers_after_more_steps_and_the_engine(
    tiny_models: TinyModels,
) -> None:
    # the engine lends page-locked buffers for logits (a few, then heap ones) and takes each back
    # only when its array dies: held arrays never change, also once the engine is gone
    model_dir = tiny_models.converted(4, "A")
    ids = token_ids(6, 20)
    e = fm.Engine(model_dir, device="cuda")
    want = [e.prefill(ids[:4]).copy()] + [e.step(t).copy() for t in ids[4:]]
    e = fm.Engine(model_dir, device="cuda")
    held = [e.prefill(ids[:4])] + [e.step(t) for t in ids[4:]]
    del e
    for got, ref in zip(held, want, strict=True):
        np.testing.assert_array_equal(got, ref)
    # and dropped arrays' buffers come back to later steps without touching held ones
    e = fm.Engine(model_dir, device="cuda")
    kept = []
    for i, t in enumerate(ids):
        logits = e.step(t)
        if i % 3 == 0:
            kept.append((i, logits))
    e.reset()
    for i, t in enumerate(ids):
        fresh = e.step(t)
        for j, arr in kept:
            if j == i:
                np.testing.assert_array_equal(arr, fresh)


def test_snapshots_move_between_cpu_and_cuda(tiny_models: TinyModels) -> None:
    model_dir = tiny_models.converted(4, "A")
    ids = token_ids(5, 40)
    cpu, gpu = fm.Engine(model_dir, device="cpu"), fm.Engine(model_dir, device="cuda")
    step_all(cpu, ids[:25])
    want = step_all(cpu, ids[25:])
    cpu.reset()
    step_all(cpu, ids[:25])
    gpu.restore(cpu.snapshot())
    assert rel_errors(step_all(gpu, ids[25:]), want).max() < REL_TOL
    gpu.reset()
    step_all(gpu, ids[:25])
    cpu.restore(gpu.snapshot())
    assert rel_errors(step_all(cpu, ids[25:]), want).max() < REL_TOL


@pytest.mark.parametrize("direct_io", [False, True])
def test_streaming_stats_count_hits_misses_and_bytes(
    tiny_models: TinyModels, direct_io: bool
) -> None:
    model_dir = tiny_models.converted(4, "B")
    manifest = fmt.load_manifest(model_dir)
    layers = manifest["config"]["num_hidden_layers"]
    k = manifest["config"]["num_experts_per_tok"]
    experts = manifest["experts"]
    # half of all blocks: experts come back while still cached
    e = engine(model_dir, "streaming", layers * experts["num_experts"] // 2, direct_io=direct_io)
    ids = token_ids(11, 20)
    got = step_all(e, ids)
    s = e.stats()
    assert s["tokens"] == len(ids)
    assert s["expert_cache_hits"] + s["expert_cache_misses"] == len(ids) * layers * k
    assert s["expert_cache_misses"] >= layers * k  # the first token misses everything
    assert s["expert_cache_hits"] > 0
    assert sum(s["layer_cache_hits"]) == s["expert_cache_hits"]
    assert sum(s["layer_cache_misses"]) == s["expert_cache_misses"]
    assert len(s["layer_cache_hits"]) == layers
    per_read = experts["block_stride"] if direct_io else experts["block_bytes"]
    assert s["experts_loaded"] == s["expert_cache_misses"]
    assert s["expert_bytes_read"] == s["expert_cache_misses"] * per_read
    assert s["bytes_h2d"] == s["expert_cache_misses"] * experts["block_bytes"]
    assert rel_errors(got, step_all(engine(model_dir, "resident"), ids)).max() < 1e-6


def test_resident_stats_and_profile(tiny_models: TinyModels) -> None:
    model_dir = tiny_models.converted(4, "A")
    manifest = fmt.load_manifest(model_dir)
    layers, k = manifest["config"]["num_hidden_layers"], manifest["config"]["num_experts_per_tok"]
    for profile in (False, True):
        e = fm.Engine(model_dir, device="cuda", profile=profile)
        assert ("CUDA graph" in e.device) != profile
        step_all(e, token_ids(2, 6))
        s = e.stats()
        assert s["expert_cache_hits"] == 6 * layers * k
        assert s["expert_cache_misses"] == 0 and s["expert_bytes_read"] == 0 and s["bytes_h2d"] == 0
        phases = [s["ms"][p] for p in ("mixer", "router", "expert_compute", "lm_head")]
        assert all(v > 0 for v in phases) if profile else all(v == 0 for v in phases)
        assert s["ms"]["total"] > 0


def test_context_limit_and_bad_options(tiny_models: TinyModels) -> None:
    model_dir = tiny_models.converted(4, "A")
    e = fm.Engine(model_dir, device="cuda", max_context=8)
    step_all(e, token_ids(1, 8))
    with pytest.raises(fm.ContextLimitError):
        e.step(1)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        fm.Engine(model_dir, device="cuda").step(VOCAB)
    with pytest.raises(RuntimeError, match="experts_per_token"):
        fm.Engine(model_dir, device="cuda", expert_cache_gb=streaming_gb(model_dir, 1))
    with pytest.raises(ValueError, match="device='cuda'"):
        fm.Engine(model_dir, device="cpu", expert_cache_gb=1.0)
