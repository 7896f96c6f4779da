"""Our chat template rendering must equal transformers' on the real Qwen3.5 template."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jinja2
import pytest
from tiny_tokenizer import build_tiny_tokenizer

from flashmoe_native.chat_template import ChatTemplate

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. Köln"},
                "days": {"type": "integer"},
                "units": {"type": "array", "items": {"type": "string", "enum": ["c", "f"]}},
            },
            "required": ["city"],
        },
    },
}
SEARCH = {
    "type": "function",
    "function": {
        "name": "search",
        "description": "Search documents with filters.",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string"},
                "filters": {"type": "object"},
                "exact": {"type": "boolean"},
            },
            "required": ["query"],
        },
    },
}

WEATHER_CALL = {
    "id": "call_1",
    "type": "function",
    "function": {
        "name": "get_weather",
        "arguments": {"city": "Köln", "days": 3, "units": ["c", "f"]},
    },
}
SEARCH_CALL = {
    "id": "call_2",
    "type": "function",
    "function": {
        "name": "search",
        "arguments": {
            "query": "rain <b>\nlines",
            "filters": {"year": 2024, "tags": ["a"]},
            "exact": False,
        },
    },
}

# (messages, tools, render options)
CONVERSATIONS: list[tuple[list[dict[str, Any]], list[dict[str, Any]] | None, dict[str, Any]]] = [
    ([{"role": "user", "content": "Hello!"}], None, {"add_generation_prompt": True}),
    (
        [{"role": "system", "content": "  You are terse.\n"}, {"role": "user", "content": "Hi"}],
        None,
        {"add_generation_prompt": True, "enable_thinking": False},
    ),
    (
        [
            {"role": "system", "content": "Use tools when useful."},
            {"role": "user", "content": "Weather?"},
        ],
        [WEATHER, SEARCH],
        {"add_generation_prompt": True, "enable_thinking": True},
    ),
    (
        [
            {"role": "user", "content": "Weather in Köln, and search rain?"},
            {
                "role": "assistant",
                "content": "Let me check both.",
                "reasoning_content": "Two tools are needed.",
                "tool_calls": [WEATHER_CALL, SEARCH_CALL],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21, "sky": "clear"}'},
            {"role": "tool", "tool_call_id": "call_2", "content": "No documents found."},
        ],
        [WEATHER, SEARCH],
        {"add_generation_prompt": True},
    ),
    (
        [
            {"role": "system", "content": "Be kind."},
            {"role": "user", "content": "First question"},
            {"role": "assistant", "content": "First answer", "reasoning_content": "old thoughts"},
            {"role": "user", "content": "Second question"},
            {
                "role": "assistant",
                "content": "Second answer",
                "reasoning_content": "new thoughts\n",
            },
        ],
        None,
        {"add_generation_prompt": False},
    ),
    (
        [
            {"role": "user", "content": "Think inline"},
            {
                "role": "assistant",
                "content": "<think>\nI reason here.\n</think>\n\nThe answer is 4.",
            },
            {"role": "user", "content": "And again?"},
        ],
        None,
        {"add_generation_prompt": True, "enable_thinking": False},
    ),
    (
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Parts: "},
                    {"type": "text", "text": "日本語 🙂"},
                ],
            },
            {"role": "assistant", "content": None, "tool_calls": [WEATHER_CALL]},
            {"role": "tool", "content": "sunny"},
            {"role": "assistant", "content": "It is sunny.", "reasoning": "alias field"},
        ],
        [WEATHER],
        {"add_generation_prompt": False},
    ),
    (
        [
            {"role": "user", "content": "<tool_response>\nnot a real response\n</tool_response>"},
            {"role": "user", "content": 'Real question with "quotes" and {braces}'},
            {"role": "assistant", "content": "", "tool_calls": [SEARCH_CALL]},
            {"role": "tool", "content": "result A"},
            {"role": "user", "content": "Thanks, now summarize."},
        ],
        [SEARCH],
        {"add_generation_prompt": True, "enable_thinking": True},
    ),
    (
        [
            {"role": "system", "content": [{"type": "text", "text": "System as parts."}]},
            {"role": "user", "content": "Multi\nline\n\nuser"},
            {"role": "assistant", "content": "Answer one"},
            {"role": "user", "content": "Follow-up"},
            {
                "role": "assistant",
                "content": "Calling.",
                "tool_calls": [{"function": WEATHER_CALL["function"]}],
            },
            {"role": "tool", "content": "cloudy"},
            {"role": "tool", "content": "second result"},
        ],
        [WEATHER, SEARCH],
        {"add_generation_prompt": True, "enable_thinking": False},
    ),
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer_dir: Path) -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))


@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_render_equals_transformers(index: int, tokenizer_dir: Path, hf_tokenizer: Any) -> None:
    messages, tools, options = CONVERSATIONS[index]
    template = ChatTemplate.from_dir(tokenizer_dir)
    ours = template.render(copy.deepcopy(messages), tools=copy.deepcopy(tools), **options)
    theirs = hf_tokenizer.apply_chat_template(
        copy.deepcopy(messages), tools=copy.deepcopy(tools), tokenize=False, **options
    )
    assert ours == theirs
    assert ours.startswith("<|im_start|>")


def test_openai_string_arguments_render_like_objects(tokenizer_dir: Path) -> None:
    template = ChatTemplate.from_dir(tokenizer_dir)
    messages, tools, options = CONVERSATIONS[3]
    as_strings = copy.deepcopy(messages)
    for call in as_strings[1]["tool_calls"]:
        call["function"]["arguments"] = json.dumps(call["function"]["arguments"])
    rendered = template.render(as_strings, tools=tools, **options)
    assert rendered == template.render(messages, tools=tools, **options)
    assert '<parameter=filters>\n{"year": 2024, "tags": ["a"]}\n</parameter>' in rendered


def test_template_errors_are_raised(tokenizer_dir: Path, hf_tokenizer: Any) -> None:
    template = ChatTemplate.from_dir(tokenizer_dir)
    only_system = [{"role": "system", "content": "nobody asks"}]
    with pytest.raises(jinja2.exceptions.TemplateError, match="No user query"):
        template.render(only_system)
    with pytest.raises(jinja2.exceptions.TemplateError, match="No user query"):
        hf_tokenizer.apply_chat_template(only_system, tokenize=False)


def test_template_from_tokenizer_config(tokenizer_dir: Path, tmp_path: Path) -> None:
    source = (tokenizer_dir / "chat_template.jinja").read_text()
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = [
        {"name": "default", "template": source},
        {"name": "rag", "template": "x"},
    ]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    template = ChatTemplate.from_dir(tmp_path)
    assert template.source == source
    assert template.special_tokens == {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    assert template.tool_call_format == "xml"
    assert ChatTemplate("{{ '<tool_call>' }}").tool_call_format == "json"


@pytest.mark.parametrize("enable_thinking", [None, False])
def test_continuation_is_the_tail_of_the_full_rendering(
    tokenizer_dir: Path, enable_thinking: bool | None
) -> None:
    template = ChatTemplate.from_dir(tokenizer_dir)
    history = [
        {"role": "user", "content": "Weather in Köln, and search rain?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [WEATHER_CALL]},
    ]
    tool_results = [{"role": "tool", "content": "sunny"}, {"role": "tool", "content": "warm"}]
    options = {"tools": [WEATHER], "enable_thinking": enable_thinking}
    full = template.render(history + tool_results, **options)
    tail = template.render_continuation(tool_results, **options)
    assert full.endswith(tail)
    assert tail.startswith("<|im_end|>\n<|im_start|>user\n<tool_response>\nsunny\n</tool_response>")
    user_turn = [{"role": "user", "content": "And tomorrow?"}]
    tail = template.render_continuation(user_turn, **options)
    assert template.render(
        [*history, *tool_results, {"role": "assistant", "content": "Sunny."}, *user_turn], **options
    ).endswith(tail)
    generation_prompt = "<think>\n" if enable_thinking is None else "<think>\n\n</think>\n\n"
    assert (
        tail
        == "<|im_end|>\n<|im_start|>user\nAnd tomorrow?<|im_end|>\n<|im_start|>assistant\n"
        + generation_prompt
    )
