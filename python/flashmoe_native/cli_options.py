"""Command-line options that `flashmoe infer` and `flashmoe chat` share: model, engine, sampling."""

from __future__ import annotations

import argparse

from .bundled import default_model_path
from .engine import Engine
from .sampling import SamplingParams


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=str(default_model_path()),
        help="model directory written by flashmoe convert (default: the bundled tiny model)",
    )
    parser.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: cuda if usable"
    )
    parser.add_argument(
        "--experts-per-token",
        type=int,
        help="routed experts per token (default: the model's; fewer reads less, at some quality)",
    )
    parser.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    parser.add_argument("--max-context", type=int, help="context length to allocate, in tokens")


def open_engine(args: argparse.Namespace) -> Engine:
    return Engine(
        args.model,
        device=args.device,
        experts_per_token=args.experts_per_token,
        threads=args.threads,
        max_context=args.max_context,
    )


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling (defaults: the model's generation_config.json)")
    group.add_argument("--temperature", type=float, help="0 picks the most likely token")
    group.add_argument("--top-k", type=int)
    group.add_argument("--top-p", type=float)
    group.add_argument("--min-p", type=float)
    group.add_argument("--repetition-penalty", type=float)
    group.add_argument("--presence-penalty", type=float)
    group.add_argument("--seed", type=int, help="makes sampling reproducible")
    group.add_argument(
        "--stop", action="append", default=[], help="stop at this text (may be repeated)"
    )


def sampling_params(args: argparse.Namespace, defaults: SamplingParams) -> SamplingParams:
    return defaults.with_overrides(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        seed=args.seed,
    )
