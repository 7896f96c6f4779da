"""A small byte-level BPE tokenizer shaped like Qwen's, for tests that need a real model directory.

It has Qwen's special tokens (`<|endoftext|>`, `<|im_start|>`, `<|im_end|>`) and its added,
non-special tags (`<think>`, `</think>`, `<tool_call>`, ...), the same pipeline (NFC, regex split,
byte-level), and is trained on text every machine of this project has (the Python standard
library's sources and the real Qwen3.5 chat template), so it is deterministic. The Qwen3.5 chat
template is copied next to it as `chat_template.jinja`.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

_REPO = Path(__file__).resolve().parents[1]
# the real Qwen3.5 chat template (shared/fixtures/qwen3_5_chat_template.jinja), as the bundled
# model ships it: in the repository, so tests need nothing beside the checkout
QWEN_TEMPLATE = _REPO / "models" / "tiny-stdlib-moe" / "chat_template.jinja"

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TAG_TOKENS = [
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
]

# Qwen2-family pre-tokenizer split: contractions, letter runs with one leading non-letter, single
# digits, punctuation runs, newlines, and whitespace.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Tool-call and multilingual text so that tags, JSON punctuation and multi-byte characters are
# all represented: some merged into tokens, the rarer ones left as raw bytes.
EXTRA_TEXT = """
<tool_call>
<function=get_weather>
<parameter=city>
Paris
</parameter>
<parameter=days>
3
</parameter>
</function>
</tool_call>
<tool_call>
{"name": "get_weather", "arguments": {"city": "Paris", "days": 3, "units": ["c", "f"]}}
</tool_call>
{"ok": true, "value": null, "count": -12.5e3, "items": [1, 2, 3], "nested": {"a": false}}
Grüße aus Köln, café crème, naïve façade. Ça va très bien. Добрый день, как дела?
日本語のテキストです。中文文本测试。한국어 텍스트. 🙂🚀✨ — “quotes” and ‘apostrophes’ … ¿Qué?
"""


def _training_text() -> list[str]:
    stdlib = Path(json.__file__).resolve().parents[1]
    names = [
        "json/__init__.py",
        "json/decoder.py",
        "textwrap.py",
        "string.py",
        "shlex.py",
        "this.py",
    ]
    texts = [(stdlib / name).read_text(encoding="utf-8") for name in names]
    texts.append(QWEN_TEMPLATE.read_text(encoding="utf-8"))
    texts.extend([EXTRA_TEXT] * 8)
    return texts


def build_tiny_tokenizer(out_dir: Path, vocab_size: int = 512) -> Path:
    """Train it; write tokenizer.json, tokenizer_config.json and chat_template.jinja."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE(fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel(
        add_prefix_space=False, trim_offsets=False, use_regex=False
    )
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS) - len(TAG_TOKENS),
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tokenizer.train_from_iterator(_training_text(), trainer=trainer)
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]
    )
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAG_TOKENS])
    tokenizer.save(str(out_dir / "tokenizer.json"))

    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "split_special_tokens": False,
        "model_max_length": 262144,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    shutil.copyfile(QWEN_TEMPLATE, out_dir / "chat_template.jinja")
    return out_dir


if __name__ == "__main__":
    print(build_tiny_tokenizer(Path(sys.argv[1])))
