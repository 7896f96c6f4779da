"""CUDA backend benchmarks against the hardware's floors (issue 5), in one run.

On a Qwen3.5-35B-A3B-shaped synthetic model (all 40 layers, 256 experts, random 4-bit weights,
about 19 GB, bench/synthetic.py) this measures:
  (a) the ceilings: device memory copy bandwidth (read + written), pinned host-to-device copy
      bandwidth, and the disk's parallel read bandwidth for expert-sized random reads (cold cache);
  (b) decode tok/s with every expert resident on the GPU, against the floor
      bytes touched per token / device copy bandwidth;
  (c) decode tok/s streaming: device cache capped at 2 GB, the process in a cgroup v2 whose
      memory.max caps host RAM (page cache included) at 4 GB, against the I/O floor
      bytes missed per token / disk read bandwidth;
  (d) the per-layer time breakdown (mixer, router, expert I/O wait, expert compute), from runs
      with device-event profiling;
  and batched prefill of a 2,048-token prompt in both regimes (streaming: into the empty cache,
  in the same child process as that regime's decode), against that decode.
Writes cuda_bench.json and prints a short table. Needs root (drop_caches, cgroups) and a GPU.

  python bench/cuda_bench.py --work /tmp/fmbench --out results/
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from floors import disk_read_bandwidth, drop_caches  # noqa: E402
from synthetic import qwen35_35b_a3b, write_synthetic_model  # noqa: E402

import flashmoe_native as fm  # noqa: E402
from flashmoe_native import format as fmt  # noqa: E402
from flashmoe_native.bench import format_breakdown  # noqa: E402

CGROUP = Path("/sys/fs/cgroup/flashmoe-bench")


# (a) ceilings --------------------------------------------------------------------------------


def device_copy_bandwidth(gb: float = 4.0, reps: int = 20) -> dict[str, float]:
    """Device-to-device copy (bytes read + written per second) and pinned host-to-device copy."""
    import torch  # only here: the streaming child stays free of torch's memory

    n = int(gb * 1e9) // 4
    src = torch.randn(n, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    d2d = 2 * n * 4 / float(np.median(times)) / 1e9
    host = torch.randn(n // 4).pin_memory()
    dev = torch.empty(n // 4, device="cuda")
    dev.copy_(host, non_blocking=True)
    times = []
    for _ in range(reps // 2):
        start.record()
        dev.copy_(host, non_blocking=True)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    h2d = n * 4 / 4 / float(np.median(times)) / 1e9
    del src, dst, host, dev
    torch.cuda.empty_cache()
    return {"d2d_GBps": d2d, "h2d_pinned_GBps": h2d}


# (b)-(d) decode ------------------------------------------------------------------------------


def bytes_touched_per_token(manifest: dict[str, Any], k: int, context: int) -> dict[str, int]:
    """The fewest bytes a decode step reads or writes in device memory (the resident floor)."""
    c = manifest["config"]
    tensors = manifest["tensors"]
    embed = tensors["embed_tokens.weight"]
    rows, cols = embed["shape"]
    weights = sum(t["nbytes"] for t in tensors.values()) - embed["nbytes"] + embed["nbytes"] // rows
    layers = c["num_hidden_layers"]
    experts = layers * k * manifest["experts"]["block_bytes"]
    lin = sum(t == "linear_attention" for t in c["layer_types"])
    full = layers - lin
    ssm = c["linear_num_value_heads"] * c["linear_key_head_dim"] * c["linear_value_head_dim"] * 4
    kv_row = 2 * c["num_key_value_heads"] * c["head_dim"] * 4
    state = lin * 2 * ssm + full * context * kv_row
    return {
        "weights": weights,
        "experts": experts,
        "state": state,
        "total": weights + experts + state,
    }


def decode(engine: fm.Engine, prompt: int, tokens: int, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    engine.reset()
    logits = engine.prefill(rng.integers(0, engine.vocab_size, prompt))
    engine.reset_stats()
    # the engine's time per token is step()'s; the greedy choice between steps is the caller's
    # sampling (np.argmax over the vocabulary, about 0.05 ms) and is timed apart
    elapsed = sampling = 0.0
    for _ in range(tokens):
        t0 = time.perf_counter()
        token = int(np.argmax(logits))
        t1 = time.perf_counter()
        logits = engine.step(token)
        elapsed += time.perf_counter() - t1
        sampling += t1 - t0
    return {
        "tokens": tokens,
        "seconds": elapsed,
        "sampling_seconds": sampling,
        "tok_s": tokens / elapsed,
        "stats": engine.stats(),
    }


def prefill(engine: fm.Engine, tokens: int, seed: int = 3) -> dict[str, Any]:
    """One prompt of `tokens` random ids from position 0, timed end to end."""
    ids = np.random.default_rng(seed).integers(0, engine.vocab_size, tokens)
    engine.reset()
    engine.reset_stats()
    t0 = time.perf_counter()
    engine.prefill(ids)
    elapsed = time.perf_counter() - t0
    stats = engine.stats()
    return {"tokens": tokens, "seconds": elapsed, "tok_s": tokens / elapsed, "stats": stats}


def resident(model: Path, prompt: int, tokens: int, prefill_tokens: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    engine = fm.Engine(model, device="cuda", max_context=4096)
    load_s = time.perf_counter() - t0
    runs = [decode(engine, prompt, tokens, seed) for seed in range(3)]
    best = sorted(runs, key=lambda r: r["tok_s"])[1]  # the median of three
    prefill(engine, prefill_tokens)  # warm-up
    pre_runs = [prefill(engine, prefill_tokens, seed) for seed in range(3)]
    pre = sorted(pre_runs, key=lambda r: r["tok_s"])[1]
    del engine
    profiled = fm.Engine(model, device="cuda", max_context=4096, profile=True)
    prof = decode(profiled, prompt, max(8, tokens // 4))
    return {
        "device": profiled.device,
        "load_s": load_s,
        "decode": best,
        "tok_s_runs": [r["tok_s"] for r in runs],
        "prefill": pre,
        "profiled": prof,
    }


def streaming_child(args: argparse.Namespace) -> int:
    """Runs inside the cgroup: one streaming configuration, JSON on stdout."""
    engine = fm.Engine(
        args.model,
        device="cuda",
        max_context=4096,
        expert_cache_gb=args.cache_gb,
        direct_io=args.direct_io,
        profile=args.profile,
    )
    # a long prompt first, into the empty cache, as a session starts
    pre = prefill(engine, args.prefill) if args.prefill else None
    # a few tokens so that the cache holds what its policy would keep
    decode(engine, args.prompt, 8, seed=1)
    result = decode(engine, args.prompt, args.tokens, seed=2)
    result["device"] = engine.device
    result["prefill"] = pre
    print("RESULT " + json.dumps(result))
    return 0


def run_in_cgroup(argv: list[str], mem_max: int) -> dict[str, Any]:
    """argv in a child process confined to a cgroup v2 with memory.max = mem_max bytes."""
    root = Path("/sys/fs/cgroup")
    if not (root / "cgroup.controllers").is_file():
        raise RuntimeError("no cgroup v2 hierarchy at /sys/fs/cgroup")
    if "memory" not in (root / "cgroup.subtree_control").read_text().split():
        (root / "cgroup.subtree_control").write_text("+memory\n")
    CGROUP.mkdir(exist_ok=True)
    (CGROUP / "memory.max").write_text(f"{mem_max}\n")
    if (CGROUP / "memory.swap.max").exists():
        (CGROUP / "memory.swap.max").write_text("0\n")
    drop_caches()  # pages cached outside the cgroup would be free hits
    script = f'echo $$ > {CGROUP}/cgroup.procs && exec "$@"'
    proc = subprocess.run(["sh", "-c", script, "sh", *argv], capture_output=True, text=True)
    peak = (
        (CGROUP / "memory.peak").read_text().strip() if (CGROUP / "memory.peak").exists() else None
    )
    events = (CGROUP / "memory.events").read_text() if (CGROUP / "memory.events").exists() else ""
    CGROUP.rmdir()
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"streaming child failed ({proc.returncode}): {proc.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT ") :])
    result["cgroup_memory_peak"] = int(peak) if peak else None
    result["cgroup_memory_events"] = events
    return result


def streaming(
    model: Path, args: argparse.Namespace, direct_io: bool, profile: bool, tokens: int, prefill: int
) -> dict[str, Any]:
    argv = [
        sys.executable,
        __file__,
        "--streaming-child",
        "--model",
        str(model),
        "--cache-gb",
        str(args.cache_gb),
        "--prompt",
        str(args.prompt),
        "--tokens",
        str(tokens),
        "--prefill",
        str(prefill),
    ]
    if direct_io:
        argv.append("--direct-io")
    if profile:
        argv.append("--profile")
    return run_in_cgroup(argv, int(args.ram_gb * (1 << 30)))


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--work", type=Path, default=Path("/tmp/fmbench"), help="where the synthetic model goes"
    )
    p.add_argument("--out", type=Path, default=Path("."), help="where cuda_bench.json goes")
    p.add_argument("--layers", type=int, default=None, help="first N layers only (default all 40)")
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--tokens", type=int, default=64, help="tokens decoded per resident run")
    p.add_argument("--stream-tokens", type=int, default=24, help="tokens decoded per streaming run")
    p.add_argument("--prefill", type=int, default=2048, help="prompt tokens of the prefill runs")
    p.add_argument("--cache-gb", type=float, default=2.0, help="streaming: device expert cache")
    p.add_argument("--ram-gb", type=float, default=4.0, help="streaming: cgroup memory.max, GiB")
    p.add_argument(
        "--resident-only", action="store_true", help="skip the disk ceilings and streaming (c)"
    )
    p.add_argument("--streaming-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--direct-io", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.streaming_child:
        return streaming_child(args)

    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    model = write_synthetic_model(args.work / "qwen35-35b-a3b-q4", qwen35_35b_a3b(args.layers))
    out["generate_s"] = time.perf_counter() - t0
    manifest = fmt.load_manifest(model)
    c, ex = manifest["config"], manifest["experts"]
    layers, k = c["num_hidden_layers"], c["num_experts_per_tok"]
    out["model"] = {
        "layers": layers,
        "experts": c["num_experts"],
        "k": k,
        "block_bytes": ex["block_bytes"],
        "block_stride": ex["block_stride"],
        "experts_GB": layers * c["num_experts"] * ex["block_stride"] / 1e9,
        "weights_GB": manifest["files"]["weights.bin"]["size"] / 1e9,
    }
    print(f"model: {out['model']} (generated in {out['generate_s']:.0f} s)", flush=True)

    # (b) + (d) resident: first, while the new model is still in the page cache
    res = resident(model, args.prompt, args.tokens, args.prefill)
    # (a)
    out["ceilings"] = device_copy_bandwidth()
    experts = model / "experts.bin"
    disk = {}
    for sequential in () if args.resident_only else (False, True):
        for direct in (False, True):
            for threads in (8, 32):
                pattern = "seq" if sequential else "rand"
                name = f"{pattern}_{'direct' if direct else 'buffered'}_qd{threads}"
                disk[name] = disk_read_bandwidth(
                    experts, ex["block_stride"], ex["block_bytes"], 512, threads, direct, sequential
                )
    out["ceilings"]["disk_GBps"] = disk
    out["ceilings"]["disk_best_GBps"] = max(disk.values(), default=None)
    print(f"ceilings: {json.dumps(out['ceilings'])}", flush=True)

    floor = bytes_touched_per_token(manifest, k, args.prompt + args.tokens)
    floor_ms = floor["total"] / (out["ceilings"]["d2d_GBps"] * 1e9) * 1e3
    res["floor_bytes"] = floor
    res["floor_ms"] = floor_ms
    res["ms_per_token"] = 1e3 / res["decode"]["tok_s"]
    res["fraction_of_floor"] = floor_ms / res["ms_per_token"]
    prof = res["profiled"]["stats"]
    lm = manifest["tensors"]["lm_head.weight"]["nbytes"]
    res["lm_head_GBps"] = lm / (prof["ms"]["lm_head"] / prof["tokens"] / 1e3) / 1e9
    res["gpu_busy_ms_per_token"] = (
        sum(prof["ms"][p] for p in ("mixer", "router", "expert_compute", "lm_head"))
        / prof["tokens"]
    )
    out["resident"] = res
    print(
        f"resident: {res['decode']['tok_s']:.1f} tok/s, floor {floor_ms:.3f} ms/token "
        f"({floor['total'] / 1e9:.3f} GB) -> {100 * res['fraction_of_floor']:.1f}% of floor",
        flush=True,
    )

    # (c) + (d) streaming, in the cgroup
    out["streaming"] = {}
    for direct in () if args.resident_only else (True, False):
        name = "direct" if direct else "buffered"
        try:
            run = streaming(model, args, direct, False, args.stream_tokens, args.prefill)
            prof_run = streaming(model, args, direct, True, max(8, args.stream_tokens // 2), 0)
        except Exception as e:  # reported, not hidden: the table says this regime failed
            out["streaming"][name] = {"error": str(e)}
            print(f"streaming {name}: FAILED {e}", flush=True)
            continue
        s = run["stats"]
        tokens = s["tokens"]
        missed = s["expert_bytes_read"] / tokens
        disk_bw = out["ceilings"]["disk_best_GBps"] * 1e9
        io_floor_ms = missed / disk_bw * 1e3
        ms = 1e3 / run["tok_s"]
        run.update(
            {
                "profiled": prof_run,
                "mb_missed_per_token": missed / 1e6,
                "io_floor_ms": io_floor_ms,
                "ms_per_token": ms,
                "fraction_of_io_floor": io_floor_ms / ms,
                "hit_rate": s["expert_cache_hits"]
                / max(1, s["expert_cache_hits"] + s["expert_cache_misses"]),
                "achieved_read_GBps": s["expert_bytes_read"] / (s["ms"]["total"] / 1e3) / 1e9,
            }
        )
        if run["prefill"]:
            pre = run["prefill"]
            run["prefill_over_decode"] = pre["tok_s"] / run["tok_s"]
            pre["read_GB"] = pre["stats"]["prefill_expert_bytes_read"] / 1e9
            pre["read_GBps"] = pre["read_GB"] / pre["seconds"]
            print(
                f"streaming {name} prefill: {pre['tok_s']:.1f} tok/s ({pre['tokens']} tokens, "
                f"{pre['read_GB']:.1f} GB read at {pre['read_GBps']:.2f} GB/s) "
                f"= {run['prefill_over_decode']:.1f}x decode",
                flush=True,
            )
        out["streaming"][name] = run
        print(
            f"streaming {name}: {run['tok_s']:.2f} tok/s, {missed / 1e6:.0f} MB missed/token, "
            f"I/O floor {io_floor_ms:.0f} ms -> {100 * run['fraction_of_io_floor']:.0f}% of floor",
            flush=True,
        )

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cuda_bench.json").write_text(json.dumps(out, indent=1) + "\n")
    print_table(out, layers)
    return 0


def print_table(out: dict[str, Any], layers: int) -> None:
    ce, r = out["ceilings"], out["resident"]
    disk = ", ".join(f"{k} {v:.2f}" for k, v in ce["disk_GBps"].items())
    fb = r["floor_bytes"]["total"] / 1e9
    print("\n== (a) ceilings")
    print(f"  device copy {ce['d2d_GBps']:.0f} GB/s (read+write)")
    print(f"  pinned host-to-device copy {ce['h2d_pinned_GBps']:.1f} GB/s")
    print(f"  disk, random expert blocks: {disk} GB/s")
    print("\n== (b) resident (all experts on the GPU)")
    print(f"  {r['decode']['tok_s']:.1f} tok/s = {r['ms_per_token']:.3f} ms/token")
    print(f"  floor {r['floor_ms']:.3f} ms/token ({fb:.3f} GB touched per token)")
    print(f"  -> {100 * r['fraction_of_floor']:.1f}% of the floor")
    print(f"  profiled (no graph): {r['profiled']['tok_s']:.1f} tok/s")
    print(f"  GPU busy {r['gpu_busy_ms_per_token']:.3f} ms/token")
    print(f"  lm_head kernel {r['lm_head_GBps']:.0f} GB/s")
    rp = r["prefill"]
    print(f"  prefill {rp['tokens']} tokens: {rp['tok_s']:.0f} tok/s ({rp['seconds']:.2f} s)")
    print("\n== (c) streaming (2 GB device cache, 4 GiB host RAM cgroup)")
    for name, s in out["streaming"].items():
        if "error" in s:
            print(f"  {name}: FAILED: {s['error'][:300]}")
            continue
        peak = (s["cgroup_memory_peak"] or 0) / 2**30
        print(f"  {name}: {s['tok_s']:.2f} tok/s = {s['ms_per_token']:.0f} ms/token")
        print(f"    hit rate {100 * s['hit_rate']:.0f}%")
        print(f"    {s['mb_missed_per_token']:.0f} MB missed per token")
        print(f"    I/O floor {s['io_floor_ms']:.0f} ms at {ce['disk_best_GBps']:.2f} GB/s")
        print(f"    -> {100 * s['fraction_of_io_floor']:.0f}% of the I/O floor")
        print(f"    reads {s['achieved_read_GBps']:.2f} GB/s; cgroup memory peak {peak:.2f} GiB")
        if s.get("prefill"):
            p = s["prefill"]
            print(
                f"    prefill {p['tokens']} tokens: {p['tok_s']:.1f} tok/s ({p['seconds']:.1f} s, "
                f"{p['read_GB']:.1f} GB read at {p['read_GBps']:.2f} GB/s)"
                f" = {s['prefill_over_decode']:.1f}x decode"
            )
    print("\n== (d) per-layer breakdown (device-event profiling)")
    print(" resident:")
    print(format_breakdown(r["profiled"]["stats"], layers))
    for name, s in out["streaming"].items():
        if "error" not in s:
            print(f" streaming {name}:")
            print(format_breakdown(s["profiled"]["stats"], layers))


if __name__ == "__main__":
    sys.exit(main())
