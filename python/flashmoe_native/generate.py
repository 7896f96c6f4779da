"""Generation over an Engine: prompt reuse, sampling, stop rules, and a stream of events.

`Generator.generate()` yields text, reasoning and tool-call events as tokens are produced and a
final `Finished` with the whole message and usage. Between two tokens it checks a cancel flag,
and a consumer may also simply stop iterating; either way the engine is left consistent. The
engine keeps the last conversation: a prompt that extends it only prefills the new tokens.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from .chat_template import ChatTemplate
from .sampling import Sampler, SamplingParams
from .tokenizer import Tokenizer
from .tool_calls import (
    AssistantMessage,
    ContentDelta,
    ParseEvent,
    ReasoningDelta,
    ResponseParser,
    ToolCallDelta,
    ToolCallError,
)
from .tool_constraint import ToolCallConstraint, ToolGrammar

FinishReason = Literal["stop", "length", "tool_calls", "cancelled"]
ToolChoice = str  # "auto", "none", "required" or the name of one declared function


class EngineLike(Protocol):
    """What generation needs from `flashmoe_native.Engine`."""

    @property
    def position(self) -> int: ...
    @property
    def max_context(self) -> int: ...
    @property
    def config(self) -> dict[str, Any]: ...
    def prefill(self, tokens: Sequence[int]) -> np.ndarray: ...
    def step(self, token: int) -> np.ndarray: ...
    def reset(self) -> None: ...
    def stats(self) -> dict[str, Any]: ...


@dataclasses.dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    cached_prompt_tokens: int  # already in the engine from the previous request
    completion_tokens: int  # tokens sampled, an end token included
    prefill_seconds: float
    decode_seconds: float  # from the first token sampled to the last
    time_to_first_token: float  # from the call to the first token
    prefill_stats: dict[str, Any]  # Engine.stats() accrued while prefilling
    decode_stats: dict[str, Any]  # ... and while decoding

    @property
    def prompt_tokens_per_second(self) -> float:
        prefilled = self.prompt_tokens - self.cached_prompt_tokens
        return prefilled / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def generation_tokens_per_second(self) -> float:
        # the first token comes from the prompt's logits; the others each cost one step
        steps = self.completion_tokens - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else 0.0


@dataclasses.dataclass(frozen=True)
class Finished:
    reason: FinishReason
    message: AssistantMessage
    usage: Usage


GenerationEvent = ParseEvent | Finished

__all__ = [
    "ContentDelta",
    "Finished",
    "GenerationEvent",
    "Generator",
    "ReasoningDelta",
    "ToolCallDelta",
    "ToolCallError",
    "Usage",
]


def _stats_delta(after: Mapping[str, Any], before: Mapping[str, Any]) -> dict[str, Any]:
    delta: dict[str, Any] = {}
    for key, value in after.items():
        if isinstance(value, Mapping):
            delta[key] = _stats_delta(value, before.get(key, {}))
        elif isinstance(value, (int, float)):
            delta[key] = value - before.get(key, 0)
    return delta


class _StopStrings:
    """Cuts the text at the first stop string, never letting any part of one out."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text that may be emitted, whether a stop string was reached)."""
        if not self._stops:
            return text, False
        text = self._held + text
        hits = [i for i in (text.find(s) for s in self._stops) if i >= 0]
        if hits:
            self._held = ""
            return text[: min(hits)], True
        keep = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(text)), keep, -1):
                if stop.startswith(text[-size:]):
                    keep = size
                    break
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


def _prompt_opens_reasoning(prompt_text: str) -> bool:
    return prompt_text.rfind("<think>") > prompt_text.rfind("</think>")


class Generator:
    """Generates from one Engine with the model directory's tokenizer, template and defaults."""

    def __init__(self, engine: EngineLike, model_dir: str | Path) -> None:
        model_dir = Path(model_dir)
        self.engine = engine
        self.tokenizer = Tokenizer.from_dir(model_dir)
        self.template = ChatTemplate.from_dir(model_dir)
        self.defaults = SamplingParams.from_generation_config(model_dir)
        self.vocab_size = int(engine.config["vocab_size"])
        ends = set(int(i) for i in engine.config.get("eos_token_ids", []))
        for text in ("<|im_end|>", "<|endoftext|>"):
            token_id = self.tokenizer.token_id(text)
            if token_id is not None:
                ends.add(token_id)
        self.end_token_ids = sorted(ends)
        # ids the model has but the tokenizer does not (padding of the embedding) never come out
        self._real_tokens = np.zeros(self.vocab_size, dtype=bool)
        known = np.flatnonzero(self.tokenizer.has_token[: self.vocab_size])
        self._real_tokens[known] = True
        self._context: list[int] = []  # tokens the engine has consumed
        self._pending: list[int] = []  # generated, part of the conversation, not yet consumed
        self._last_logits: np.ndarray | None = None

    @property
    def context_tokens(self) -> list[int]:
        """The conversation so far as tokens: the last prompt and what was generated after it."""
        return self._context + self._pending

    def reset(self) -> None:
        self.engine.reset()
        self._context, self._pending, self._last_logits = [], [], None

    def resume(self, tokens: Sequence[int]) -> None:
        """Take the engine as holding exactly `tokens` (e.g. restored from a snapshot taken
        there), so a prompt that extends them only prefills the rest."""
        if self.engine.position != len(tokens):
            raise ValueError(f"the engine holds {self.engine.position} tokens, not {len(tokens)}")
        self._context, self._pending, self._last_logits = list(tokens), [], None

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        enable_thinking: bool | None = None,
    ) -> list[int]:
        """Prompt tokens for a conversation, ending with the assistant's generation prompt."""
        text = self.template.render(
            messages, tools=tools, add_generation_prompt=True, enable_thinking=enable_thinking
        )
        return self.tokenizer.encode(text)

    def _prefill(self, prompt: Sequence[int]) -> tuple[np.ndarray, int]:
        """Logits after `prompt`, reusing the engine state when the prompt extends it."""
        prompt = list(prompt)
        if len(prompt) >= self.engine.max_context:
            raise ValueError(
                f"prompt of {len(prompt)} tokens leaves no room in a context of "
                f"{self.engine.max_context}"
            )
        reused = len(self._context)
        if reused and prompt == self._context and self._last_logits is not None:
            self._pending = []
            return self._last_logits, reused
        if not (0 < reused < len(prompt) and prompt[:reused] == self._context):
            self.engine.reset()
            self._context, reused = [], 0
        self._pending = []
        self._last_logits = None
        logits = self.engine.prefill(prompt[reused:])
        self._context = prompt
        self._last_logits = logits
        return logits, reused

    def generate(
        self,
        prompt: Sequence[int],
        *,
        max_tokens: int | None = None,
        sampling: SamplingParams | None = None,
        stop: Sequence[str] = (),
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: ToolChoice = "auto",
        constrain_tool_calls: bool = True,
        parse: bool = True,
        cancel: threading.Event | None = None,
    ) -> Iterator[GenerationEvent]:
        """Generate after `prompt` (token ids), streaming events; the last one is `Finished`.

        `parse=False` gives the raw text as content. With tools, calls are parsed and, unless
        `constrain_tool_calls` is off, constrained so they are always well-formed.
        """
        started = time.perf_counter()
        params = sampling or self.defaults
        tools = tools if tools and tool_choice != "none" else None
        stats_before = self.engine.stats()
        logits, cached = self._prefill(prompt)
        prefill_done = time.perf_counter()
        stats_prefilled = self.engine.stats()

        prompt_text = self.tokenizer.decode(list(prompt[-64:]))
        in_reasoning = _prompt_opens_reasoning(prompt_text)
        parser = ResponseParser(tools, in_reasoning=in_reasoning) if parse else None
        base = self._real_tokens.copy()
        call_open = self.tokenizer.token_id("<tool_call>")
        if tool_choice == "none" and call_open is not None:
            base[call_open] = False
        constraint = None
        fmt = self.template.tool_call_format
        if tools and constrain_tool_calls and fmt is not None:
            grammar = ToolGrammar(tools, fmt, tool_choice=tool_choice)
            constraint = ToolCallConstraint(
                self.tokenizer, grammar, in_reasoning=in_reasoning, end_token_ids=self.end_token_ids
            )

        room = self.engine.max_context - len(self._context)
        limit = room if max_tokens is None else min(max_tokens, room)
        if constraint is not None and len(constraint.closing()) > limit:
            raise ValueError(f"{limit} tokens are too few for the required tool call")
        sampler = Sampler(params, self.vocab_size)
        sampler.observe_prompt(prompt)
        decoder = self.tokenizer.stream()
        stops = _StopStrings(stop)
        generated = 0
        first_token_at: float | None = None
        last_token_at: float | None = None
        reason: FinishReason | None = None
        stopped_by_string = False

        raw_text: list[str] = []

        def emit(text: str) -> list[ParseEvent]:
            if not text:
                return []
            if parser is not None:
                return parser.feed(text)
            raw_text.append(text)
            return [ContentDelta(text)]

        while reason is None:
            if cancel is not None and cancel.is_set():
                reason = "cancelled"
                break
            if generated >= limit:
                reason = "length"
                break
            if self._pending:  # the previous token goes in only when another is wanted
                token = self._pending.pop()
                logits = self.engine.step(token)
                self._context.append(token)
                self._last_logits = logits
            allowed = base
            if constraint is not None:
                allowed = base.copy()
                allowed[: self.tokenizer.vocab_size] &= constraint.allowed(limit - generated)[
                    : self.vocab_size
                ]
            token = sampler.sample(logits, allowed)
            last_token_at = time.perf_counter()
            first_token_at = first_token_at or last_token_at
            generated += 1
            if constraint is not None:
                constraint.advance(token)
            if token in self.end_token_ids:
                reason = "stop"
                break
            sampler.observe_generated(token)
            self._pending.append(token)
            text, stopped_by_string = stops.feed(decoder.feed(token))
            yield from emit(text)
            if stopped_by_string:
                reason = "stop"

        if not stopped_by_string:  # text after a stop string is dropped, held bytes included
            tail, stopped_by_string = stops.feed(decoder.flush())
            yield from emit(tail if stopped_by_string else tail + stops.flush())
        if parser is not None:
            yield from parser.finish()
            message = parser.message
        else:
            message = AssistantMessage(content="".join(raw_text))
        last_token_at = last_token_at or time.perf_counter()
        if message.tool_calls and reason == "stop":
            reason = "tool_calls"
        usage = Usage(
            prompt_tokens=len(prompt),
            cached_prompt_tokens=cached,
            completion_tokens=generated,
            prefill_seconds=prefill_done - started,
            decode_seconds=last_token_at - (first_token_at or last_token_at),
            time_to_first_token=(first_token_at or last_token_at) - started,
            prefill_stats=_stats_delta(stats_prefilled, stats_before),
            decode_stats=_stats_delta(self.engine.stats(), stats_prefilled),
        )
        yield Finished(reason, message, usage)
