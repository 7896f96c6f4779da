#!/usr/bin/env python3
"""Measure the bundled model and write docs/quality.md.

- Perplexity of the held-out text (models/tiny-stdlib-moe/heldout.txt, files never trained on)
  at 16, 8 and 4 bits with the model's top-k, and at 4 bits with k = top-k, top-k - 1, ..., 1;
  each with the mean KL divergence of its next-token distributions from the 16-bit, full-top-k
  run of the same tokens (flashmoe_native.perplexity, the engine stepping every token).
  transformers' own forward on the bf16 checkpoint is scored on the same windows as a check.
- Expert routing over 1,000 held-out tokens, what an expert cache sees: distinct experts per
  layer, overlap between consecutive tokens' expert sets, the share of selections that go to
  the 8 most used experts, and the hit rate of an LRU cache of 8/16/32 experts per layer. The
  routing comes from forward hooks on the routers of transformers' model (the engine does not
  report expert ids), loaded from the bf16 checkpoint.

    python3 tools/quality_report.py            # needs torch and transformers (test extras)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "python"))

from flashmoe_native import Engine, default_model_path  # noqa: E402
from flashmoe_native.cache_sim import lru_hit_rate  # noqa: E402
from flashmoe_native.convert import convert  # noqa: E402
from flashmoe_native.perplexity import PerplexityResult, evaluate, text_tokens  # noqa: E402

SOURCE = REPO / "models" / "tiny-stdlib-moe"


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def transformers_nll(tokens: list[int], window: int) -> float:
    """Mean NLL of transformers' Qwen3_5MoeForCausalLM (fp32 compute) over the same windows."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(SOURCE, dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for begin in range(0, len(tokens), window):
            chunk = torch.tensor([tokens[begin : begin + window]])
            if chunk.shape[1] < 2:
                continue
            logp = torch.log_softmax(model(chunk).logits[0].double(), dim=-1)
            targets = chunk[0, 1:]
            total -= float(logp[torch.arange(targets.numel()), targets].sum())
            count += targets.numel()
    return total / count


def routing(tokens: list[int]) -> list[np.ndarray]:
    """Per layer, the [tokens, k] expert ids transformers' routers pick for one sequence."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(SOURCE, dtype=torch.float32).eval()
    picks: dict[int, np.ndarray] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):

        def keep(_module: Any, _inputs: Any, output: Any, i: int = i) -> None:
            picks[i] = output[2].reshape(len(tokens), -1).numpy().copy()  # (logits, w, ids)

        hooks.append(layer.mlp.gate.register_forward_hook(keep))
    with torch.no_grad():
        model(torch.tensor([tokens]))
    for h in hooks:
        h.remove()
    return [picks[i] for i in range(len(model.model.layers))]


def routing_stats(per_layer: list[np.ndarray], slots: tuple[int, ...]) -> list[dict[str, Any]]:
    rows = []
    for layer, ids in enumerate(per_layer):
        k = ids.shape[1]
        sets = [set(r.tolist()) for r in ids]
        overlap = np.mean([len(a & b) / k for a, b in zip(sets, sets[1:], strict=False)])
        counts = Counter(ids.ravel().tolist())
        top8 = sum(c for _, c in counts.most_common(8)) / ids.size
        rows.append(
            {
                "layer": layer,
                "distinct": len(counts),
                "overlap": float(overlap),
                "top8_share": top8,
                "lru": {s: lru_hit_rate(ids.tolist(), s) for s in slots},
            }
        )
    return rows


def fmt_kl(r: PerplexityResult) -> str:
    return "0 (reference)" if r.kl is None else f"{r.kl:.4f}"


def fmt_agree(r: PerplexityResult) -> str:
    return "100%" if r.top1_agreement is None else f"{100 * r.top1_agreement:.1f}%"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=8192, help="held-out tokens to score")
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--routing-tokens", type=int, default=1000)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=REPO / "docs" / "quality.md")
    p.add_argument("--json", type=Path, help="also write every number to this JSON file")
    args = p.parse_args()

    curve = json.loads((SOURCE / "loss_curve.json").read_text())
    config = json.loads((SOURCE / "config.json").read_text())
    top_k = int(config["num_experts_per_tok"])
    text = (SOURCE / "heldout.txt").read_text(encoding="utf-8")
    bundled = default_model_path()
    tokens, covered = text_tokens(bundled, text, args.tokens)
    start = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        dirs = {4: bundled}
        for bits in (16, 8):
            dirs[bits] = Path(tmp) / f"q{bits}"
            convert(SOURCE, dirs[bits], bits, progress=False)
        sizes = {bits: dir_bytes(d) for bits, d in dirs.items()}

        def engine(bits: int, k: int | None = None) -> Engine:
            return Engine(dirs[bits], experts_per_token=k, threads=args.threads)

        reference = engine(16)

        def score(bits: int, k: int | None = None, ref: bool = True) -> PerplexityResult:
            r = evaluate(
                engine(bits, k),
                tokens,
                window=args.window,
                reference=reference if ref else None,
                text_bytes=covered,
            )
            print(f"{bits}-bit k={r.experts_per_token}: ppl {r.perplexity:.3f} kl {r.kl}")
            return r

        by_bits = {16: score(16, ref=False), 8: score(8), 4: score(4)}
        by_k = {top_k: by_bits[4]}
        for k in range(top_k - 1, 0, -1):
            by_k[k] = score(4, k)
    hf_nll = transformers_nll(tokens, min(args.window, reference.max_context))
    per_layer = routing(tokens[: args.routing_tokens])
    slots = (8, 16, 32)
    stats = routing_stats(per_layer, slots)
    elapsed = time.perf_counter() - start

    md = render(args, curve, config, sizes, tokens, covered, by_bits, by_k, hf_nll, stats, slots)
    args.out.write_text(md)
    print(f"wrote {args.out} in {elapsed:.0f} s")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "by_bits": {b: r.to_json() for b, r in by_bits.items()},
                    "by_k": {k: r.to_json() for k, r in by_k.items()},
                    "transformers_nll": hf_nll,
                    "routing": stats,
                    "sizes": sizes,
                },
                indent=1,
            )
        )
    return 0


def render(
    args: argparse.Namespace,
    curve: dict[str, Any],
    config: dict[str, Any],
    sizes: dict[int, int],
    tokens: list[int],
    covered: int,
    by_bits: dict[int, PerplexityResult],
    by_k: dict[int, PerplexityResult],
    hf_nll: float,
    stats: list[dict[str, Any]],
    slots: tuple[int, ...],
) -> str:
    top_k = int(config["num_experts_per_tok"])
    n_exp = int(config["num_experts"])
    recipe = curve["recipe"]
    model = curve["model"]
    corpus = curve["corpus"]
    windows = math.ceil(len(tokens) / args.window)
    routed = min(args.routing_tokens, len(tokens))
    mixers = ", ".join(
        "DeltaNet" if t == "linear_attention" else "attention" for t in config["layer_types"]
    )
    lines = [
        "# Quality of the bundled model",
        "",
        "Generated by `tools/quality_report.py` (re-run it after retraining or after changing a "
        "kernel); every number below is measured, none is copied by hand.",
        "",
        "## The model",
        "",
        f"`tiny-stdlib-moe`: transformers' `Qwen3_5MoeForCausalLM`, "
        f"{model['parameters'] / 1e6:.2f} M parameters ({model['active_parameters'] / 1e6:.2f} M "
        f"active per token), hidden {config['hidden_size']}, {config['num_hidden_layers']} layers "
        f"({mixers}), {n_exp} routed experts of intermediate {config['moe_intermediate_size']} "
        f"with top-{top_k} plus a gated shared expert of "
        f"{config['shared_expert_intermediate_size']}, vocabulary {config['vocab_size']} "
        "(byte-level BPE trained on the corpus, Qwen's special tokens and "
        "chat template). Recipe: `tools/train_tiny_model.py`; checkpoint (bf16) and tokenizer in "
        "`models/tiny-stdlib-moe/`, its 4-bit conversion shipped as "
        "`python/flashmoe_native/models/tiny-stdlib-moe-q4/` (the default model).",
        "",
        f"Corpus: the `.py` files of `{corpus['root']}` (Python {corpus['python']}), "
        f"{corpus['train']['files']} training files ({corpus['train']['bytes'] / 1e6:.1f} MB, "
        f"{curve['tokens']['train']:,} tokens with {curve['chat_samples']:,} chat-formatted "
        f"definitions), {corpus['val']['files']} validation files and {corpus['test']['files']} "
        f"test files ({corpus['test']['bytes'] / 1e3:.0f} KB, `heldout.txt`) split off by a hash "
        "of their path. "
        f"Training: {curve['steps']} steps of {recipe['batch']} x {recipe['seq_len']} tokens "
        f"({curve['tokens_seen'] / 1e6:.1f} M tokens, {curve['epochs']} epochs) in "
        f"{curve['seconds']['training']:.0f} s on one {curve['device']} (torch "
        f"{curve['software']['torch']}, transformers {curve['software']['transformers']}), AdamW "
        f"peak lr {recipe['lr']}, cosine over the time budget; the checkpoint kept is the one "
        f"with the best validation loss (step {curve['best']['step']}).",
        "",
        "Loss curve (nats/token; `loss_curve.json` has every point):",
        "",
        "| step | tokens | seconds | train loss | validation loss |",
        "|---:|---:|---:|---:|---:|",
    ]
    points = curve["curve"]
    shown = points[:: max(1, len(points) // 8)]
    if shown[-1] is not points[-1]:
        shown.append(points[-1])
    for pt in shown:
        train = "–" if pt["train_loss"] is None else f"{pt['train_loss']:.3f}"
        lines.append(
            f"| {pt['step']} | {pt['tokens'] / 1e6:.1f} M | {pt['seconds']:.0f} | {train} | "
            f"{pt['val_loss']:.3f} |"
        )
    lines += [
        "",
        f"Validation loss bottoms out at {curve['best']['val_loss']:.3f} (step "
        f"{curve['best']['step']}) and rises after, while training loss keeps falling: at "
        f"{curve['epochs']} epochs over a {corpus['train']['bytes'] / 1e6:.0f} MB corpus the model "
        "overfits, which is why the best-validation checkpoint is the one kept. Test loss of "
        f"that checkpoint in training (bf16 autocast): {curve['test_loss']:.3f} "
        f"(perplexity {math.exp(curve['test_loss']):.2f}).",
        "",
        "## Perplexity and divergence",
        "",
        f"Held-out text: the first {len(tokens):,} tokens ({covered / 1e3:.0f} KB) of "
        f"`models/tiny-stdlib-moe/heldout.txt`, scored in {windows} independent windows of "
        f"{args.window} tokens by `flashmoe perplexity` (one `step()` per token, CPU engine). "
        f"KL is the mean KL(reference ‖ run) of the next-token distributions, the reference "
        f"being the 16-bit conversion at top-{top_k}; agreement is how often both rank the same "
        "token first.",
        "",
        "| weights | experts/token | size on disk | perplexity | vs 16-bit | bits/byte | KL (nats) "
        "| top-1 agreement |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = by_bits[16].perplexity

    def row(bits: int, r: PerplexityResult) -> str:
        return (
            f"| {bits}-bit | {r.experts_per_token} | {sizes[bits] / 1e6:.1f} MB | "
            f"{r.perplexity:.3f} | {100 * (r.perplexity / base - 1):+.2f}% | "
            f"{r.bits_per_byte:.4f} | {fmt_kl(r)} | {fmt_agree(r)} |"
        )

    for bits in (16, 8, 4):
        lines.append(row(bits, by_bits[bits]))
    for k in sorted(by_k, reverse=True):
        if k != top_k:
            lines.append(row(4, by_k[k]))
    lines += [
        "",
        f"Check: transformers' forward (fp32 compute on the bf16 checkpoint) over the same "
        f"windows gives perplexity {math.exp(hf_nll):.3f}; the 16-bit engine gives "
        f"{base:.3f}.",
        "",
        f"## Expert routing over {routed:,} tokens",
        "",
        f"The first {routed:,} held-out tokens as one sequence; routing from forward "
        "hooks on the routers of transformers' model on the bf16 checkpoint (the engine does not "
        f"report expert ids). Each token picks {top_k} of {n_exp} experts per layer. Overlap: "
        "the mean share of a token's experts that the previous token also used. Top-8 share: "
        "the share of all selections going to the layer's 8 most used experts (static skew). "
        "LRU: hit rate of a least-recently-used cache of that many experts per layer, starting "
        f"empty (so {n_exp} slots only miss each expert's first use).",
        "",
        "| layer | mixer | distinct experts | overlap | top-8 share | "
        + " | ".join(f"LRU {s}" for s in slots)
        + " |",
        "|---:|---|---:|---:|---:|" + "---:|" * len(slots),
    ]
    for s in stats:
        mixer = "DeltaNet" if config["layer_types"][s["layer"]] == "linear_attention" else "attn"
        lines.append(
            f"| {s['layer']} | {mixer} | {s['distinct']} | {100 * s['overlap']:.1f}% | "
            f"{100 * s['top8_share']:.1f}% | "
            + " | ".join(f"{100 * s['lru'][n]:.1f}%" for n in slots)
            + " |"
        )
    mean = {
        "distinct": np.mean([s["distinct"] for s in stats]),
        "overlap": np.mean([s["overlap"] for s in stats]),
        "top8": np.mean([s["top8_share"] for s in stats]),
        "lru": {n: np.mean([s["lru"][n] for s in stats]) for n in slots},
    }
    lines.append(
        f"| mean | | {mean['distinct']:.1f} | {100 * mean['overlap']:.1f}% | "
        f"{100 * mean['top8']:.1f}% | "
        + " | ".join(f"{100 * mean['lru'][n]:.1f}%" for n in slots)
        + " |"
    )
    uniform = {n: n / n_exp for n in slots}
    lines += [
        "",
        f"For scale: with no locality at all (experts drawn uniformly), an LRU of n slots would "
        f"hit about n/{n_exp} of lookups ("
        + ", ".join(f"{100 * uniform[n]:.0f}% at {n}" for n in slots)
        + "); consecutive tokens sharing experts by chance would overlap "
        f"{100 * top_k / n_exp:.1f}%.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
