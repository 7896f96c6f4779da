"""How much code each decode launch runs: from Nsight Compute's per-instruction counts (the
SourceCounters section, exported as `ncu --import R --page source --csv --print-source sass`),
each profiled launch's SASS size and the instructions it executed at least once (16 bytes each),
the code that must reach the SM's instruction cache (about 32 KB on an H200:
bench/icache_fetch.cu) for the launch to run. `bash bench/run_device.sh footprint` profiles one
decode token of bench/kernel_probe.py's 4-layer model and prints this.

    python3 bench/code_footprint.py source.csv
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

INSTRUCTION_BYTES = 16


def footprints(path: Path) -> list[tuple[str, int, int, int]]:
    """(kernel, SASS instructions, executed at least once, executed branches) per launch."""
    out = []
    name = "?"
    header: list[str] | None = None
    rows: list[list[str]] = []

    def flush() -> None:
        if header is None:
            return
        executed = header.index(next(c for c in header if c.startswith("Instructions Executed")))
        source = header.index("Source")
        ran = [r for r in rows if r[executed] not in ("", "0")]
        branches = sum("BRA" in r[source] for r in ran)
        out.append((name, len(rows), len(ran), branches))

    with path.open(newline="") as f:
        for r in csv.reader(f):
            if r and r[0] == "Kernel Name":
                flush()
                header, rows = None, []
                name = r[1].split("(")[0].split("::")[-1] if len(r) > 1 else "?"
            elif "Address" in r and "Source" in r:
                header = r
            elif header is not None and len(r) == len(header):
                rows.append(r)
    flush()
    return out


def main() -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    p.add_argument("csv", type=Path)
    a = p.parse_args()
    kb = INSTRUCTION_BYTES / 1024
    print(f"{'launch':26s} {'SASS':>13s} {'executed':>15s} {'branches':>8s}")
    for name, total, ran, branches in footprints(a.csv):
        sizes = f"{total:6d} {total * kb:4.0f} KB {ran:6d} {ran * kb:5.1f} KB"
        print(f"{name:26s} {sizes} {branches:8d}")


if __name__ == "__main__":
    main()
