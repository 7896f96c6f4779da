"""`flashmoe perplexity`: how well a model predicts a text, and how far its token distributions
are from a reference run of the same text (say the same model at 16 bits and its full top-k).

The text is tokenized with the model directory's tokenizer.json and scored in independent windows
of `--window` tokens (the engine is reset between windows); within a window every token after the
first is predicted from the ones before it, one `step()` at a time, so every position's logits
are seen. With `--reference DIR` a second engine runs the same tokens in lockstep and the mean
KL(reference || model) of the next-token distributions is reported, with how often both pick the
same most likely token.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from .cli_options import add_model_arguments
from .engine import Engine
from .tokenizer import Tokenizer

DEFAULT_WINDOW = 1024


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    model: str
    experts_per_token: int
    tokens: int  # tokens of text scored (windows included whole)
    predictions: int  # positions with a predicted next token
    nll: float  # mean negative log-likelihood, nats per predicted token
    perplexity: float
    bits_per_byte: float  # total NLL over the UTF-8 bytes of the scored text, in bits
    reference: str | None = None
    kl: float | None = None  # mean KL(reference || model), nats
    top1_agreement: float | None = None  # share of positions where both argmaxes agree
    reference_nll: float | None = None
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max()
    return x - math.log(np.exp(x).sum())


def evaluate(
    engine: Engine,
    tokens: Sequence[int],
    *,
    window: int = DEFAULT_WINDOW,
    reference: Engine | None = None,
    text_bytes: int | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> PerplexityResult:
    """Score `tokens` with `engine` (and `reference` in lockstep); `text_bytes` is the UTF-8 size
    of the scored text, for bits per byte (omitted: the tokens' own count is used, bpb is 0)."""
    if window < 2:
        raise ValueError("window must be at least 2 tokens")
    window = min(window, engine.max_context)
    if reference is not None:
        if reference.vocab_size != engine.vocab_size:
            raise ValueError(
                f"reference vocabulary ({reference.vocab_size}) differs from the model's "
                f"({engine.vocab_size}): KL needs the same tokenizer"
            )
        window = min(window, reference.max_context)
    ids = [int(t) for t in tokens]
    if len(ids) < 2:
        raise ValueError("need at least 2 tokens to score")
    start = time.perf_counter()
    nll = ref_nll = kl = 0.0
    agree = predictions = 0
    for begin in range(0, len(ids), window):
        chunk = ids[begin : begin + window]
        engine.reset()
        if reference is not None:
            reference.reset()
        for i, token in enumerate(chunk[:-1]):
            logp = log_softmax(engine.step(token))
            target = chunk[i + 1]
            nll -= logp[target]
            if reference is not None:
                ref_logp = log_softmax(reference.step(token))
                ref_nll -= ref_logp[target]
                kl += float(np.dot(np.exp(ref_logp), ref_logp - logp))
                agree += int(np.argmax(ref_logp) == np.argmax(logp))
            predictions += 1
            if progress is not None:
                progress(begin + i + 2, len(ids), nll / predictions)
    mean = nll / predictions
    return PerplexityResult(
        model=str(engine.path),
        experts_per_token=engine.experts_per_token,
        tokens=len(ids),
        predictions=predictions,
        nll=mean,
        perplexity=math.exp(mean),
        bits_per_byte=nll / math.log(2) / text_bytes if text_bytes else 0.0,
        reference=None if reference is None else str(reference.path),
        kl=None if reference is None else kl / predictions,
        top1_agreement=None if reference is None else agree / predictions,
        reference_nll=None if reference is None else ref_nll / predictions,
        seconds=time.perf_counter() - start,
    )


def text_tokens(model_dir: str | Path, text: str, max_tokens: int | None) -> tuple[list[int], int]:
    """Token ids of `text` (the first max_tokens) and the UTF-8 size of the text they cover."""
    tokenizer = Tokenizer.from_dir(model_dir)
    ids = tokenizer.encode(text)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    covered = sum(len(tokenizer.token_bytes[i]) for i in ids)
    return ids, covered


class ProgressLine:
    """A line to stderr every few seconds: tokens done, running perplexity, ETA."""

    def __init__(self, out: TextIO = sys.stderr, every: float = 5.0) -> None:
        self.out, self.every = out, every
        self.start = self.last = time.perf_counter()

    def __call__(self, done: int, total: int, mean_nll: float) -> None:
        now = time.perf_counter()
        if now - self.last < self.every and done < total:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        eta = (total - done) / rate if rate > 0 else 0.0
        self.out.write(
            f"  {done}/{total} tokens  ppl {math.exp(mean_nll):.3f}  "
            f"{rate:.0f} tok/s  eta {eta:.0f} s\n"
        )
        self.out.flush()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--text", required=True, type=Path, help="UTF-8 text file to score")
    parser.add_argument(
        "--reference",
        help="model directory to compare with (same tokenizer), e.g. the 16-bit conversion; "
        "run with its own top-k. Without it the KL divergence is not computed",
    )
    parser.add_argument(
        "--window",
        type=int,
        default=DEFAULT_WINDOW,
        help=f"tokens per independent window (default {DEFAULT_WINDOW})",
    )
    parser.add_argument("--max-tokens", type=int, help="score only the first N tokens")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def run(args: argparse.Namespace) -> int:
    text = args.text.read_text(encoding="utf-8")
    ids, covered = text_tokens(args.model, text, args.max_tokens)
    engine = Engine(
        args.model,
        device=args.device,
        experts_per_token=args.experts_per_token,
        threads=args.threads,
        max_context=args.max_context,
    )
    reference = None
    if args.reference:
        reference = Engine(
            args.reference, device=args.device, threads=args.threads, max_context=args.max_context
        )
    print(
        f"flashmoe perplexity: {args.model} (top-{engine.experts_per_token}) on {args.text}: "
        f"{len(ids)} tokens, windows of {min(args.window, engine.max_context)}",
        file=sys.stderr,
    )
    result = evaluate(
        engine,
        ids,
        window=args.window,
        reference=reference,
        text_bytes=covered,
        progress=None if args.quiet else ProgressLine(),
    )
    print(f"tokens          {result.tokens} ({result.predictions} predicted)")
    print(f"perplexity      {result.perplexity:.4f}")
    print(f"nll             {result.nll:.5f} nats/token")
    print(f"bits per byte   {result.bits_per_byte:.4f}")
    if result.kl is None:
        print("kl              not computed (no --reference given)")
    else:
        print(f"reference       {result.reference}")
        print(f"reference ppl   {math.exp(result.reference_nll or 0.0):.4f}")
        print(f"kl              {result.kl:.6f} nats/token (reference || model)")
        print(f"top-1 agreement {100 * (result.top1_agreement or 0.0):.2f}%")
    print(f"time            {result.seconds:.1f} s")
    if args.json:
        args.json.write_text(json.dumps(result.to_json(), indent=1) + "\n")
    return 0
