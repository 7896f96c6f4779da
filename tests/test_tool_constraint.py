"""Constrained tool-call decoding: masks are exact, and any logits give well-formed calls."""

from __future__ import annotations

import copy
import json
from typing import Any

import numpy as np
import pytest
from tiny_tokenizer import build_tiny_tokenizer

from flashmoe_native.tokenizer import Tokenizer
from flashmoe_native.tool_calls import ResponseParser
from flashmoe_native.tool_constraint import (
    ToolCallConstraint,
    ToolGrammar,
    accepts_end,
    advance,
)

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "days": {"type": "integer"},
                    "scale": {"type": "number"},
                    "metric": {"type": "boolean"},
                    "units": {"type": "array", "items": {"type": "string", "enum": ["c", "f"]}},
                    "where": {"type": "object"},
                    "mode": {"type": "string", "enum": ["fast", "slow"]},
                    "limit": {"type": ["integer", "null"]},
                    "anything": {},
                },
                "required": ["city", "days"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {
                "type": "object",
                "properties": {
                    "tz": {"type": "string"},
                    "opts": {
                        "type": "object",
                        "properties": {"a": {"type": "integer"}, "b": {"type": "array"}},
                        "required": ["a"],
                    },
                },
                "required": ["opts"],
            },
        },
    },
    {"type": "function", "function": {"name": "get_nothing", "parameters": {}}},
]


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_arguments(name: str, args: dict[str, Any]) -> None:
    """The test schema, checked by hand, independently of the code under test."""
    if name == "get_weather":
        assert set(args) <= {
            "city",
            "days",
            "scale",
            "metric",
            "units",
            "where",
            "mode",
            "limit",
            "anything",
        }
        assert isinstance(args["city"], str)
        assert type(args["days"]) is int
        assert "scale" not in args or is_number(args["scale"])
        assert "metric" not in args or isinstance(args["metric"], bool)
        assert "units" not in args or all(u in ("c", "f") for u in args["units"])
        assert "where" not in args or isinstance(args["where"], dict)
        assert "mode" not in args or args["mode"] in ("fast", "slow")
        assert "limit" not in args or args["limit"] is None or type(args["limit"]) is int
        json.dumps(args.get("anything"), allow_nan=False)
    elif name == "get_time":
        assert set(args) <= {"tz", "opts"}
        assert "tz" not in args or isinstance(args["tz"], str)
        assert set(args["opts"]) <= {"a", "b"} and type(args["opts"]["a"]) is int
        assert "b" not in args["opts"] or isinstance(args["opts"]["b"], list)
    else:
        assert name == "get_nothing" and args == {}


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer.from_dir(build_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer")))


def end_ids(tok: Tokenizer) -> list[int]:
    return [i for i in (tok.token_id("<|im_end|>"), tok.token_id("<|endoftext|>")) if i is not None]


def run_random(
    tok: Tokenizer,
    constraint: ToolCallConstraint,
    max_tokens: int,
    rng: np.random.Generator,
    scale: float = 3.0,
) -> list[int]:
    """Generate with random logits under the constraint, as a sampler would."""
    ids: list[int] = []
    for step in range(max_tokens):
        mask = constraint.allowed(max_tokens - step)
        logits = rng.normal(size=tok.vocab_size) * scale
        logits[~mask] = -np.inf
        token = int(np.argmax(logits))
        constraint.advance(token)
        if constraint.ended:
            break
        ids.append(token)
    return ids


XML_CITY = "<tool_call>\n<function=get_weather>\n<parameter=city>\n"
XML_WHERE = "<tool_call>\n<function=get_weather>\n<parameter=where>\n"
JSON_ARGS = '<tool_call>\n{"name": "get_weather", "arguments": '

# (format, tool_choice, prompt left reasoning open, output so far): states to start walks from,
# including every partial-tag state that has a shortcut in the mask computation
WALK_STARTS = [
    ("xml", "required", False, ""),
    ("xml", "auto", True, "Hmm </thi"),
    ("xml", "auto", False, "  <thi"),
    ("xml", "auto", False, ""),
    ("json", "auto", False, "\n \n"),
    ("xml", "auto", False, "Sure <tool_c"),
    ("xml", "auto", False, XML_CITY + "Paris </para"),
    ("xml", "auto", False, XML_WHERE + '{"k": "v </par'),
    ("xml", "auto", False, XML_WHERE + '{"k": "\\u00'),
    ("xml", "required", True, "ok </think>\n"),
    ("json", "required", False, ""),
    ("json", "auto", False, JSON_ARGS + '{"city": "Pa'),
    (
        "json",
        "get_time",
        False,
        '<tool_call>\n{"name": "get_time", "arguments": {"opts": {"b": [1, ',
    ),
]


@pytest.mark.parametrize(("fmt", "tool_choice", "in_reasoning", "prefix"), WALK_STARTS)
def test_mask_equals_brute_force(
    tok: Tokenizer, fmt: str, tool_choice: str, in_reasoning: bool, prefix: str
) -> None:
    """At states along random walks, the fast mask equals trying every token byte by byte."""
    rng = np.random.default_rng(len(prefix))
    # an end id that is also text, as a model config may list one: it must still only end turns
    ends = [*end_ids(tok), tok.token_id("</tool_response>")]
    grammar = ToolGrammar(TOOLS, fmt, tool_choice=tool_choice)
    constraint = ToolCallConstraint(tok, grammar, in_reasoning=in_reasoning, end_token_ids=ends)
    for b in prefix.encode():
        constraint.stack = advance(constraint.stack, b)
    for step in range(25):
        # budgets just above what closing needs, where the length check decides
        remaining = len(constraint.closing()) + int(rng.choice([1, 2, 3, 5, 100]))
        mask = constraint.allowed(remaining)
        expected = np.zeros(tok.vocab_size, dtype=bool)
        for token_id, token in enumerate(tok.token_bytes):
            if token_id in tok.special_ids:
                continue
            stack = constraint.stack
            for b in token:
                stack = advance(stack, b) if stack is not None else None
            if stack is not None:
                closing = b"".join(f.closing() for f in reversed(stack))
                expected[token_id] = len(closing) <= remaining - 1
        expected[ends] = accepts_end(constraint.stack)
        assert np.array_equal(mask, expected), step
        choices = np.flatnonzero(mask & ~np.isin(np.arange(tok.vocab_size), ends))
        if choices.size == 0:
            break
        constraint.advance(int(rng.choice(choices)))


@pytest.mark.parametrize("fmt", ["xml", "json"])
def test_closing_finishes_every_state(tok: Tokenizer, fmt: str) -> None:
    """From any state, the closing bytes are accepted one by one, each leaving one byte less."""
    rng = np.random.default_rng(11)
    grammar = ToolGrammar(TOOLS, fmt, tool_choice="required")
    for walk in range(6):
        constraint = ToolCallConstraint(
            tok, grammar, in_reasoning=walk % 2 == 1, end_token_ids=end_ids(tok)
        )
        for _ in range(int(rng.integers(0, 80))):
            mask = constraint.allowed(500)
            mask[end_ids(tok)] = False
            if not mask.any():
                break
            constraint.advance(int(rng.choice(np.flatnonzero(mask))))
        stack = constraint.stack
        closing = constraint.closing()
        for i, b in enumerate(closing):
            stack = advance(stack, b)
            assert stack is not None
            assert b"".join(f.closing() for f in reversed(stack)) == closing[i + 1 :]
        assert accepts_end(stack)


def parse(tok: Tokenizer, ids: list[int], **kw: Any) -> Any:
    parser = ResponseParser(TOOLS, **kw)
    parser.feed(tok.decode(ids))
    parser.finish()
    return parser.message


def test_random_logits_give_100_of_100_valid_calls(tok: Tokenizer) -> None:
    rng = np.random.default_rng(2024)
    ends = end_ids(tok)
    called: set[str] = set()
    for trial in range(100):
        fmt = "xml" if trial % 2 == 0 else "json"
        in_reasoning = trial % 5 == 0
        grammar = ToolGrammar(TOOLS, fmt, tool_choice="get_time" if trial % 7 == 0 else "required")
        constraint = ToolCallConstraint(tok, grammar, in_reasoning=in_reasoning, end_token_ids=ends)
        ids = run_random(tok, constraint, 100, rng, scale=float(rng.choice([1.0, 3.0, 10.0])))
        message = parse(tok, ids, in_reasoning=in_reasoning)
        assert message.malformed_tool_calls == [], tok.decode(ids)
        assert 1 <= len(message.tool_calls) and message.content == ""
        for call in message.tool_calls:
            check_arguments(call.name, call.arguments)
            wire = call.to_openai()["function"]
            assert json.loads(wire["arguments"]) == call.arguments
            called.add(call.name)
        if trial % 7 == 0:
            assert [c.name for c in message.tool_calls] == ["get_time"]
    assert called == {"get_weather", "get_time", "get_nothing"}


@pytest.mark.parametrize("fmt", ["xml", "json"])
def test_tightest_budget_still_closes(tok: Tokenizer, fmt: str) -> None:
    rng = np.random.default_rng(3)
    grammar = ToolGrammar(TOOLS, fmt, tool_choice="get_weather")
    shortest = len(
        ToolCallConstraint(tok, grammar, in_reasoning=False, end_token_ids=end_ids(tok)).closing()
    )
    for _ in range(5):
        constraint = ToolCallConstraint(
            tok, grammar, in_reasoning=False, end_token_ids=end_ids(tok)
        )
        ids = run_random(tok, constraint, shortest, rng)
        message = parse(tok, ids)
        assert [c.name for c in message.tool_calls] == ["get_weather"]
        check_arguments("get_weather", message.tool_calls[0].arguments)


def test_auto_mode_text_is_free_until_a_call_opens(tok: Tokenizer) -> None:
    ends = end_ids(tok)
    constraint = ToolCallConstraint(
        tok, ToolGrammar(TOOLS, "xml"), in_reasoning=True, end_token_ids=ends
    )
    usable = [i for i in range(tok.vocab_size) if i not in tok.special_ids]
    assert constraint.allowed(50)[usable].all() and constraint.allowed(50)[ends].all()
    for token in tok.encode("Let me see.</think>\n\nSure: <tool_call>"):
        constraint.advance(token)
    mask = constraint.allowed(50)
    assert not mask[ends].any()
    assert tok.decode(list(np.flatnonzero(mask))) == "\n"  # only the newline before <function=
    for token in tok.encode("\n<function=get_nothing>\n</function>\n</tool_call>"):
        constraint.advance(token)
    assert constraint.allowed(50)[usable].all() and constraint.allowed(50)[ends].all()


@pytest.mark.parametrize(
    ("fmt", "text", "bad_at"),
    [
        ("xml", "<tool_call>\n<function=get_weathe", None),
        ("xml", "<tool_call>\n<function=l", "l"),
        ("xml", "<tool_call>\n<function=get_weather>\n</", "/"),  # required ones missing
        ("xml", "<tool_call>\n<function=get_weather>\n<parameter=days>\nx", "x"),
        ("xml", "<tool_call>\n<function=get_weather>\n<parameter=days>\n01", "1"),
        ("xml", "<tool_call>\n<function=get_weather>\n<parameter=n", "n"),
        ("xml", "<tool_call>\n<function=get_weather>\n<parameter=mode>\nfas", None),
        ("xml", "<tool_call>\n<function=get_weather>\n<parameter=mode>\nfaste", "e"),
        ("xml", '<tool_call>\n<function=get_weather>\n<parameter=where>\n{"a": "</parameter>', ">"),
        ("xml", "<tool_call>\n<function=get_nothing>\n</function>\n</tool_call>", None),
        ("json", '<tool_call>\n{"name": "get_time", "arguments": {"opts": {}', "}"),
        ("json", '<tool_call>\n{"name": "get_time", "arguments": {"opts": {"a": 1.', "."),
        ("json", '<tool_call>\n{"name": "get_time", "arguments": {"tz": 3', "3"),
        ("json", '<tool_call>\n{"name": "get_weather", "arguments": {"units": ["c", "x', "x"),
        ("json", '<tool_call>\n{"name": "get_weather", "arguments": {"days": 1, "d', "d"),
        ("json", '<tool_call>\n{"name": "get_weather", "arguments": {"where": {"k": tru', None),
    ],
)
def test_grammar_rejects_exactly_where_output_goes_wrong(
    fmt: str, text: str, bad_at: str | None
) -> None:
    stack = ToolGrammar(TOOLS, fmt).initial(in_reasoning=False)
    data = text.encode()
    for i, b in enumerate(data):
        nxt = advance(stack, b)
        if nxt is None:
            assert bad_at is not None and i == len(data) - 1 and data[i:] == bad_at.encode(), text
            return
        stack = nxt
    assert bad_at is None, f"{text!r} was accepted"


def test_digits_and_whitespace_runs_are_bounded(tok: Tokenizer) -> None:
    stack = ToolGrammar(TOOLS, "json").initial(in_reasoning=False)
    for b in b'<tool_call>\n{"name": "get_time", "arguments": {"opts": {"a": 1234567890123456':
        stack = advance(stack, b)
    assert advance(stack, ord("7")) is None
    for b in b"}" + b" " * 16:
        stack = advance(stack, b)
    assert advance(stack, ord(" ")) is None and advance(stack, ord("}")) is not None


def test_tool_choice_must_be_declared() -> None:
    with pytest.raises(ValueError, match="undeclared"):
        ToolGrammar(TOOLS, "xml", tool_choice="launch")


def test_every_ascii_byte_needs_a_token(tok: Tokenizer) -> None:
    broken = copy.copy(tok)
    broken.token_bytes = [b"}}" if t == b"}" else t for t in tok.token_bytes]
    with pytest.raises(ValueError, match="single-byte"):
        ToolCallConstraint(broken, ToolGrammar(TOOLS, "json"), in_reasoning=False, end_token_ids=[])
