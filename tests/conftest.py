"""Shared fixtures: tiny Qwen3.5-MoE checkpoints and their conversions, built once per session."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tiny_models import TinyModels, perturb, save_checkpoint, text_config
from tiny_tokenizer import build_tiny_tokenizer
from transformers import Qwen3_5MoeForCausalLM

from flashmoe_native.convert import convert
from flashmoe_native.tokenizer import Tokenizer

# One thread: the reference models are tiny, and with the 2 cores oversubscribed two OpenMP
# threads spin at every barrier (measured 27 s instead of 0.4 s for the same 13 forwards).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    """Builder of tiny checkpoints (tiny_models.checkpoint) and conversions (.converted)."""
    return TinyModels(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture
def model_copy(tiny_models: TinyModels, tmp_path: Path) -> Callable[..., Path]:
    """A private copy of a converted tiny model, free to corrupt: model_copy(bits=4, shape="A")."""

    def make(bits: int = 4, shape: str = "A", **kwargs: object) -> Path:
        src = tiny_models.converted(bits, shape, **kwargs)
        dst = tmp_path / f"{src.name}-copy"
        shutil.copytree(src, dst)
        return dst

    return make


@pytest.fixture(scope="session")
def chat_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int, int], Path]:
    """chat_model(init_seed, perturb_seed): shape A at 4 bits with the tiny Qwen tokenizer, a
    vocabulary padded past it (like Qwen's: ids that exist only in the model) and room for tool
    prompts (4096 positions); built once per seed pair."""
    built: dict[tuple[int, int], Path] = {}

    def make(init_seed: int, perturb_seed: int) -> Path:
        if (init_seed, perturb_seed) not in built:
            root = tmp_path_factory.mktemp(f"chat_model_{init_seed}_{perturb_seed}")
            tokenizer_dir = build_tiny_tokenizer(root / "tokenizer")
            tok = Tokenizer.from_dir(tokenizer_dir)
            ends = [tok.token_id("<|im_end|>"), tok.token_id("<|endoftext|>")]
            config = text_config(
                "A", tok.vocab_size + 64, max_position_embeddings=4096, eos_token_id=ends[0]
            )
            torch.manual_seed(init_seed)
            model = Qwen3_5MoeForCausalLM(config).eval()
            perturb(model, seed=perturb_seed)
            checkpoint = save_checkpoint(
                model,
                root / "checkpoint",
                layout="fused",
                eos_token_ids=ends,
                tokenizer_dir=tokenizer_dir,
            )
            model_dir = convert(checkpoint, root / "model", 4, progress=False)
            built[(init_seed, perturb_seed)] = model_dir
        return built[(init_seed, perturb_seed)]

    return make
