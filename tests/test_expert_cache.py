"""The CUDA expert cache's replacement policy (host-side bookkeeping, so it runs everywhere): slots
in use in a round are never evicted, and on a trained model's routing it keeps more of the experts
that come back than least-recently-used would."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import router_choices
from transformers import AutoModelForCausalLM

from flashmoe_native import _core
from flashmoe_native.bundled import default_model_path
from flashmoe_native.cache_sim import lru_hit_rate
from flashmoe_native.perplexity import text_tokens

SOURCE = Path(__file__).resolve().parents[1] / "models" / "tiny-stdlib-moe"


@functools.cache
def bundled_routing(n_tokens: int = 1000) -> tuple[list[list[int]], int, int]:
    """Per token, the cache keys (layer * experts + expert) of the bf16 checkpoint's routing over
    held-out text, in layer order as the engine looks them up; the number of keys; k."""
    text = (SOURCE / "heldout.txt").read_text(encoding="utf-8")
    tokens, _ = text_tokens(default_model_path(), text, n_tokens)
    model = AutoModelForCausalLM.from_pretrained(SOURCE, dtype=torch.float32).eval()
    picks = router_choices(model, tokens)
    experts = model.config.num_experts
    keys = [
        [layer * experts + int(e) for layer, ids in enumerate(picks) for e in ids[t]]
        for t in range(len(tokens))
    ]
    return keys, len(picks) * experts, model.config.num_experts_per_tok


def policy_hit_rate(trace: list[list[int]], num_keys: int, k: int, capacity: int) -> float:
    """The engine's use of the policy: a round per layer (its k keys found, then misses inserted),
    with the engine's half-life of 64 tokens' lookups."""
    policy = _core.ExpertCachePolicy(capacity, num_keys, 64.0 * len(trace[0]))
    hits = lookups = 0
    for token in trace:
        for start in range(0, len(token), k):
            policy.begin_round()
            layer_keys = token[start : start + k]
            missed = [key for key in layer_keys if policy.find(key) < 0]
            hits += len(layer_keys) - len(missed)
            lookups += len(layer_keys)
            for key in missed:
                policy.insert(key)
    return hits / lookups


def test_slots_used_in_a_round_are_never_evicted() -> None:
    rng = np.random.default_rng(3)
    num_keys, capacity = 200, 24
    policy = _core.ExpertCachePolicy(capacity, num_keys, 50.0)
    holder: dict[int, int] = {}  # slot -> key, as the engine believes
    for _ in range(2000):
        policy.begin_round()
        keys = rng.choice(num_keys, size=8, replace=False, p=np.linspace(1, 3, num_keys) / 400)
        round_slots = {}
        missed = []
        for key in keys.tolist():
            slot = policy.find(key)
            if slot >= 0:
                assert holder[slot] == key
                round_slots[key] = slot
            else:
                missed.append(key)
        for key in missed:
            slot = policy.insert(key)
            assert 0 <= slot < capacity
            assert slot not in round_slots.values()  # a slot this round reads is kept
            holder[slot] = key
            round_slots[key] = slot
    small = _core.ExpertCachePolicy(4, 10, 50.0)
    for key in range(4):
        small.insert(key)
    small.begin_round()
    assert [small.find(key) for key in range(4)] == [0, 1, 2, 3]
    with pytest.raises(RuntimeError, match="in use this round"):  # nothing may be evicted
        small.insert(4)
    small.begin_round()
    assert small.insert(4) in range(4)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="at least one slot"):
        _core.ExpertCachePolicy(0, 10, 10.0)
    with pytest.raises(ValueError, match="half-life"):
        _core.ExpertCachePolicy(4, 10, 0.0)
    policy = _core.ExpertCachePolicy(4, 10, 10.0)
    policy.insert(1)
    with pytest.raises(RuntimeError, match="inserted twice"):
        policy.insert(1)


@pytest.mark.parametrize(("eighths", "gain"), [(1, 0.08), (2, 0.06)])
def test_frequency_keeps_more_of_a_trained_router_than_recency(eighths: int, gain: float) -> None:
    trace, num_keys, k = bundled_routing()
    capacity = num_keys * eighths // 8
    ours, lru = policy_hit_rate(trace, num_keys, k, capacity), lru_hit_rate(trace, capacity)
    print(f"cache {capacity}/{num_keys} blocks: hit rate {100 * ours:.1f}% vs LRU {100 * lru:.1f}%")
    assert ours > lru + gain
