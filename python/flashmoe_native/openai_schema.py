"""The OpenAI wire format: request bodies checked into typed requests, and response objects.

Every problem with a request becomes a `RequestError` naming the offending field, so a client
gets a 4xx it can act on instead of a traceback. Fields this server does not know are ignored,
as most OpenAI-compatible servers do; a known field with an unsupported value is an error.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from .generate import Finished, Usage
from .sampling import SamplingParams
from .tool_schema import JSON_TYPES, json_type


class RequestError(Exception):
    """A request the server will not run, with the HTTP status and OpenAI error fields."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.kind = kind

    def to_json(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }


# -- field checks


def _type_name(value: Any) -> str:
    """The JSON type of a request value, for error messages."""
    try:
        return json_type(value)
    except TypeError:
        return type(value).__name__


def _wrong_type(param: str, expected: str, value: Any) -> RequestError:
    return RequestError(
        f"Invalid type for '{param}': expected {expected}, but got {_type_name(value)}.",
        param=param,
        code="invalid_type",
    )


def _out_of_range(param: str, value: Any, allowed: str) -> RequestError:
    return RequestError(
        f"Invalid value for '{param}': {value!r} is not {allowed}.",
        param=param,
        code="invalid_value",
    )


def _unsupported(param: str, what: str) -> RequestError:
    return RequestError(f"'{param}': {what}", param=param, code="unsupported_value")


def _int(body: Mapping[str, Any], key: str, *, minimum: int | None = None) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    # bool is an int in Python but not in JSON
    if isinstance(value, bool) or not isinstance(value, int):
        raise _wrong_type(key, "an integer", value)
    if minimum is not None and value < minimum:
        raise _out_of_range(key, value, f"at least {minimum}")
    return value


def _number(
    body: Mapping[str, Any], key: str, low: float, high: float, *, open_low: bool = False
) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _wrong_type(key, "a number", value)
    too_low = value <= low if open_low else value < low
    if not math.isfinite(value) or too_low or value > high:
        interval = f"{'(' if open_low else '['}{low:g}, {high:g}]"
        raise _out_of_range(key, value, f"in {interval}")
    return float(value)


def _bool(body: Mapping[str, Any], key: str) -> bool | None:
    value = body.get(key)
    if value is not None and not isinstance(value, bool):
        raise _wrong_type(key, "a boolean", value)
    return value


def _string(body: Mapping[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise _wrong_type(key, "a string", value)
    return value


def _object(body: Mapping[str, Any], key: str) -> dict[str, Any] | None:
    value = body.get(key)
    if value is not None and not isinstance(value, dict):
        raise _wrong_type(key, "an object", value)
    return value


# -- generation options shared by both endpoints

MAX_STOP_STRINGS = 16


@dataclasses.dataclass(frozen=True)
class GenerationOptions:
    max_tokens: int | None  # None: up to the end of the context
    stop: tuple[str, ...]
    temperature: float | None  # None: the model's generation_config.json default
    top_p: float | None
    top_k: int | None
    min_p: float | None
    presence_penalty: float | None
    repetition_penalty: float | None
    seed: int | None
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the usage

    def sampling(self, defaults: SamplingParams) -> SamplingParams:
        return defaults.with_overrides(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            presence_penalty=self.presence_penalty,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
        )


def _stop(body: Mapping[str, Any]) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise _wrong_type("stop", "a string or an array of strings", value)
    if len(value) > MAX_STOP_STRINGS:
        raise _out_of_range("stop", f"{len(value)} strings", f"at most {MAX_STOP_STRINGS}")
    return tuple(value)


def _options(body: Mapping[str, Any], *, default_max_tokens: int | None) -> GenerationOptions:
    n = _int(body, "n", minimum=1)
    if n is not None and n != 1:
        raise _unsupported("n", "only one choice per request (n=1) is supported.")
    frequency = _number(body, "frequency_penalty", -2.0, 2.0)
    if frequency:
        raise _unsupported("frequency_penalty", "not supported; use presence_penalty.")
    logprobs = body.get("logprobs")
    if logprobs not in (None, False):
        raise _unsupported("logprobs", "log probabilities are not supported.")
    stream = _bool(body, "stream") or False
    stream_options = _object(body, "stream_options") or {}
    include_usage = _bool(stream_options, "include_usage") or False
    # max_completion_tokens is the newer name of max_tokens
    max_tokens = _int(body, "max_completion_tokens", minimum=1)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", minimum=1)
    return GenerationOptions(
        max_tokens=default_max_tokens if max_tokens is None else max_tokens,
        stop=_stop(body),
        temperature=_number(body, "temperature", 0.0, 2.0),
        top_p=_number(body, "top_p", 0.0, 1.0, open_low=True),
        top_k=_int(body, "top_k", minimum=0),
        min_p=_number(body, "min_p", 0.0, 1.0),
        presence_penalty=_number(body, "presence_penalty", -2.0, 2.0),
        repetition_penalty=_number(body, "repetition_penalty", 0.0, 10.0, open_low=True),
        seed=_int(body, "seed"),
        stream=stream,
        include_usage=include_usage,
    )


def _model(body: Mapping[str, Any]) -> str:
    model = _string(body, "model")
    if not model:
        raise RequestError("You must provide a model parameter.", param="model")
    return model


# -- chat messages

ROLES = ("system", "developer", "user", "assistant", "tool")


def _text(content: Any, where: str, *, optional: bool) -> str | None:
    """Message content as one string: a string, or the text parts of a content array joined."""
    if content is None:
        if optional:
            return None
        raise RequestError(f"Missing '{where}'.", param=where)
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _wrong_type(where, "a string or an array of content parts", content)
    texts = []
    for i, part in enumerate(content):
        here = f"{where}[{i}]"
        if not isinstance(part, dict):
            raise _wrong_type(here, "an object", part)
        if part.get("type") != "text":
            raise _unsupported(
                f"{here}.type", f"only text parts are supported, not {part.get('type')!r}."
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise _wrong_type(f"{here}.text", "a string", text)
        texts.append(text)
    return "".join(texts)  # what the chat template itself does with text parts


def _assistant_tool_calls(value: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise _wrong_type(where, "an array", value)
    calls = []
    for i, call in enumerate(value):
        here = f"{where}[{i}]"
        if not isinstance(call, dict):
            raise _wrong_type(here, "an object", call)
        function = call.get("function")
        if not isinstance(function, dict):
            raise _wrong_type(f"{here}.function", "an object", function)
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise _wrong_type(f"{here}.function.name", "a non-empty string", name)
        arguments = function.get("arguments", "{}")
        if not isinstance(arguments, str):
            raise _wrong_type(f"{here}.function.arguments", "a JSON string", arguments)
        try:
            parsed = json.loads(arguments)
        except json.JSONDecodeError as exc:
            raise RequestError(
                f"'{here}.function.arguments' is not valid JSON: {exc}.",
                param=f"{here}.function.arguments",
            ) from exc
        if not isinstance(parsed, dict):
            raise _wrong_type(f"{here}.function.arguments", "a JSON object", parsed)
        call_id = call.get("id")
        if call_id is not None and not isinstance(call_id, str):
            raise _wrong_type(f"{here}.id", "a string", call_id)
        calls.append(
            {
                "id": call_id,
                "type": "function",
                "function": {"name": name, "arguments": arguments},
            }
        )
    return calls


def _message(message: Any, where: str) -> dict[str, Any]:
    """One message in the shape chat templates take; `developer` is the newer name of system."""
    if not isinstance(message, dict):
        raise _wrong_type(where, "an object", message)
    role = message.get("role")
    if role not in ROLES:
        raise RequestError(
            f"Invalid value for '{where}.role': {role!r}; expected one of {', '.join(ROLES)}.",
            param=f"{where}.role",
        )
    out: dict[str, Any] = {"role": "system" if role == "developer" else role}
    has_calls = role == "assistant" and message.get("tool_calls")
    out["content"] = _text(message.get("content"), f"{where}.content", optional=role == "assistant")
    if has_calls:
        out["tool_calls"] = _assistant_tool_calls(message["tool_calls"], f"{where}.tool_calls")
    if role == "assistant":
        # vLLM-style clients send it back as `reasoning`
        for key in ("reasoning_content", "reasoning"):
            reasoning = _string(message, key)
            if reasoning is not None:
                out["reasoning_content"] = reasoning
                break
    for key in ("name", "tool_call_id"):
        value = _string(message, key)
        if value is not None:
            out[key] = value
    return out


def _messages(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if messages is None:
        raise RequestError("Missing required parameter: 'messages'.", param="messages")
    if not isinstance(messages, list):
        raise _wrong_type("messages", "an array", messages)
    if not messages:
        raise RequestError("'messages' must hold at least one message.", param="messages")
    return [_message(m, f"messages[{i}]") for i, m in enumerate(messages)]


# -- tools

# OpenAI's rule for function names; it also keeps names the XML call format can delimit
FUNCTION_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf")


def _check_schema(schema: Any, where: str) -> None:
    """The parts of JSON Schema that steer tool calls must be well-formed."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise _wrong_type(where, "a JSON schema object", schema)
    declared = schema.get("type")
    names = [declared] if isinstance(declared, str) else declared
    if declared is not None and (
        not isinstance(names, list) or not names or any(t not in JSON_TYPES for t in names)
    ):
        raise RequestError(
            f"Invalid schema at '{where}.type': {declared!r}; types are {', '.join(JSON_TYPES)}.",
            param=f"{where}.type",
            code="invalid_tool_schema",
        )
    properties = schema.get("properties")
    if properties is not None:
        if not isinstance(properties, dict):
            raise _wrong_type(f"{where}.properties", "an object", properties)
        for name, sub in properties.items():
            _check_schema(sub, f"{where}.properties.{name}")
    required = schema.get("required")
    if required is not None and (
        not isinstance(required, list) or not all(isinstance(r, str) for r in required)
    ):
        raise _wrong_type(f"{where}.required", "an array of strings", required)
    if "items" in schema:
        _check_schema(schema["items"], f"{where}.items")
    if "additionalProperties" in schema:
        _check_schema(schema["additionalProperties"], f"{where}.additionalProperties")
    if "enum" in schema and (not isinstance(schema["enum"], list) or not schema["enum"]):
        raise _wrong_type(f"{where}.enum", "a non-empty array", schema["enum"])
    for key in _SCHEMA_LISTS:
        if key in schema:
            options = schema[key]
            if not isinstance(options, list) or not options:
                raise _wrong_type(f"{where}.{key}", "a non-empty array of schemas", options)
            for i, sub in enumerate(options):
                _check_schema(sub, f"{where}.{key}[{i}]")


def _tools(body: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    tools = body.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise _wrong_type("tools", "an array", tools)
    seen: set[str] = set()
    out = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise _wrong_type(where, "an object", tool)
        if tool.get("type", "function") != "function":
            raise _unsupported(f"{where}.type", "only 'function' tools are supported.")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise _wrong_type(f"{where}.function", "an object", function)
        name = function.get("name")
        if not isinstance(name, str) or not FUNCTION_NAME.fullmatch(name):
            raise RequestError(
                f"Invalid '{where}.function.name': {name!r}; a name is 1 to 64 letters, digits, "
                "underscores, dots or dashes.",
                param=f"{where}.function.name",
                code="invalid_tool_schema",
            )
        if name in seen:
            raise RequestError(f"'{where}': the function {name!r} is declared twice.", param=where)
        seen.add(name)
        _string(function, "description")
        parameters = function.get("parameters")
        if parameters is not None:
            _check_schema(parameters, f"{where}.function.parameters")
            if parameters.get("type", "object") != "object":
                raise RequestError(
                    f"Invalid schema at '{where}.function.parameters': a function's parameters "
                    f"must be an object schema, not {parameters.get('type')!r}.",
                    param=f"{where}.function.parameters",
                    code="invalid_tool_schema",
                )
        out.append({"type": "function", "function": function})
    return out or None


def _tool_choice(body: Mapping[str, Any], tools: Sequence[Mapping[str, Any]] | None) -> str:
    """'none', 'auto', 'required' or the name of the one function the model must call."""
    choice = body.get("tool_choice")
    names = [t["function"]["name"] for t in tools or []]
    if choice is None:  # what the generation stack does by default
        return "auto"
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise RequestError(
                f"Invalid value for 'tool_choice': {choice!r}; expected 'none', 'auto', "
                "'required' or a named function.",
                param="tool_choice",
            )
        if choice == "required" and not tools:
            raise RequestError(
                "'tool_choice' is 'required' but no tools were given.", param="tool_choice"
            )
        return choice
    if not isinstance(choice, dict):
        raise _wrong_type("tool_choice", "a string or an object", choice)
    function = choice.get("function")
    name = function.get("name") if isinstance(function, dict) else None
    if choice.get("type") != "function" or not isinstance(name, str):
        raise RequestError(
            'Invalid \'tool_choice\': expected {"type": "function", "function": {"name": ...}}.',
            param="tool_choice",
        )
    if name not in names:
        declared = ", ".join(repr(n) for n in names) or "none"
        raise RequestError(
            f"'tool_choice' names the function {name!r}, which is not in 'tools' "
            f"(declared: {declared}).",
            param="tool_choice",
            code="unknown_tool",
        )
    return name


# -- requests


@dataclasses.dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    tool_choice: str  # "none", "auto", "required" or a declared function's name
    enable_thinking: bool | None  # None: the template's default
    options: GenerationOptions


@dataclasses.dataclass(frozen=True)
class CompletionRequest:
    model: str
    prompt: str | list[int]  # text, or token ids
    options: GenerationOptions


def _require_object(body: Any) -> Mapping[str, Any]:
    if not isinstance(body, dict):
        raise RequestError(
            f"The request body must be a JSON object, not {_type_name(body)}.", code="invalid_body"
        )
    return body


def parse_chat_request(body: Any) -> ChatRequest:
    body = _require_object(body)
    response_format = _object(body, "response_format")
    if response_format is not None and response_format.get("type", "text") != "text":
        raise _unsupported("response_format", "only the 'text' response format is supported.")
    template_kwargs = _object(body, "chat_template_kwargs") or {}
    unknown = sorted(set(template_kwargs) - {"enable_thinking"})
    if unknown:
        raise _unsupported(
            "chat_template_kwargs", f"only 'enable_thinking' is supported, not {unknown}."
        )
    tools = _tools(body)
    return ChatRequest(
        model=_model(body),
        messages=_messages(body),
        tools=tools,
        tool_choice=_tool_choice(body, tools),
        enable_thinking=_bool(template_kwargs, "enable_thinking"),
        options=_options(body, default_max_tokens=None),
    )


# the legacy endpoint's default, as OpenAI documents it
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


def _prompt(body: Mapping[str, Any]) -> str | list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise RequestError("'prompt' is empty.", param="prompt")
        return prompt
    if isinstance(prompt, list) and prompt:
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return list(prompt)
        if all(isinstance(p, (str, list)) for p in prompt):
            raise _unsupported("prompt", "one prompt per request; batches are not supported.")
    if prompt is None:
        raise RequestError("Missing required parameter: 'prompt'.", param="prompt")
    raise _wrong_type("prompt", "a non-empty string or array of token ids", prompt)


def parse_completion_request(body: Any) -> CompletionRequest:
    body = _require_object(body)
    if body.get("echo"):
        raise _unsupported("echo", "echoing the prompt is not supported.")
    if body.get("suffix") is not None:
        raise _unsupported("suffix", "suffixes are not supported.")
    best_of = _int(body, "best_of", minimum=1)
    if best_of not in (None, 1):
        raise _unsupported("best_of", "only best_of=1 is supported.")
    return CompletionRequest(
        model=_model(body),
        prompt=_prompt(body),
        options=_options(body, default_max_tokens=COMPLETIONS_DEFAULT_MAX_TOKENS),
    )


# -- responses


def usage_json(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_prompt_tokens},
    }


def chat_completion(
    response_id: str, created: int, model: str, finished: Finished
) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": finished.message.to_openai(),
                "finish_reason": finished.reason,
                "logprobs": None,
            }
        ],
        "usage": usage_json(finished.usage),
    }


def chat_chunk(
    response_id: str,
    created: int,
    model: str,
    delta: dict[str, Any] | None,
    finish_reason: str | None = None,
    usage: Usage | None = None,
) -> dict[str, Any]:
    """One streamed chunk; `delta` None makes the usage-only chunk that has no choices."""
    chunk: dict[str, Any] = {
        "id": response_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": []
        if delta is None
        else [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
    }
    if usage is not None:
        chunk["usage"] = usage_json(usage)
    return chunk


def text_completion(
    response_id: str,
    created: int,
    model: str,
    text: str | None,
    finish_reason: str | None = None,
    usage: Usage | None = None,
) -> dict[str, Any]:
    """A completion, or one streamed piece of it; `text` None makes the usage-only chunk."""
    body: dict[str, Any] = {
        "id": response_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": []
        if text is None
        else [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}],
    }
    if usage is not None:
        body["usage"] = usage_json(usage)
    return body
