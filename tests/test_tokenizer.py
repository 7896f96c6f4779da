"""Tokenizer: exact token bytes, and streaming text that never splits a UTF-8 character."""

from __future__ import annotations

import json
import random
import unicodedata
from pathlib import Path

import pytest
from tiny_tokenizer import build_tiny_tokenizer
from tokenizers import Tokenizer as HFTokenizer

from flashmoe_native.tokenizer import Tokenizer

TEXTS = [
    "Hello, world! def f(x): return x + 1",
    "Grüße aus Köln — naïve café, 日本語のテキスト, 한국어 🙂🚀 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "<think>\nreasoning\n</think>\n\n<tool_call>\n<function=f>\n<parameter=x>\n1\n</parameter>",
    "  leading spaces\n\n\ttabs\r\nand CRLF  ",
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def tok(tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(tokenizer_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_token_bytes_spell_the_text(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert b"".join(tok.token_bytes[i] for i in ids) == unicodedata.normalize("NFC", text).encode()
    assert tok.decode(ids) == unicodedata.normalize("NFC", text)


@pytest.mark.parametrize("text", TEXTS)
def test_stream_emits_whole_characters_only(tok: Tokenizer, text: str) -> None:
    stream = tok.stream()
    pieces = [stream.feed(i) for i in tok.encode(text)]
    assert stream.flush() == ""
    assert "".join(pieces) == text
    for piece in pieces:
        assert "\ufffd" not in piece
        piece.encode("utf-8")  # a lone surrogate or broken character would raise here


def test_stream_holds_back_split_characters(tok: Tokenizer) -> None:
    # The tiny vocabulary has no token for these characters, so each spans several byte tokens.
    ids = tok.encode("日🙂")
    assert len(ids) == 7
    stream = tok.stream()
    assert [stream.feed(i) for i in ids] == ["", "", "日", "", "", "", "🙂"]


def test_added_and_special_tokens(tok: Tokenizer) -> None:
    im_start, im_end = tok.token_id("<|im_start|>"), tok.token_id("<|im_end|>")
    think = tok.token_id("<think>")
    assert im_start is not None and im_end is not None and think is not None
    assert tok.encode("<|im_start|>user<|im_end|><think>") == [
        im_start,
        *tok.encode("user"),
        im_end,
        think,
    ]
    assert {im_start, im_end, tok.token_id("<|endoftext|>")} == set(tok.special_ids)
    assert think in tok.added_ids and think not in tok.special_ids
    # control tokens vanish from text; tags stay because the output parser reads them
    assert tok.decode([im_start, *tok.encode("hi"), im_end, think]) == "hi<think>"
    assert tok.token_id("<function=") is None


def test_decode_matches_tokenizers_on_random_ids(tok: Tokenizer, tokenizer_dir: Path) -> None:
    reference = HFTokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    rng = random.Random(7)
    for _ in range(500):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 24))]
        assert tok.decode(ids) == reference.decode(ids, skip_special_tokens=True)


def test_rejects_tokenizers_that_are_not_byte_level(tokenizer_dir: Path, tmp_path: Path) -> None:
    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    spec["decoder"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always"}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="byte-level"):
        Tokenizer.from_dir(tmp_path)
