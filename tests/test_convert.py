"""flashmoe convert: every source layout gives the same model directory, as docs/format.md says."""

from __future__ import annotations

import argparse
import filecmp
import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from safetensors.torch import save_file as save_torch
from tiny_models import LAYOUTS, SHAPES, WRAPPERS, TinyModels

from flashmoe_native import _core
from flashmoe_native import convert as convert_mod
from flashmoe_native import format as fmt
from flashmoe_native import verify as verify_mod
from flashmoe_native.convert import convert, normalize_config, tensor_dtype
from flashmoe_native.progress import Progress
from flashmoe_native.safetensors_io import Checkpoint

DATA_FILES = (fmt.WEIGHTS_FILE, fmt.EXPERTS_FILE)


def same_model(a: Path, b: Path) -> bool:
    """Byte-identical data files and manifests that differ only in where they came from."""
    if not all(filecmp.cmp(a / f, b / f, shallow=False) for f in DATA_FILES):
        return False
    ma, mb = (json.loads((d / fmt.MANIFEST_NAME).read_text()) for d in (a, b))
    ma.pop("source"), mb.pop("source")
    return ma == mb


@pytest.mark.parametrize("shape", ["A", "B"])
def test_every_layout_and_wrapper_converts_to_the_same_bytes(
    tiny_models: TinyModels, shape: str
) -> None:
    for bits in (16, 4):
        first = tiny_models.converted(bits, shape, "fused", wrapper="text")
        for layout in LAYOUTS:
            for wrapper in WRAPPERS:
                other = tiny_models.converted(bits, shape, layout, wrapper=wrapper)
                assert same_model(first, other), (layout, wrapper, bits)


def test_bf16_source_converts_like_its_fp32_original(tiny_models: TinyModels) -> None:
    # our bf16 rounding is round-to-nearest-even like torch's, so a bf16 checkpoint (as on the hub)
    # gives the same 16-bit model as the fp32 one it was cast from, except for the f32 tensors
    from_bf16 = tiny_models.converted(16, "A", "fused", wrapper="vlm", dtype="bfloat16")
    from_f32 = tiny_models.converted(16, "A", "fused")
    assert filecmp.cmp(from_bf16 / fmt.EXPERTS_FILE, from_f32 / fmt.EXPERTS_FILE, shallow=False)
    m16, m32 = fmt.load_manifest(from_bf16), fmt.load_manifest(from_f32)
    assert m16["tensors"] == m32["tensors"]
    for name, entry in m16["tensors"].items():
        got = fmt.read_tensor(from_bf16, m16, name)
        want = fmt.read_tensor(from_f32, m32, name)
        if entry["dtype"] == "f32":
            want = fmt.bf16_round(want)
        np.testing.assert_array_equal(got, want, err_msg=name)


def source_weights(tiny_models: TinyModels, shape: str) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in tiny_models.text_model(shape).state_dict().items()}


def expert_source(state: dict[str, np.ndarray], layer: int, expert: int, inter: int) -> dict:
    gate_up = state[f"model.layers.{layer}.mlp.experts.gate_up_proj"][expert]
    down = state[f"model.layers.{layer}.mlp.experts.down_proj"][expert]
    return {"gate": gate_up[:inter], "up": gate_up[inter:], "down": down}


@pytest.mark.parametrize("shape", ["A", "B", "C"])
@pytest.mark.parametrize("bits", [16, 8, 4])
def test_stored_tensors_are_the_source_encoded_as_the_spec_says(
    tiny_models: TinyModels, shape: str, bits: int
) -> None:
    model_dir = tiny_models.converted(bits, shape, "per_expert")
    manifest = fmt.load_manifest(model_dir)
    state = source_weights(tiny_models, shape)
    assert manifest["quantization"] == {"bits": bits, "group_size": 64}
    for name, entry in manifest["tensors"].items():
        src = state[name if name == "lm_head.weight" else "model." + name]
        if name.endswith("conv1d.weight"):
            assert src.shape[1] == 1
            src = src[:, 0, :]  # [C, 1, K] -> [C, K]
        assert entry["shape"] == list(src.shape), name
        rows_cols = src.ndim == 2
        if not rows_cols or name.endswith("conv1d.weight"):
            expected_dtype = "f32"
        elif bits == 16 or name.endswith(convert_mod.KEEP_BF16_SUFFIXES) or src.shape[1] % 64:
            expected_dtype = "bf16"
        else:
            expected_dtype = f"q{bits}"
        assert entry["dtype"] == expected_dtype, name
        got = fmt.read_tensor(model_dir, manifest, name)
        if expected_dtype == "f32":
            np.testing.assert_array_equal(got, src, err_msg=name)
        elif expected_dtype == "bf16":
            np.testing.assert_array_equal(got, fmt.bf16_round(src), err_msg=name)
        else:
            b = fmt.QUANT_BITS[expected_dtype]
            np.testing.assert_array_equal(
                got, fmt.dequantize(*fmt.quantize(src, b), b), err_msg=name
            )

    experts = manifest["experts"]
    inter = SHAPES[shape]["moe_intermediate_size"]
    for layer in range(experts["num_layers"]):
        for e in range(experts["num_experts"]):
            got = fmt.read_expert(model_dir, manifest, layer, e)
            for part, src in expert_source(state, layer, e, inter).items():
                dtype = experts["parts"][part]["dtype"]
                assert dtype == ("bf16" if bits == 16 or src.shape[1] % 64 else f"q{bits}")
                if dtype == "bf16":
                    want = fmt.bf16_round(src)
                else:
                    want = fmt.dequantize(*fmt.quantize(src, bits), bits)
                np.testing.assert_array_equal(got[part], want, err_msg=f"{layer}/{e}/{part}")


def test_shape_c_mixes_quantized_and_bf16_parts_in_one_expert_block(
    tiny_models: TinyModels,
) -> None:
    manifest = fmt.load_manifest(tiny_models.converted(4, "C"))
    parts = manifest["experts"]["parts"]
    assert [parts[p]["dtype"] for p in ("gate", "up", "down")] == ["q4", "q4", "bf16"]
    assert manifest["tensors"]["layers.0.linear_attn.out_proj.weight"]["dtype"] == "bf16"
    assert manifest["tensors"]["layers.0.mlp.shared_expert.down_proj.weight"]["dtype"] == "bf16"
    assert manifest["tensors"]["layers.0.mlp.shared_expert.up_proj.weight"]["dtype"] == "q4"


def test_layout_offsets_hashes_and_sizes_are_consistent(tiny_models: TinyModels) -> None:
    model_dir = tiny_models.converted(4, "B")
    manifest = fmt.load_manifest(model_dir)
    experts = manifest["experts"]
    assert experts["block_stride"] % 4096 == 0
    assert experts["block_stride"] == fmt.align_up(experts["block_bytes"], 4096)
    ends = []
    for name, entry in manifest["tensors"].items():
        assert entry["offset"] % 64 == 0, name
        ends.append((entry["offset"], entry["offset"] + entry["nbytes"]))
    ends.sort()
    assert all(a[1] <= b[0] for a, b in zip(ends, ends[1:], strict=False)), "tensors overlap"
    blob = (model_dir / fmt.EXPERTS_FILE).read_bytes()
    stride = experts["block_stride"]
    assert len(blob) == experts["num_layers"] * experts["num_experts"] * stride
    for index, expected in enumerate(experts["xxh64"]):
        block = blob[index * stride : (index + 1) * stride]
        h = _core.Xxh64()
        h.update(block)
        assert fmt.hex64(h.digest()) == expected
        assert not any(block[experts["block_bytes"] :]), "block padding must be zero"
    for name in DATA_FILES:
        entry = manifest["files"][name]
        assert (
            fmt.hex64(_core.xxh64_file(str(model_dir / name), 0, entry["size"])) == entry["xxh64"]
        )


def test_manifest_config_is_normalized(tiny_models: TinyModels) -> None:
    manifest = fmt.load_manifest(tiny_models.converted(8, "A", "fused", wrapper="vlm"))
    assert manifest["format"] == "flashmoe-native" and manifest["format_version"] == 1
    assert manifest["architecture"] == "qwen3_5_moe"
    assert manifest["source"]["model_type"] == "qwen3_5_moe"
    assert manifest["config"] == {
        "vocab_size": 256,
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "layer_types": ["linear_attention", "full_attention"] * 2,
        "rms_norm_eps": 1e-6,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "rotary_dim": 8,
        "rope_theta": 10_000_000.0,
        "max_position_embeddings": 512,
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 16,
        "linear_conv_kernel_dim": 4,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 64,
        "norm_topk_prob": True,
        "shared_expert_intermediate_size": 64,
        "eos_token_ids": [254, 255],  # generation_config's first, then config's
    }
    assert fmt.load_manifest(tiny_models.converted(4, "B"))["config"]["rotary_dim"] == 32


def text_config_dict(**changes: Any) -> dict[str, Any]:
    base = {
        "model_type": "qwen3_5_moe_text",
        "vocab_size": 100,
        "hidden_size": 64,
        "num_hidden_layers": 6,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 64,
        "linear_num_key_heads": 1,
        "linear_num_value_heads": 2,
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 16,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 64,
        "shared_expert_intermediate_size": 64,
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def test_config_defaults_and_legacy_keys() -> None:
    path = Path("config.json")
    # no layer_types: every full_attention_interval-th layer is full attention (default 4)
    cfg = normalize_config(text_config_dict(full_attention_interval=3), None, path)
    lin, full = "linear_attention", "full_attention"
    assert cfg["layer_types"] == [lin, lin, full, lin, lin, full]
    cfg = normalize_config(text_config_dict(), None, path)
    assert cfg["layer_types"] == [lin, lin, lin, full, lin, lin]
    # transformers' defaults for Qwen3.5: rope_theta 10000, partial_rotary_factor 0.25
    assert (cfg["rope_theta"], cfg["rotary_dim"]) == (10000.0, 16)
    assert cfg["eos_token_ids"] == [] and cfg["norm_topk_prob"] is True
    legacy = normalize_config(
        text_config_dict(rope_theta=5e6, partial_rotary_factor=0.5, eos_token_id=7), None, path
    )
    assert (legacy["rope_theta"], legacy["rotary_dim"], legacy["eos_token_ids"]) == (5e6, 32, [7])
    nested = normalize_config(
        {
            "model_type": "qwen3_5_moe",
            "text_config": text_config_dict(
                rope_parameters={"rope_theta": 1e7, "partial_rotary_factor": 0.25}, eos_token_id=9
            ),
            "eos_token_id": 3,
        },
        {"eos_token_id": [5, 9]},
        path,
    )
    assert nested["eos_token_ids"] == [5, 9, 3] and nested["rope_theta"] == 1e7
    top_level_vocab = normalize_config(
        {
            "model_type": "qwen3_5_moe",
            "text_config": text_config_dict(vocab_size=None),
            "vocab_size": 123,
        },
        None,
        path,
    )
    assert top_level_vocab["vocab_size"] == 123


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"model_type": "qwen3_moe"}, "model_type 'qwen3_moe' is not supported"),
        (text_config_dict(num_experts=None), "missing 'num_experts'"),
        (text_config_dict(rope_parameters={"rope_type": "yarn"}), "rope_type 'yarn'"),
        (text_config_dict(hidden_act="gelu"), "hidden_act 'gelu'"),
        (text_config_dict(layer_types=["linear_attention"]), "layer_types"),
        ({"model_type": "qwen3_5_moe", "text_config": None}, "text_config"),
        ({"model_type": "qwen3_5_moe"}, "text_config"),
    ],
)
def test_unusable_configs_are_refused_naming_config_json(raw: dict, message: str) -> None:
    with pytest.raises(fmt.ModelFormatError, match="config.json") as info:
        normalize_config(raw, None, Path("/src/config.json"))
    assert message in str(info.value)


def test_dtype_selection_follows_the_spec() -> None:
    assert tensor_dtype("layers.0.mlp.gate.weight", [8, 64], 4) == "bf16"
    assert tensor_dtype("layers.0.mlp.shared_expert_gate.weight", [1, 64], 8) == "bf16"
    assert tensor_dtype("layers.0.linear_attn.in_proj_a.weight", [4, 64], 4) == "bf16"
    assert tensor_dtype("layers.0.linear_attn.in_proj_b.weight", [4, 64], 4) == "bf16"
    assert tensor_dtype("layers.0.linear_attn.conv1d.weight", [128, 4], 4) == "f32"
    assert tensor_dtype("layers.0.linear_attn.A_log", [4], 16) == "f32"
    assert tensor_dtype("layers.0.mlp.shared_expert.gate_proj.weight", [64, 64], 4) == "q4"
    assert tensor_dtype("layers.0.mlp.shared_expert.gate_proj.weight", [64, 64], 8) == "q8"
    assert tensor_dtype("layers.0.linear_attn.out_proj.weight", [64, 96], 4) == "bf16"
    assert tensor_dtype("embed_tokens.weight", [256, 64], 16) == "bf16"


def test_row_chunked_streaming_reads_little_and_writes_the_same_bytes(
    tiny_models: TinyModels, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tiny_models.checkpoint("A", "fused")
    reads: list[int] = []
    original_read = Checkpoint._read

    def recording_read(self: Checkpoint, info: Any, offset: int, nbytes: int) -> np.ndarray:
        reads.append(nbytes)
        return original_read(self, info, offset, nbytes)

    monkeypatch.setattr(Checkpoint, "_read", recording_read)
    monkeypatch.setattr(convert_mod, "CHUNK_ELEMENTS", 64 * 48)  # 48 rows of 64 per chunk
    out = convert(src, tmp_path / "chunked", 4, progress=False)
    assert same_model(out, tiny_models.converted(4, "A", "fused"))
    fused = Checkpoint(src).info("model.layers.0.mlp.experts.gate_up_proj")
    one_expert = fused.row_nbytes  # [2I, H] of fp32
    assert max(reads) <= max(one_expert, 64 * 48 * 4)
    assert max(reads) < fused.nbytes // 4, "read a whole fused expert tensor at once"


def test_tied_embeddings_supply_lm_head(tiny_models: TinyModels, tmp_path: Path) -> None:
    src = tmp_path / "tied"
    shutil.copytree(tiny_models.checkpoint("A", "fused"), src)
    config = json.loads((src / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (src / "config.json").write_text(json.dumps(config))
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shard = src / index["weight_map"].pop("lm_head.weight")
    tensors = load_file(shard)
    del tensors["lm_head.weight"]
    save_file(tensors, shard)
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    out = convert(src, tmp_path / "out", 8, progress=False)
    manifest = fmt.load_manifest(out)
    np.testing.assert_array_equal(
        fmt.read_tensor(out, manifest, "lm_head.weight"),
        fmt.read_tensor(out, manifest, "embed_tokens.weight"),
    )


def test_side_files_are_copied(tiny_models: TinyModels, tmp_path: Path) -> None:
    tok = tmp_path / "tok"
    tok.mkdir()
    contents = {
        "tokenizer.json": '{"model": {}}',
        "tokenizer_config.json": "{}",
        "chat_template.jinja": "{{ messages }}",
        "special_tokens_map.json": "{}",
        "notes.txt": "not copied by the converter",
    }
    for name, text in contents.items():
        (tok / name).write_text(text)
    src = tiny_models.checkpoint("A", "per_expert", tokenizer_dir=tok)
    out = convert(src, tmp_path / "out", 16, progress=False)
    for name in [*list(contents)[:4], "config.json", "generation_config.json"]:
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    assert not (out / "notes.txt").exists()
    assert sorted(p.name for p in out.iterdir() if p.suffix in (".bin", ".safetensors")) == [
        "experts.bin",
        "weights.bin",
    ]


def test_safetensors_reader_matches_the_reference_library(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    tensors = {
        "f32": rng.standard_normal((4, 3, 5)).astype(np.float32),
        "f16": rng.standard_normal((6, 7)).astype(np.float16),
        "bf16": torch.from_numpy(rng.standard_normal((5, 2, 3)).astype(np.float32)).bfloat16(),
        "scalarish": np.array([1.5], np.float32),
    }
    save_torch(
        {
            k: (v if isinstance(v, torch.Tensor) else torch.from_numpy(v))
            for k, v in tensors.items()
        },
        tmp_path / "model.safetensors",
    )
    ckpt = Checkpoint(tmp_path)
    for name, value in tensors.items():
        want = (
            value.float().numpy() if isinstance(value, torch.Tensor) else value.astype(np.float32)
        )
        got = ckpt.read(name)
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(ckpt.read_index(name, 0), want[0])
        if want.shape[0] > 2:
            np.testing.assert_array_equal(ckpt.read_rows(name, 1, 3), want[1:3])
    assert ckpt.info("bf16").dtype == "BF16" and ckpt.info("f16").dtype == "F16"
    ckpt.close()


def test_cli_convert_and_verify(tiny_models: TinyModels, tmp_path: Path, capsys: Any) -> None:
    def run(module: Any, argv: list[str]) -> int:
        parser = argparse.ArgumentParser()
        module.add_arguments(parser)
        return module.run(parser.parse_args(argv))

    src = tiny_models.checkpoint("B", "fused", wrapper="vlm")
    out = tmp_path / "cli"
    assert run(convert_mod, [str(src), str(out), "--bits", "8"]) == 0
    captured = capsys.readouterr()
    assert f"wrote {out}" in captured.out
    # stderr is not a terminal here: no redraws, only the final summary line
    assert "\r" not in captured.err and captured.err.count("\n") == 1 and "MB/s" in captured.err
    assert same_model(out, tiny_models.converted(8, "B"))
    assert run(verify_mod, [str(out)]) == 0
    assert "OK" in capsys.readouterr().out
    assert verify_mod.verify(out, progress=False) == []


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_terminal_and_off_it() -> None:
    tty = FakeTerminal()
    bar = Progress(3_000_000, "convert x", stream=tty, min_interval=0)
    bar.advance(1_000_000)
    bar.advance(2_000_000)
    bar.finish()
    text = tty.getvalue()
    assert "\r" in text and "33%" in text and "ETA" in text and "3.0 MB/3.0 MB" in text
    assert text.endswith("B/s)\n") and "convert x: 3.0 MB in" in text
    log = io.StringIO()
    with Progress(10, "verify", stream=log) as quiet:
        quiet.advance(10)
    assert log.getvalue().count("\n") == 1 and "\r" not in log.getvalue()
    silent = io.StringIO()
    with Progress(10, "verify", stream=silent, enabled=False) as off:
        off.advance(10)
    assert silent.getvalue() == ""
