"""The model directory format (docs/format.md): constants, encodings, manifest checks, numpy reader.

The writer (convert.py), `flashmoe verify` and the tests all go through this module, so the byte
layout of a tensor is defined once, here.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import _core

FORMAT = "flashmoe-native"
FORMAT_VERSION = 1
GROUP_SIZE = 64
TENSOR_ALIGN = 64  # every tensor in weights.bin and every part of a quantized matrix
BLOCK_ALIGN = 4096  # expert blocks, so one O_DIRECT pread fetches one expert

MANIFEST_NAME = "manifest.json"
WEIGHTS_FILE = "weights.bin"
EXPERTS_FILE = "experts.bin"

SUPPORTED_ARCHITECTURES = ("qwen3_5_moe",)
DTYPES = ("f32", "bf16", "q8", "q4")
QUANT_BITS = {"q4": 4, "q8": 8}
EXPERT_PARTS = ("gate", "up", "down")

# Keys of manifest["config"] for architecture qwen3_5_moe (docs/format.md).
CONFIG_KEYS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "layer_types",
    "rms_norm_eps",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rotary_dim",
    "rope_theta",
    "max_position_embeddings",
    "linear_num_key_heads",
    "linear_num_value_heads",
    "linear_key_head_dim",
    "linear_value_head_dim",
    "linear_conv_kernel_dim",
    "num_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "norm_topk_prob",
    "shared_expert_intermediate_size",
    "eos_token_ids",
)
LAYER_TYPES = ("linear_attention", "full_attention")


class ModelFormatError(Exception):
    """A model directory or source checkpoint is malformed; the message names the offending file."""


def align_up(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


def hex64(value: int) -> str:
    """Checksum text as stored in manifests: lower-case hex, 16 digits."""
    return f"{value:016x}"


# ---------------------------------------------------------------------------------------------
# element encodings


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even; NaN stays a quiet NaN."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounding_bias = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    out = ((bits + rounding_bias) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = ((bits[nan] >> 16) | 0x40).astype(np.uint16)
    return out


def bf16_to_f32(b: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32, exact."""
    return (np.ascontiguousarray(b, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def bf16_round(x: np.ndarray) -> np.ndarray:
    """float32 rounded to the nearest bfloat16, as float32."""
    return bf16_to_f32(f32_to_bf16(x))


# ---------------------------------------------------------------------------------------------
# quantized matrices


@dataclass(frozen=True)
class QuantLayout:
    """Byte layout of one quantized [rows, cols] matrix; offsets are from the tensor's start."""

    rows: int
    cols: int
    bits: int
    data_offset: int
    data_nbytes: int
    scales_offset: int
    scales_nbytes: int
    biases_offset: int
    biases_nbytes: int

    @property
    def nbytes(self) -> int:
        return self.biases_offset + self.biases_nbytes

    @property
    def words_per_row(self) -> int:
        return self.cols * self.bits // 32

    @property
    def groups_per_row(self) -> int:
        return self.cols // GROUP_SIZE


def quant_layout(rows: int, cols: int, bits: int) -> QuantLayout:
    """The one definition of where data, scales and biases of a quantized matrix sit."""
    if bits not in (4, 8):
        raise ValueError(f"quantized matrices have 4 or 8 bits, not {bits}")
    if rows <= 0 or cols <= 0 or cols % GROUP_SIZE:
        raise ValueError(
            f"cannot quantize a [{rows}, {cols}] matrix: cols must be a multiple of 64"
        )
    data_nbytes = rows * cols * bits // 8
    group_nbytes = rows * (cols // GROUP_SIZE) * 2
    scales_offset = align_up(data_nbytes, TENSOR_ALIGN)
    biases_offset = scales_offset + align_up(group_nbytes, TENSOR_ALIGN)
    return QuantLayout(
        rows, cols, bits, 0, data_nbytes, scales_offset, group_nbytes, biases_offset, group_nbytes
    )


def quantize(w: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Affine group-64 quantization of a float32 [rows, cols] matrix (docs/format.md).

    Returns (data uint32 [rows, cols*bits/32], scales uint16 bf16 [rows, cols/64], biases likewise).
    """
    if w.ndim != 2:
        raise ValueError(f"quantize expects a 2-D matrix, got shape {w.shape}")
    layout = quant_layout(w.shape[0], w.shape[1], bits)
    levels = (1 << bits) - 1
    groups = np.asarray(w, dtype=np.float32).reshape(layout.rows, layout.groups_per_row, GROUP_SIZE)
    lo = groups.min(axis=2)
    hi = groups.max(axis=2)
    scales = f32_to_bf16((hi - lo) / np.float32(levels))
    biases = f32_to_bf16(lo)
    scale = bf16_to_f32(scales)[:, :, None]
    bias = bf16_to_f32(biases)[:, :, None]
    constant = scale == 0  # a constant group: q = 0 reproduces it exactly through the bias
    # in place, one temporary: conversion time is dominated by this function
    q = groups - bias
    q /= np.where(constant, np.float32(1), scale)
    np.rint(q, out=q)
    np.clip(q, 0, levels, out=q)
    q *= ~constant
    q8 = q.astype(np.uint8).reshape(layout.rows, layout.cols)
    if bits == 4:
        # byte b holds column 2b in its low nibble and 2b + 1 in its high nibble
        q8 = q8[:, 0::2] | (q8[:, 1::2] << 4)
    # little-endian words: element j of a word sits at bits [bits*j, bits*j + bits)
    data = np.ascontiguousarray(q8).view("<u4").astype(np.uint32, copy=False)
    return data, scales, biases


def dequantize(data: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of quantize's encoding: w[r, c] = q[r, c] * scale[r, c/64] + bias[r, c/64] in f32."""
    rows, groups = scales.shape
    layout = quant_layout(rows, groups * GROUP_SIZE, bits)
    if data.shape != (rows, layout.words_per_row) or biases.shape != scales.shape:
        raise ValueError(
            f"inconsistent quantized parts: data {data.shape}, scales {scales.shape}, "
            f"biases {biases.shape} for {bits} bits"
        )
    per_word = 32 // bits
    shifts = (np.arange(per_word, dtype=np.uint32) * np.uint32(bits))[None, None, :]
    mask = np.uint32((1 << bits) - 1)
    q = ((data.astype(np.uint32)[:, :, None] >> shifts) & mask).astype(np.float32)
    q = q.reshape(rows, groups, GROUP_SIZE)
    w = q * bf16_to_f32(scales)[:, :, None] + bf16_to_f32(biases)[:, :, None]
    return w.reshape(rows, layout.cols)


def pack_quantized(
    data: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int
) -> np.ndarray:
    """Serialize one quantized matrix to its bytes (uint8), padding between parts zeroed."""
    layout = quant_layout(scales.shape[0], scales.shape[1] * GROUP_SIZE, bits)
    out = np.zeros(layout.nbytes, dtype=np.uint8)
    parts = (
        (layout.data_offset, data),
        (layout.scales_offset, scales),
        (layout.biases_offset, biases),
    )
    for offset, part in parts:
        raw = np.ascontiguousarray(part).astype(part.dtype.newbyteorder("<"), copy=False)
        flat = raw.view(np.uint8).reshape(-1)
        out[offset : offset + flat.size] = flat
    return out


def unpack_quantized(
    buf: np.ndarray, rows: int, cols: int, bits: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split the bytes of one quantized matrix (uint8) into (data, scales, biases)."""
    layout = quant_layout(rows, cols, bits)
    if buf.size < layout.nbytes:
        raise ValueError(f"quantized [{rows}, {cols}] q{bits} needs {layout.nbytes} bytes")

    def part(offset: int, nbytes: int, dtype: str, shape: tuple[int, int]) -> np.ndarray:
        return buf[offset : offset + nbytes].view(np.dtype(dtype)).reshape(shape)

    data = part(layout.data_offset, layout.data_nbytes, "<u4", (rows, layout.words_per_row))
    scales = part(layout.scales_offset, layout.scales_nbytes, "<u2", (rows, layout.groups_per_row))
    biases = part(layout.biases_offset, layout.biases_nbytes, "<u2", (rows, layout.groups_per_row))
    return data, scales, biases


# ---------------------------------------------------------------------------------------------
# tensors of any dtype


def tensor_nbytes(dtype: str, shape: list[int] | tuple[int, ...]) -> int:
    """Bytes a tensor of this dtype and shape occupies (raises ValueError if it cannot exist)."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} (known: {', '.join(DTYPES)})")
    if not shape or any(not isinstance(d, int) or d <= 0 for d in shape):
        raise ValueError(f"bad shape {shape!r}")
    if dtype in QUANT_BITS:
        if len(shape) != 2:
            raise ValueError(f"{dtype} tensors are 2-D, got shape {list(shape)}")
        return quant_layout(shape[0], shape[1], QUANT_BITS[dtype]).nbytes
    return math.prod(shape) * (4 if dtype == "f32" else 2)


def encode_tensor(w: np.ndarray, dtype: str) -> np.ndarray:
    """float32 tensor -> its stored bytes (uint8) in the given dtype."""
    w = np.asarray(w, dtype=np.float32)
    if dtype == "f32":
        return np.ascontiguousarray(w, dtype="<f4").view(np.uint8).reshape(-1)
    if dtype == "bf16":
        return np.ascontiguousarray(f32_to_bf16(w), dtype="<u2").view(np.uint8).reshape(-1)
    if dtype in QUANT_BITS:
        return pack_quantized(*quantize(w, QUANT_BITS[dtype]), QUANT_BITS[dtype])
    raise ValueError(f"unknown dtype {dtype!r}")


def decode_tensor(buf: np.ndarray, dtype: str, shape: list[int] | tuple[int, ...]) -> np.ndarray:
    """Stored bytes (uint8) -> float32 tensor of the given shape (dequantized / widened)."""
    nbytes = tensor_nbytes(dtype, shape)
    if buf.size < nbytes:
        raise ValueError(f"{dtype} {list(shape)} needs {nbytes} bytes, got {buf.size}")
    buf = np.ascontiguousarray(buf[:nbytes])
    if dtype == "f32":
        return buf.view("<f4").astype(np.float32).reshape(shape)
    if dtype == "bf16":
        return bf16_to_f32(buf.view("<u2")).reshape(shape)
    bits = QUANT_BITS[dtype]
    return dequantize(*unpack_quantized(buf, shape[0], shape[1], bits), bits)


def expert_block_layout(
    part_dtypes: Mapping[str, str], part_shapes: Mapping[str, list[int]]
) -> tuple[dict[str, dict[str, Any]], int, int]:
    """Offsets of gate, up, down inside one expert block -> (parts, block_bytes, block_stride)."""
    parts: dict[str, dict[str, Any]] = {}
    offset = 0
    for name in EXPERT_PARTS:
        offset = align_up(offset, TENSOR_ALIGN)
        shape = list(part_shapes[name])
        parts[name] = {"dtype": part_dtypes[name], "shape": shape, "offset": offset}
        offset += tensor_nbytes(part_dtypes[name], shape)
    return parts, offset, align_up(offset, BLOCK_ALIGN)


# ---------------------------------------------------------------------------------------------
# the tensors an architecture needs


def expected_tensor_shapes(config: Mapping[str, Any]) -> dict[str, list[int]]:
    """Every non-expert tensor a qwen3_5_moe model has, with its stored shape."""
    h = config["hidden_size"]
    vocab = config["vocab_size"]
    shapes: dict[str, list[int]] = {
        "embed_tokens.weight": [vocab, h],
        "norm.weight": [h],
        "lm_head.weight": [vocab, h],
    }
    nh, nkv, hd = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    nk, nv = config["linear_num_key_heads"], config["linear_num_value_heads"]
    dk, dv = config["linear_key_head_dim"], config["linear_value_head_dim"]
    conv_channels = 2 * nk * dk + nv * dv
    shared = config["shared_expert_intermediate_size"]
    for i, kind in enumerate(config["layer_types"]):
        p = f"layers.{i}."
        shapes[p + "input_layernorm.weight"] = [h]
        shapes[p + "post_attention_layernorm.weight"] = [h]
        if kind == "full_attention":
            a = p + "self_attn."
            shapes[a + "q_proj.weight"] = [2 * nh * hd, h]  # query and output gate per head
            shapes[a + "k_proj.weight"] = [nkv * hd, h]
            shapes[a + "v_proj.weight"] = [nkv * hd, h]
            shapes[a + "o_proj.weight"] = [h, nh * hd]
            shapes[a + "q_norm.weight"] = [hd]
            shapes[a + "k_norm.weight"] = [hd]
        else:
            a = p + "linear_attn."
            shapes[a + "in_proj_qkv.weight"] = [conv_channels, h]
            shapes[a + "in_proj_z.weight"] = [nv * dv, h]
            shapes[a + "in_proj_b.weight"] = [nv, h]
            shapes[a + "in_proj_a.weight"] = [nv, h]
            shapes[a + "conv1d.weight"] = [conv_channels, config["linear_conv_kernel_dim"]]
            shapes[a + "out_proj.weight"] = [h, nv * dv]
            shapes[a + "norm.weight"] = [dv]
            shapes[a + "A_log"] = [nv]
            shapes[a + "dt_bias"] = [nv]
        m = p + "mlp."
        shapes[m + "gate.weight"] = [config["num_experts"], h]
        shapes[m + "shared_expert_gate.weight"] = [1, h]
        shapes[m + "shared_expert.gate_proj.weight"] = [shared, h]
        shapes[m + "shared_expert.up_proj.weight"] = [shared, h]
        shapes[m + "shared_expert.down_proj.weight"] = [h, shared]
    return shapes


def expected_expert_shapes(config: Mapping[str, Any]) -> dict[str, list[int]]:
    h, inter = config["hidden_size"], config["moe_intermediate_size"]
    return {"gate": [inter, h], "up": [inter, h], "down": [h, inter]}


# ---------------------------------------------------------------------------------------------
# manifest


def _require(cond: bool, path: Path, message: str) -> None:
    if not cond:
        raise ModelFormatError(f"{path}: {message}")


def _is_hex64(v: Any) -> bool:
    return isinstance(v, str) and len(v) == 16 and all(c in "0123456789abcdef" for c in v)


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def check_config(config: Any, path: Path) -> None:
    """Raise ModelFormatError (naming `path`) unless `config` is a valid normalized config."""
    _require(isinstance(config, dict), path, "'config' must be an object")
    missing = [k for k in CONFIG_KEYS if k not in config]
    _require(not missing, path, f"config lacks {', '.join(missing)}")
    non_counts = ("layer_types", "rms_norm_eps", "rope_theta", "norm_topk_prob", "eos_token_ids")
    for key in CONFIG_KEYS:
        if key not in non_counts:
            _require(_is_count(config[key]), path, f"config.{key} must be a positive integer")
    _require(isinstance(config["norm_topk_prob"], bool), path, "config.norm_topk_prob must be bool")
    eos = config["eos_token_ids"]
    _require(
        isinstance(eos, list) and all(isinstance(t, int) for t in eos),
        path,
        "config.eos_token_ids must be a list of integers",
    )
    for key in ("rms_norm_eps", "rope_theta"):
        v = config[key]
        _require(isinstance(v, (int, float)) and v > 0, path, f"config.{key} must be positive")
    types = config["layer_types"]
    _require(
        isinstance(types, list)
        and len(types) == config["num_hidden_layers"]
        and all(t in LAYER_TYPES for t in types),
        path,
        f"config.layer_types must list {config['num_hidden_layers']} entries of {LAYER_TYPES}",
    )
    _require(
        config["rotary_dim"] <= config["head_dim"] and config["rotary_dim"] % 2 == 0,
        path,
        "config.rotary_dim must be even and at most head_dim",
    )
    _require(
        config["num_attention_heads"] % config["num_key_value_heads"] == 0
        and config["linear_num_value_heads"] % config["linear_num_key_heads"] == 0,
        path,
        "head counts must be multiples of their key/value head counts",
    )
    _require(
        config["num_experts_per_tok"] <= config["num_experts"],
        path,
        "config.num_experts_per_tok exceeds num_experts",
    )


def _check_tensor_entry(name: str, entry: Any, path: Path) -> tuple[int, int]:
    _require(isinstance(entry, dict), path, f"tensor {name}: entry must be an object")
    for key in ("dtype", "shape", "offset", "nbytes"):
        _require(key in entry, path, f"tensor {name}: missing '{key}'")
    try:
        expected = tensor_nbytes(entry["dtype"], entry["shape"])
    except ValueError as e:
        raise ModelFormatError(f"{path}: tensor {name}: {e}") from None
    _require(
        entry["nbytes"] == expected,
        path,
        f"tensor {name}: nbytes {entry['nbytes']} but {entry['dtype']} {entry['shape']} "
        f"takes {expected}",
    )
    offset = entry["offset"]
    _require(
        isinstance(offset, int) and offset >= 0 and offset % TENSOR_ALIGN == 0,
        path,
        f"tensor {name}: offset {offset!r} is not a 64-byte aligned byte offset",
    )
    return offset, expected


def _check_experts(experts: Any, config: Mapping[str, Any], path: Path) -> None:
    _require(isinstance(experts, dict), path, "'experts' must be an object")
    for key in (
        "file",
        "num_layers",
        "num_experts",
        "block_bytes",
        "block_stride",
        "parts",
        "xxh64",
    ):
        _require(key in experts, path, f"experts: missing '{key}'")
    _require(
        isinstance(experts["file"], str) and os.path.basename(experts["file"]) == experts["file"],
        path,
        "experts.file must be a plain file name",
    )
    for key in ("num_layers", "num_experts", "block_bytes", "block_stride"):
        _require(_is_count(experts[key]), path, f"experts.{key} must be a positive integer")
    _require(
        experts["num_layers"] == config["num_hidden_layers"]
        and experts["num_experts"] == config["num_experts"],
        path,
        "experts: num_layers/num_experts disagree with config",
    )
    parts = experts["parts"]
    _require(
        isinstance(parts, dict) and sorted(parts) == sorted(EXPERT_PARTS),
        path,
        f"experts.parts must be exactly {', '.join(EXPERT_PARTS)}",
    )
    shapes = expected_expert_shapes(config)
    for name in EXPERT_PARTS:
        part = parts[name]
        _require(isinstance(part, dict), path, f"experts.parts.{name} must be an object")
        _require(
            part.get("shape") == shapes[name],
            path,
            f"experts.parts.{name}: shape {part.get('shape')} but config implies {shapes[name]}",
        )
        try:
            nbytes = tensor_nbytes(part.get("dtype"), part["shape"])
        except ValueError as e:
            raise ModelFormatError(f"{path}: experts.parts.{name}: {e}") from None
        offset = part.get("offset")
        _require(
            isinstance(offset, int)
            and offset >= 0
            and offset % TENSOR_ALIGN == 0
            and offset + nbytes <= experts["block_bytes"],
            path,
            f"experts.parts.{name}: offset {offset!r} + {nbytes} bytes lies outside the block",
        )
    spans = sorted(
        (
            parts[n]["offset"],
            parts[n]["offset"] + tensor_nbytes(parts[n]["dtype"], parts[n]["shape"]),
        )
        for n in EXPERT_PARTS
    )
    _require(
        all(end <= start for (_, end), (start, _) in zip(spans, spans[1:], strict=False)),
        path,
        "experts.parts overlap",
    )
    _require(
        experts["block_stride"] == align_up(experts["block_bytes"], BLOCK_ALIGN),
        path,
        "experts.block_stride must be block_bytes rounded up to 4096",
    )
    hashes = experts["xxh64"]
    n_blocks = experts["num_layers"] * experts["num_experts"]
    _require(
        isinstance(hashes, list) and len(hashes) == n_blocks and all(_is_hex64(h) for h in hashes),
        path,
        f"experts.xxh64 must hold {n_blocks} checksums of 16 hex digits",
    )


def build_manifest(
    *,
    config: Mapping[str, Any],
    bits: int,
    tensors: Mapping[str, Any],
    expert_parts: Mapping[str, Any],
    block_bytes: int,
    block_stride: int,
    block_hashes: list[str],
    files: Mapping[str, Any],
    source: Mapping[str, Any],
) -> dict[str, Any]:
    """The manifest.json of a qwen3_5_moe model directory (docs/format.md)."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": "qwen3_5_moe",
        "config": dict(config),
        "quantization": {"bits": bits, "group_size": GROUP_SIZE},
        "tensors": dict(tensors),
        "experts": {
            "file": EXPERTS_FILE,
            "num_layers": config["num_hidden_layers"],
            "num_experts": config["num_experts"],
            "block_bytes": block_bytes,
            "block_stride": block_stride,
            "parts": dict(expert_parts),
            "xxh64": block_hashes,
        },
        "files": dict(files),
        "source": dict(source),
    }


def write_manifest(model_dir: Path, manifest: Mapping[str, Any]) -> None:
    """Write manifest.json durably, then check it with the reader: writer and reader must agree."""
    path = model_dir / MANIFEST_NAME
    with open(path, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    load_manifest(model_dir, verify_weights=False)


def load_manifest(model_dir: str | os.PathLike[str], *, verify_weights: bool = True) -> dict:
    """Read and check manifest.json and the files it describes; raises ModelFormatError."""
    root = Path(model_dir)
    path = root / MANIFEST_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ModelFormatError(f"{path}: missing (not a converted model directory?)") from None
    except OSError as e:
        raise ModelFormatError(f"{path}: cannot read: {e.strerror}") from None
    try:
        manifest = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFormatError(f"{path}: not valid JSON: {e}") from None
    _require(isinstance(manifest, dict), path, "top level must be a JSON object")
    _require(
        manifest.get("format") == FORMAT,
        path,
        f"format is {manifest.get('format')!r}, expected {FORMAT!r}",
    )
    _require(
        manifest.get("format_version") == FORMAT_VERSION,
        path,
        f"format_version {manifest.get('format_version')!r} is not supported "
        f"(this build reads version {FORMAT_VERSION})",
    )
    for key in ("architecture", "config", "quantization", "tensors", "experts", "files"):
        _require(key in manifest, path, f"missing key '{key}'")
    arch = manifest["architecture"]
    _require(
        arch in SUPPORTED_ARCHITECTURES,
        path,
        f"architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})",
    )
    quantization = manifest["quantization"]
    _require(
        isinstance(quantization, dict)
        and quantization.get("bits") in (4, 8, 16)
        and quantization.get("group_size") == GROUP_SIZE,
        path,
        f"quantization must be {{'bits': 4, 8 or 16, 'group_size': {GROUP_SIZE}}}",
    )
    config = manifest["config"]
    check_config(config, path)
    experts = manifest["experts"]
    _check_experts(experts, config, path)

    files = manifest["files"]
    _require(isinstance(files, dict), path, "'files' must be an object")
    for name in (WEIGHTS_FILE, experts["file"]):
        _require(name in files, path, f"files lacks {name!r}")
    for name, entry in files.items():
        _require(
            isinstance(entry, dict)
            and isinstance(entry.get("size"), int)
            and _is_hex64(entry.get("xxh64")),
            path,
            f"files.{name} must have 'size' and a 16 hex digit 'xxh64'",
        )
        _require(os.path.basename(name) == name, path, f"files.{name}: must be a plain file name")
        file_path = root / name
        try:
            size = file_path.stat().st_size
        except FileNotFoundError:
            raise ModelFormatError(
                f"{file_path}: missing (manifest lists {entry['size']} bytes)"
            ) from None
        if size != entry["size"]:
            raise ModelFormatError(
                f"{file_path}: size is {size} bytes, manifest.json says {entry['size']} "
                f"({'truncated' if size < entry['size'] else 'too long'})"
            )

    tensors = manifest["tensors"]
    _require(isinstance(tensors, dict), path, "'tensors' must be an object")
    expected_shapes = expected_tensor_shapes(config)
    missing = [n for n in expected_shapes if n not in tensors]
    _require(not missing, path, f"tensors missing: {', '.join(missing[:5])}")
    unknown = [n for n in tensors if n not in expected_shapes]
    _require(not unknown, path, f"unknown tensors: {', '.join(unknown[:5])}")
    weights_size = files[WEIGHTS_FILE]["size"]
    for name, entry in tensors.items():
        offset, nbytes = _check_tensor_entry(name, entry, path)
        _require(
            entry["shape"] == expected_shapes[name],
            path,
            f"tensor {name}: shape {entry['shape']} but config implies {expected_shapes[name]}",
        )
        _require(
            offset + nbytes <= weights_size,
            path,
            f"tensor {name}: bytes {offset}..{offset + nbytes} lie outside {WEIGHTS_FILE} "
            f"({weights_size} bytes)",
        )

    experts_size = experts["num_layers"] * experts["num_experts"] * experts["block_stride"]
    _require(
        files[experts["file"]]["size"] == experts_size,
        path,
        f"{experts['file']} must be num_layers x num_experts x block_stride = {experts_size} bytes",
    )

    if verify_weights:
        weights_path = root / WEIGHTS_FILE
        actual = hex64(_core.xxh64_file(str(weights_path), 0, weights_size))
        if actual != files[WEIGHTS_FILE]["xxh64"]:
            raise ModelFormatError(
                f"{weights_path}: checksum mismatch (xxh64 {actual}, manifest.json says "
                f"{files[WEIGHTS_FILE]['xxh64']}): the file is corrupted"
            )
    return manifest


# ---------------------------------------------------------------------------------------------
# numpy reader (what the engine holds, for tests and tools)


def _read_bytes(path: Path, offset: int, nbytes: int) -> np.ndarray:
    buf = np.empty(nbytes, dtype=np.uint8)
    with open(path, "rb") as f:
        f.seek(offset)
        got = f.readinto(memoryview(buf))
    if got != nbytes:
        raise ModelFormatError(f"{path}: file ends before byte {offset + nbytes}")
    return buf


def read_tensor(
    model_dir: str | os.PathLike[str], manifest: Mapping[str, Any], name: str
) -> np.ndarray:
    """A tensor of weights.bin as float32 (dequantized or widened), shape as in the manifest."""
    try:
        entry = manifest["tensors"][name]
    except KeyError:
        raise KeyError(f"no tensor {name!r} in the manifest") from None
    buf = _read_bytes(Path(model_dir) / WEIGHTS_FILE, entry["offset"], entry["nbytes"])
    return decode_tensor(buf, entry["dtype"], entry["shape"])


def read_expert(
    model_dir: str | os.PathLike[str], manifest: Mapping[str, Any], layer: int, expert: int
) -> dict[str, np.ndarray]:
    """One expert of experts.bin as float32 matrices: gate [I,H], up [I,H], down [H,I]."""
    experts = manifest["experts"]
    if not (0 <= layer < experts["num_layers"] and 0 <= expert < experts["num_experts"]):
        raise IndexError(f"no expert ({layer}, {expert}) in this model")
    block_index = layer * experts["num_experts"] + expert
    block = _read_bytes(
        Path(model_dir) / experts["file"],
        block_index * experts["block_stride"],
        experts["block_bytes"],
    )
    out = {}
    for name in EXPERT_PARTS:
        part = experts["parts"][name]
        out[name] = decode_tensor(block[part["offset"] :], part["dtype"], part["shape"])
    return out
