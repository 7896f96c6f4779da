"""CPU benchmarks: the 4-bit matvec against memory bandwidth, and decode on real layer shapes."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from synthetic import random_tensor

import flashmoe_native as fm
from flashmoe_native import _core
from flashmoe_native.bench import decode_benchmark, format_breakdown

# 32768 x 8192 at 4 bits: 151 MB, several times any last-level cache of a small machine
ROWS, COLS = 32768, 8192


def median_seconds(fn: Callable[[], object], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def test_q4_matvec_vs_memory_bandwidth(benchmark) -> None:
    kernels = _core.CpuKernels()
    rng = np.random.default_rng(0)
    weights = random_tensor(rng, "q4", [ROWS, COLS], "bench")
    x = rng.standard_normal(COLS).astype(np.float32)
    buffer = np.ones(weights.nbytes, dtype=np.uint8)

    def matvec() -> np.ndarray:
        return kernels.linear(weights, "q4", ROWS, COLS, x)

    # interleaved so both see the same machine state
    read_s, matvec_s = [], []
    for _ in range(15):
        read_s.append(median_seconds(lambda: kernels.stream_read(buffer), 1))
        matvec_s.append(median_seconds(matvec, 1))
    read_bw = weights.nbytes / statistics.median(read_s)
    matvec_bw = weights.nbytes / statistics.median(matvec_s)
    benchmark.extra_info.update(
        simd=kernels.simd,
        threads=kernels.threads,
        matrix_bytes=weights.nbytes,
        memory_read_gb_s=read_bw / 1e9,
        q4_matvec_gb_s=matvec_bw / 1e9,
        ratio=matvec_bw / read_bw,
    )
    print(
        f"\nq4 matvec {ROWS}x{COLS} ({weights.nbytes / 1e6:.0f} MB, {kernels.simd}, "
        f"{kernels.threads} threads): {matvec_bw / 1e9:.1f} GB/s; memory read "
        f"{read_bw / 1e9:.1f} GB/s; ratio {matvec_bw / read_bw:.2f}"
    )
    benchmark.pedantic(matvec, rounds=10, iterations=1)


def test_decode_step_35b_a3b_layers(benchmark, synthetic_35b_a3b: Path) -> None:
    engine = fm.Engine(synthetic_35b_a3b)
    result = decode_benchmark(engine, prompt_tokens=4, decode_tokens=16)
    benchmark.extra_info.update(
        decode_tok_s=result["decode_tok_s"],
        layers=result["layers"],
        expert_mb_per_token=result["decode_stats"]["expert_bytes_read"] / 16 / 1e6,
    )
    print(f"\n{engine.device}: {result['decode_tok_s']:.2f} tok/s over {result['layers']} layers")
    print(format_breakdown(result["decode_stats"], result["layers"]))
    token = iter(np.random.default_rng(1).integers(0, engine.vocab_size, 1000).tolist())
    benchmark.pedantic(lambda: engine.step(next(token)), rounds=20, iterations=1)
