"""`flashmoe verify MODEL_DIR`: check the manifest, the data file checksums and every expert block.

Opening a model only hashes weights.bin; experts.bin is too large to hash on every start, so this
command is how a bad download or a failing disk is found, down to the (layer, expert) block.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from . import _core
from . import format as fmt
from .format import ModelFormatError
from .progress import Progress, format_bytes

READ_CHUNK = 8 << 20


def _hash_file(path: Path, size: int, bar: Progress) -> str:
    hasher = _core.Xxh64()
    buf = np.empty(READ_CHUNK, dtype=np.uint8)
    done = 0
    with open(path, "rb") as f:
        while done < size:
            got = f.readinto(memoryview(buf)[: min(READ_CHUNK, size - done)])
            if not got:
                raise ModelFormatError(f"{path}: file ends at byte {done}, expected {size}")
            hasher.update_array(buf[:got])
            done += got
            bar.advance(got)
    return fmt.hex64(hasher.digest())


def _check_experts(root: Path, experts: dict[str, Any], bar: Progress) -> tuple[str, list[str]]:
    """Hash experts.bin block by block -> (whole-file xxh64, problems naming each bad block)."""
    path = root / experts["file"]
    stride, n_experts = experts["block_stride"], experts["num_experts"]
    whole = _core.Xxh64()
    problems: list[str] = []
    block = np.empty(stride, dtype=np.uint8)
    with open(path, "rb") as f:
        for index, expected in enumerate(experts["xxh64"]):
            got = f.readinto(memoryview(block))
            if got != stride:
                raise ModelFormatError(f"{path}: file ends inside block {index}")
            whole.update_array(block)
            hasher = _core.Xxh64()
            hasher.update_array(block)
            actual = fmt.hex64(hasher.digest())
            if actual != expected:
                layer, expert = divmod(index, n_experts)
                problems.append(
                    f"{path}: layer {layer} expert {expert} is corrupted "
                    f"(block {index} at byte {index * stride}: xxh64 {actual}, "
                    f"manifest.json says {expected})"
                )
            bar.advance(stride)
    return fmt.hex64(whole.digest()), problems


def verify(model_dir: str | os.PathLike[str], *, progress: bool = True) -> list[str]:
    """Every problem found in a model directory, one message each (empty when it is sound)."""
    root = Path(model_dir)
    try:
        manifest = fmt.load_manifest(root, verify_weights=False)
    except ModelFormatError as e:
        return [str(e)]
    files = manifest["files"]
    experts = manifest["experts"]
    problems: list[str] = []
    with Progress(
        sum(f["size"] for f in files.values()), f"verify {root.name}", enabled=progress
    ) as bar:
        for name, entry in files.items():
            path = root / name
            try:
                if name == experts["file"]:
                    actual, block_problems = _check_experts(root, experts, bar)
                    problems.extend(block_problems)
                else:
                    actual = _hash_file(path, entry["size"], bar)
            except OSError as e:
                problems.append(f"{path}: cannot read: {e.strerror}")
                continue
            except ModelFormatError as e:
                problems.append(str(e))
                continue
            if actual != entry["xxh64"]:
                problems.append(
                    f"{path}: checksum mismatch (xxh64 {actual}, manifest.json says "
                    f"{entry['xxh64']}): the file is corrupted"
                )
    return problems


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", type=Path, help="model directory written by flashmoe convert")
    parser.add_argument("--quiet", action="store_true", help="no progress output")


def run(args: argparse.Namespace) -> int:
    problems = verify(args.model_dir, progress=not args.quiet)
    if problems:
        for problem in problems:
            print(f"flashmoe verify: {problem}", file=sys.stderr)
        print(
            f"flashmoe verify: {args.model_dir}: {len(problems)} problem(s) found", file=sys.stderr
        )
        return 1
    manifest = fmt.load_manifest(args.model_dir, verify_weights=False)
    experts = manifest["experts"]
    total = sum(f["size"] for f in manifest["files"].values())
    print(
        f"{args.model_dir}: OK ({len(manifest['tensors'])} tensors, "
        f"{experts['num_layers']} x {experts['num_experts']} expert blocks, "
        f"{format_bytes(total)} checked)"
    )
    return 0
