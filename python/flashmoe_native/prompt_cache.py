"""Engine snapshots keyed by the tokens they hold: an LRU within a byte budget.

Agents resend the whole conversation every turn. A snapshot whose tokens are a prefix of a new
prompt lets the engine restore that state and prefill only the rest.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Generic, Protocol, TypeVar


class Snapshot(Protocol):
    @property
    def nbytes(self) -> int: ...


S = TypeVar("S", bound=Snapshot)


class PromptCache(Generic[S]):
    """Snapshots by token prefix; the least recently used go first when the budget is passed."""

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes < 0:
            raise ValueError("the prompt cache budget cannot be negative")
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[tuple[int, ...], S] = OrderedDict()  # oldest use first
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, tokens: Sequence[int]) -> bool:
        return tuple(tokens) in self._entries

    def longest_prefix(
        self, tokens: Sequence[int], max_length: int
    ) -> tuple[tuple[int, ...], S] | None:
        """The entry for the longest prefix of `tokens` no longer than `max_length`, now the most
        recently used; None when no entry is such a prefix."""
        prompt = tuple(tokens)
        best: tuple[int, ...] | None = None
        for key in self._entries:
            n = len(key)
            if n <= max_length and (best is None or n > len(best)) and prompt[:n] == key:
                best = key
        if best is None:
            return None
        self._entries.move_to_end(best)
        return best, self._entries[best]

    def put(self, tokens: Sequence[int], state: S) -> bool:
        """Keep `state` for `tokens`, evicting the least recently used entries to stay within
        the budget; False when the state alone is larger than the budget."""
        key = tuple(tokens)
        if key in self._entries:
            self.nbytes -= self._entries.pop(key).nbytes
        if state.nbytes > self.budget_bytes:
            return False
        while self.nbytes + state.nbytes > self.budget_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.nbytes -= evicted.nbytes
        self._entries[key] = state
        self.nbytes += state.nbytes
        return True
