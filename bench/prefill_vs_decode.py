"""Prefill against decode on one model, in the same run: tokens/s of a long prompt over tokens/s
of greedy decoding, in two regimes.

  resident   expert blocks come from the OS page cache (the model fits in RAM)
  streaming  every expert read goes to the disk (O_DIRECT): a model far larger than RAM; decode
             is also set against its I/O floor, expert bytes per token over the disk's parallel
             O_DIRECT read bandwidth for expert blocks, measured in the same run

    python bench/prefill_vs_decode.py MODEL_DIR [--prompt 512] [--decode 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import flashmoe_native as fm
from flashmoe_native import format as fmt
from flashmoe_native.bench import decode_benchmark

sys.path.insert(0, str(Path(__file__).parent))
from floors import disk_read_bandwidth  # noqa: E402

IO_THREADS = 16  # as many as the CPU engine's I/O pool


def measure(
    model: Path, direct_io: bool, prompt_tokens: int, decode_tokens: int, chunk: int | None
) -> dict[str, Any]:
    engine = fm.Engine(model, direct_io=direct_io, prefill_chunk=chunk)
    engine.prefill([0, 1, 2, 3])  # touch the non-expert weights once
    r = decode_benchmark(engine, prompt_tokens, decode_tokens)
    prefill, decode = r["prefill_stats"], r["decode_stats"]
    layers = r["layers"]
    return {
        "regime": "streaming (O_DIRECT)" if direct_io else "resident (page cache)",
        "device": r["device"],
        "layers": layers,
        "prefill_chunk": chunk,
        "prompt_tokens": prompt_tokens,
        "prefill_tok_s": r["prefill_tok_s"],
        "prefill_mb_per_token": prefill["prefill_expert_bytes_read"] / prompt_tokens / 1e6,
        "prefill_unique_experts_per_chunk_layer": prefill["prefill_experts_loaded"]
        / max(1, prefill["prefill_chunks"])
        / layers,
        "prefill_ms": {k: v / prompt_tokens for k, v in prefill["ms"].items()},
        "decode_tokens": decode_tokens,
        "decode_tok_s": r["decode_tok_s"],
        "decode_mb_per_token": decode["expert_bytes_read"] / decode_tokens / 1e6,
        "decode_ms": {k: v / decode_tokens for k, v in decode["ms"].items()},
        "prefill_over_decode": r["prefill_tok_s"] / r["decode_tok_s"],
    }


def add_io_floor(result: dict[str, Any], model: Path) -> None:
    """Disk bandwidth for random expert blocks with O_DIRECT, and decode against that floor."""
    experts = fmt.load_manifest(model, verify_weights=False)["experts"]
    stride = experts["block_stride"]
    gb_s = disk_read_bandwidth(
        model / fmt.EXPERTS_FILE, stride, stride, 256, IO_THREADS, direct=True, sequential=False
    )
    floor_ms = result["decode_mb_per_token"] / 1e3 / gb_s * 1e3
    result["disk_gb_s"] = gb_s
    result["decode_io_floor_ms"] = floor_ms
    result["decode_vs_io_floor"] = floor_ms / (1e3 / result["decode_tok_s"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("model", type=Path)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--decode", type=int, default=8)
    p.add_argument("--chunk", type=int, default=None, help="prefill chunk (default: engine's)")
    p.add_argument("--regimes", default="resident,streaming")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()
    results = []
    for regime in a.regimes.split(","):
        r = measure(a.model, regime == "streaming", a.prompt, a.decode, a.chunk)
        if regime == "streaming":
            add_io_floor(r, a.model)
        results.append(r)
        print(
            f"{r['regime']:22s} {r['device']}, {r['layers']} layers: prefill {r['prompt_tokens']} "
            f"tokens at {r['prefill_tok_s']:.2f} tok/s ({r['prefill_mb_per_token']:.1f} MB/token), "
            f"decode {r['decode_tok_s']:.2f} tok/s ({r['decode_mb_per_token']:.1f} MB/token): "
            f"prefill/decode = {r['prefill_over_decode']:.1f}x",
            flush=True,
        )
        if "disk_gb_s" in r:
            print(
                f"{'':22s} disk {r['disk_gb_s']:.2f} GB/s ({IO_THREADS} O_DIRECT readers): decode "
                f"I/O floor {r['decode_io_floor_ms']:.0f} ms/token, decode at "
                f"{100 * r['decode_vs_io_floor']:.0f}% of it",
                flush=True,
            )
    if a.json:
        a.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
