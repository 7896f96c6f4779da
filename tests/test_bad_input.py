"""Broken model directories, checkpoints and requests fail with a clear Python error, never a crash.

Each message must name what is wrong: the file (and for experts the layer/expert), the
architecture, the token, the context limit.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from tiny_models import TinyModels

import flashmoe_native as fm
from flashmoe_native import convert as convert_mod
from flashmoe_native import format as fmt
from flashmoe_native import verify as verify_mod
from flashmoe_native.convert import convert
from flashmoe_native.safetensors_io import Checkpoint

ModelCopy = Callable[..., Path]


def edit_manifest(model_dir: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    path = model_dir / fmt.MANIFEST_NAME
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        value = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([value ^ 0x5A]))


def run_cli(module: Any, argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return module.run(parser.parse_args(argv))


def open_both_ways(model_dir: Path, match: str) -> str:
    """load_manifest and Engine must both refuse the directory; returns the message."""
    with pytest.raises(fmt.ModelFormatError, match=match) as info:
        fmt.load_manifest(model_dir)
    with pytest.raises(fmt.ModelFormatError, match=match):
        fm.Engine(model_dir)
    return str(info.value)


# ------------------------------------------------------------------------------------------------
# model directory


@pytest.mark.parametrize("name", [fmt.WEIGHTS_FILE, fmt.EXPERTS_FILE])
def test_truncated_data_file(model_copy: ModelCopy, name: str) -> None:
    model_dir = model_copy()
    path = model_dir / name
    size = path.stat().st_size
    os.truncate(path, size - 100)
    message = open_both_ways(model_dir, name)
    assert "truncated" in message and str(size) in message and str(size - 100) in message


@pytest.mark.parametrize("name", [fmt.WEIGHTS_FILE, fmt.EXPERTS_FILE, fmt.MANIFEST_NAME])
def test_missing_file(model_copy: ModelCopy, name: str) -> None:
    model_dir = model_copy()
    (model_dir / name).unlink()
    assert "missing" in open_both_ways(model_dir, name)
    assert verify_mod.verify(model_dir, progress=False)[0].startswith(str(model_dir / name))


def test_corrupted_weights_byte_fails_open_naming_weights_bin(model_copy: ModelCopy) -> None:
    model_dir = model_copy()
    flip_byte(model_dir / fmt.WEIGHTS_FILE, 1000)
    assert "checksum" in open_both_ways(model_dir, fmt.WEIGHTS_FILE)
    problems = verify_mod.verify(model_dir, progress=False)
    assert len(problems) == 1 and fmt.WEIGHTS_FILE in problems[0]


def test_corrupted_expert_block_is_named_by_verify(
    model_copy: ModelCopy, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir = model_copy(4, "B")
    experts = fmt.load_manifest(model_dir)["experts"]
    layer, expert = 3, 11
    block = layer * experts["num_experts"] + expert
    flip_byte(model_dir / fmt.EXPERTS_FILE, block * experts["block_stride"] + 777)
    assert run_cli(verify_mod, [str(model_dir), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert f"layer {layer} expert {expert} is corrupted" in err
    assert len(re.findall(r"layer \d+ expert \d+ is corrupted", err)) == 1  # only that block
    assert "experts.bin: checksum mismatch" in err
    # a block's padding is covered by its checksum too
    flip_byte(model_dir / fmt.EXPERTS_FILE, (block + 1) * experts["block_stride"] - 1)
    problems = verify_mod.verify(model_dir, progress=False)
    assert sum(bool(re.search(r"layer \d+ expert \d+ is", p)) for p in problems) == 1
    flip_byte(model_dir / fmt.EXPERTS_FILE, 5)  # layer 0 expert 0
    problems = verify_mod.verify(model_dir, progress=False)
    assert any("layer 0 expert 0 is corrupted" in p for p in problems)


def test_verify_passes_a_sound_model(model_copy: ModelCopy, capsys: Any) -> None:
    model_dir = model_copy(8, "C")
    assert run_cli(verify_mod, [str(model_dir), "--quiet"]) == 0
    assert "OK" in capsys.readouterr().out


def test_bad_manifest_json(model_copy: ModelCopy) -> None:
    model_dir = model_copy()
    (model_dir / fmt.MANIFEST_NAME).write_text('{"format": "flashmoe-native", ')
    assert "not valid JSON" in open_both_ways(model_dir, "manifest.json")


def test_unsupported_architecture_is_named(model_copy: ModelCopy) -> None:
    model_dir = model_copy()
    edit_manifest(model_dir, lambda m: m.update(architecture="deepseek_v3"))
    message = open_both_ways(model_dir, "manifest.json")
    assert "'deepseek_v3' is not supported" in message


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.update(format="gguf"), "format is 'gguf'"),
        (lambda m: m.update(format_version=2), "format_version 2 is not supported"),
        (lambda m: m.pop("tensors"), "missing key 'tensors'"),
        (lambda m: m["config"].pop("rotary_dim"), "config lacks rotary_dim"),
        (lambda m: m["tensors"].pop("norm.weight"), "tensors missing: norm.weight"),
        (
            lambda m: m["tensors"]["norm.weight"].update(offset=m["files"]["weights.bin"]["size"]),
            "tensor norm.weight: bytes",
        ),
        (lambda m: m["tensors"]["norm.weight"].update(nbytes=4), "tensor norm.weight: nbytes 4"),
        (lambda m: m["tensors"]["norm.weight"].update(offset=3), "not a 64-byte aligned"),
        (lambda m: m["tensors"]["norm.weight"].update(dtype="f16"), "unknown dtype 'f16'"),
        (
            lambda m: m["tensors"]["embed_tokens.weight"].update(shape=[128, 64], nbytes=4608),
            "config implies [256, 64]",
        ),
        (lambda m: m["experts"].update(block_stride=4096 * 64), "block_stride"),
        (lambda m: m["experts"]["xxh64"].pop(), "experts.xxh64 must hold"),
        (lambda m: m["files"]["weights.bin"].update(xxh64="xyz"), "16 hex digit"),
        (lambda m: m["experts"]["parts"]["down"].update(offset=64), "experts.parts overlap"),
        (lambda m: m["experts"]["parts"]["down"].update(offset=8192), "lies outside the block"),
    ],
)
def test_inconsistent_manifest_is_refused(
    model_copy: ModelCopy, edit: Callable[[dict], Any], message: str
) -> None:
    model_dir = model_copy()
    edit_manifest(model_dir, edit)
    assert message in open_both_ways(model_dir, "manifest.json")


# ------------------------------------------------------------------------------------------------
# engine requests


def test_token_id_out_of_range(tiny_models: TinyModels) -> None:
    engine = fm.Engine(tiny_models.converted(4, "A"))
    for token in (256, -1, 10**12):
        with pytest.raises(ValueError, match="outside the vocabulary"):
            engine.step(token)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.prefill([1, 2, 256])
    assert engine.position == 0  # nothing was run
    assert np.isfinite(engine.step(255)).all()


def test_exceeding_the_context_limit(tiny_models: TinyModels) -> None:
    engine = fm.Engine(tiny_models.converted(4, "A"), max_context=8)
    for token in range(8):
        engine.step(token)
    with pytest.raises(ValueError, match="context") as info:
        engine.step(8)
    assert "max_context=8" in str(info.value)
    assert engine.position == 8
    engine.reset()
    with pytest.raises(ValueError, match="context"):
        engine.prefill(list(range(9)))
    assert engine.position == 0


# ------------------------------------------------------------------------------------------------
# converter


def assert_nothing_at(out: Path) -> None:
    assert not out.exists()
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(out.name + ".")]
    assert leftovers == [], leftovers


def test_converter_refuses_to_overwrite(tiny_models: TinyModels, tmp_path: Path) -> None:
    src = tiny_models.checkpoint("A", "fused")
    out = convert(src, tmp_path / "out", 4, progress=False)
    before = (out / fmt.MANIFEST_NAME).read_bytes()
    with pytest.raises(FileExistsError, match="--force"):
        convert(src, out, 8, progress=False)
    assert (out / fmt.MANIFEST_NAME).read_bytes() == before
    assert run_cli(convert_mod, [str(src), str(out), "--bits", "8", "--quiet"]) == 1
    # --force replaces a previous conversion...
    convert(src, out, 8, force=True, progress=False)
    assert fmt.load_manifest(out)["quantization"]["bits"] == 8
    # ...but never a directory that is not one, nor the source itself
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(FileExistsError, match="not a converted model directory"):
        convert(src, precious, 4, force=True, progress=False)
    assert (precious / "thesis.tex").read_text() == "years of work"
    with pytest.raises(fmt.ModelFormatError, match="must not be or contain the source"):
        convert(src, src, 4, force=True, progress=False)


# exception types, not instances: a raised instance kept by parametrize would keep its traceback
# (and the converter's native hashers) alive until interpreter exit
@pytest.mark.parametrize("exception", [OSError, KeyboardInterrupt])
def test_interrupted_conversion_leaves_nothing(
    tiny_models: TinyModels,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    exception: type[BaseException],
) -> None:
    src = tiny_models.checkpoint("B", "fused", wrapper="vlm")
    calls = 0
    original_read = Checkpoint._read

    def failing_read(self: Checkpoint, *args: Any) -> np.ndarray:
        nonlocal calls
        calls += 1
        if calls == 60:  # midway through the experts
            raise exception
        return original_read(self, *args)

    monkeypatch.setattr(Checkpoint, "_read", failing_read)
    out = tmp_path / "out"
    with pytest.raises(exception):
        convert(src, out, 4, progress=False)
    assert calls == 60
    assert_nothing_at(out)


def test_failure_in_a_parallel_expert_encoder_leaves_nothing(
    tiny_models: TinyModels, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = 0
    original = convert_mod.encode_expert_block

    def failing_encode(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 20:
            raise MemoryError("simulated")
        return original(*args)

    monkeypatch.setattr(convert_mod, "encode_expert_block", failing_encode)
    out = tmp_path / "out"
    with pytest.raises(MemoryError):
        convert(tiny_models.checkpoint("B", "per_expert"), out, 8, progress=False)
    assert_nothing_at(out)


def test_failed_forced_conversion_keeps_the_previous_model(
    tiny_models: TinyModels, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tiny_models.checkpoint("A", "per_expert")
    out = convert(src, tmp_path / "out", 16, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def failing_quantize(*args: Any) -> Any:
        raise MemoryError("simulated")

    monkeypatch.setattr(fmt, "quantize", failing_quantize)
    with pytest.raises(MemoryError):
        convert(src, out, 4, force=True, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def copy_checkpoint(tiny_models: TinyModels, tmp_path: Path, **kwargs: Any) -> Path:
    src = tmp_path / "src"
    shutil.copytree(tiny_models.checkpoint(**kwargs), src)
    return src


def rewrite_shard(src: Path, tensor: str, edit: Callable[[dict[str, np.ndarray]], None]) -> Path:
    """Apply `edit` to the tensors of the shard holding `tensor`; returns that shard's path."""
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shard = src / index["weight_map"][tensor]
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard)
    weight_map = {k: v for k, v in index["weight_map"].items() if src / v != shard}
    index["weight_map"] = {**weight_map, **dict.fromkeys(tensors, shard.name)}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    return shard


EXPERTS_0 = "model.layers.0.mlp.experts.gate_up_proj"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.pop(EXPERTS_0), "has no experts for layer 0"),
        (lambda t: t.__setitem__(EXPERTS_0, t[EXPERTS_0][:, :64]), "config implies [8, 128, 64]"),
        (
            lambda t: t.__setitem__("model.layers.0.extra.weight", np.zeros(2, np.float32)),
            "unexpected tensor",
        ),
        (lambda t: t[EXPERTS_0].__setitem__((3, 5, 7), np.nan), "contains NaN or Inf"),
        (lambda t: t.__setitem__(EXPERTS_0, t[EXPERTS_0].astype(np.int32)), "dtype I32"),
    ],
)
def test_bad_checkpoint_tensors_are_named(
    tiny_models: TinyModels, tmp_path: Path, edit: Callable, message: str
) -> None:
    src = copy_checkpoint(tiny_models, tmp_path, shape="A", layout="fused")
    rewrite_shard(src, EXPERTS_0, edit)
    out = tmp_path / "out"
    with pytest.raises(fmt.ModelFormatError, match="safetensors|src") as info:
        convert(src, out, 4, progress=False)
    assert message in str(info.value)
    assert_nothing_at(out)


def test_truncated_or_garbled_safetensors_is_named(tiny_models: TinyModels, tmp_path: Path) -> None:
    src = copy_checkpoint(tiny_models, tmp_path, shape="A", layout="per_expert")
    shard = sorted(src.glob("*.safetensors"))[1]
    os.truncate(shard, shard.stat().st_size - 10)
    with pytest.raises(fmt.ModelFormatError, match=shard.name) as info:
        convert(src, tmp_path / "out", 4, progress=False)
    assert "truncated" in str(info.value)
    shard.write_bytes((40).to_bytes(8, "little") + b"{not json" + b" " * 31)
    with pytest.raises(fmt.ModelFormatError, match=f"{shard.name}: header is not valid JSON"):
        convert(src, tmp_path / "out", 4, progress=False)
    shard.write_bytes(b"\xff" * 16)
    with pytest.raises(fmt.ModelFormatError, match=f"{shard.name}: header length"):
        convert(src, tmp_path / "out", 4, progress=False)
    assert_nothing_at(tmp_path / "out")


def test_bad_source_directories(tiny_models: TinyModels, tmp_path: Path, capsys: Any) -> None:
    src = copy_checkpoint(tiny_models, tmp_path, shape="A", layout="fused")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "model_type": "qwen3_next"}))
    with pytest.raises(fmt.ModelFormatError, match="config.json: model_type 'qwen3_next'"):
        convert(src, tmp_path / "out", 4, progress=False)
    assert run_cli(convert_mod, [str(src), str(tmp_path / "out"), "--quiet"]) == 1
    assert "model_type 'qwen3_next' is not supported" in capsys.readouterr().err
    (src / "config.json").unlink()
    with pytest.raises(fmt.ModelFormatError, match="config.json: missing"):
        convert(src, tmp_path / "out", 4, progress=False)
    with pytest.raises(fmt.ModelFormatError, match="not a directory"):
        convert(tmp_path / "nowhere", tmp_path / "out", 4, progress=False)
    with pytest.raises(ValueError, match="bits must be 4, 8 or 16"):
        convert(src, tmp_path / "out", 3, progress=False)
    assert_nothing_at(tmp_path / "out")
