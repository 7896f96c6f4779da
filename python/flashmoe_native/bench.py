"""`flashmoe bench MODEL_DIR`: decode tok/s and where the time goes, per token and per layer."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from .engine import Engine
from .format import EXPERTS_FILE

PHASES = ("mixer", "router", "expert_io_wait", "expert_compute", "lm_head")


def evict_from_page_cache(path: Path) -> None:
    """Drop a file's pages from the OS page cache (no root needed), for cold-cache runs."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def decode_benchmark(
    engine: Engine, prompt_tokens: int, decode_tokens: int, seed: int = 0
) -> dict[str, Any]:
    """Prefill a random prompt, then decode greedily; returns timings and engine counters."""
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, engine.vocab_size, prompt_tokens)
    engine.reset()
    engine.reset_stats()
    t0 = time.perf_counter()
    logits = engine.prefill(prompt)
    prefill_s = time.perf_counter() - t0
    prefill_stats = engine.stats()
    engine.reset_stats()
    t0 = time.perf_counter()
    for _ in range(decode_tokens):
        logits = engine.step(int(np.argmax(logits)))
    decode_s = time.perf_counter() - t0
    stats = engine.stats()
    return {
        "device": engine.device,
        "experts_per_token": engine.experts_per_token,
        "layers": engine.config["num_hidden_layers"],
        "prompt_tokens": prompt_tokens,
        "decode_tokens": decode_tokens,
        "prefill_s": prefill_s,
        "prefill_tok_s": prompt_tokens / prefill_s,
        "prefill_expert_bytes": prefill_stats["expert_bytes_read"],
        "prefill_stats": prefill_stats,
        "decode_s": decode_s,
        "decode_tok_s": decode_tokens / decode_s,
        "decode_stats": stats,
    }


def format_breakdown(stats: dict[str, Any], layers: int) -> str:
    """Per-token and per-layer milliseconds by phase, as the reference engine reported them."""
    tokens = max(1, int(stats["tokens"]))
    ms = stats["ms"]
    per_token = {p: ms[p] / tokens for p in PHASES}
    total = ms["total"] / tokens
    other = total - sum(per_token.values())
    lines = [f"  {'phase':16s} {'ms/token':>9s} {'ms/layer':>9s} {'share':>6s}"]
    for p in (*PHASES, "other"):
        v = other if p == "other" else per_token[p]
        per_layer = "" if p in ("lm_head", "other") else f"{v / layers:9.3f}"
        lines.append(f"  {p:16s} {v:9.2f} {per_layer:>9s} {100 * v / total:5.1f}%")
    lines.append(f"  {'total':16s} {total:9.2f} {total / layers:9.3f}")
    mb = stats["expert_bytes_read"] / tokens / 1e6
    lines.append(
        f"  experts read: {stats['experts_loaded'] / tokens:.1f} blocks/token, {mb:.1f} MB/token"
    )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, help="converted model directory")
    parser.add_argument("--tokens", type=int, default=32, help="tokens to decode (default 32)")
    parser.add_argument("--prompt-tokens", type=int, default=16, help="random prompt length")
    parser.add_argument("--experts-per-token", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument(
        "--cold", action="store_true", help="evict experts.bin from the page cache first"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write results here")


def run(args: argparse.Namespace) -> int:
    if args.tokens < 1 or args.prompt_tokens < 1:
        raise SystemExit("flashmoe bench: --tokens and --prompt-tokens must be at least 1")
    engine = Engine(
        args.model,
        device=args.device,
        experts_per_token=args.experts_per_token,
        threads=args.threads,
    )
    if args.cold:
        evict_from_page_cache(args.model / EXPERTS_FILE)
    result = decode_benchmark(engine, args.prompt_tokens, args.tokens)
    layers = result["layers"]
    print(f"model {args.model} on {result['device']}, K={result['experts_per_token']}")
    print(
        f"prefill: {result['prompt_tokens']} tokens at {result['prefill_tok_s']:.2f} tok/s; "
        f"decode: {result['decode_tokens']} tokens at {result['decode_tok_s']:.2f} tok/s"
    )
    print(format_breakdown(result["decode_stats"], layers))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0
