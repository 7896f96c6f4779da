"""`flashmoe serve`: an OpenAI-compatible HTTP server over one engine.

The HTTP stack (Starlette, uvicorn) is the optional `server` extra, imported only when the
server starts, so the other commands work without it.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys
from pathlib import Path

from .cli_options import add_model_arguments, open_engine

MB = 1 << 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: loopback only)"
    )
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every request")
    parser.add_argument(
        "--served-model-name",
        help="the model id clients name (default: the model directory's name)",
    )
    parser.add_argument(
        "--prompt-cache-mb",
        type=float,
        default=2048,
        help="memory for saved prompt states, so a prompt that extends an earlier one only "
        "prefills its new tokens (0 turns it off; default 2048)",
    )
    parser.add_argument(
        "--max-request-mb", type=float, default=32, help="largest request body accepted"
    )
    parser.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], default="info"
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from .openai_app import create_app
    except ImportError as exc:
        print(
            f"flashmoe serve needs the server extra ({exc.name} is missing): "
            "pip install 'flashmoe-native[server]'",
            file=sys.stderr,
        )
        return 2
    from .engine_worker import EngineWorker

    if args.prompt_cache_mb < 0 or args.max_request_mb <= 0:
        print("--prompt-cache-mb must be >= 0 and --max-request-mb > 0", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s: %(message)s")
    name = args.served_model_name or Path(args.model).resolve().name
    worker = EngineWorker(
        open_engine(args), args.model, prompt_cache_bytes=int(args.prompt_cache_mb * MB)
    )
    try:
        app = create_app(
            worker,
            model_name=name,
            api_key=args.api_key,
            max_request_bytes=int(args.max_request_mb * MB),
        )
        if not _is_loopback(args.host) and not args.api_key:
            print(
                f"warning: listening on {args.host} without --api-key: anyone who can reach "
                "this address can use the model",
                file=sys.stderr,
            )
        print(
            f"flashmoe serve: model '{name}' ({worker.engine.device}, context "
            f"{worker.engine.max_context}) at http://{args.host}:{args.port}/v1",
            file=sys.stderr,
            flush=True,
        )
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        worker.close()
    return 0
