"""Hit rates of a least-recently-used expert cache on a routing trace: the baseline that the
engine's cache policy (csrc/expert_cache.*) is measured against."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable


def lru_hit_rate(trace: Iterable[Iterable[int]], capacity: int) -> float:
    """Hits / lookups of an LRU cache of `capacity` keys, looking up each token's keys in order."""
    cache: OrderedDict[int, None] = OrderedDict()
    hits = lookups = 0
    for token in trace:
        for key in token:
            lookups += 1
            if key in cache:
                hits += 1
                cache.move_to_end(key)
            else:
                cache[key] = None
                if len(cache) > capacity:
                    cache.popitem(last=False)
    return hits / lookups
