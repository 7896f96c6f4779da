"""Tiny random Qwen3.5-MoE checkpoints built with transformers, in every layout the converter reads.

Every checkpoint of one shape holds the same weights whatever its layout (per-expert from
save_pretrained, or the hub's fused experts), wrapper (text-only or the vision-language wrapper) and
storage dtype, so their conversions can be compared byte for byte. Weights that random init leaves
at identity (zero-centred norms, dt_bias, the router) are perturbed so that a `w` vs `1 + w` bug or
a flat router cannot hide.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import (
    Qwen3_5MoeConfig,
    Qwen3_5MoeForCausalLM,
    Qwen3_5MoeForConditionalGeneration,
    Qwen3_5MoeTextConfig,
)

from flashmoe_native import format as fmt
from flashmoe_native.convert import convert

LIN, FULL = "linear_attention", "full_attention"

# Every matrix in-dim is a multiple of 64 in A and B, so 4/8-bit applies to all projections.
SHAPES: dict[str, dict[str, Any]] = {
    "A": dict(
        hidden_size=64,
        layer_types=[LIN, FULL, LIN, FULL],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        partial_rotary_factor=0.25,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=64,
    ),
    "B": dict(
        hidden_size=128,
        layer_types=[LIN, LIN, LIN, FULL, LIN],
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        partial_rotary_factor=0.5,
        linear_num_key_heads=1,
        linear_num_value_heads=3,  # 3 value heads share one key head
        linear_key_head_dim=32,
        linear_value_head_dim=64,
        num_experts=16,
        num_experts_per_tok=4,
        moe_intermediate_size=128,
        shared_expert_intermediate_size=64,
    ),
    # In-dims that are not multiples of 64 (out_proj 48, expert down 96, shared down 32): those
    # matrices stay bf16 at 4/8 bits, so one expert block mixes q4/q8 and bf16 parts.
    "C": dict(
        hidden_size=64,
        layer_types=[LIN, FULL],
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        partial_rotary_factor=0.5,
        linear_num_key_heads=1,
        linear_num_value_heads=3,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=96,
        shared_expert_intermediate_size=32,
    ),
}
SEEDS = {"A": 11, "B": 22, "C": 33}
LAYOUTS = ("fused", "per_expert")
WRAPPERS = ("text", "vlm")


def text_config(shape: str, vocab_size: int = 256, **overrides: Any) -> Qwen3_5MoeTextConfig:
    dims = dict(SHAPES[shape])
    partial = dims.pop("partial_rotary_factor")
    rotary_dim = int(dims["head_dim"] * partial)
    half = rotary_dim // 2
    # mRoPE sections (t, h, w) sum to rotary_dim / 2; text-only input makes them plain RoPE
    mrope = [half - 2 * (half // 3), half // 3, half // 3]
    kwargs: dict[str, Any] = dict(
        vocab_size=vocab_size,
        num_hidden_layers=len(dims["layer_types"]),
        rms_norm_eps=1e-6,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        linear_conv_kernel_dim=4,
        rope_parameters=dict(
            rope_type="default",
            rope_theta=10_000_000.0,
            partial_rotary_factor=partial,
            mrope_section=mrope,
            mrope_interleaved=True,
        ),
        eos_token_id=vocab_size - 1,
        **dims,
    )
    kwargs.update(overrides)
    return Qwen3_5MoeTextConfig(**kwargs)


def perturb(model: torch.nn.Module, seed: int) -> None:
    """Give norm weights, dt_bias and the router real values (init leaves them at identity/zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("dt_bias"):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
            if name.endswith("mlp.gate.weight"):
                p.normal_(0, 0.5, generator=g)
            if name.endswith("shared_expert_gate.weight"):
                p.normal_(0, 0.3, generator=g)


def build_text_model(shape: str, vocab_size: int = 256) -> Qwen3_5MoeForCausalLM:
    torch.manual_seed(SEEDS[shape])
    model = Qwen3_5MoeForCausalLM(text_config(shape, vocab_size)).eval()
    perturb(model, SEEDS[shape] + 1)
    return model


def wrap_vlm(text_model: Qwen3_5MoeForCausalLM) -> Qwen3_5MoeForConditionalGeneration:
    """The vision-language wrapper real Qwen3.5 checkpoints use, holding the same text weights."""
    text_cfg = text_model.config
    vocab = text_cfg.vocab_size
    cfg = Qwen3_5MoeConfig(
        text_config=text_cfg.to_dict(),
        vision_config=dict(
            depth=1,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=text_cfg.hidden_size,
            patch_size=16,
            num_position_embeddings=64,
        ),
        image_token_id=vocab - 6,
        video_token_id=vocab - 5,
        vision_start_token_id=vocab - 4,
        vision_end_token_id=vocab - 3,
    )
    torch.manual_seed(0)
    vlm = Qwen3_5MoeForConditionalGeneration(cfg).eval()
    vlm.model.language_model.load_state_dict(text_model.model.state_dict())
    vlm.lm_head.load_state_dict(text_model.lm_head.state_dict())
    return vlm


def _tokenizer_eos_ids(tokenizer_dir: Path) -> list[int]:
    """Ids of <|im_end|> and <|endoftext|> (Qwen's end tokens) in a tokenizer.json."""
    added = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    ids = {t["content"]: t["id"] for t in added.get("added_tokens", [])}
    return [ids[t] for t in ("<|im_end|>", "<|endoftext|>") if t in ids]


def save_checkpoint(
    model: torch.nn.Module,
    directory: Path,
    *,
    layout: str,
    dtype: torch.dtype = torch.float32,
    eos_token_ids: list[int],
    tokenizer_dir: Path | None = None,
) -> Path:
    """Write `model` as a sharded checkpoint: per-expert (save_pretrained) or fused (hub layout)."""
    directory.mkdir(parents=True)
    # like the hub's Qwen3.5: config.json names <|endoftext|>, generation_config.json both ends
    text_cfg = getattr(model.config, "text_config", model.config)
    config_eos = text_cfg.eos_token_id
    text_cfg.eos_token_id = eos_token_ids[-1] if eos_token_ids else None
    model = model.to(dtype)
    try:
        model.generation_config.eos_token_id = eos_token_ids
        if layout == "per_expert":
            # save_pretrained reverts transformers' fusing: experts.{e}.{gate,up,down}_proj.weight
            model.save_pretrained(directory, max_shard_size="200KB")
        elif layout == "fused":
            # the in-memory state dict is the hub's layout: experts.gate_up_proj [E, 2I, H], ...
            model.config.save_pretrained(directory)
            model.generation_config.save_pretrained(directory)
            state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
            if isinstance(model, Qwen3_5MoeForConditionalGeneration):
                # hub checkpoints carry a multi-token-prediction head the converter must skip
                state["mtp.fc.weight"] = torch.zeros(8, 8, dtype=dtype)
                state["mtp.layers.0.mlp.experts.down_proj"] = torch.zeros(2, 8, 8, dtype=dtype)
            names = sorted(state)
            shards = [names[: len(names) // 2], names[len(names) // 2 :]]
            weight_map = {}
            for i, shard in enumerate(shards):
                file_name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file({n: state[n] for n in shard}, directory / file_name, {"format": "pt"})
                weight_map.update(dict.fromkeys(shard, file_name))
            index = {"metadata": {}, "weight_map": weight_map}
            (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        else:
            raise ValueError(f"unknown layout {layout!r}")
    finally:
        model.to(torch.float32)
        text_cfg.eos_token_id = config_eos
    if tokenizer_dir is not None:
        for f in Path(tokenizer_dir).iterdir():
            if f.is_file():
                shutil.copyfile(f, directory / f.name)
    return directory


@dataclass(frozen=True)
class CheckpointKey:
    shape: str
    layout: str
    wrapper: str
    vocab_size: int
    dtype: str
    tokenizer_dir: str | None


class TinyModels:
    """Builds checkpoints and conversions on demand, each once per test session."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._models: dict[tuple[str, int], Qwen3_5MoeForCausalLM] = {}
        self._checkpoints: dict[CheckpointKey, Path] = {}
        self._converted: dict[tuple[Path, int], Path] = {}

    def text_model(self, shape: str = "A", vocab_size: int = 256) -> Qwen3_5MoeForCausalLM:
        """The fp32 transformers model every checkpoint of this shape was saved from."""
        key = (shape, vocab_size)
        if key not in self._models:
            self._models[key] = build_text_model(shape, vocab_size)
        return self._models[key]

    def checkpoint(
        self,
        shape: str = "A",
        layout: str = "fused",
        wrapper: str = "text",
        *,
        vocab_size: int = 256,
        dtype: str = "float32",
        tokenizer_dir: Path | None = None,
    ) -> Path:
        key = CheckpointKey(
            shape, layout, wrapper, vocab_size, dtype, str(tokenizer_dir) if tokenizer_dir else None
        )
        if key not in self._checkpoints:
            text_model = self.text_model(shape, vocab_size)
            model = wrap_vlm(text_model) if wrapper == "vlm" else text_model
            if tokenizer_dir is not None:
                eos = _tokenizer_eos_ids(Path(tokenizer_dir))
            else:
                eos = [vocab_size - 2, vocab_size - 1]
            name = f"{shape}-{layout}-{wrapper}-v{vocab_size}-{dtype}-{len(self._checkpoints)}"
            self._checkpoints[key] = save_checkpoint(
                model,
                self.root / "checkpoints" / name,
                layout=layout,
                dtype=getattr(torch, dtype),
                eos_token_ids=eos,
                tokenizer_dir=tokenizer_dir,
            )
        return self._checkpoints[key]

    def converted(self, bits: int, shape: str = "A", layout: str = "fused", **kwargs: Any) -> Path:
        """A model directory converted from checkpoint(shape, layout, **kwargs) at `bits`."""
        src = self.checkpoint(shape, layout, **kwargs)
        key = (src, bits)
        if key not in self._converted:
            out = self.root / "converted" / f"{src.name}-q{bits}"
            self._converted[key] = convert(src, out, bits, progress=False)
        return self._converted[key]


def reference_config(
    manifest: dict[str, Any], experts_per_token: int | None = None
) -> Qwen3_5MoeTextConfig:
    """The transformers config of a converted model (optionally with fewer experts per token)."""
    c = manifest["config"]
    return Qwen3_5MoeTextConfig(
        vocab_size=c["vocab_size"],
        hidden_size=c["hidden_size"],
        num_hidden_layers=c["num_hidden_layers"],
        layer_types=c["layer_types"],
        rms_norm_eps=c["rms_norm_eps"],
        num_attention_heads=c["num_attention_heads"],
        num_key_value_heads=c["num_key_value_heads"],
        head_dim=c["head_dim"],
        rope_parameters=dict(
            rope_type="default",
            rope_theta=c["rope_theta"],
            partial_rotary_factor=c["rotary_dim"] / c["head_dim"],
        ),
        max_position_embeddings=c["max_position_embeddings"],
        linear_num_key_heads=c["linear_num_key_heads"],
        linear_num_value_heads=c["linear_num_value_heads"],
        linear_key_head_dim=c["linear_key_head_dim"],
        linear_value_head_dim=c["linear_value_head_dim"],
        linear_conv_kernel_dim=c["linear_conv_kernel_dim"],
        num_experts=c["num_experts"],
        num_experts_per_tok=experts_per_token or c["num_experts_per_tok"],
        moe_intermediate_size=c["moe_intermediate_size"],
        shared_expert_intermediate_size=c["shared_expert_intermediate_size"],
        tie_word_embeddings=False,
    )


def engine_weights_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    """The weights the engine holds (dequantized/widened to fp32) as a transformers state dict."""
    manifest = fmt.load_manifest(model_dir)
    state: dict[str, torch.Tensor] = {}
    for name, entry in manifest["tensors"].items():
        w = fmt.read_tensor(model_dir, manifest, name)
        if name.endswith("conv1d.weight"):
            w = w.reshape(entry["shape"][0], 1, entry["shape"][1])
        key = name if name == "lm_head.weight" else "model." + name
        state[key] = torch.from_numpy(w)
    experts = manifest["experts"]
    for layer in range(experts["num_layers"]):
        blocks = [
            fmt.read_expert(model_dir, manifest, layer, e) for e in range(experts["num_experts"])
        ]
        prefix = f"model.layers.{layer}.mlp.experts."
        gate_up = [np.concatenate([b["gate"], b["up"]]) for b in blocks]  # gate rows first
        state[prefix + "gate_up_proj"] = torch.from_numpy(np.stack(gate_up))
        state[prefix + "down_proj"] = torch.from_numpy(np.stack([b["down"] for b in blocks]))
    return state


def reference_model(model_dir: Path, experts_per_token: int | None = None) -> Qwen3_5MoeForCausalLM:
    """transformers fp32 model holding exactly the weights of a converted model directory."""
    manifest = fmt.load_manifest(model_dir)
    model = Qwen3_5MoeForCausalLM(reference_config(manifest, experts_per_token)).eval()
    model.load_state_dict(engine_weights_state_dict(model_dir), strict=True)
    return model


def router_choices(model: torch.nn.Module, ids: list[int]) -> list[np.ndarray]:
    """Per layer, the [tokens, k] expert ids a transformers MoE model's routers pick for `ids`."""
    picks: list[np.ndarray] = []
    hooks = [
        layer.mlp.gate.register_forward_hook(
            lambda _m, _i, out: picks.append(out[2].reshape(len(ids), -1).numpy())
        )
        for layer in model.model.layers
    ]
    with torch.no_grad():
        model(input_ids=torch.tensor([ids]))
    for h in hooks:
        h.remove()
    return picks


def routed_experts(model_dir: Path, ids: list[int]) -> list[list[set[int]]]:
    """Per layer, per token: the experts transformers' router picks."""
    per_layer = router_choices(reference_model(model_dir), ids)
    return [[set(row.tolist()) for row in p] for p in per_layer]
