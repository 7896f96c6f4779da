"""Sampling policy: each filter's support, the distribution it samples, penalties, seeds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from flashmoe_native.sampling import Sampler, SamplingParams

# probabilities 0.5, 0.3, 0.15, 0.05 at temperature 1
PROBS = np.array([0.5, 0.3, 0.15, 0.05])
LOGITS = np.log(PROBS).astype(np.float32)


def draw(params: SamplingParams, logits: np.ndarray, n: int = 4000, **kw: np.ndarray) -> np.ndarray:
    sampler = Sampler(params, logits.size)
    return np.array([sampler.sample(logits, **kw) for _ in range(n)])


def test_temperature_zero_is_argmax() -> None:
    logits = np.array([0.1, 3.0, 2.9, -1.0], dtype=np.float32)
    assert set(draw(SamplingParams(temperature=0), logits, 50)) == {1}


def test_samples_follow_softmax_of_scaled_logits() -> None:
    for temperature in (1.0, 0.5):
        counts = np.bincount(
            draw(SamplingParams(temperature=temperature, seed=1), LOGITS), minlength=4
        )
        expected = PROBS ** (1 / temperature) / (PROBS ** (1 / temperature)).sum()
        # 4000 draws: 4 standard errors is below 0.032 for every probability here
        np.testing.assert_allclose(counts / counts.sum(), expected, atol=0.032)


@pytest.mark.parametrize(
    ("params", "support"),
    [
        (SamplingParams(top_k=1, seed=0), {0}),
        (SamplingParams(top_k=2, seed=0), {0, 1}),
        (SamplingParams(top_p=0.75, seed=0), {0, 1}),
        (SamplingParams(top_p=0.85, seed=0), {0, 1, 2}),
        (SamplingParams(top_p=0.01, seed=0), {0}),
        (SamplingParams(min_p=0.25, seed=0), {0, 1, 2}),
        (SamplingParams(min_p=0.5, seed=0), {0, 1}),
        (SamplingParams(top_k=3, top_p=0.9, min_p=0.5, seed=0), {0, 1}),
    ],
)
def test_filters_keep_exactly_their_support(params: SamplingParams, support: set[int]) -> None:
    samples = draw(params, LOGITS)
    assert set(samples.tolist()) == support


def test_top_k_renormalises_what_it_keeps() -> None:
    counts = np.bincount(draw(SamplingParams(top_k=2, seed=3), LOGITS), minlength=4)
    np.testing.assert_allclose(counts[:2] / counts.sum(), [0.625, 0.375], atol=0.035)


def test_allowed_mask_wins_over_logits() -> None:
    allowed = np.array([False, False, True, True])
    assert set(draw(SamplingParams(temperature=0), LOGITS, 5, allowed=allowed)) == {2}
    assert set(draw(SamplingParams(seed=2), LOGITS, 500, allowed=allowed)) == {2, 3}
    with pytest.raises(ValueError, match="no token"):
        Sampler(SamplingParams(), 4).sample(LOGITS, np.zeros(4, dtype=bool))


def test_seed_reproduces_and_differs() -> None:
    logits = np.random.default_rng(0).normal(size=300).astype(np.float32)
    a = draw(SamplingParams(seed=42), logits, 200)
    assert np.array_equal(a, draw(SamplingParams(seed=42), logits, 200))
    assert not np.array_equal(a, draw(SamplingParams(seed=43), logits, 200))


def test_repetition_penalty_divides_positive_and_multiplies_negative() -> None:
    greedy = SamplingParams(temperature=0, repetition_penalty=2.0)
    sampler = Sampler(greedy, 3)
    sampler.observe_prompt([0])
    assert sampler.sample(np.array([3.0, 2.0, -5.0], dtype=np.float32)) == 1  # 3/2 < 2
    sampler = Sampler(greedy, 3)
    sampler.observe_generated(0)
    assert sampler.sample(np.array([-1.0, -1.5, -3.0], dtype=np.float32)) == 1  # -1*2 < -1.5


def test_presence_penalty_counts_generated_tokens_only() -> None:
    params = SamplingParams(temperature=0, presence_penalty=1.0)
    logits = np.array([2.0, 1.5, 0.0], dtype=np.float32)
    sampler = Sampler(params, 3)
    sampler.observe_prompt([0])
    assert sampler.sample(logits) == 0
    sampler.observe_generated(0)
    assert sampler.sample(logits) == 1


def test_defaults_from_generation_config(tmp_path: Path) -> None:
    assert SamplingParams.from_generation_config(tmp_path) == SamplingParams()
    config = {
        "do_sample": True,
        "temperature": 0.6,
        "top_k": 20,
        "top_p": 0.95,
        "eos_token_id": [1, 2],
    }
    (tmp_path / "generation_config.json").write_text(json.dumps(config))
    params = SamplingParams.from_generation_config(tmp_path)
    assert (params.temperature, params.top_k, params.top_p, params.min_p) == (0.6, 20, 0.95, 0.0)
    assert params.with_overrides(temperature=0.0, top_k=None).top_k == 20
    (tmp_path / "generation_config.json").write_text(json.dumps({**config, "do_sample": False}))
    assert SamplingParams.from_generation_config(tmp_path).temperature == 0.0


def test_invalid_params_are_rejected() -> None:
    for bad in ({"temperature": -1}, {"top_p": 0}, {"min_p": 2}, {"top_k": -1}):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
