"""The Python face of the native engine: opens a model directory and runs tokens."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import _core
from .bundled import default_model_path
from .format import load_manifest

ContextLimitError = _core.ContextLimitError
EngineState = _core.EngineState


def _positive_or_none(name: str, value: int | None) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def cuda_available() -> bool:
    return not _core.cuda_unavailable_reason()


def resolve_device(device: str) -> str:
    """'cpu', 'cuda' (an error naming the reason when no GPU can be used) or 'auto'."""
    if device == "auto":
        return "cuda" if cuda_available() else "cpu"
    if device == "cuda" and not cuda_available():
        raise RuntimeError(f"device='cuda' is not available: {_core.cuda_unavailable_reason()}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'auto', not {device!r}")
    return device


class Engine:
    """A model directory opened for inference: one sequence, advanced a token at a time.

    `path` defaults to the bundled model (bundled.default_model_path()). Non-expert weights are
    memory-mapped; the routed experts of every layer are read from experts.bin on demand.
    Sampling is the caller's: `step` returns raw float32 logits.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        device: str = "cpu",
        experts_per_token: int | None = None,
        threads: int | None = None,
        max_context: int | None = None,
        direct_io: bool = False,
        prefill_chunk: int | None = None,
        expert_cache_gb: float | None = None,
        profile: bool = False,
    ) -> None:
        """expert_cache_gb (CUDA): GPU memory for cached expert blocks, in GB; None takes what
        fits after the weights and state (every expert when the model fits, else a cache that evicts
        the least frequently used expert).
        profile (CUDA): time each phase with device events, for stats()["ms"]; slower. The CPU
        engine always times its phases."""
        self.path = Path(path) if path is not None else default_model_path()
        self.manifest: dict[str, Any] = load_manifest(self.path)
        resolved = resolve_device(device)
        cache_gb = 0.0
        if expert_cache_gb is not None:
            if resolved != "cuda":
                raise ValueError("expert_cache_gb applies to device='cuda' only")
            gb = expert_cache_gb
            if isinstance(gb, bool) or not isinstance(gb, (int, float)) or not gb > 0:
                raise ValueError(f"expert_cache_gb must be a positive number, not {gb!r}")
            cache_gb = float(gb)
        self._native = _core.Engine(
            str(self.path),
            self.manifest,
            device=resolved,
            experts_per_token=_positive_or_none("experts_per_token", experts_per_token),
            threads=_positive_or_none("threads", threads),
            max_context=_positive_or_none("max_context", max_context),
            direct_io=bool(direct_io),
            prefill_chunk=_positive_or_none("prefill_chunk", prefill_chunk),
            expert_cache_gb=cache_gb,
            profile=bool(profile),
        )

    @property
    def config(self) -> dict[str, Any]:
        return self.manifest["config"]

    @property
    def vocab_size(self) -> int:
        return int(self.config["vocab_size"])

    @property
    def position(self) -> int:
        """Number of tokens in the sequence so far."""
        return self._native.position

    @property
    def max_context(self) -> int:
        return self._native.max_context

    @property
    def experts_per_token(self) -> int:
        return self._native.experts_per_token

    @property
    def device(self) -> str:
        return self._native.describe()

    def step(self, token: int) -> np.ndarray:
        """Run one token; returns float32 logits over the vocabulary."""
        if isinstance(token, bool) or not isinstance(token, (int, np.integer)):
            raise TypeError(f"token must be an int, got {type(token).__name__}")
        return self._native.step(int(token))

    def prefill(self, tokens: Sequence[int] | np.ndarray) -> np.ndarray:
        """Run a prompt in chunks of `prefill_chunk` tokens; returns the logits of its last token.

        Each chunk's projections are matrix products, and every expert any of its tokens routes
        to is read once per chunk. The state afterwards equals stepping the tokens one by one:
        bit for bit on the CPU, to rounding on CUDA (its chunk kernels sum in another order).
        """
        ids = np.asarray(tokens)
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError("prefill needs a non-empty 1-D sequence of token ids")
        if not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"token ids must be integers, got dtype {ids.dtype}")
        bad = (ids < 0) | (ids >= self.vocab_size)
        if bad.any():
            raise ValueError(
                f"token id {int(ids[bad][0])} is outside the vocabulary (0..{self.vocab_size - 1})"
            )
        return self._native.prefill(np.ascontiguousarray(ids, dtype=np.int32))

    def reset(self) -> None:
        """Forget the sequence: position 0, empty KV cache and recurrent state."""
        self._native.reset()

    def snapshot(self) -> EngineState:
        """Copy of the sequence state (KV cache, conv and recurrent state, position)."""
        return self._native.snapshot()

    def restore(self, state: EngineState) -> None:
        self._native.restore(state)

    def stats(self) -> dict[str, Any]:
        """Counters since the last reset_stats(): tokens, expert bytes and blocks read, and
        per-phase milliseconds (mixer, router, expert_io_wait, expert_compute, lm_head, total).
        CUDA adds the device expert cache's hits and misses (in total and per layer:
        expert_cache_hits/misses, layer_cache_hits/misses) and bytes_h2d copied to the GPU."""
        return self._native.stats()

    def reset_stats(self) -> None:
        self._native.reset_stats()
