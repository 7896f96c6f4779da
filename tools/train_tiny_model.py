#!/usr/bin/env python3
"""Train the bundled tiny Qwen3.5-MoE model on the Python standard library's source.

The model is transformers' own `Qwen3_5MoeForCausalLM` with the real architecture at toy size:
hybrid layers (Gated DeltaNet and gated full attention), 32 routed experts with top-4 plus the
gated shared expert, zero-centred norms, partial rotary. Every matrix in-dim is a multiple of 64 so
that a 4-bit conversion quantizes every projection. The tokenizer is a byte-level BPE trained
here with `tokenizers`, with Qwen's special tokens and chat template.

Corpus: every `.py` file of the running interpreter's standard library (its test suite included
when installed), minus generated codec tables. Files are split by a hash of their path: a `val`
set (loss curve, best-checkpoint selection) and a `test` set (written as `heldout.txt`, for
perplexity) never seen in training. A share of the training stream is the training files'
functions and classes wrapped as chat turns (user: the start of a definition or its docstring,
assistant: the definition), so that the chat template that `flashmoe infer` applies leads to code.

Training runs for a wall-clock budget (learning rate warmup and cosine decay on elapsed time),
then writes a Hugging Face checkpoint directory (bf16 safetensors shards, config, generation
config, tokenizer files, chat template, loss curve, held-out text).

    python3 tools/train_tiny_model.py --out /tmp/tiny-stdlib-moe \
        --chat-template models/tiny-stdlib-moe/chat_template.jinja --time-budget 330
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import random
import shutil
import sys
import sysconfig
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

CONTROL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXT_TOKENS = [
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
]
LIN, FULL = "linear_attention", "full_attention"


@dataclass
class Corpus:
    root: Path
    train: list[tuple[str, str]] = field(default_factory=list)  # (relative path, text)
    val: list[tuple[str, str]] = field(default_factory=list)
    test: list[tuple[str, str]] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        def part(files: list[tuple[str, str]]) -> dict[str, Any]:
            return {"files": len(files), "bytes": sum(len(t.encode()) for _, t in files)}

        return {
            "root": str(self.root),
            "python": sys.version.split()[0],
            "train": part(self.train),
            "val": part(self.val),
            "test": part(self.test) | {"paths": [p for p, _ in self.test]},
            "skipped": self.skipped,
        }


def _path_key(rel: str) -> str:
    return hashlib.sha256(rel.encode()).hexdigest()


def load_corpus(root: Path, val_bytes: int, test_bytes: int, limit_bytes: int | None) -> Corpus:
    """Read the stdlib's .py files and split them deterministically by a hash of their path."""
    corpus = Corpus(root)
    files: list[tuple[str, str]] = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if {"site-packages", "dist-packages", "__pycache__"} & set(path.parts):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            corpus.skipped["unreadable"] = corpus.skipped.get("unreadable", 0) + 1
            continue
        # Codec tables and pydoc's topic dump are generated data, not code.
        if "decoding_table = (" in text or len(text) > 400_000:
            corpus.skipped["generated"] = corpus.skipped.get("generated", 0) + 1
            continue
        if text.strip():
            files.append((rel, text))
    files.sort(key=lambda f: _path_key(f[0]))
    if limit_bytes is not None:  # small corpora for dry runs
        kept, total = [], 0
        for f in files:
            if total >= limit_bytes:
                break
            kept.append(f)
            total += len(f[1])
        files = kept
    # Held-out sets take whole files of ordinary size, in hash order (the same split for the
    # same stdlib on any machine).
    for rel, text in files:
        size = len(text.encode())
        if size <= 40_000 and sum(len(t.encode()) for _, t in corpus.test) < test_bytes:
            corpus.test.append((rel, text))
        elif size <= 40_000 and sum(len(t.encode()) for _, t in corpus.val) < val_bytes:
            corpus.val.append((rel, text))
        else:
            corpus.train.append((rel, text))
    return corpus


def chat_sample(user: str, code: str) -> str:
    """One user/assistant exchange exactly as the Qwen3.5 template renders it (no thinking)."""
    return (
        f"<|im_start|>user\n{user.strip()}<|im_end|>\n"
        f"<|im_start|>assistant\n<think>\n\n</think>\n\n{code.strip()}<|im_end|>\n"
    )


def check_chat_format(template_path: Path) -> None:
    """The hand-written chat samples must equal what the real template renders."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    template = env.from_string(template_path.read_text(encoding="utf-8"))
    messages = [
        {"role": "user", "content": "def "},
        {"role": "assistant", "content": "def f():\n    return 1\n"},
    ]
    rendered = template.render(messages=messages, add_generation_prompt=False)
    expected = chat_sample("def ", "def f():\n    return 1\n")
    if rendered != expected:
        raise SystemExit(f"chat samples differ from the template:\n{rendered!r}\n{expected!r}")
    prompt = template.render(messages=messages[:1], add_generation_prompt=True)
    if not expected.startswith(prompt):
        raise SystemExit(f"generation prompt {prompt!r} does not prefix the chat sample")


def definitions(text: str) -> Iterator[tuple[str, str | None]]:
    """(source, docstring's first line) of each top-level function and class and of each method
    (dedented)."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return
    lines = text.splitlines()

    def item(node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> tuple[str, str | None]:
        start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
        end = node.end_lineno or node.lineno
        doc = ast.get_docstring(node)
        summary = doc.strip().splitlines()[0] if doc and doc.strip() else None
        return textwrap.dedent("\n".join(lines[start:end])), summary

    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield item(node)
        if isinstance(node, ast.ClassDef):
            for sub in node.body:
                if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield item(sub)


def chat_samples(files: list[tuple[str, str]], target_bytes: int, seed: int) -> list[str]:
    """Definitions from the training files as chat turns, about target_bytes in all.

    Files are visited in random order and each definition is kept with probability 1/2, so only
    as many files are parsed as the target needs and the samples still spread over many files.
    """
    rng = random.Random(seed)
    order = list(range(len(files)))
    rng.shuffle(order)
    samples: list[str] = []
    total = 0
    for i in order:
        if total >= target_bytes:
            break
        for code, doc in definitions(files[i][1]):
            if not 80 <= len(code) <= 2500 or rng.random() < 0.5:
                continue
            first = next((ln for ln in code.splitlines() if not ln.startswith("@")), code)
            r = rng.random()
            if r < 0.3 and doc:
                user = doc
            elif r < 0.8:
                user = first[: rng.randint(3, max(3, len(first)))]  # "def", "def pa", ...
            else:
                user = first
            sample = chat_sample(user if user.strip() else first, code)
            samples.append(sample)
            total += len(sample)
    rng.shuffle(samples)
    return samples


def train_tokenizer(texts: list[str], vocab_size: int, sample_bytes: int, seed: int) -> Any:
    """Byte-level BPE; Qwen's control tokens (special) and tag tokens (plain text) at the end."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    n_added = len(CONTROL_TOKENS) + len(TEXT_TOKENS)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - n_added,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    rng = random.Random(seed)
    order = list(range(len(texts)))
    rng.shuffle(order)
    sample, total = [], 0
    for i in order:
        if total >= sample_bytes:
            break
        sample.append(texts[i])
        total += len(texts[i])
    tok.train_from_iterator(sample, trainer=trainer)
    if tok.get_vocab_size() != vocab_size - n_added:
        raise SystemExit(f"BPE reached only {tok.get_vocab_size()} tokens; corpus too small")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CONTROL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TEXT_TOKENS])
    if tok.get_vocab_size() != vocab_size:
        raise SystemExit(f"tokenizer has {tok.get_vocab_size()} tokens, wanted {vocab_size}")
    return tok


def model_config(args: argparse.Namespace, vocab_size: int, ids: dict[str, int]) -> Any:
    from transformers import Qwen3_5MoeTextConfig

    head_dim = 64
    partial = 0.25
    half = int(head_dim * partial) // 2
    mrope = [half - 2 * (half // 3), half // 3, half // 3]  # text-only: plain RoPE
    layer_types = [FULL if (i + 1) % args.full_every == 0 else LIN for i in range(args.layers)]
    return Qwen3_5MoeTextConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        layer_types=layer_types,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=head_dim,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=64,
        linear_value_head_dim=64,
        linear_conv_kernel_dim=4,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        moe_intermediate_size=args.moe_intermediate,
        shared_expert_intermediate_size=args.shared_intermediate,
        max_position_embeddings=args.max_positions,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        rope_parameters=dict(
            rope_type="default",
            rope_theta=10_000_000.0,
            partial_rotary_factor=partial,
            mrope_section=mrope,
            mrope_interleaved=True,
        ),
        router_aux_loss_coef=args.aux_loss,
        bos_token_id=None,
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )


def lr_at(frac: float, peak: float, warmup: float, floor: float) -> float:
    """Linear warmup then cosine decay to floor*peak, over the fraction of the time budget."""
    if frac < warmup:
        return peak * frac / warmup
    t = min(1.0, (frac - warmup) / (1.0 - warmup))
    return peak * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t)))


def windows(stream: torch.Tensor, length: int, limit: int) -> torch.Tensor:
    """Non-overlapping windows of `length` tokens (at most `limit`)."""
    n = min(limit, stream.numel() // length)
    return stream[: n * length].view(n, length)


@torch.no_grad()
def mean_loss(model: Any, batches: torch.Tensor, batch: int, autocast: Any) -> float:
    """Mean next-token cross entropy (nats) over windows [n, T+1]."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, batches.shape[0], batch):
        chunk = batches[i : i + batch]
        with autocast():
            logits = model(input_ids=chunk[:, :-1], output_router_logits=False).logits
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(loss)
        count += chunk[:, 1:].numel()
    model.train()
    return total / max(count, 1)


def train_loss(
    model: Any, x: torch.Tensor, aux_weight: float, autocast: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, cross entropy, router load-balancing loss) of windows x [B, T+1]: all T positions
    are predicted, which transformers' own shifted-labels loss would cut to T-1."""
    with autocast():
        out = model(input_ids=x[:, :-1], output_router_logits=True)
    ce = torch.nn.functional.cross_entropy(
        out.logits.float().reshape(-1, out.logits.shape[-1]), x[:, 1:].reshape(-1)
    )
    return ce + aux_weight * out.aux_loss, ce, out.aux_loss


def choose_experts_implementation(model: Any, sample: torch.Tensor, autocast: Any) -> str:
    """Pick the fastest experts implementation that runs a training step here."""
    timings: dict[str, float] = {}
    for impl in ("grouped_mm", "batched_mm", "eager"):
        try:
            if hasattr(model, "set_experts_implementation"):
                model.set_experts_implementation(impl)
            else:
                model.config._experts_implementation = impl
            for i in range(3):  # one warm-up, two timed
                if i == 1:
                    if sample.is_cuda:
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                loss, _, _ = train_loss(model, sample, 0.0, autocast)
                loss.backward()
                if not torch.isfinite(loss):
                    raise RuntimeError("loss not finite")
            if sample.is_cuda:
                torch.cuda.synchronize()
            timings[impl] = (time.perf_counter() - start) / 2
        except Exception as exc:  # an implementation this torch/GPU lacks: try the next
            print(f"experts implementation {impl}: unusable ({type(exc).__name__}: {exc})")
        model.zero_grad(set_to_none=True)
    if not timings:
        raise SystemExit("no experts implementation runs here")
    best = min(timings, key=timings.__getitem__)
    print("experts implementation step seconds:", {k: round(v, 4) for k, v in timings.items()})
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation(best)
    else:
        model.config._experts_implementation = best
    return best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    p.add_argument("--chat-template", type=Path, required=True, help="Qwen3.5 chat_template.jinja")
    p.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    p.add_argument("--time-budget", type=float, default=330.0, help="training seconds")
    p.add_argument("--max-steps", type=int, help="stop after this many steps (dry runs)")
    p.add_argument("--corpus-limit-mb", type=float, help="use only this much source (dry runs)")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--tokenizer-sample-mb", type=float, default=16.0)
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--full-every", type=int, default=3, help="every Nth layer is full attention")
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--moe-intermediate", type=int, default=64)
    p.add_argument("--shared-intermediate", type=int, default=192)
    p.add_argument("--max-positions", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--aux-loss", type=float, default=0.01, help="router load-balancing weight")
    p.add_argument("--chat-share", type=float, default=0.15, help="chat turns / training bytes")
    p.add_argument("--val-kb", type=int, default=200)
    p.add_argument("--test-kb", type=int, default=320)
    p.add_argument("--eval-every", type=float, default=20.0, help="seconds between evaluations")
    p.add_argument("--shard-mb", type=int, default=10, help="safetensors shard size")
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args()

    t0 = time.perf_counter()
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_chat_format(args.chat_template)

    limit = int(args.corpus_limit_mb * 1e6) if args.corpus_limit_mb else None
    corpus = load_corpus(args.stdlib.resolve(), args.val_kb * 1000, args.test_kb * 1000, limit)
    train_bytes = sum(len(t) for _, t in corpus.train)
    chats = chat_samples(corpus.train, int(train_bytes * args.chat_share), args.seed)
    print(
        f"corpus {corpus.root}: train {len(corpus.train)} files ({train_bytes / 1e6:.1f} MB), "
        f"val {len(corpus.val)}, test {len(corpus.test)}; {len(chats)} chat samples",
        flush=True,
    )

    t_tok = time.perf_counter()
    tok = train_tokenizer(
        [t for _, t in corpus.train], args.vocab, int(args.tokenizer_sample_mb * 1e6), args.seed
    )
    ids = {t: tok.token_to_id(t) for t in CONTROL_TOKENS + TEXT_TOKENS}
    eot = ids["<|endoftext|>"]
    docs = [t for _, t in corpus.train] + chats
    random.Random(args.seed).shuffle(docs)

    def stream(texts: list[str]) -> torch.Tensor:
        out: list[int] = []
        for enc in tok.encode_batch(texts, add_special_tokens=False):
            out.extend(enc.ids)
            out.append(eot)
        return torch.tensor(out, dtype=torch.long)

    train_ids = stream(docs)
    val_ids = stream([t for _, t in corpus.val])
    heldout_text = "\n\n".join(t.strip("\n") for _, t in corpus.test) + "\n"
    test_ids = torch.tensor(tok.encode(heldout_text, add_special_tokens=False).ids)
    tokenize_s = time.perf_counter() - t_tok
    print(
        f"tokenizer + encoding {tokenize_s:.1f} s: train {train_ids.numel():,} tokens "
        f"({train_bytes / train_ids.numel():.2f} bytes/token incl. chat), "
        f"val {val_ids.numel():,}, test {test_ids.numel():,}",
        flush=True,
    )

    from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen3_5MoeForCausalLM

    config = model_config(args, tok.get_vocab_size(), ids)
    model = Qwen3_5MoeForCausalLM(config).to(device)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    n_routed = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    active = n_params - n_routed + n_routed * args.top_k // args.experts
    print(f"model: {n_params / 1e6:.2f} M parameters, {active / 1e6:.2f} M active per token")

    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

        def autocast() -> Any:
            return torch.autocast("cuda", dtype=torch.bfloat16)
    else:

        def autocast() -> Any:
            return torch.autocast("cpu", enabled=False)

    train_dev = train_ids.to(device)
    seq = args.seq_len
    offsets = torch.arange(seq + 1, device=device)

    def batch_at(generator: torch.Generator) -> torch.Tensor:
        starts = torch.randint(
            0, train_dev.numel() - seq - 1, (args.batch,), generator=generator, device="cpu"
        )
        return train_dev[starts.to(device)[:, None] + offsets]

    g = torch.Generator().manual_seed(args.seed)
    impl = choose_experts_implementation(model, batch_at(g)[: max(1, args.batch // 4)], autocast)

    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": args.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
        fused=device.type == "cuda",
    )
    val_windows = windows(val_ids, seq + 1, 64).to(device)
    test_windows = windows(test_ids, seq + 1, 256).to(device)

    curve: list[dict[str, Any]] = []
    best_val, best_step, best_state = float("inf"), 0, None
    step, tokens = 0, 0
    recent_ce: list[torch.Tensor] = []
    recent_aux: list[torch.Tensor] = []
    start = time.perf_counter()
    next_eval = 0.0
    while True:
        elapsed = time.perf_counter() - start
        out_of_steps = args.max_steps is not None and step >= args.max_steps
        done = elapsed >= args.time_budget or out_of_steps
        if elapsed >= next_eval or done:
            val = mean_loss(model, val_windows, args.batch, autocast)
            ce = float(torch.stack(recent_ce).mean()) if recent_ce else float("nan")
            aux = float(torch.stack(recent_aux).mean()) if recent_aux else float("nan")
            recent_ce.clear()
            recent_aux.clear()
            point = {
                "step": step,
                "tokens": tokens,
                "seconds": round(elapsed, 1),
                "lr": opt.param_groups[0]["lr"],
                "train_loss": None if math.isnan(ce) else round(ce, 4),
                "router_aux_loss": None if math.isnan(aux) else round(aux, 4),
                "val_loss": round(val, 4),
            }
            curve.append(point)
            print(json.dumps(point), flush=True)
            if val < best_val:
                best_val, best_step = val, step
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            next_eval = elapsed + args.eval_every
        if done:
            break
        lr = lr_at(elapsed / args.time_budget, args.lr, 0.04, 0.1)
        for group in opt.param_groups:
            group["lr"] = lr
        x = batch_at(g)
        loss, ce_loss, aux_loss = train_loss(model, x, args.aux_loss, autocast)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        recent_ce.append(ce_loss.detach())
        recent_aux.append(aux_loss.detach())
        step += 1
        tokens += x[:, :-1].numel()
    train_s = time.perf_counter() - start

    assert best_state is not None
    model.load_state_dict(best_state)
    test_loss = mean_loss(model, test_windows, args.batch, autocast)
    print(
        f"trained {step} steps, {tokens:,} tokens in {train_s:.0f} s "
        f"({tokens / train_s:,.0f} tok/s); best val {best_val:.4f} at step {best_step}; "
        f"held-out test loss {test_loss:.4f} (ppl {math.exp(test_loss):.2f})",
        flush=True,
    )

    out_dir: Path = args.out
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    model.config.output_router_logits = False
    model.generation_config = GenerationConfig(
        eos_token_id=[ids["<|im_end|>"], eot],
        pad_token_id=eot,
        do_sample=True,
        temperature=0.7,
        top_k=20,
        top_p=0.95,
    )
    model.to(torch.bfloat16).save_pretrained(out_dir, max_shard_size=f"{args.shard_mb}MB")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=args.max_positions,
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(out_dir)
    shutil.copyfile(args.chat_template, out_dir / "chat_template.jinja")
    (out_dir / "heldout.txt").write_text(heldout_text, encoding="utf-8")
    record = {
        "recipe": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "corpus": corpus.describe(),
        "chat_samples": len(chats),
        "tokens": {
            "train": train_ids.numel(),
            "val": val_ids.numel(),
            "test": test_ids.numel(),
            "val_windows": int(val_windows.shape[0]),
            "test_windows": int(test_windows.shape[0]),
        },
        "model": {
            "parameters": n_params,
            "routed_expert_parameters": n_routed,
            "active_parameters": active,
            "layer_types": config.layer_types,
        },
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "software": {"torch": torch.__version__, "transformers": _version("transformers")},
        "experts_implementation": impl,
        "seconds": {
            "tokenizer_and_encoding": round(tokenize_s, 1),
            "training": round(train_s, 1),
            "total": round(time.perf_counter() - t0, 1),
        },
        "steps": step,
        "tokens_seen": tokens,
        "epochs": round(tokens / train_ids.numel(), 2),
        "best": {"step": best_step, "val_loss": round(best_val, 4)},
        "test_loss": round(test_loss, 4),
        "curve": curve,
    }
    (out_dir / "loss_curve.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out_dir} in {time.perf_counter() - t0:.0f} s total", flush=True)
    return 0


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    sys.exit(main())
