"""`flashmoe` command line: one subcommand per module, each exposing add_arguments() and run()."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "convert": (
        "flashmoe_native.convert",
        "convert a Hugging Face checkpoint to a model directory",
    ),
    "verify": ("flashmoe_native.verify", "check every file and expert block of a model directory"),
    "bench": ("flashmoe_native.bench", "measure decode tok/s and where the time goes"),
    "infer": ("flashmoe_native.infer", "generate from one prompt, then report speed"),
    "chat": ("flashmoe_native.chat", "talk with a model in the terminal"),
    "serve": ("flashmoe_native.server", "serve a model over an OpenAI-compatible HTTP API"),
    "perplexity": (
        "flashmoe_native.perplexity",
        "perplexity of a text, and KL divergence against a reference model",
    ),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flashmoe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    args = parser.parse_args(argv)
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
