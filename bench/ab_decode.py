"""Same-run A/B of resident CUDA decode between builds of the package (kernel experiments).

Each variant is a package installed into its own folder (pip install --target DIR). Every
repetition runs each variant once, in turn, in a fresh process (engine load, three decodes of
64 tokens, the median kept), so that drift of the machine falls on all variants alike. The
first variant is the reference: each other one's logits over the same greedy decode must be
the same bits, or the difference is printed (a kernel change meant to be exact must not move
a bit; one that reorders sums shows by how much).

    python bench/ab_decode.py --model /tmp/fmbench/qwen35-35b-a3b-q4 base=/tmp/v_base new=/tmp/v_new
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent

CHILD = """
import json, sys
import numpy as np
sys.path.insert(0, {bench!r})
import flashmoe_native as fm
from cuda_bench import decode
engine = fm.Engine({model!r}, device="cuda", max_context=4096)
runs = [decode(engine, 16, {tokens}, seed) for seed in range(3)]
ms = sorted(1e3 * r["seconds"] / r["tokens"] for r in runs)
engine.reset()
logits = engine.prefill(np.arange(16) * 7919 % engine.vocab_size)
out = []
for _ in range(8):
    token = int(np.argmax(logits))
    logits = engine.step(token)
    out.append(np.asarray(logits, dtype=np.float32))
np.save({logits_path!r}, np.stack(out))
print(json.dumps({{"ms": ms[1]}}))
"""


def run_variant(name: str, target: Path, model: Path, tokens: int, work: Path) -> float:
    logits_path = work / f"{name}.npy"
    code = CHILD.format(
        bench=str(BENCH), model=str(model), tokens=tokens, logits_path=str(logits_path)
    )
    env = dict(os.environ, PYTHONPATH=str(target))
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"{name}: exit {done.returncode}\n{done.stderr[-3000:]}")
    return float(json.loads(done.stdout.strip().splitlines()[-1])["ms"])


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("variants", nargs="+", help="NAME=DIR, the package installed into DIR")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--work", type=Path, default=Path("/tmp/ab_decode"))
    args = p.parse_args()
    import numpy as np

    variants = [(v.split("=", 1)[0], Path(v.split("=", 1)[1])) for v in args.variants]
    args.work.mkdir(parents=True, exist_ok=True)
    times: dict[str, list[float]] = {name: [] for name, _ in variants}
    for rep in range(args.reps):
        order = variants if rep % 2 == 0 else variants[::-1]
        for name, target in order:
            times[name].append(run_variant(name, target, args.model, args.tokens, args.work))
        print("rep", rep, " ".join(f"{n}={times[n][-1]:.3f}" for n, _ in variants), flush=True)
    ref_name = variants[0][0]
    ref = np.load(args.work / f"{ref_name}.npy")
    for name, _ in variants:
        t = times[name]
        runs = " ".join(f"{x:.3f}" for x in t)
        line = f"{name:12s} ms/token median {statistics.median(t):.3f}  runs {runs}"
        if name != ref_name:
            got = np.load(args.work / f"{name}.npy")
            if np.array_equal(got, ref):
                line += f"  logits: the same bits as {ref_name}"
            else:
                rel = float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
                line += f"  logits differ from {ref_name}: max |d| / max |ref| = {rel:.3g}"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
