"""The bundled default model: it loads with no path, writes Python, is the 4-bit conversion of the
committed checkpoint, and 4 bits cost it under 5% of held-out perplexity."""

from __future__ import annotations

import json
import keyword
import re
import subprocess
import sys
from pathlib import Path

import pytest

from flashmoe_native import Engine, default_model_path
from flashmoe_native.convert import convert
from flashmoe_native.perplexity import evaluate, text_tokens
from flashmoe_native.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parent.parent
SOURCE = REPO / "models" / "tiny-stdlib-moe"
HELDOUT = SOURCE / "heldout.txt"
EVAL_TOKENS = 4096  # 4 windows of 1024: ~10 s for both runs on 2 cores
PROMPTS = ("import os\n\n\ndef ", "class Reader:\n    def __init__(self", "    for line in ")
PY_WORDS = set(keyword.kwlist) | {"self", "cls", "len", "str", "isinstance", "__init__"}


@pytest.fixture(scope="module")
def q16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny-stdlib-moe") / "q16"
    convert(SOURCE, out, 16, progress=False)
    return out


@pytest.fixture(scope="module")
def heldout_ids() -> list[int]:
    ids, _ = text_tokens(default_model_path(), HELDOUT.read_text(encoding="utf-8"), EVAL_TOKENS)
    return ids


def greedy(engine: Engine, tokenizer: Tokenizer, prompt: str, n: int) -> list[int]:
    logits = engine.prefill(tokenizer.encode(prompt))
    out: list[int] = []
    for _ in range(n):
        token = int(logits.argmax())
        out.append(token)
        if token in engine.config["eos_token_ids"]:
            break
        logits = engine.step(token)
    return out


def test_default_engine_is_the_bundled_model() -> None:
    path = default_model_path()
    assert path.is_dir() and (path / "manifest.json").is_file()
    engine = Engine()
    assert engine.path == path
    assert engine.manifest["quantization"]["bits"] == 4
    cfg = engine.config
    assert cfg["num_experts"] >= 32 and cfg["num_experts_per_tok"] >= 4
    assert {"linear_attention", "full_attention"} <= set(cfg["layer_types"])
    assert cfg["shared_expert_intermediate_size"] > 0
    # every matrix quantized: only the router, shared-expert gate and DeltaNet a/b stay bf16
    kept = {
        name
        for name, t in engine.manifest["tensors"].items()
        if len(t["shape"]) == 2 and t["dtype"] == "bf16" and "conv1d" not in name
    }
    assert kept and all(
        re.search(r"mlp\.gate\.|shared_expert_gate|in_proj_[ab]\.", name) for name in kept
    ), kept
    assert sum(f.stat().st_size for f in path.iterdir()) < 20e6


def test_bundled_model_writes_python() -> None:
    engine = Engine()
    tokenizer = Tokenizer.from_dir(default_model_path())
    generated = []  # the continuations only: the prompts hold Python words themselves
    for prompt in PROMPTS:
        engine.reset()
        ids = greedy(engine, tokenizer, prompt, 80)
        assert len(set(ids)) >= 5  # a tiny model loops greedily, but not on one token
        generated.append(tokenizer.decode(ids))
    words = set(re.findall(r"[A-Za-z_]+", "\n".join(generated)))
    # A random-weight model strings unrelated vocabulary pieces together: no Python words, no
    # block structure (checked on random models of this shape when the test was written).
    assert len(words & PY_WORDS) >= 3, generated
    assert any(re.search(r"\n( {4})+\S", t) for t in generated), generated
    assert any("(" in t and ")" in t for t in generated), generated


def test_bundled_model_is_the_4bit_conversion_of_the_checkpoint(tmp_path: Path) -> None:
    convert(SOURCE, tmp_path / "q4", 4, progress=False)
    for name in ("weights.bin", "experts.bin", "tokenizer.json", "chat_template.jinja"):
        assert (tmp_path / "q4" / name).read_bytes() == (default_model_path() / name).read_bytes()
    fresh = json.loads((tmp_path / "q4" / "manifest.json").read_text())
    shipped = json.loads((default_model_path() / "manifest.json").read_text())
    assert fresh["tensors"] == shipped["tensors"] and fresh["config"] == shipped["config"]


def test_heldout_perplexity_4bit_within_5_percent_of_16bit(
    q16: Path, heldout_ids: list[int]
) -> None:
    assert len(heldout_ids) == EVAL_TOKENS
    r4 = evaluate(Engine(), heldout_ids, window=1024, reference=Engine(q16))
    r16 = evaluate(Engine(q16), heldout_ids, window=1024)
    assert r4.reference_nll == pytest.approx(r16.nll, rel=1e-9)
    # trained: far below the vocabulary's 8192 of a uniform guess
    assert r16.perplexity < 60
    assert r4.perplexity <= 1.05 * r16.perplexity, (r4.perplexity, r16.perplexity)
    assert 0 < r4.kl < 0.2
    assert r4.top1_agreement is not None and r4.top1_agreement > 0.7


def test_fewer_experts_cost_quality(heldout_ids: list[int]) -> None:
    ids = heldout_ids[:1024]
    full = evaluate(Engine(), ids).perplexity
    one = evaluate(Engine(experts_per_token=1), ids).perplexity
    assert one > 1.1 * full


def run_cli(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "flashmoe_native.cli", *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return done.stdout


def test_perplexity_cli(q16: Path, tmp_path: Path) -> None:
    out = tmp_path / "ppl.json"
    text = run_cli(
        "perplexity",
        "--text",
        str(HELDOUT),
        "--max-tokens",
        "300",
        "--window",
        "150",
        "--device",
        "cpu",
        "--reference",
        str(q16),
        "--json",
        str(out),
    )
    ppl = float(re.search(r"^perplexity\s+([\d.]+)$", text, re.M).group(1))  # type: ignore[union-attr]
    kl = float(re.search(r"^kl\s+([\d.]+) nats", text, re.M).group(1))  # type: ignore[union-attr]
    result = json.loads(out.read_text())
    assert result["tokens"] == 300 and result["predictions"] == 298  # 2 windows of 150
    assert ppl == pytest.approx(result["perplexity"], rel=1e-4)
    assert kl == pytest.approx(result["kl"], abs=1e-6) and kl > 0
    assert 1 < ppl < 200
    assert result["model"] == str(default_model_path())

    alone = run_cli("perplexity", "--text", str(HELDOUT), "--max-tokens", "100", "--quiet")
    assert "kl              not computed (no --reference given)" in alone
    assert float(re.search(r"^perplexity\s+([\d.]+)$", alone, re.M).group(1)) > 1  # type: ignore[union-attr]


def test_infer_uses_the_bundled_model() -> None:
    text = run_cli("infer", "--prompt", "def ", "--tokens", "48", "--temperature", "0")
    assert "def" in text and len(set(re.findall(r"[A-Za-z_]+", text)) & PY_WORDS) >= 2, text
