"""`flashmoe bench`: decode tok/s and the per-phase breakdown on a converted model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_models import TinyModels

from flashmoe_native import format as fmt
from flashmoe_native.cli import main


def test_bench_prints_rates_and_where_time_went(
    tiny_models: TinyModels, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir = tiny_models.converted(4, "B")
    out = tmp_path / "bench.json"
    assert (
        main(["bench", str(model_dir), "--tokens", "5", "--prompt-tokens", "7", "--json", str(out)])
        == 0
    )
    printed = capsys.readouterr().out
    assert "decode: 5 tokens at" in printed and "tok/s" in printed
    for phase in ("mixer", "router", "expert_io_wait", "expert_compute", "lm_head", "total"):
        assert phase in printed
    result = json.loads(out.read_text())
    manifest = fmt.load_manifest(model_dir)
    k = manifest["config"]["num_experts_per_tok"]
    layers = manifest["config"]["num_hidden_layers"]
    assert result["decode_stats"]["tokens"] == 5
    # every decoded token reads k distinct experts in each layer
    assert result["decode_stats"]["experts_loaded"] == 5 * layers * k
    assert result["decode_tok_s"] > 0 and result["prefill_tok_s"] > 0


def test_bench_cold_cache_and_bad_arguments(tiny_models: TinyModels) -> None:
    model_dir = tiny_models.converted(4, "A")
    assert main(["bench", str(model_dir), "--tokens", "2", "--prompt-tokens", "2", "--cold"]) == 0
    with pytest.raises(SystemExit, match="at least 1"):
        main(["bench", str(model_dir), "--tokens", "0"])
