"""Split streamed model output into reasoning, answer text and tool calls.

Text arrives in arbitrary pieces. `<think>…</think>` is reasoning; `<tool_call>…</tool_call>`
holds a call in Qwen3-Coder XML (`<function=NAME><parameter=ARG>VALUE</parameter></function>`)
or Hermes JSON (`{"name": …, "arguments": {…}}`). XML parameter values are converted by the
tool's schema types. A call that does not parse or fails its schema is reported, and its text is
kept in the answer: bad output from the model never raises.
"""

from __future__ import annotations

import dataclasses
import json
import re
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

from .tool_schema import Schema, schema_errors, schema_types, tool_parameters

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
PARAM_OPEN, PARAM_CLOSE = "<parameter=", "</parameter>"


@dataclasses.dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: dict[str, Any]

    def to_openai(self) -> dict[str, Any]:
        arguments = json.dumps(self.arguments, ensure_ascii=False)
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": arguments},
        }


@dataclasses.dataclass(frozen=True)
class MalformedToolCall:
    text: str  # the call as the model wrote it, tags included
    error: str


@dataclasses.dataclass(frozen=True)
class ReasoningDelta:
    text: str


@dataclasses.dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclasses.dataclass(frozen=True)
class ToolCallDelta:
    """One complete, validated call; `index` counts the calls of this message from 0."""

    index: int
    call: ToolCall


@dataclasses.dataclass(frozen=True)
class ToolCallError:
    """A call that could not be used; its text also went out as content."""

    malformed: MalformedToolCall


ParseEvent = ReasoningDelta | ContentDelta | ToolCallDelta | ToolCallError


@dataclasses.dataclass
class AssistantMessage:
    content: str = ""
    reasoning_content: str | None = None  # None when the model did not reason
    tool_calls: list[ToolCall] = dataclasses.field(default_factory=list)
    malformed_tool_calls: list[MalformedToolCall] = dataclasses.field(default_factory=list)

    def to_openai(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            message["content"] = self.content or None
            message["tool_calls"] = [call.to_openai() for call in self.tool_calls]
        if self.reasoning_content is not None:
            message["reasoning_content"] = self.reasoning_content
        return message


class _TrimmedText:
    """Accumulates a section of text without its leading and trailing whitespace.

    Trailing whitespace is held back until more text follows, so the streamed deltas add up
    to exactly the final, trimmed section (which is what chat templates store and re-render).
    """

    def __init__(self) -> None:
        self.text = ""
        self._held = ""

    def add(self, piece: str) -> str:
        piece = self._held + piece
        if not self.text:
            piece = piece.lstrip()
        body = piece.rstrip()
        self._held = piece[len(body) :]
        self.text += body
        return body


def _held_prefix(text: str, tags: Sequence[str]) -> int:
    """Length of the longest end of `text` that could be the start of one of `tags`."""
    for size in range(min(len(text), max(len(t) for t in tags) - 1), 0, -1):
        tail = text[-size:]
        if any(t.startswith(tail) for t in tags):
            return size
    return 0


def _find_call_end(body: str) -> int | None:
    """Where `</tool_call>` closes the call that `body` starts, or None if it has not yet.

    The scan skips JSON strings and XML parameter values, so a value that mentions
    `</tool_call>` does not end the call.
    """
    if CALL_CLOSE not in body:  # cheap test first: this runs on every streamed piece
        return None
    stripped = body.lstrip()
    if stripped.startswith("{"):
        in_string = escaped = False
        for i in range(len(body) - len(stripped), len(body)):
            c = body[i]
            if in_string:
                if escaped:
                    escaped = False
                elif c == "\\":
                    escaped = True
                elif c == '"':
                    in_string = False
            elif c == '"':
                in_string = True
            elif body.startswith(CALL_CLOSE, i):
                return i
        return None
    pos = 0
    while True:
        close = body.find(CALL_CLOSE, pos)
        param = body.find(PARAM_OPEN, pos)
        if param < 0 or 0 <= close < param:
            return close if close >= 0 else None
        value_end = body.find(PARAM_CLOSE, param)
        if value_end < 0:
            return None
        pos = value_end + len(PARAM_CLOSE)


_FUNCTION = re.compile(r"\s*<function=([^>\n]+)>(.*)</function>\s*", re.S)
_PARAMETER = re.compile(r"\s*<parameter=([^>\n]+)>(.*?)</parameter>", re.S)


def _convert_xml_value(raw: str, schema: Schema | None) -> Any:
    """Turn the text of an XML parameter into the JSON value its schema asks for."""
    types = schema_types(schema)
    if types == {"string"}:
        return raw
    text = raw.strip()
    if "boolean" in types and text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        if not types or "string" in types:
            return raw
        raise ValueError(f"{text[:40]!r} is not a {' or '.join(sorted(types))}") from None
    if isinstance(value, str) and "string" not in types and types:
        raise ValueError(f"{text[:40]!r} is not a {' or '.join(sorted(types))}")
    return value


def _parse_xml(body: str, declared: Mapping[str, Schema]) -> tuple[str, dict[str, Any]]:
    match = _FUNCTION.fullmatch(body)
    if match is None:
        raise ValueError("expected <function=NAME>…</function>")
    name, inner = match.group(1).strip(), match.group(2)
    if name not in declared:
        raise ValueError(f"unknown function {name!r}")
    properties = declared[name].get("properties") or {}
    arguments: dict[str, Any] = {}
    pos = 0
    for param in _PARAMETER.finditer(inner):
        if param.start() != pos:
            break
        pname, raw = param.group(1).strip(), param.group(2)
        # the template writes each value between newlines that are not part of it
        raw = raw.removeprefix("\n").removesuffix("\n")
        if pname in arguments:
            raise ValueError(f"parameter {pname!r} given twice")
        try:
            arguments[pname] = _convert_xml_value(raw, properties.get(pname))
        except ValueError as exc:
            raise ValueError(f"parameter {pname!r}: {exc}") from None
        pos = param.end()
    if inner[pos:].strip():
        raise ValueError(f"unexpected text in function body: {inner[pos:].strip()[:40]!r}")
    return name, arguments


def _parse_json(body: str, declared: Mapping[str, Schema]) -> tuple[str, dict[str, Any]]:
    try:
        call = json.loads(body)
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON: {exc}") from None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        raise ValueError('expected {"name": …, "arguments": {…}}')
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):  # some models double-encode the arguments
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as exc:
            raise ValueError(f"arguments are not JSON: {exc}") from None
    if not isinstance(arguments, dict):
        raise ValueError("arguments must be an object")
    if call["name"] not in declared:
        raise ValueError(f"unknown function {call['name']!r}")
    return call["name"], arguments


def parse_tool_call(body: str, declared: Mapping[str, Schema]) -> ToolCall:
    """Parse the text between `<tool_call>` and `</tool_call>`; ValueError says what is wrong."""
    parse = _parse_json if body.lstrip().startswith("{") else _parse_xml
    name, arguments = parse(body, declared)
    errors = schema_errors(arguments, declared[name])
    if errors:
        raise ValueError("; ".join(errors))
    return ToolCall(id=f"call_{secrets.token_hex(12)}", name=name, arguments=arguments)


class ResponseParser:
    """Incremental parser of one assistant turn.

    `in_reasoning` says whether the prompt left a `<think>` block open (Qwen3.5's generation
    prompt does); otherwise a `<think>` at the very start of the output opens one. Tool calls
    are parsed only when tools were declared.
    """

    def __init__(
        self, tools: Sequence[Mapping[str, Any]] | None = None, *, in_reasoning: bool = False
    ) -> None:
        self._declared = tool_parameters(tools) if tools else {}
        self._phase = "reasoning" if in_reasoning else "content"
        self._buffer = ""
        self._reasoning = _TrimmedText() if in_reasoning else None
        self._content = _TrimmedText()
        self._at_start = not in_reasoning  # a <think> may still open the output
        self.message = AssistantMessage(reasoning_content="" if in_reasoning else None)

    def feed(self, text: str) -> list[ParseEvent]:
        self._buffer += text
        events: list[ParseEvent] = []
        while self._advance(events):
            pass
        return events

    def finish(self) -> list[ParseEvent]:
        """End of output: flush held text and report an unterminated call."""
        events: list[ParseEvent] = []
        if self._phase == "tool_call":
            self._close_call(self._buffer, events, terminated=False)
        elif self._phase == "content":
            self._emit_content(self._buffer, events)
        else:
            self._emit_reasoning(self._buffer, events)
        self._buffer = ""
        self._phase = "done"
        return events

    def _advance(self, events: list[ParseEvent]) -> bool:
        buf = self._buffer
        if self._phase == "reasoning":
            end = buf.find(THINK_CLOSE)
            if end < 0:
                keep = _held_prefix(buf, [THINK_CLOSE])
                self._emit_reasoning(buf[: len(buf) - keep], events)
                self._buffer = buf[len(buf) - keep :]
                return False
            self._emit_reasoning(buf[:end], events)
            self._buffer = buf[end + len(THINK_CLOSE) :]
            self._phase = "content"
            return True
        if self._phase == "content":
            if self._at_start:
                head = buf.lstrip()
                if head.startswith(THINK_OPEN):
                    self._buffer = head[len(THINK_OPEN) :]
                    self._phase, self._at_start = "reasoning", False
                    self._reasoning = _TrimmedText()
                    self.message.reasoning_content = ""
                    return True
                if THINK_OPEN.startswith(head):
                    return False  # only whitespace or part of "<think>" so far
                self._at_start = False
            tags = [CALL_OPEN] if self._declared else []
            start = buf.find(CALL_OPEN) if tags else -1
            if start < 0:
                keep = _held_prefix(buf, tags) if tags else 0
                self._emit_content(buf[: len(buf) - keep], events)
                self._buffer = buf[len(buf) - keep :]
                return False
            self._emit_content(buf[:start], events)
            self._buffer = buf[start + len(CALL_OPEN) :]
            self._phase = "tool_call"
            return True
        if self._phase == "tool_call":
            end = _find_call_end(buf)
            if end is None:
                return False
            self._close_call(buf[:end], events, terminated=True)
            self._buffer = buf[end + len(CALL_CLOSE) :]
            self._phase = "content"
            return True
        return False

    def _emit_reasoning(self, text: str, events: list[ParseEvent]) -> None:
        assert self._reasoning is not None
        delta = self._reasoning.add(text)
        self.message.reasoning_content = self._reasoning.text
        if delta:
            events.append(ReasoningDelta(delta))

    def _emit_content(self, text: str, events: list[ParseEvent]) -> None:
        delta = self._content.add(text)
        self.message.content = self._content.text
        if delta:
            events.append(ContentDelta(delta))

    def _close_call(self, body: str, events: list[ParseEvent], *, terminated: bool) -> None:
        try:
            call = parse_tool_call(body, self._declared)
        except ValueError as exc:
            text = CALL_OPEN + body + (CALL_CLOSE if terminated else "")
            error = str(exc) if terminated else f"unterminated tool call ({exc})"
            malformed = MalformedToolCall(text=text, error=error)
            self.message.malformed_tool_calls.append(malformed)
            events.append(ToolCallError(malformed))
            self._emit_content(text, events)
            return
        events.append(ToolCallDelta(len(self.message.tool_calls), call))
        self.message.tool_calls.append(call)
