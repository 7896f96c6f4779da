"""Synthetic model directories with real model dimensions and random weights, for benchmarks.

Quantized tensors are written as random codes with scales chosen so each row has roughly unit
gain (activations neither vanish nor blow up over 40 layers); nothing is quantized, so a 19 GB
Qwen3.5-35B-A3B-shaped model is written at disk speed.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

from flashmoe_native import _core
from flashmoe_native import format as fmt
from flashmoe_native.convert import HashingWriter, tensor_dtype
from flashmoe_native.progress import Progress

# Qwen3.5-35B-A3B text decoder (the shape of the hub config's text_config).
QWEN35_35B_A3B: dict[str, Any] = {
    "vocab_size": 248320,
    "hidden_size": 2048,
    "num_hidden_layers": 40,
    "layer_types": [
        "full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(40)
    ],
    "rms_norm_eps": 1e-6,
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "head_dim": 256,
    "rotary_dim": 64,
    "rope_theta": 10_000_000.0,
    "max_position_embeddings": 262144,
    "linear_num_key_heads": 16,
    "linear_num_value_heads": 32,
    "linear_key_head_dim": 128,
    "linear_value_head_dim": 128,
    "linear_conv_kernel_dim": 4,
    "num_experts": 256,
    "num_experts_per_tok": 8,
    "moe_intermediate_size": 512,
    "shared_expert_intermediate_size": 512,
    "norm_topk_prob": True,
    "eos_token_ids": [248046],
}


def qwen35_35b_a3b(layers: int | None = None) -> dict[str, Any]:
    """The 35B-A3B config, optionally cut to its first `layers` layers."""
    config = copy.deepcopy(QWEN35_35B_A3B)
    if layers is not None:
        config["num_hidden_layers"] = layers
        config["layer_types"] = config["layer_types"][:layers]
    return config


def random_tensor(rng: np.random.Generator, dtype: str, shape: list[int], name: str) -> np.ndarray:
    """Encoded bytes of one random tensor of `dtype` and `shape` (docs/format.md)."""
    if len(shape) == 1 or dtype == "f32":
        n = int(np.prod(shape))
        if name.endswith("A_log"):
            values = np.log(rng.uniform(1, 16, n))
        elif name.endswith("dt_bias"):
            values = np.ones(n)
        elif name.endswith("conv1d.weight"):
            values = rng.normal(0, 0.3, n)
        elif name.endswith("linear_attn.norm.weight"):
            values = 1 + rng.normal(0, 0.1, n)  # plain weight
        else:
            values = rng.normal(0, 0.1, n)  # zero-centred norms: (1 + w)
        return values.astype("<f4").view(np.uint8)
    rows, cols = shape
    std = 1.0 / np.sqrt(cols)
    if dtype == "bf16":
        w = rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(std)
        return fmt.f32_to_bf16(w).view(np.uint8).reshape(-1)
    bits = fmt.QUANT_BITS[dtype]
    levels = (1 << bits) - 1
    layout = fmt.quant_layout(rows, cols, bits)
    out = np.zeros(layout.nbytes, dtype=np.uint8)
    codes = rows * cols * bits // 8
    # 64 random bits at a time: about 25 times faster per byte than drawing single bytes
    top = np.iinfo(np.uint64).max
    words = rng.integers(0, top, (codes + 7) // 8, dtype=np.uint64, endpoint=True)
    out[:codes] = words.view(np.uint8)[:codes]
    groups = rows * (cols // fmt.GROUP_SIZE)
    # uniform codes have std levels/sqrt(12); centre them with the bias
    scale = (std * np.sqrt(12) / levels) * rng.uniform(0.8, 1.2, groups).astype(np.float32)
    scales = fmt.f32_to_bf16(scale.astype(np.float32))
    biases = fmt.f32_to_bf16((-levels / 2 * fmt.bf16_to_f32(scales)).astype(np.float32))
    out[layout.scales_offset : layout.scales_offset + 2 * groups] = scales.view(np.uint8)
    out[layout.biases_offset : layout.biases_offset + 2 * groups] = biases.view(np.uint8)
    return out


def write_synthetic_model(
    out: str | os.PathLike[str], config: dict[str, Any], bits: int = 4, seed: int = 0
) -> Path:
    """Write a model directory with `config`'s shape and random weights at `bits`; returns it.

    A directory that already holds a model of the same config, bits and seed is reused.
    """
    out_path = Path(out)
    recipe = {"config": config, "bits": bits, "seed": seed}
    manifest_path = out_path / fmt.MANIFEST_NAME
    if manifest_path.is_file():
        existing = json.loads(manifest_path.read_text())
        if existing.get("source", {}).get("synthetic") == recipe:
            return out_path
        raise FileExistsError(f"{out_path}: holds another model; remove it first")
    fmt.check_config(config, out_path / "config")
    rng = np.random.default_rng(seed)
    shapes = fmt.expected_tensor_shapes(config)
    dtypes = {name: tensor_dtype(name, shape, bits) for name, shape in shapes.items()}
    expert_shapes = fmt.expected_expert_shapes(config)
    expert_dtypes = {p: tensor_dtype("experts." + p, s, bits) for p, s in expert_shapes.items()}
    parts, block_bytes, block_stride = fmt.expert_block_layout(expert_dtypes, expert_shapes)
    layers, experts = config["num_hidden_layers"], config["num_experts"]
    total = sum(fmt.tensor_nbytes(dtypes[n], s) for n, s in shapes.items())
    total += layers * experts * block_stride

    tmp = out_path.with_name(f"{out_path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with Progress(total, f"synthetic {out_path.name}") as bar:
            weights = HashingWriter(tmp / fmt.WEIGHTS_FILE)
            tensors = {}
            for name, shape in shapes.items():
                offset = fmt.align_up(weights.size, fmt.TENSOR_ALIGN)
                weights.pad_to(offset)
                data = random_tensor(rng, dtypes[name], shape, name)
                weights.write(data)
                bar.advance(data.size)
                tensors[name] = {
                    "dtype": dtypes[name],
                    "shape": shape,
                    "offset": offset,
                    "nbytes": data.size,
                }
            weights_entry = weights.close()
            experts_file = HashingWriter(tmp / fmt.EXPERTS_FILE)
            hashes = []
            for _ in range(layers * experts):
                block = np.zeros(block_stride, dtype=np.uint8)
                for p in fmt.EXPERT_PARTS:
                    data = random_tensor(rng, expert_dtypes[p], expert_shapes[p], p)
                    block[parts[p]["offset"] : parts[p]["offset"] + data.size] = data
                hasher = _core.Xxh64()
                hasher.update_array(block)
                hashes.append(fmt.hex64(hasher.digest()))
                experts_file.write(block)
                bar.advance(block_stride)
            experts_entry = experts_file.close()
        manifest = fmt.build_manifest(
            config=config,
            bits=bits,
            tensors=tensors,
            expert_parts=parts,
            block_bytes=block_bytes,
            block_stride=block_stride,
            block_hashes=hashes,
            files={fmt.WEIGHTS_FILE: weights_entry, fmt.EXPERTS_FILE: experts_entry},
            source={"synthetic": recipe},
        )
        fmt.write_manifest(tmp, manifest)
        if out_path.exists():
            shutil.rmtree(out_path)
        tmp.rename(out_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("out", type=Path)
    p.add_argument("--layers", type=int, default=None, help="first N layers only (default all 40)")
    p.add_argument("--bits", type=int, choices=(4, 8, 16), default=4)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    path = write_synthetic_model(a.out, qwen35_35b_a3b(a.layers), a.bits, a.seed)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
