"""Sampling policy: pick the next token from logits (temperature, top-k/p, min-p, penalties)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to choose tokens. Neutral values switch a filter off."""

    temperature: float = 1.0  # 0 picks the most likely token (greedy)
    top_k: int = 0  # keep the k most likely tokens; 0 keeps all
    top_p: float = 1.0  # keep the smallest set whose probability reaches top_p
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one
    repetition_penalty: float = 1.0  # > 1 discourages any token already in the context
    presence_penalty: float = 0.0  # subtracted from the logit of every token already generated
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if not 0 <= self.min_p <= 1:
            raise ValueError("min_p must be in [0, 1]")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")

    @classmethod
    def from_generation_config(cls, model_dir: str | Path) -> SamplingParams:
        """The model's recommended defaults from `generation_config.json`, neutral when absent."""
        path = Path(model_dir) / "generation_config.json"
        config: dict[str, Any] = json.loads(path.read_text("utf-8")) if path.exists() else {}
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in config.items() if k in fields and v is not None}
        if config.get("do_sample") is False:
            values["temperature"] = 0.0
        return cls(**values)

    def with_overrides(self, **overrides: Any) -> SamplingParams:
        """A copy with the given values replaced; None means keep the current one."""
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})


class Sampler:
    """Draws tokens for one request; keeps the token counts the penalties need and its RNG."""

    def __init__(self, params: SamplingParams, vocab_size: int) -> None:
        self.params = params
        self._rng = np.random.default_rng(params.seed)
        # repetition penalty looks at the whole context, presence penalty only at generated tokens
        self._in_context = np.zeros(vocab_size, dtype=bool)
        self._generated = np.zeros(vocab_size, dtype=bool)

    def observe_prompt(self, token_ids: Iterable[int]) -> None:
        self._in_context[np.fromiter(token_ids, dtype=np.int64)] = True

    def observe_generated(self, token_id: int) -> None:
        self._in_context[token_id] = True
        self._generated[token_id] = True

    def sample(self, logits: np.ndarray, allowed: np.ndarray | None = None) -> int:
        """Choose a token id. `allowed` (bool per id) removes tokens before any filtering."""
        p = self.params
        x = np.array(logits, dtype=np.float32, copy=True)
        if p.repetition_penalty != 1.0:
            seen = x[self._in_context]
            x[self._in_context] = np.where(
                seen > 0, seen / p.repetition_penalty, seen * p.repetition_penalty
            )
        if p.presence_penalty != 0.0:
            x[self._generated] -= p.presence_penalty
        if allowed is not None:
            if not allowed.any():
                raise ValueError("no token is allowed")
            x[~allowed] = -np.inf
        if p.temperature == 0.0:
            return int(np.argmax(x))

        candidates = np.flatnonzero(np.isfinite(x))
        if 0 < p.top_k < candidates.size:
            top = np.argpartition(-x[candidates], p.top_k - 1)[: p.top_k]
            candidates = candidates[top]
        scaled = x[candidates] / p.temperature
        order = np.argsort(-scaled, kind="stable")
        candidates, scaled = candidates[order], scaled[order]
        probs = np.exp((scaled - scaled[0]).astype(np.float64))
        probs /= probs.sum()
        keep = probs.size
        if p.top_p < 1.0:
            # the first token always stays, so a tiny top_p degrades to greedy, not to nothing
            keep = min(keep, int(np.searchsorted(np.cumsum(probs), p.top_p)) + 1)
        if p.min_p > 0.0:
            keep = min(keep, int(np.count_nonzero(probs >= p.min_p * probs[0])))
        cumulative = np.cumsum(probs[:keep])
        pick = int(np.searchsorted(cumulative, self._rng.random() * cumulative[-1], side="right"))
        return int(candidates[min(pick, keep - 1)])
