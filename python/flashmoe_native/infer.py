"""`flashmoe infer`: generate from one prompt, streaming the text, then report speed and where
the time went."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .cli_options import add_model_arguments, add_sampling_arguments, open_engine, sampling_params
from .generate import ContentDelta, Finished, Generator, Usage

PHASES = (
    ("mixer", "mixer"),
    ("router", "router"),
    ("expert_io_wait", "expert I/O wait"),
    ("expert_compute", "expert compute"),
    ("lm_head", "lm_head"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--prompt", required=True, help="the user message (or raw text, --raw)")
    parser.add_argument("--tokens", type=int, default=128, help="most tokens to generate")
    parser.add_argument(
        "--raw", action="store_true", help="feed the prompt as is, no chat template"
    )
    parser.add_argument("--system", help="system message")
    parser.add_argument(
        "--no-think", action="store_true", help="ask the model to answer without reasoning first"
    )
    add_sampling_arguments(parser)


def _megabytes(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


def format_report(usage: Usage, reason: str) -> str:
    """Speed and per-phase breakdown, one fact per line."""
    prefilled = usage.prompt_tokens - usage.cached_prompt_tokens
    lines = [
        f"prompt      {usage.prompt_tokens} tokens ({prefilled} prefilled) in "
        f"{usage.prefill_seconds * 1e3:.1f} ms: {usage.prompt_tokens_per_second:.1f} tok/s",
        f"generation  {usage.completion_tokens} tokens in {usage.decode_seconds * 1e3:.1f} ms: "
        f"{usage.generation_tokens_per_second:.2f} tok/s (stopped: {reason})",
        f"time to first token  {usage.time_to_first_token * 1e3:.1f} ms",
    ]
    for label, stats in (("prefill", usage.prefill_stats), ("decode", usage.decode_stats)):
        tokens = stats.get("tokens", 0)
        if not tokens:
            continue
        ms: dict[str, Any] = stats.get("ms", {})
        per_token = ", ".join(f"{name} {ms.get(key, 0.0) / tokens:.3f} ms" for key, name in PHASES)
        lines.append(f"{label} per token  {per_token}")
        lines.append(
            f"{label} experts  {stats.get('experts_loaded', 0) / tokens:.1f} loaded and "
            f"{_megabytes(stats.get('expert_bytes_read', 0) / tokens)} read per token"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    engine = open_engine(args)
    generator = Generator(engine, args.model)
    if args.raw:
        prompt = generator.tokenizer.encode(args.prompt)
    else:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        messages.append({"role": "user", "content": args.prompt})
        prompt = generator.encode_chat(messages, enable_thinking=False if args.no_think else None)
    events = generator.generate(
        prompt,
        max_tokens=args.tokens,
        sampling=sampling_params(args, generator.defaults),
        stop=args.stop,
        parse=False,  # show exactly what the model wrote, reasoning tags included
    )
    for event in events:
        if isinstance(event, ContentDelta):
            sys.stdout.write(event.text)
            sys.stdout.flush()
        elif isinstance(event, Finished):
            sys.stdout.write("\n")
            sys.stdout.flush()
            print(format_report(event.usage, event.reason), file=sys.stderr)
    return 0
