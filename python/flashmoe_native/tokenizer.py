"""The model's byte-level BPE tokenizer (`tokenizer.json`) and streaming detokenization."""

from __future__ import annotations

import codecs
import json
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer


def _byte_level_alphabet() -> dict[str, int]:
    """Map each character of the byte-level alphabet back to the byte it stands for.

    Byte-level BPE writes every byte as a printable character: bytes that are printable Latin-1
    stand for themselves, the others (controls, space, ...) take code points 256, 257, ... in
    byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    char_to_byte = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            char_to_byte[chr(256 + extra)] = b
            extra += 1
    return char_to_byte


def _decoder_is_byte_level(decoder: dict | None) -> bool:
    if decoder is None:
        return False
    if decoder.get("type") == "ByteLevel":
        return True
    return decoder.get("type") == "Sequence" and any(
        _decoder_is_byte_level(d) for d in decoder.get("decoders", [])
    )


class Tokenizer:
    """Encodes text to ids and gives the exact bytes of every token.

    Token bytes (rather than per-token strings) are the unit here because a token can hold part
    of a UTF-8 character: streaming output and constrained decoding both work on bytes.
    """

    def __init__(self, tokenizer_json: Path) -> None:
        spec = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))
        if not _decoder_is_byte_level(spec.get("decoder")):
            raise ValueError(f"{tokenizer_json}: only byte-level BPE tokenizers are supported")
        self._tokenizer = _HFTokenizer.from_str(json.dumps(spec))

        added = {int(t["id"]): t for t in spec.get("added_tokens", [])}
        # Control tokens (chat markers, end of text) are dropped from decoded text; the other
        # added tokens (<think>, <tool_call>, ...) are text the output parser reads.
        self.special_ids = frozenset(i for i, t in added.items() if t.get("special", False))
        self.added_ids = frozenset(added)

        to_byte = {ord(c): b for c, b in _byte_level_alphabet().items()}
        vocab = self._tokenizer.get_vocab(with_added_tokens=False)
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self.vocab_size = max(self.vocab_size, max(vocab.values()) + 1, max(added, default=-1) + 1)
        token_bytes = [b""] * self.vocab_size
        self.has_token = [False] * self.vocab_size
        for piece, token_id in vocab.items():
            token_bytes[token_id] = piece.translate(to_byte).encode("latin-1")
            self.has_token[token_id] = True
        for token_id, token in added.items():
            token_bytes[token_id] = token["content"].encode("utf-8")
            self.has_token[token_id] = True
        self.token_bytes: list[bytes] = token_bytes

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer:
        return cls(Path(model_dir) / "tokenizer.json")

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; added tokens written in the text (chat markers) become their ids."""
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        """Text of `ids` without control tokens; bytes that are not valid UTF-8 become U+FFFD."""
        stream = self.stream()
        return "".join(stream.feed(i) for i in ids) + stream.flush()

    def token_id(self, text: str) -> int | None:
        """Id of the token that is exactly `text`, or None when `text` is not a single token."""
        return self._tokenizer.token_to_id(text)

    def stream(self) -> StreamDecoder:
        return StreamDecoder(self)


class StreamDecoder:
    """Turns ids into text one at a time, holding back bytes until they complete a character."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        tok = self._tokenizer
        if token_id in tok.special_ids:
            return ""
        if token_id in tok.added_ids:
            # An added token is whole text: bytes pending before it can no longer complete.
            return self.flush() + tok.token_bytes[token_id].decode("utf-8")
        return self._utf8.decode(tok.token_bytes[token_id])

    def flush(self) -> str:
        """Emit whatever is held back (as U+FFFD if incomplete) and start afresh."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text
