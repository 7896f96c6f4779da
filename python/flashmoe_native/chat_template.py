"""The model's own chat template, rendered exactly as transformers renders it."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Named special tokens transformers hands to every template render.
_NAMED_SPECIAL_TOKENS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
# Older names under which clients send an assistant message's reasoning.
_REASONING_ALIASES = ("reasoning_content", "thinking", "reasoning")

ToolCallFormat = Literal["xml", "json"]


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes HTML characters; templates expect plain json.dumps.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _token_text(value: Any) -> str | None:
    # tokenizer_config.json stores a special token as a string or as {"content": ...}.
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _plain(value: Any) -> Any:
    """A copy of JSON types only: the template can neither mutate nor reach caller objects."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _normalize_message(message: Mapping[str, Any]) -> dict[str, Any]:
    """Prepare one OpenAI-shaped message the way templates expect it.

    Keys set to None are dropped (templates test for presence, not for None), reasoning sent
    under an older name is also offered as `reasoning_content`, and tool-call arguments sent as
    a JSON string (the OpenAI wire form) become the object templates iterate over.
    """
    msg = {k: _plain(v) for k, v in message.items() if v is not None}
    reasoning = next((msg[k] for k in _REASONING_ALIASES if msg.get(k) is not None), None)
    if reasoning is not None:
        msg = {"thinking": reasoning, **msg, "reasoning_content": reasoning}
    for call in msg.get("tool_calls") or []:
        function = call.get("function", call) if isinstance(call, dict) else None
        if isinstance(function, dict) and isinstance(function.get("arguments"), str):
            try:
                function["arguments"] = json.loads(function["arguments"])
            except json.JSONDecodeError as exc:
                raise ValueError(f"tool call arguments are not JSON: {exc}") from exc
    return msg


class ChatTemplate:
    """A chat template plus the named special tokens it may refer to."""

    def __init__(self, source: str, special_tokens: Mapping[str, str] | None = None) -> None:
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        self._template = _environment().from_string(source)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ChatTemplate:
        """Load `chat_template.jinja`, else the template inside `tokenizer_config.json`."""
        model_dir = Path(model_dir)
        config_path = model_dir / "tokenizer_config.json"
        config = json.loads(config_path.read_text("utf-8")) if config_path.exists() else {}
        jinja_path = model_dir / "chat_template.jinja"
        if jinja_path.exists():
            source = jinja_path.read_text("utf-8")
        else:
            source = config.get("chat_template")
            if isinstance(source, list):  # named templates: the default one is the chat template
                named = {t["name"]: t["template"] for t in source}
                source = named.get("default")
            if not isinstance(source, str):
                raise FileNotFoundError(
                    f"{model_dir}: no chat_template.jinja and no template in tokenizer_config.json"
                )
        special = {}
        for name in _NAMED_SPECIAL_TOKENS:
            text = _token_text(config.get(name))
            if text is not None:
                special[name] = text
        return cls(source, special)

    @property
    def tool_call_format(self) -> ToolCallFormat | None:
        """How this template writes tool calls: Qwen3-Coder XML, Hermes JSON, or not at all."""
        if "<function=" in self.source:
            return "xml"
        if "<tool_call>" in self.source:
            return "json"
        return None

    def render_continuation(
        self,
        new_messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        enable_thinking: bool | None = None,
    ) -> str:
        """Text that follows an assistant turn the model just wrote, up to the next prompt.

        It closes that turn and renders `new_messages` (user turn or tool results) and the
        generation prompt, so a conversation kept in the engine grows without re-reading its
        history. The template renders it after a stand-in turn whose content marks the cut.
        """
        marker = "\u2063flashmoe-continuation\u2063"
        lead = [{"role": "user", "content": "."}, {"role": "assistant", "content": marker}]
        text = self.render([*lead, *new_messages], tools=tools, enable_thinking=enable_thinking)
        cut = text.find(marker)
        if cut < 0:
            raise ValueError("the chat template does not render assistant content verbatim")
        return text[cut + len(marker) :]

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
        **template_kwargs: Any,
    ) -> str:
        """Render a conversation of OpenAI-shaped messages; tools are JSON schemas."""
        kwargs: dict[str, Any] = {**self.special_tokens, **_plain(template_kwargs)}
        if enable_thinking is not None:
            kwargs["enable_thinking"] = enable_thinking
        return self._template.render(
            messages=[_normalize_message(m) for m in messages],
            tools=_plain(tools) if tools is not None else None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **kwargs,
        )
