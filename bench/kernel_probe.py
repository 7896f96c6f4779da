"""Per-kernel view of one decode step of the CUDA engine, under Nsight Compute.

Runs a few tokens of a 4-layer model of the Qwen3.5-35B-A3B shape (3 DeltaNet layers and one
full-attention layer: every kernel the 40-layer model launches, at its real size), without the
CUDA graph so that ncu sees plain launches:

  ncu --csv --page raw --metrics ... python3 bench/kernel_probe.py --work /tmp/fmprobe > ncu.csv
  python3 bench/kernel_probe.py --summarize ncu.csv

--summarize prints each kernel's time, DRAM bytes and bandwidth, and what the SMs were doing.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from synthetic import qwen35_35b_a3b, write_synthetic_model  # noqa: E402

import flashmoe_native as fm  # noqa: E402

METRICS = [
    "gpu__time_duration.sum",
    "dram__bytes_read.sum",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed",
    "sm__throughput.avg.pct_of_peak_sustained_elapsed",
    "sm__warps_active.avg.pct_of_peak_sustained_active",
    "smsp__issue_active.avg.pct_of_peak_sustained_active",
    "launch__registers_per_thread",
    "launch__grid_size",
]


def run(work: Path, tokens: int) -> None:
    model = write_synthetic_model(work / "probe-4l-q4", qwen35_35b_a3b(4))
    engine = fm.Engine(model, device="cuda", max_context=256, profile=True)
    logits = engine.step(1)
    for _ in range(tokens):
        logits = engine.step(int(np.argmax(logits)))


def num(text: str) -> float:
    return float(text.replace(",", ""))


def summarize(path: Path) -> None:
    rows = list(csv.reader(path.read_text().splitlines()))
    start = next(i for i, r in enumerate(rows) if "Kernel Name" in r)
    header, units, data = rows[start], rows[start + 1], rows[start + 2 :]
    col = {name: header.index(name) for name in ["Kernel Name", *METRICS]}
    scale = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3}[
        units[col["gpu__time_duration.sum"]]
    ]
    byte_scale = {"byte": 1, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9}[
        units[col["dram__bytes_read.sum"]]
    ]
    print(
        f"{'kernel':24s} {'grid':>6s} {'regs':>4s} {'us':>8s} {'MB':>7s} {'GB/s':>6s} "
        f"{'dram%':>5s} {'sm%':>5s} {'warps%':>6s} {'issue%':>6s}"
    )
    total = 0.0
    for r in data:
        found = re.search(r"(\w+_kernel)", r[col["Kernel Name"]])
        name = found.group(1) if found else r[col["Kernel Name"]]
        us = num(r[col["gpu__time_duration.sum"]]) * scale
        mb = num(r[col["dram__bytes_read.sum"]]) * byte_scale / 1e6
        total += us
        grid, regs = r[col["launch__grid_size"]], r[col["launch__registers_per_thread"]]
        print(
            f"{name[:24]:24s} {grid:>6s} {regs:>4s} {us:8.1f} {mb:7.2f} {1e3 * mb / us:6.0f} "
            f"{num(r[col[METRICS[2]]]):5.1f} {num(r[col[METRICS[3]]]):5.1f} "
            f"{num(r[col[METRICS[4]]]):6.1f} {num(r[col[METRICS[5]]]):6.1f}"
        )
    print(f"{len(data)} kernels, {total:.1f} us of kernel time")


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--work", type=Path, default=Path("/tmp/fmprobe"))
    p.add_argument("--tokens", type=int, default=2)
    p.add_argument("--summarize", type=Path, default=None, help="ncu --csv --page raw output")
    p.add_argument("--metrics", action="store_true", help="print the metric list for ncu")
    a = p.parse_args()
    if a.metrics:
        print(",".join(METRICS))
    elif a.summarize:
        summarize(a.summarize)
    else:
        run(a.work, a.tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
