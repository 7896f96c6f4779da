"""Tool-call and reasoning parsing, streamed in arbitrary pieces, well-formed and malformed."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from flashmoe_native.tool_calls import (
    AssistantMessage,
    ContentDelta,
    ParseEvent,
    ReasoningDelta,
    ResponseParser,
    ToolCallDelta,
    ToolCallError,
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
                    "units": {"type": "array", "items": {"type": "string"}},
                    "where": {"type": "object"},
                    "mode": {"type": "string", "enum": ["fast", "slow"]},
                    "limit": {"type": ["integer", "null"]},
                    "anything": {},
                },
                "required": ["city"],
            },
        },
    },
    {"name": "ping", "parameters": {"type": "object", "properties": {}}},
]

XML_CALL = (
    "<tool_call>\n<function=get_weather>\n"
    "<parameter=city>\n123 Main </tool_call> St\n</parameter>\n"
    "<parameter=days>\n3\n</parameter>\n"
    "<parameter=scale>\n-1.5e2\n</parameter>\n"
    "<parameter=metric>\nTrue\n</parameter>\n"
    '<parameter=units>\n["c", "f"]\n</parameter>\n'
    '<parameter=where>\n{"lat": 50.9, "tags": ["köln"]}\n</parameter>\n'
    "<parameter=mode>\nfast\n</parameter>\n"
    "<parameter=limit>\nnull\n</parameter>\n"
    "<parameter=anything>\n[1, 2]\n</parameter>\n"
    "</function>\n</tool_call>"
)
XML_ARGS = {
    "city": "123 Main </tool_call> St",
    "days": 3,
    "scale": -150.0,
    "metric": True,
    "units": ["c", "f"],
    "where": {"lat": 50.9, "tags": ["köln"]},
    "mode": "fast",
    "limit": None,
    "anything": [1, 2],
}
JSON_CALL = (
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "say \\"</tool_call>\\"", '
    '"days": 2}}\n</tool_call>'
)


def stream(
    text: str, rng: random.Random | None, **kw: Any
) -> tuple[list[ParseEvent], AssistantMessage]:
    """Feed `text` in random pieces (one character at a time when rng is None)."""
    parser = ResponseParser(**kw)
    events: list[ParseEvent] = []
    pos = 0
    while pos < len(text):
        size = 1 if rng is None else rng.randint(1, 12)
        events += parser.feed(text[pos : pos + size])
        pos += size
    events += parser.finish()
    return events, parser.message


def check_consistent(events: list[ParseEvent], message: AssistantMessage) -> None:
    """Streamed deltas add up to the final message."""
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    reasoning = "".join(e.text for e in events if isinstance(e, ReasoningDelta))
    assert content == message.content
    assert reasoning == (message.reasoning_content or "")
    calls = [e for e in events if isinstance(e, ToolCallDelta)]
    assert [e.call for e in calls] == message.tool_calls
    assert [e.index for e in calls] == list(range(len(calls)))
    errors = [e.malformed for e in events if isinstance(e, ToolCallError)]
    assert errors == message.malformed_tool_calls


SPLITS = [None, *(random.Random(seed) for seed in range(6))]


@pytest.mark.parametrize("rng", SPLITS)
def test_xml_calls_with_reasoning(rng: random.Random | None) -> None:
    text = (
        "\nThe user wants weather.\n\n</think>\n\nChecking now.\n\n"
        + XML_CALL
        + "\n<tool_call>\n<function=ping>\n</function>\n</tool_call>"
    )
    events, message = stream(text, rng, tools=TOOLS, in_reasoning=True)
    check_consistent(events, message)
    assert message.reasoning_content == "The user wants weather."
    assert message.content == "Checking now."
    assert [(c.name, c.arguments) for c in message.tool_calls] == [
        ("get_weather", XML_ARGS),
        ("ping", {}),
    ]
    assert message.malformed_tool_calls == []
    first = message.to_openai()["tool_calls"][0]
    assert first["type"] == "function" and json.loads(first["function"]["arguments"]) == XML_ARGS


@pytest.mark.parametrize("rng", SPLITS)
def test_hermes_json_calls(rng: random.Random | None) -> None:
    text = "<think>\nhmm\n</think>\n\n" + JSON_CALL + "\n" + JSON_CALL.replace("2}}", "5}}")
    events, message = stream(text, rng, tools=TOOLS)
    check_consistent(events, message)
    assert message.reasoning_content == "hmm"
    assert message.content == ""
    assert [c.arguments for c in message.tool_calls] == [
        {"city": 'say "</tool_call>"', "days": 2},
        {"city": 'say "</tool_call>"', "days": 5},
    ]
    assert message.to_openai()["content"] is None


@pytest.mark.parametrize(
    ("call", "error"),
    [
        ("<tool_call>\n<function=launch>\n</function>\n</tool_call>", "unknown function 'launch'"),
        (
            "<tool_call>\n<function=get_weather>\n<parameter=city>\nX\n</parameter>\n"
            "<parameter=days>\nthree\n</parameter>\n</function>\n</tool_call>",
            "parameter 'days'",
        ),
        (
            "<tool_call>\n<function=get_weather>\n<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>",
            "missing required 'city'",
        ),
        (
            "<tool_call>\n<function=get_weather>\n<parameter=city>\nX\n</parameter>\n"
            "<parameter=mode>\nmedium\n</parameter>\n</function>\n</tool_call>",
            "not one of",
        ),
        (
            "<tool_call>\n<function=get_weather>\n<parameter=city>\nX\n</parameter>\n"
            '<parameter=units>\n["c", \n</parameter>\n</function>\n</tool_call>',
            "parameter 'units'",
        ),
        (
            "<tool_call>\n<function=get_weather>\nstray text\n</function>\n</tool_call>",
            "unexpected text",
        ),
        (
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>',
            "invalid JSON",
        ),
        ('<tool_call>\n{"name": "ping", "arguments": [1]}\n</tool_call>', "must be an object"),
        ("<tool_call>\nno idea\n</tool_call>", "expected <function=NAME>"),
    ],
)
def test_malformed_calls_are_flagged_and_kept_as_text(call: str, error: str) -> None:
    text = "Before. " + call + " After.\n" + JSON_CALL
    for rng in SPLITS[:3]:
        events, message = stream(text, rng, tools=TOOLS)
        check_consistent(events, message)
        assert len(message.malformed_tool_calls) == 1
        assert error in message.malformed_tool_calls[0].error
        assert message.malformed_tool_calls[0].text == call
        assert message.content == "Before. " + call + " After."
        # the good call after the bad one is still parsed
        assert [c.arguments["days"] for c in message.tool_calls] == [2]


@pytest.mark.parametrize("rng", SPLITS[:3])
def test_unterminated_call(rng: random.Random | None) -> None:
    text = "<tool_call>\n<function=get_weather>\n<parameter=city>\nPar"
    events, message = stream(text, rng, tools=TOOLS)
    check_consistent(events, message)
    assert message.tool_calls == []
    assert message.malformed_tool_calls[0].error.startswith("unterminated")
    assert message.content == text
    # a complete function body that only lacks the closing tag is still a call
    complete = (
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n"
    )
    _, message = stream(complete, rng, tools=TOOLS)
    assert [c.arguments for c in message.tool_calls] == [{"city": "Paris"}]


def test_string_parameters_stay_strings() -> None:
    call = (
        "<tool_call>\n<function=get_weather>\n<parameter=city>\n  42  \n</parameter>\n"
        "<parameter=anything>\nnot json\n</parameter>\n</function>\n</tool_call>"
    )
    _, message = stream(call, None, tools=TOOLS)
    assert message.tool_calls[0].arguments == {"city": "  42  ", "anything": "not json"}


def test_without_tools_calls_are_plain_text() -> None:
    events, message = stream("Hi " + XML_CALL, random.Random(1))
    check_consistent(events, message)
    assert message.content == "Hi " + XML_CALL and message.tool_calls == []
    assert message.to_openai() == {"role": "assistant", "content": "Hi " + XML_CALL}


@pytest.mark.parametrize("rng", SPLITS)
def test_reasoning_only_when_opened(rng: random.Random | None) -> None:
    # Qwen3.5 opens <think> in the prompt; output then starts inside reasoning
    events, message = stream("deep thought</think>answer <think> is text", rng, in_reasoning=True)
    check_consistent(events, message)
    assert (message.reasoning_content, message.content) == (
        "deep thought",
        "answer <think> is text",
    )
    # a model that opens <think> itself, after whitespace
    events, message = stream("  \n<think>\nplan\n</think>\n\nDone", rng)
    check_consistent(events, message)
    assert (message.reasoning_content, message.content) == ("plan", "Done")
    # no reasoning at all: a '<' at the start is held only until it cannot be <think>
    events, message = stream("<b>bold</b>", rng)
    check_consistent(events, message)
    assert (message.reasoning_content, message.content) == (None, "<b>bold</b>")
    assert "reasoning_content" not in message.to_openai()
    # cut off while reasoning: everything so far is reasoning
    events, message = stream("still thinking <", rng, in_reasoning=True)
    assert (message.reasoning_content, message.content) == ("still thinking <", "")


def test_whitespace_is_held_not_lost() -> None:
    parser = ResponseParser(tools=TOOLS)
    assert parser.feed("a \n") == [ContentDelta("a")]
    assert parser.feed(" b") == [ContentDelta(" \n b")]
    assert parser.feed("<tool") == []  # could become <tool_call>
    assert parser.feed("box>") == [ContentDelta("<toolbox>")]
    assert parser.finish() == []
    assert parser.message.content == "a \n b<toolbox>"
