"""Constrained decoding of tool calls: whatever the logits, every tool call comes out well-formed.

A byte-level pushdown automaton follows the assistant turn as it is generated: reasoning, answer
text, and, from `<tool_call>` on, the call grammar of the model's format (Qwen3-Coder XML or
Hermes JSON): a declared function name, parameter names from its schema, each value of its
schema type (strings free until the closing tag, JSON values of the right type, enums from
their list), and every required parameter before the call may close.

Each frame of the automaton also knows the shortest bytes that finish it (`closing`). A token is
allowed only if, after it, the call can still be finished within the tokens left, so a call
started before `max_tokens` always closes: the reference engine found that weak (2-bit) experts
break tool-call JSON, and this makes that impossible. Byte-level BPE has a token for every
byte, so the closing bytes can always be written one token at a time.

The per-token cost is a walk of the vocabulary's byte trie that only descends where the
automaton accepts; inside free text, tokens without a significant byte (`<`, a quote, ...) are
accepted wholesale from a precomputed mask, and masks are cached per automaton state.
"""

from __future__ import annotations

import abc
import bisect
import dataclasses
import functools
import json
import weakref
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from .chat_template import ToolCallFormat
from .tokenizer import Tokenizer
from .tool_schema import Schema, schema_types, tool_parameters

THINK_OPEN, THINK_CLOSE = b"<think>", b"</think>"
CALL_OPEN = b"<tool_call>"
PARAM_CLOSE = b"</parameter>"
XML_CALL_CLOSE = b"</function>\n</tool_call>"
JSON_WHITESPACE = frozenset(b" \t\n\r")
TEXT_WHITESPACE = JSON_WHITESPACE
MAX_WHITESPACE_RUN = 16  # longer runs are a degenerate loop, not formatting
MAX_CALL_GAP = 4  # whitespace allowed before a forced <tool_call>
MAX_ANY_DEPTH = 8  # nesting of JSON values whose schema does not fix their shape
MAX_DIGITS = 16  # integer and fraction digits: keeps every number finite as a float
MAX_EXPONENT_DIGITS = 2
CONTROL_BYTES = frozenset(range(0x20))
DIGITS = frozenset(b"0123456789")
HEX = frozenset(b"0123456789abcdefABCDEF")

Stack = tuple["Frame", ...]


class Plain(NamedTuple):
    """The tokens a free-text frame accepts wholesale: those without any byte of `anywhere`,
    not starting with a byte of `first` and, when `blank` is set, not made only of whitespace.
    Each of them leaves `result` in the frame's place; the other tokens are checked byte by
    byte."""

    anywhere: frozenset[int]
    first: frozenset[int]
    result: Frame
    blank: bool = False


def _seq(*frames: Frame) -> Stack:
    """Frames in the order they consume input, as a stack slice (the first one on top)."""
    return tuple(reversed(frames))


def _after_tag(partial: bytes, b: int, tags: Sequence[bytes]) -> bytes:
    """The part of a tag matched after byte `b`, given `partial` matched before it.

    Every tag starts with `<` and has no other `<`, so a mismatch restarts at `<` or nothing.
    """
    s = partial + bytes([b])
    if any(t.startswith(s) for t in tags):
        return s
    return b"<" if b == 0x3C else b""


# ---------------------------------------------------------------------------------------------
# Schema nodes: a JSON schema compiled into hashable pieces frames can refer to by index.


@dataclasses.dataclass(frozen=True)
class Node:
    types: frozenset[str]  # empty: any JSON value
    enum: tuple[bytes, ...] | None  # JSON texts of the allowed values
    keys: tuple[str, ...]  # an object's allowed keys, in declared order (closed objects)
    children: tuple[int, ...]  # node of each key's value
    required: frozenset[str]
    closed: bool  # keys limited to `keys`
    items: int  # node of array items / values of open objects


ANY = 0


# ---------------------------------------------------------------------------------------------
# Frames. Each is immutable and hashable. feed(b) returns the frames replacing it (bottom to
# top; empty when it is finished) or None when it cannot take b; `can_end` says it may finish
# without taking b (then the byte goes to the frame below); closing() is the shortest input
# that finishes it. `plain()` (text frames only) describes the tokens it accepts wholesale.


@dataclasses.dataclass(frozen=True, slots=True)
class Frame(abc.ABC):
    can_end = False

    @abc.abstractmethod
    def feed(self, b: int) -> Stack | None: ...

    @abc.abstractmethod
    def closing(self) -> bytes: ...

    def plain(self) -> Plain | None:
        """The tokens accepted wholesale, or None when all must be checked byte by byte."""
        return None


@dataclasses.dataclass(frozen=True, slots=True)
class Literal(Frame):
    text: bytes
    pos: int = 0

    def feed(self, b: int) -> Stack | None:
        if self.text[self.pos] != b:
            return None
        return () if self.pos + 1 == len(self.text) else (Literal(self.text, self.pos + 1),)

    def closing(self) -> bytes:
        return self.text[self.pos :]


@dataclasses.dataclass(frozen=True, slots=True)
class Choice(Frame):
    """One of a fixed list of byte strings (enum values)."""

    options: tuple[bytes, ...]
    matched: bytes = b""

    @property
    def can_end(self) -> bool:  # type: ignore[override]
        return self.matched in self.options

    def feed(self, b: int) -> Stack | None:
        s = self.matched + bytes([b])
        longer = [o for o in self.options if o.startswith(s)]
        if not longer:
            return None
        if longer == [s]:
            return ()
        return (Choice(self.options, s),)

    def closing(self) -> bytes:
        if self.can_end:
            return b""
        rest = [o for o in self.options if o.startswith(self.matched)]
        return min(rest, key=len)[len(self.matched) :]


@dataclasses.dataclass(frozen=True, slots=True)
class Reasoning(Frame):
    """Free text until `</think>`, then the answer."""

    g: ToolGrammar
    partial: bytes = b""

    @property
    def can_end(self) -> bool:  # type: ignore[override]
        return not self.g.required

    def feed(self, b: int) -> Stack | None:
        s = _after_tag(self.partial, b, [THINK_CLOSE])
        if s == THINK_CLOSE:
            return (self.g.answer(at_start=False),)
        return (Reasoning(self.g, s),)

    def closing(self) -> bytes:
        if self.can_end:
            return b""
        return THINK_CLOSE[len(self.partial) :] + self.g.answer(at_start=False).closing()

    def plain(self) -> Plain | None:
        first = frozenset([THINK_CLOSE[len(self.partial)]]) if self.partial else frozenset()
        return Plain(frozenset(b"<"), first, Reasoning(self.g))


@dataclasses.dataclass(frozen=True, slots=True)
class Content(Frame):
    """Free answer text in which `<tool_call>` opens a call (tool_choice auto)."""

    g: ToolGrammar
    partial: bytes = b""
    at_start: bool = True  # only whitespace so far: a `<think>` may still open reasoning
    can_end = True

    def feed(self, b: int) -> Stack | None:
        tags = (CALL_OPEN, THINK_OPEN) if self.at_start else (CALL_OPEN,)
        s = _after_tag(self.partial, b, tags)
        if s == CALL_OPEN:
            return (Content(self.g, b"", False), *self.g.call())
        if s == THINK_OPEN:
            return (Reasoning(self.g),)
        # still at the start: more leading whitespace, or "<think>" being spelled out
        extends = s == self.partial + bytes([b])
        at_start = self.at_start and (
            (not s and not self.partial and b in TEXT_WHITESPACE)
            or (extends and THINK_OPEN.startswith(s))
        )
        return (Content(self.g, s, at_start),)

    def closing(self) -> bytes:
        return b""

    def plain(self) -> Plain | None:
        if self.at_start and self.partial:
            return None
        first = frozenset([CALL_OPEN[len(self.partial)]]) if self.partial else frozenset()
        # at the start, a token of only whitespace keeps a later <think> possible
        return Plain(frozenset(b"<"), first, Content(self.g, b"", False), blank=self.at_start)


@dataclasses.dataclass(frozen=True, slots=True)
class CallsOnly(Frame):
    """The answer must be tool calls (tool_choice required or a named function)."""

    g: ToolGrammar
    partial: bytes = b""
    calls: int = 0
    gap: int = 0  # whitespace bytes since the last call

    @property
    def can_end(self) -> bool:  # type: ignore[override]
        return self.calls > 0 and not self.partial

    def feed(self, b: int) -> Stack | None:
        if not self.partial and b in TEXT_WHITESPACE:
            return (
                (CallsOnly(self.g, b"", self.calls, self.gap + 1),)
                if self.gap < MAX_CALL_GAP
                else None
            )
        if self.g.max_calls is not None and self.calls >= self.g.max_calls:
            return None
        s = self.partial + bytes([b])
        if not CALL_OPEN.startswith(s):
            return None
        if s == CALL_OPEN:
            return (CallsOnly(self.g, b"", self.calls + 1, 0), *self.g.call())
        return (CallsOnly(self.g, s, self.calls, self.gap),)

    def closing(self) -> bytes:
        if self.can_end:
            return b""
        return CALL_OPEN[len(self.partial) :] + _stack_closing(self.g.call())


@dataclasses.dataclass(frozen=True, slots=True)
class FunctionName(Frame):
    """A declared function name with what the format writes after it."""

    g: ToolGrammar
    matched: bytes = b""

    def feed(self, b: int) -> Stack | None:
        s = self.matched + bytes([b])
        options = self.g.function_options
        if not any(o.startswith(s) for o in options):
            return None
        if s in options:  # options end in a delimiter, so none is a prefix of another
            return self.g.after_function(s)
        return (FunctionName(self.g, s),)

    def closing(self) -> bytes:
        rest = [o for o in self.g.function_options if o.startswith(self.matched)]
        return min(
            (o[len(self.matched) :] + _stack_closing(self.g.after_function(o)) for o in rest),
            key=len,
        )


@dataclasses.dataclass(frozen=True, slots=True)
class XmlParams(Frame):
    """Between parameters of an XML call: another `<parameter=NAME>` or `</function>`."""

    g: ToolGrammar
    tool: str
    used: tuple[str, ...] = ()  # sorted
    partial: bytes = b""

    def feed(self, b: int) -> Stack | None:
        s = self.partial + bytes([b])
        options = self.g.param_options(self.tool, self.used)
        if not any(o.startswith(s) for o in options):
            return None
        if s in options:
            return self._after(s)
        return (XmlParams(self.g, self.tool, self.used, s),)

    def _after(self, option: bytes) -> Stack:
        if option == XML_CALL_CLOSE:
            return ()
        name = option[len(b"<parameter=") : -len(b">\n")].decode()
        used = tuple(sorted((*self.used, name)))
        return (XmlParams(self.g, self.tool, used), *self.g.xml_value(self.tool, name))

    def closing(self) -> bytes:
        if not self.partial:
            return self.g.xml_params_tail(self.tool, self.used)
        options = self.g.param_options(self.tool, self.used)
        rest = [o for o in options if o.startswith(self.partial)]
        return min((o[len(self.partial) :] + _stack_closing(self._after(o)) for o in rest), key=len)


@dataclasses.dataclass(frozen=True, slots=True)
class XmlText(Frame):
    """A string parameter's text: anything up to and including `</parameter>`."""

    partial: bytes = b""

    def feed(self, b: int) -> Stack | None:
        s = _after_tag(self.partial, b, [PARAM_CLOSE])
        return () if s == PARAM_CLOSE else (XmlText(s),)

    def closing(self) -> bytes:
        return PARAM_CLOSE[len(self.partial) :]

    def plain(self) -> Plain | None:
        first = frozenset([PARAM_CLOSE[len(self.partial)]]) if self.partial else frozenset()
        return Plain(frozenset(b"<"), first, XmlText())


@dataclasses.dataclass(frozen=True, slots=True)
class JsonValue(Frame):
    """Any JSON value that the schema node allows; its first byte picks the kind."""

    g: ToolGrammar
    node: int
    depth: int = 0

    def feed(self, b: int) -> Stack | None:
        node = self.g.nodes[self.node]
        if node.enum is not None:
            return Choice(node.enum).feed(b)
        types = self.g.value_types(self.node, self.depth)
        if b == 0x7B and "object" in types:
            return (JsonObject(self.g, self.node, self.depth),)
        if b == 0x5B and "array" in types:
            return (JsonArray(self.g, self.node, self.depth),)
        if b == 0x22 and "string" in types:
            return (JsonString(self.g.guard),)
        if (b in DIGITS or b == 0x2D) and ("number" in types or "integer" in types):
            return JsonNumber(integer="number" not in types).feed(b)
        for word, kind in ((b"true", "boolean"), (b"false", "boolean"), (b"null", "null")):
            if b == word[0] and kind in types:
                return (Literal(word, 1),)
        return None

    def closing(self) -> bytes:
        return self.g.min_value(self.node, self.depth)


@dataclasses.dataclass(frozen=True, slots=True)
class JsonString(Frame):
    """Inside a JSON string, after its opening quote.

    In XML calls the text must not contain `</parameter>`, which would end the value early
    for any parser: `guard` tracks how much of it the string's tail matches.
    """

    guard: bool
    escape: int = 0  # 0: plain; 1: after a backslash; 2..5: hex digits of \\uXXXX still due
    partial: bytes = b""

    def feed(self, b: int) -> Stack | None:
        if self.escape == 1:
            if b == 0x75:  # \u
                return (JsonString(self.guard, 5),)
            return (JsonString(self.guard),) if b in b'"\\/bfnrt' else None
        if self.escape:
            if b not in HEX:
                return None
            return (JsonString(self.guard, self.escape - 1 if self.escape > 2 else 0),)
        if b == 0x22:
            return ()
        if b == 0x5C:
            return (JsonString(self.guard, 1),)
        if b in CONTROL_BYTES:
            return None
        if not self.guard:
            return (self,)
        s = _after_tag(self.partial, b, [PARAM_CLOSE])
        return None if s == PARAM_CLOSE else (JsonString(True, 0, s),)

    def closing(self) -> bytes:
        if self.escape == 1:
            return b'n"'
        if self.escape:
            return b"0" * (self.escape - 1) + b'"'
        return b'"'

    def plain(self) -> Plain | None:
        if self.escape:
            return None
        special = CONTROL_BYTES | frozenset(b'"\\')
        if not self.guard:
            return Plain(special, frozenset(), self)
        first = frozenset([PARAM_CLOSE[len(self.partial)]]) if self.partial else frozenset()
        return Plain(special | frozenset(b"<"), first, JsonString(True))


@dataclasses.dataclass(frozen=True, slots=True)
class JsonNumber(Frame):
    integer: bool
    state: str = "start"  # start, sign, zero, int, dot, frac, exp, exp_sign, exp_digits
    digits: int = 0

    @property
    def can_end(self) -> bool:  # type: ignore[override]
        return self.state in ("zero", "int", "frac", "exp_digits")

    def feed(self, b: int) -> Stack | None:
        st, n = self.state, self.digits
        digit = b in DIGITS
        if st in ("start", "sign"):
            if st == "start" and b == 0x2D:
                return (JsonNumber(self.integer, "sign"),)
            if digit:
                return (JsonNumber(self.integer, "zero" if b == 0x30 else "int", 1),)
            return None
        if st in ("zero", "int"):
            if digit and st == "int" and n < MAX_DIGITS:
                return (JsonNumber(self.integer, "int", n + 1),)
            if self.integer:
                return None
            if b == 0x2E:
                return (JsonNumber(False, "dot"),)
            if b in b"eE":
                return (JsonNumber(False, "exp"),)
            return None
        if st in ("dot", "frac"):
            if digit and n < MAX_DIGITS:
                return (JsonNumber(False, "frac", n + 1),)
            if st == "frac" and b in b"eE":
                return (JsonNumber(False, "exp"),)
            return None
        if st == "exp" and b in b"+-":
            return (JsonNumber(False, "exp_sign"),)
        if digit and (st in ("exp", "exp_sign") or n < MAX_EXPONENT_DIGITS):
            return (JsonNumber(False, "exp_digits", 1 if st != "exp_digits" else n + 1),)
        return None

    def closing(self) -> bytes:
        return b"" if self.can_end else b"0"


@dataclasses.dataclass(frozen=True, slots=True)
class JsonArray(Frame):
    g: ToolGrammar
    node: int
    depth: int
    state: str = "start"  # start (after '['), next (after ','), after (after a value)
    ws: int = 0

    def feed(self, b: int) -> Stack | None:
        if b in JSON_WHITESPACE:
            if self.ws >= MAX_WHITESPACE_RUN:
                return None
            return (dataclasses.replace(self, ws=self.ws + 1),)
        if b == 0x5D and self.state != "next":
            return ()
        if b == 0x2C and self.state == "after":
            return (JsonArray(self.g, self.node, self.depth, "next"),)
        if self.state == "after":
            return None
        item = JsonValue(self.g, self.g.nodes[self.node].items, self.depth + 1).feed(b)
        if item is None:
            return None
        return (JsonArray(self.g, self.node, self.depth, "after"), *item)

    def closing(self) -> bytes:
        if self.state == "next":
            return self.g.min_value(self.g.nodes[self.node].items, self.depth + 1) + b"]"
        return b"]"


@dataclasses.dataclass(frozen=True, slots=True)
class JsonObject(Frame):
    """An object; closed objects take only their declared keys, each at most once."""

    g: ToolGrammar
    node: int
    depth: int
    state: str = "start"  # start, next (after ','), key, colon, value, after
    used: tuple[str, ...] = ()  # sorted keys written so far
    key: bytes = b""  # key bytes matched so far (closed objects, state key)
    current: int = ANY  # node of the value being written
    ws: int = 0

    def _with(self, **changes: Any) -> JsonObject:
        return dataclasses.replace(self, **{"ws": 0, **changes})

    def feed(self, b: int) -> Stack | None:
        g, node = self.g, self.g.nodes[self.node]
        st = self.state
        if st == "key":
            s = self.key + bytes([b])
            options = g.key_options(self.node, self.used)
            if not any(o.startswith(s) for o in options):
                return None
            if s not in options:
                return (self._with(key=s),)
            name = json.loads(s.decode())
            used = tuple(sorted((*self.used, name)))
            child = node.children[node.keys.index(name)]
            return (self._with(state="colon", used=used, key=b"", current=child),)
        if b in JSON_WHITESPACE:
            if self.ws >= MAX_WHITESPACE_RUN:
                return None
            return (dataclasses.replace(self, ws=self.ws + 1),)
        if st in ("start", "next") and b == 0x22:
            if node.closed:
                if not g.key_options(self.node, self.used):
                    return None
                return (self._with(state="key", key=b'"'),)
            return (self._with(state="colon", current=node.items), JsonString(g.guard))
        if b == 0x7D and st in ("start", "after"):
            return () if node.required.issubset(self.used) else None
        if st == "colon":
            return (self._with(state="value"),) if b == 0x3A else None
        if st == "value":
            value = JsonValue(g, self.current, self.depth + 1).feed(b)
            return None if value is None else (self._with(state="after"), *value)
        if st == "after" and b == 0x2C:
            if node.closed and not g.key_options(self.node, self.used):
                return None
            return (self._with(state="next"),)
        return None

    def closing(self) -> bytes:
        g, st = self.g, self.state
        tail = g.object_tail(self.node, self.used, self.depth, comma=True)
        if st == "start":
            return g.object_tail(self.node, self.used, self.depth, comma=False)
        if st == "after":
            return tail
        if st == "value":
            return g.min_value(self.current, self.depth + 1) + tail
        if st == "colon":
            return b":" + g.min_value(self.current, self.depth + 1) + tail
        if st == "next":
            return g.object_member(self.node, self.used, self.depth)
        options = [o for o in g.key_options(self.node, self.used) if o.startswith(self.key)]
        return min(
            (
                o[len(self.key) :] + g.after_key(self.node, self.used, self.depth, o)
                for o in options
            ),
            key=len,
        )


@functools.lru_cache(maxsize=1 << 16)
def _frame_closing(frame: Frame) -> bytes:
    return frame.closing()


def _stack_closing(stack: Stack) -> bytes:
    return b"".join(_frame_closing(f) for f in reversed(stack))


def advance(stack: Stack, b: int) -> Stack | None:
    """The automaton after byte `b`, or None if `b` is not allowed here."""
    while stack:
        top = stack[-1]
        replaced = top.feed(b)
        if replaced is not None:
            return stack[:-1] + replaced
        if not top.can_end:
            return None
        stack = stack[:-1]
    return None


def accepts_end(stack: Stack) -> bool:
    """Whether the turn may end here (every open frame may finish without more input)."""
    return all(f.can_end for f in stack)


# ---------------------------------------------------------------------------------------------


class ToolGrammar:
    """The call grammar for a set of tools in one format, with the schema nodes it needs."""

    def __init__(
        self,
        tools: Sequence[Mapping[str, Any]],
        fmt: ToolCallFormat,
        *,
        tool_choice: str = "auto",
    ) -> None:
        declared = tool_parameters(tools)
        if tool_choice not in ("auto", "required") and tool_choice not in declared:
            raise ValueError(f"tool_choice names an undeclared function: {tool_choice!r}")
        self.format = fmt
        self.guard = fmt == "xml"
        self.required = tool_choice != "auto"
        self.max_calls = 1 if self.required and tool_choice != "required" else None
        names = [n for n in declared if tool_choice in ("auto", "required") or n == tool_choice]
        # a name the XML form cannot delimit could never be parsed back, so it is not offered
        names = [n for n in names if ">" not in n and "\n" not in n]
        if not names:
            raise ValueError("no declared function can be called")
        self.nodes: list[Node] = [Node(frozenset(), None, (), (), frozenset(), False, ANY)]
        self._node_ids: dict[str, int] = {}
        self.tool_nodes = {n: self._compile(declared[n], top=True) for n in names}
        end = b">\n" if fmt == "xml" else b'", "arguments": '
        self.function_options = tuple(n.encode() + end for n in names)
        self._cache: dict[Any, Any] = {}

    # -- schema compilation

    def _compile(self, schema: Schema | None, top: bool = False) -> int:
        schema = schema or {}
        key = json.dumps(schema, sort_keys=True) + ("#top" if top else "")
        if key in self._node_ids:
            return self._node_ids[key]
        enum = None
        if isinstance(schema.get("enum"), list):
            enum = tuple(json.dumps(v, ensure_ascii=False).encode() for v in schema["enum"])
        elif "const" in schema:
            enum = (json.dumps(schema["const"], ensure_ascii=False).encode(),)
        properties = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
        required = [r for r in schema.get("required") or [] if isinstance(r, str)]
        keys = tuple(properties) + tuple(r for r in required if r not in properties)
        closed = "properties" in schema or bool(required)
        types = schema_types(schema)
        if top:  # a function's parameters are always an object
            types, closed = frozenset(["object"]), True
        self.nodes.append(Node(types, enum, keys, (), frozenset(required), closed, ANY))
        node_id = len(self.nodes) - 1
        self._node_ids[key] = node_id
        children = tuple(self._compile(properties.get(k)) for k in keys)
        items_schema = schema.get("items") if isinstance(schema.get("items"), dict) else None
        extra = schema.get("additionalProperties")
        items = self._compile(items_schema or (extra if isinstance(extra, dict) else None))
        self.nodes[node_id] = dataclasses.replace(
            self.nodes[node_id], children=children, items=items
        )
        return node_id

    def value_types(self, node_id: int, depth: int) -> frozenset[str]:
        types = self.nodes[node_id].types
        if types:
            return types
        if depth >= MAX_ANY_DEPTH:
            return frozenset(["string", "number", "boolean", "null"])
        return frozenset(["object", "array", "string", "number", "boolean", "null"])

    # -- call structure

    def answer(self, at_start: bool) -> Frame:
        return CallsOnly(self) if self.required else Content(self, at_start=at_start)

    def initial(self, in_reasoning: bool) -> Stack:
        return (Reasoning(self),) if in_reasoning else (self.answer(at_start=True),)

    def call(self) -> Stack:
        """What follows `<tool_call>`."""
        opening = b"\n<function=" if self.format == "xml" else b'\n{"name": "'
        return _seq(Literal(opening), FunctionName(self))

    def after_function(self, option: bytes) -> Stack:
        name = self._name_of(option)
        if self.format == "xml":
            return (XmlParams(self, name),)
        return _seq(JsonValue(self, self.tool_nodes[name]), Literal(b"}\n</tool_call>"))

    def _name_of(self, option: bytes) -> str:
        end = b">\n" if self.format == "xml" else b'", "arguments": '
        return option[: -len(end)].decode()

    def param_options(self, tool: str, used: tuple[str, ...]) -> tuple[bytes, ...]:
        key = ("params", tool, used)
        if key not in self._cache:
            node = self.nodes[self.tool_nodes[tool]]
            names = [k for k in node.keys if k not in used and ">" not in k and "\n" not in k]
            options = [b"<parameter=" + k.encode() + b">\n" for k in names]
            if node.required.issubset(used):
                options.append(XML_CALL_CLOSE)
            self._cache[key] = tuple(options)
        return self._cache[key]

    def xml_value(self, tool: str, name: str) -> Stack:
        """The frames of one XML parameter value, up to the newline after `</parameter>`."""
        node_id = self._child(self.tool_nodes[tool], name)
        node = self.nodes[node_id]
        if node.enum is not None and all(o.startswith(b'"') for o in node.enum):
            raw = [json.loads(o).encode() + b"\n" + PARAM_CLOSE for o in node.enum]
            raw = [o for o in raw if o.count(PARAM_CLOSE) == 1]
            return _seq(Choice(tuple(raw)), Literal(b"\n"))
        if node.enum is None and (not node.types or "string" in node.types):
            return _seq(XmlText(), Literal(b"\n"))
        return _seq(JsonValue(self, node_id), Literal(b"\n" + PARAM_CLOSE + b"\n"))

    def xml_params_tail(self, tool: str, used: tuple[str, ...]) -> bytes:
        """Shortest finish of an XML call: the missing required parameters, then the close."""
        node = self.nodes[self.tool_nodes[tool]]
        missing = [k for k in node.keys if k in node.required and k not in used]
        if not missing:
            return XML_CALL_CLOSE
        option = b"<parameter=" + missing[0].encode() + b">\n"
        value = _stack_closing(self.xml_value(tool, missing[0]))
        return option + value + self.xml_params_tail(tool, tuple(sorted((*used, missing[0]))))

    def _child(self, node_id: int, key: str) -> int:
        node = self.nodes[node_id]
        return node.children[node.keys.index(key)] if key in node.keys else node.items

    # -- JSON shortest completions

    def min_value(self, node_id: int, depth: int) -> bytes:
        key = ("min", node_id, min(depth, MAX_ANY_DEPTH))
        if key not in self._cache:
            node = self.nodes[node_id]
            if node.enum is not None:
                self._cache[key] = min(node.enum, key=len)
            else:
                types = self.value_types(node_id, depth)
                candidates = []
                for kind, text in (
                    ("integer", b"0"),
                    ("number", b"0"),
                    ("string", b'""'),
                    ("null", b"null"),
                    ("boolean", b"true"),
                    ("array", b"[]"),
                ):
                    if kind in types:
                        candidates.append(text)
                if "object" in types:
                    candidates.append(b"{" + self.object_tail(node_id, (), depth, comma=False))
                self._cache[key] = min(candidates, key=len)
        return self._cache[key]

    def key_options(self, node_id: int, used: tuple[str, ...]) -> tuple[bytes, ...]:
        key = ("keys", node_id, used)
        if key not in self._cache:
            keys = self.nodes[node_id].keys
            self._cache[key] = tuple(
                json.dumps(k, ensure_ascii=False).encode() for k in keys if k not in used
            )
        return self._cache[key]

    def object_tail(self, node_id: int, used: tuple[str, ...], depth: int, *, comma: bool) -> bytes:
        """Shortest finish of an object after its members so far: missing required ones, `}`."""
        node = self.nodes[node_id]
        missing = [k for k in node.keys if k in node.required and k not in used]
        if not missing:
            return b"}"
        return (b"," if comma else b"") + self._member(node_id, missing[0], used, depth)

    def object_member(self, node_id: int, used: tuple[str, ...], depth: int) -> bytes:
        """Shortest finish after a comma, where some member must follow."""
        node = self.nodes[node_id]
        missing = [k for k in node.keys if k in node.required and k not in used]
        if missing:
            return self._member(node_id, missing[0], used, depth)
        if node.closed:
            options = self.key_options(node_id, used)
            best = min(options, key=lambda o: len(o + self.after_key(node_id, used, depth, o)))
            return best + self.after_key(node_id, used, depth, best)
        return b'"":' + self.min_value(node.items, depth + 1) + b"}"

    def _member(self, node_id: int, key: str, used: tuple[str, ...], depth: int) -> bytes:
        option = json.dumps(key, ensure_ascii=False).encode()
        return option + self.after_key(node_id, used, depth, option)

    def after_key(self, node_id: int, used: tuple[str, ...], depth: int, option: bytes) -> bytes:
        name = json.loads(option.decode())
        after = tuple(sorted((*used, name)))
        value = self.min_value(self._child(node_id, name), depth + 1)
        return b":" + value + self.object_tail(node_id, after, depth, comma=True)


# ---------------------------------------------------------------------------------------------


class VocabularyIndex:
    """The tokenizer's non-control tokens sorted by bytes, for walking them as a trie."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        usable = [
            i
            for i in range(tokenizer.vocab_size)
            if tokenizer.has_token[i]
            and i not in tokenizer.special_ids
            and tokenizer.token_bytes[i]
        ]
        usable.sort(key=lambda i: tokenizer.token_bytes[i])
        self.size = tokenizer.vocab_size
        self.keys = [tokenizer.token_bytes[i] for i in usable]
        self.ids = np.array(usable, dtype=np.int64)
        self.id_list = usable
        self.first_byte = np.array([k[0] for k in self.keys], dtype=np.int16)
        single = {k[0] for k in self.keys if len(k) == 1}
        missing = (set(range(0x20, 0x7F)) | {0x0A}) - single
        if missing:
            # closings are written one byte at a time: every ASCII byte needs its own token
            raise ValueError(f"tokenizer lacks single-byte tokens for {sorted(missing)[:8]}")
        self._subsets: dict[frozenset[int], tuple[list[bytes], list[int], np.ndarray]] = {}
        blank = [i for i, k in enumerate(self.keys) if not k.strip(bytes(TEXT_WHITESPACE))]
        self.blank = np.zeros(len(self.keys), dtype=bool)
        self.blank[blank] = True
        self.blank_keys = [self.keys[i] for i in blank]
        self.blank_ids = [self.id_list[i] for i in blank]

    def with_bytes(self, special: frozenset[int]) -> tuple[list[bytes], list[int], np.ndarray]:
        """Tokens containing any of `special` (sorted keys, their ids) and the mask of the rest."""
        if special not in self._subsets:
            table = bytes(1 if b in special else 0 for b in range(256))
            hits = [i for i, k in enumerate(self.keys) if k.translate(table) != bytes(len(k))]
            rest = np.ones(len(self.keys), dtype=bool)
            rest[hits] = False
            subset = ([self.keys[i] for i in hits], [self.id_list[i] for i in hits], rest)
            self._subsets[special] = subset
        return self._subsets[special]

    @staticmethod
    def walk(
        keys: list[bytes], ids: list[int], lo: int, hi: int, stack: Stack, out: dict[int, Stack]
    ) -> None:
        """Every token in keys[lo:hi] the automaton accepts from `stack`, with its end state."""

        def descend(lo: int, hi: int, depth: int, stack: Stack) -> None:
            i = lo
            while i < hi and len(keys[i]) == depth:
                out[ids[i]] = stack
                i += 1
            while i < hi:
                b = keys[i][depth]
                j = (
                    hi
                    if b == 255
                    else bisect.bisect_left(keys, keys[i][:depth] + bytes([b + 1]), i, hi)
                )
                nxt = advance(stack, b)
                if nxt is not None:
                    descend(i, j, depth + 1, nxt)
                i = j

        descend(lo, hi, 0, stack)


_INDEXES: weakref.WeakKeyDictionary[Tokenizer, VocabularyIndex] = weakref.WeakKeyDictionary()


def vocabulary_index(tokenizer: Tokenizer) -> VocabularyIndex:
    if tokenizer not in _INDEXES:
        _INDEXES[tokenizer] = VocabularyIndex(tokenizer)
    return _INDEXES[tokenizer]


class ToolCallConstraint:
    """Token masks that keep one assistant turn's tool calls well-formed and finishable."""

    _MASK_CACHE_SIZE = 16

    def __init__(
        self,
        tokenizer: Tokenizer,
        grammar: ToolGrammar,
        *,
        in_reasoning: bool,
        end_token_ids: Sequence[int],
    ) -> None:
        self.tokenizer = tokenizer
        self.grammar = grammar
        self.index = vocabulary_index(tokenizer)
        self.end_token_ids = np.array(sorted(set(end_token_ids)), dtype=np.int64)
        self.stack: Stack = grammar.initial(in_reasoning)
        self.ended = False
        # per automaton state: closing length after each accepted token (-1: not accepted)
        self._lengths: OrderedDict[Stack, np.ndarray] = OrderedDict()

    def closing(self) -> bytes:
        """The shortest bytes that would finish what is open now."""
        return _stack_closing(self.stack)

    def _closing_lengths(self) -> np.ndarray:
        stack = self.stack
        if stack in self._lengths:
            self._lengths.move_to_end(stack)
            return self._lengths[stack]
        idx = self.index
        lengths = np.full(idx.size, -1, dtype=np.int32)
        accepted: dict[int, Stack] = {}
        plain = stack[-1].plain() if stack else None
        if plain is None:
            idx.walk(idx.keys, idx.id_list, 0, len(idx.keys), stack, accepted)
        else:
            keys, ids, rest = idx.with_bytes(plain.anywhere)
            idx.walk(keys, ids, 0, len(keys), stack, accepted)
            if plain.first:
                rest = rest & ~np.isin(idx.first_byte, list(plain.first))
            if plain.blank:
                rest = rest & ~idx.blank
                idx.walk(idx.blank_keys, idx.blank_ids, 0, len(idx.blank_keys), stack, accepted)
            lengths[idx.ids[rest]] = len(_stack_closing(stack[:-1] + (plain.result,)))
            for b in plain.first:  # tokens opening with a byte that continues a partial tag
                lo = bisect.bisect_left(idx.keys, bytes([b]))
                hi = bisect.bisect_left(idx.keys, bytes([b + 1])) if b < 255 else len(idx.keys)
                idx.walk(idx.keys, idx.id_list, lo, hi, stack, accepted)
        for token_id, after in accepted.items():
            lengths[token_id] = len(_stack_closing(after))
        self._lengths[stack] = lengths
        if len(self._lengths) > self._MASK_CACHE_SIZE:
            self._lengths.popitem(last=False)
        return lengths

    def allowed(self, remaining: int) -> np.ndarray:
        """Bool per token id: what may come next when at most `remaining` tokens are left.

        A token is allowed only when what it leaves open can still be closed in the tokens
        after it (one byte per token at worst).
        """
        if self.ended or remaining <= 0:
            raise ValueError("nothing may be generated")
        lengths = self._closing_lengths()
        mask = (lengths >= 0) & (lengths <= remaining - 1)
        # an end token ends the turn even when it is also text (a model config may list one)
        mask[self.end_token_ids] = accepts_end(self.stack)
        return mask

    def advance(self, token_id: int) -> None:
        if token_id in self.end_token_ids:
            if not accepts_end(self.stack):
                raise ValueError("the turn cannot end inside a tool call")
            self.ended = True
            return
        if token_id in self.tokenizer.special_ids:
            raise ValueError(f"control token {token_id} is not allowed")
        stack: Stack | None = self.stack
        for b in self.tokenizer.token_bytes[token_id]:
            stack = advance(stack, b) if stack is not None else None
        if stack is None:
            raise ValueError(f"token {token_id} breaks the tool-call grammar")
        self.stack = stack
