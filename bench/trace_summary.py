"""Summarise the in-graph timeline of one decode token (csrc/cuda/trace.cuh).

A build with -DFLASHMOE_CUDA_TRACE=ON and FLASHMOE_CUDA_TRACE=<file> in the environment writes one
record per block of every launch of the token at position 32. This prints, for a window of
launches, when their blocks started, when their wait returned, their prologue's marks and their
end (microseconds from the window's first start; medians over the launch's blocks), the spread of
each launch's phases over its blocks, then how much of the token each kind of launch holds on the
critical path: from its predecessor's last block's end to its own last block's end.

    python bench/trace_summary.py trace.bin [--first 47] [--count 12]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

MARKS = ("start", "waited", "loaded", "normed", "ready", "end")
KERNELS = ("matvec", "gate_up", "down", "deltanet")
KERNELS += ("embed", "qk_prep", "attn_part", "attn_comb")
FIELDS = [("t", "<u8", len(MARKS)), ("kernel", "<u4"), ("blocks", "<u4")]
RECORD = np.dtype(FIELDS + [("block", "<u4"), ("sm", "<u4")])


def launches(records: np.ndarray) -> list[np.ndarray]:
    """Records grouped by launch (in start order, a launch's blocks start before the next's)."""
    records = records[np.argsort(records["t"][:, 0], kind="stable")]
    key = records["kernel"].astype(np.int64) << 32 | records["blocks"]
    cuts = np.flatnonzero(np.diff(key)) + 1
    return np.split(records, cuts)


def median_mark(launch: np.ndarray, mark: int, origin: int) -> float | None:
    t = launch["t"][:, mark]
    t = t[t > 0]
    return float(np.median(t.astype(np.int64) - origin)) / 1e3 if len(t) else None


def spread(ns: np.ndarray) -> str:
    """10th, 50th and 90th percentiles of durations in ns, as microseconds."""
    p10, p50, p90 = np.percentile(ns, [10, 50, 90]) / 1e3
    return f"{p10:6.2f} {p50:6.2f} {p90:6.2f}"


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("trace", type=Path)
    p.add_argument(
        "--first",
        type=int,
        default=47,
        help="first launch of the window (47: layer 7's split attention)",
    )
    p.add_argument("--count", type=int, default=12)
    args = p.parse_args()
    records = np.fromfile(args.trace, dtype=RECORD)
    if len(records) == 0:
        print(f"{args.trace}: no records", file=sys.stderr)
        return 1
    groups = launches(records)
    last_end = [int(g["t"][:, 5].max()) for g in groups]
    token_us = (max(last_end) - int(records["t"][:, 0].min())) / 1e3
    print(f"{len(records)} blocks in {len(groups)} launches, {token_us:.1f} us start to end")

    window = groups[args.first : args.first + args.count]
    if window:
        origin = int(window[0]["t"][:, 0].min())
        head = " ".join(f"{m:>8s}" for m in (*MARKS, "last"))
        print(f"{'launch':10s} {'blocks':>6s} {'SMs':>4s} {'gap':>8s} {head}")
        prev_end = last_end[args.first - 1] if args.first > 0 else None
        for i, g in enumerate(window, start=args.first):
            waited = median_mark(g, 1, origin)
            gap = None if prev_end is None or waited is None else waited - (prev_end - origin) / 1e3
            times = [median_mark(g, m, origin) for m in range(len(MARKS))]
            times.append((last_end[i] - origin) / 1e3)
            cols = " ".join(f"{v:8.2f}" if v is not None else "       -" for v in [gap, *times])
            name = KERNELS[int(g["kernel"][0])]
            print(f"{name:10s} {len(g):6d} {len(np.unique(g['sm'])):4d} {cols}")
            prev_end = last_end[i]

        # the spread over a launch's blocks of its three phases: start to wait returned, wait to x
        # ready (or to the end, for kernels without a prologue), x ready to the end
        print("phases over each launch's blocks, us (10th / 50th / 90th percentile):")
        print(f"{'launch':10s} {'start->waited':>20s} {'waited->ready':>20s} {'ready->end':>20s}")
        for g in window:
            t = g["t"].astype(np.int64)
            ready = np.where(t[:, 4] > 0, t[:, 4], t[:, 5])
            phases = (t[:, 1] - t[:, 0], ready - t[:, 1], t[:, 5] - ready)
            cols = " ".join(spread(d) for d in phases)
            print(f"{KERNELS[int(g['kernel'][0])]:10s} {cols}")

    # critical-path time per kind of launch: predecessor's last end to own last end
    held: dict[str, float] = {}
    for i in range(1, len(groups)):
        name = f"{KERNELS[int(groups[i]['kernel'][0])]}/{len(groups[i])}"
        held[name] = held.get(name, 0.0) + (last_end[i] - last_end[i - 1]) / 1e3
    print("critical path per kind of launch (kernel/blocks, us per token):")
    for name, us in sorted(held.items(), key=lambda kv: -kv[1]):
        print(f"  {name:14s} {us:8.1f}  {100 * us / token_us:5.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
