"""`flashmoe serve` end to end: a real uvicorn server on loopback, driven by the openai client.

The model is a tiny random Qwen3.5-MoE with the tiny Qwen tokenizer and the real chat template.
Expected replies come from a `Generator` on a separate engine of the same model, so "answered
correctly" means token for token what the generation stack gives without the server.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from test_tool_constraint import TOOLS, check_arguments

from flashmoe_native import Engine
from flashmoe_native.engine_worker import EngineWorker, Served
from flashmoe_native.generate import Finished, Generator
from flashmoe_native.openai_app import create_app
from flashmoe_native.prompt_cache import PromptCache

MODEL = "tiny-qwen"
MAX_REQUEST_BYTES = 4 << 20
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}


@pytest.fixture(scope="module")
def model_dir(chat_model: Callable[[int, int], Path]) -> Path:
    return chat_model(3, 3)  # the long-reply tests rely on this model's greedy text not ending


class Server:
    """The app on a free loopback port, served by uvicorn on a thread of this process."""

    def __init__(self, model_dir: Path, *, prompt_cache_bytes: int) -> None:
        self.worker = EngineWorker(
            Engine(model_dir, device="cpu"), model_dir, prompt_cache_bytes=prompt_cache_bytes
        )
        app = create_app(self.worker, model_name=MODEL, max_request_bytes=MAX_REQUEST_BYTES)
        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, args=([self._socket],))
        self._thread.start()
        wait_for(lambda: self._server.started, "the server to start")

    def client(self, **kwargs: Any) -> openai.OpenAI:
        kwargs = {"timeout": 60.0, "max_retries": 0, **kwargs}
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", **kwargs)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)
        self.worker.close()
        self._socket.close()


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)
    return value


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[Server]:
    running = Server(model_dir, prompt_cache_bytes=64 << 20)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return server.client()


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> Generator:
    """The generation stack on its own engine: what the server's replies must equal."""
    return Generator(Engine(model_dir, device="cpu"), model_dir)


def expect_chat(
    reference: Generator,
    messages: list[dict[str, Any]],
    max_tokens: int,
    *,
    tools: list[dict[str, Any]] | None = None,
    tool_choice: str = "auto",
    enable_thinking: bool | None = None,
) -> Finished:
    prompt = reference.encode_chat(messages, tools=tools, enable_thinking=enable_thinking)
    greedy = reference.defaults.with_overrides(temperature=0.0)
    events = reference.generate(
        prompt, max_tokens=max_tokens, sampling=greedy, tools=tools, tool_choice=tool_choice
    )
    done = list(events)[-1]
    assert isinstance(done, Finished)
    return done


def expect_text(reference: Generator, prompt: str, max_tokens: int) -> Finished:
    greedy = reference.defaults.with_overrides(temperature=0.0)
    tokens = reference.tokenizer.encode(prompt)
    done = list(reference.generate(tokens, max_tokens=max_tokens, sampling=greedy, parse=False))
    assert isinstance(done[-1], Finished)
    return done[-1]


def reply(message: Any) -> tuple[str | None, str | None, list[tuple[str, dict[str, Any]]]]:
    """An OpenAI message (client object or dict) as (content, reasoning, calls) to compare."""
    data = message if isinstance(message, dict) else message.model_dump()
    calls = [
        (c["function"]["name"], json.loads(c["function"]["arguments"]))
        for c in data.get("tool_calls") or []
    ]
    return data.get("content") or None, data.get("reasoning_content"), calls


def turn_opening(reference: Generator, prompt: list[int]) -> int:
    """Where a chat prompt's last turn (the assistant's, about to be written) opens."""
    turn_start = reference.tokenizer.token_id("<|im_start|>")
    return max(i for i, t in enumerate(prompt) if t == turn_start)


def served_since(server: Server, count: int) -> list[Served]:
    return list(server.worker.served)[count:]


def wait_served(server: Server, count: int, n: int) -> list[Served]:
    """The requests served after the first `count`, once there are `n` of them."""
    return wait_for(
        lambda: len(served_since(server, count)) >= n and served_since(server, count),
        f"{n} requests to end",
    )


def test_models_and_health(server: Server, client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    health = httpx.get(server.url + "/health").json()
    assert health == {"status": "ok", "model": MODEL, "queued": 0}


def test_chat_equals_the_generation_stack(client: openai.OpenAI, reference: Generator) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a colour."},
    ]
    done = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=24, temperature=0
    )
    expected = expect_chat(reference, messages, 24)
    choice = done.choices[0]
    assert reply(choice.message) == reply(expected.message.to_openai())
    assert choice.message.reasoning_content is not None  # the prompt opened <think>
    assert choice.finish_reason == expected.reason
    usage = done.usage
    assert usage.prompt_tokens == len(reference.encode_chat(messages))
    assert usage.completion_tokens == expected.usage.completion_tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert done.id.startswith("chatcmpl-") and done.model == MODEL


def test_streamed_chat_adds_up_to_the_whole_reply(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Tell me a story."}]
    whole = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=30, temperature=0
    )
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=30,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    content = "".join(d.content or "" for d in deltas)
    reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    assert (content or None, reasoning) == reply(whole.choices[0].message)[:2]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason and set(finishes[:-1]) == {None}
    # the usage comes last, in a chunk of its own
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_seeded_sampling_is_reproducible(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        done = client.completions.create(
            model=MODEL, prompt="Once", max_tokens=24, temperature=1.0, top_p=0.9, seed=seed
        )
        return done.choices[0].text

    assert sample(5) == sample(5)
    assert len({sample(s) for s in range(4)}) > 1


def test_tool_call_round_trip(client: openai.OpenAI, reference: Generator) -> None:
    messages: list[dict[str, Any]] = [{"role": "user", "content": "What is the weather in Oslo?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    first = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        tools=TOOLS,
        tool_choice=named,
        max_tokens=200,
        temperature=0,
        extra_body=NO_THINKING,
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert [c.function.name for c in calls] == ["get_weather"]
    check_arguments("get_weather", json.loads(calls[0].function.arguments))
    expected = expect_chat(
        reference,
        messages,
        200,
        tools=TOOLS,
        tool_choice="get_weather",
        enable_thinking=False,
    )
    assert reply(choice.message) == reply(expected.message.to_openai())

    # the assistant's call and the tool's result go back; the model answers in text
    messages.append(choice.message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": calls[0].id, "content": '{"temp": 21}'})
    second = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        tools=TOOLS,
        tool_choice="none",
        max_tokens=20,
        temperature=0,
        extra_body=NO_THINKING,
    )
    answer = second.choices[0]
    assert answer.message.tool_calls is None and answer.finish_reason in ("stop", "length")
    # the first request's prompt, tools and all, was not prefilled again
    first_prompt = reference.encode_chat(messages[:1], tools=TOOLS, enable_thinking=False)
    assert first.usage.prompt_tokens == len(first_prompt)
    assert second.usage.prompt_tokens_details.cached_tokens == turn_opening(reference, first_prompt)


def test_streamed_tool_calls(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Use your tools."}],
            tools=TOOLS,
            tool_choice="required",
            max_tokens=300,
            temperature=1.0,
            seed=11,
            stream=True,
        )
    )
    calls = [call for c in chunks if c.choices for call in c.choices[0].delta.tool_calls or []]
    assert calls and [c.index for c in calls] == list(range(len(calls)))
    for call in calls:
        assert call.id and call.type == "function"
        check_arguments(call.function.name, json.loads(call.function.arguments))
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_completions(client: openai.OpenAI, reference: Generator) -> None:
    done = client.completions.create(model=MODEL, prompt="def main():", temperature=0)
    expected = expect_text(reference, "def main():", 16)  # the endpoint's default max_tokens
    assert done.choices[0].text == expected.message.content
    assert done.choices[0].finish_reason == expected.reason == "length"
    assert done.usage.completion_tokens == 16
    tokens = reference.tokenizer.encode("def main():")
    assert done.usage.prompt_tokens == len(tokens)
    by_ids = client.completions.create(model=MODEL, prompt=tokens, temperature=0)
    assert by_ids.choices[0].text == done.choices[0].text
    streamed = client.completions.create(
        model=MODEL, prompt="def main():", temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == done.choices[0].text
    stop = done.choices[0].text[4:7]
    cut = client.completions.create(model=MODEL, prompt="def main():", temperature=0, stop=stop)
    assert cut.choices[0].text == done.choices[0].text.split(stop)[0]
    assert cut.choices[0].finish_reason == "stop"


def test_second_turn_prefills_only_new_tokens(
    server: Server, client: openai.OpenAI, model_dir: Path, reference: Generator
) -> None:
    turn = [{"role": "user", "content": "Tell me about the sea."}]
    first = client.chat.completions.create(model=MODEL, messages=turn, max_tokens=16, temperature=0)
    # another conversation runs in between: the engine's own state moves on
    client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Unrelated"}], max_tokens=4
    )
    message = first.choices[0].message.model_dump(exclude_none=True)
    conversation = [*turn, message, {"role": "user", "content": "And the mountains?"}]
    stats = server.worker.engine.stats()
    second = client.chat.completions.create(
        model=MODEL, messages=conversation, max_tokens=16, temperature=0
    )
    prefilled = server.worker.engine.stats()["prefill_tokens"] - stats["prefill_tokens"]
    cached = second.usage.prompt_tokens_details.cached_tokens
    # the first prompt up to its assistant turn opening (the rest re-renders differently)
    assert cached == turn_opening(reference, reference.encode_chat(turn)) > 0
    assert prefilled == second.usage.prompt_tokens - cached

    fresh = Server(model_dir, prompt_cache_bytes=0)
    try:
        again = fresh.client().chat.completions.create(
            model=MODEL, messages=conversation, max_tokens=16, temperature=0
        )
    finally:
        fresh.stop()
    assert again.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens == second.usage.prompt_tokens
    assert reply(again.choices[0].message) == reply(second.choices[0].message)


def test_disconnects_cancel_generation(
    server: Server, client: openai.OpenAI, reference: Generator
) -> None:
    before = len(server.worker.served)
    long_request = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 3000}
    stream = client.completions.create(**long_request, temperature=0, stream=True)
    chunks = iter(stream)
    stream_id = next(chunks).id
    # a request queued behind it whose client gives up while it waits
    impatient = server.client(timeout=0.5)
    with pytest.raises(openai.APITimeoutError):
        impatient.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=8
        )
    for _ in range(3):
        next(chunks)
    stream.close()
    served = wait_served(server, before, 2)
    assert served[0].id == stream_id and served[0].reason == "cancelled"
    assert 4 <= served[0].completion_tokens < 3000
    assert served[1].reason == "cancelled" and served[1].completion_tokens == 0  # never ran

    # a non-streamed request whose client times out mid-generation
    with pytest.raises(openai.APITimeoutError):
        impatient.completions.create(**long_request, temperature=0)
    ended = wait_served(server, before, 3)[2:]
    assert ended[0].reason == "cancelled" and 0 < ended[0].completion_tokens < 3000

    # the engine was left consistent: the next reply is the one expected
    messages = [{"role": "user", "content": "Still there?"}]
    done = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=12, temperature=0
    )
    assert reply(done.choices[0].message) == reply(
        expect_chat(reference, messages, 12).message.to_openai()
    )


def test_eight_concurrent_clients_served_in_arrival_order(
    server: Server, reference: Generator
) -> None:
    questions = [[{"role": "user", "content": f"Question number {i}?"}] for i in range(1, 8)]
    expected = [expect_chat(reference, q, 20) for q in questions]
    before = len(server.worker.served)
    # the first client streams a long reply (seconds), so the other seven queue up behind it
    first = server.client().completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=3000, temperature=0, stream=True
    )
    chunks = iter(first)
    opening = next(chunks)

    def ask(messages: list[dict[str, Any]]) -> Any:
        return server.client().chat.completions.create(
            model=MODEL, messages=messages, max_tokens=20, temperature=0
        )

    def queued(n: int) -> bool:
        assert not served_since(server, before), "the long reply ended before the rest queued"
        return server.worker.queued == n

    with ThreadPoolExecutor(len(questions)) as pool:
        futures = []
        for i, question in enumerate(questions):
            futures.append(pool.submit(ask, question))
            wait_for(lambda n=i + 1: queued(n), f"{i + 1} queued requests")
        streamed = [opening, *chunks]
        answers = [f.result(timeout=60) for f in futures]
    text = "".join(c.choices[0].text for c in streamed if c.choices)
    assert streamed[-1].choices[0].finish_reason == "length"
    # greedy: the long reply begins with the short one (less a character cut in the middle)
    beginning = expect_text(reference, "Once upon a time", 40).message.content.rstrip("\ufffd")
    assert text.startswith(beginning)
    for answer, want in zip(answers, expected, strict=True):
        assert reply(answer.choices[0].message) == reply(want.message.to_openai())
    order = [s.id for s in served_since(server, before)]
    assert order == [opening.id, *(a.id for a in answers)]


def post(
    server: Server, path: str, body: Any = None, *, raw: bytes | None = None
) -> httpx.Response:
    content = raw if raw is not None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    return httpx.post(server.url + path, content=content, headers=headers, timeout=60)


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], **fields}


WEATHER = TOOLS[0]
BAD_SCHEMA_TOOL = {
    "type": "function",
    "function": {
        "name": "f",
        "parameters": {"type": "object", "properties": {"x": {"type": "strng"}}},
    },
}

MALFORMED: dict[str, tuple[str, dict[str, Any] | bytes, int, str]] = {
    "invalid JSON": ("/v1/chat/completions", b'{"model": "tiny', 400, "could not parse the JSON"),
    "not an object": ("/v1/chat/completions", b"[1, 2]", 400, "must be a JSON object"),
    "bad UTF-8": ("/v1/chat/completions", b'{"model": "\xff"}', 400, "could not parse"),
    "messages not an array": (
        "/v1/chat/completions",
        {"model": MODEL, "messages": "Hi"},
        400,
        "Invalid type for 'messages'",
    ),
    "no messages": ("/v1/chat/completions", {"model": MODEL}, 400, "'messages'"),
    "temperature a string": (
        "/v1/chat/completions",
        chat(temperature="hot"),
        400,
        "Invalid type for 'temperature'",
    ),
    "max_tokens a string": (
        "/v1/chat/completions",
        chat(max_tokens="5"),
        400,
        "Invalid type for 'max_tokens'",
    ),
    "stream a string": ("/v1/chat/completions", chat(stream="yes"), 400, "'stream'"),
    "temperature out of range": ("/v1/chat/completions", chat(temperature=7), 400, "[0, 2]"),
    "huge max_tokens": (
        "/v1/chat/completions",
        chat(max_tokens=10**9),
        400,
        "max_tokens is too large",
    ),
    "prompt plus max_tokens too long": (
        "/v1/chat/completions",
        chat(max_tokens=4090),
        400,
        "maximum context length is 4096",
    ),
    "prompt over the context": (
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "word " * 12_000}]},
        400,
        "which leaves no room for a reply",
    ),
    "1 MB message": (
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "word " * 200_000}]},
        400,
        "maximum context length is 4096",
    ),
    "body over the limit": (
        "/v1/chat/completions",
        b'{"pad": "' + b"x" * MAX_REQUEST_BYTES + b'"}',
        413,
        "larger than",
    ),
    "unknown model": ("/v1/chat/completions", chat(model="gpt-9"), 404, "does not exist"),
    "unknown role": (
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "wizard", "content": "Hi"}]},
        400,
        "'messages[0].role'",
    ),
    "image content": (
        "/v1/chat/completions",
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
        },
        400,
        "only text parts",
    ),
    "tool call arguments not JSON": (
        "/v1/chat/completions",
        {
            "model": MODEL,
            "messages": [
                {"role": "user", "content": "Hi"},
                {
                    "role": "assistant",
                    "tool_calls": [{"id": "1", "function": {"name": "f", "arguments": "{x"}}],
                },
            ],
        },
        400,
        "not valid JSON",
    ),
    "template rejects the conversation": (
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "system", "content": "Only a system prompt"}]},
        400,
        "No user query found",
    ),
    "unknown tool in tool_choice": (
        "/v1/chat/completions",
        chat(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}),
        400,
        "'nope', which is not in 'tools'",
    ),
    "required without tools": (
        "/v1/chat/completions",
        chat(tool_choice="required"),
        400,
        "no tools",
    ),
    "invalid tool schema": (
        "/v1/chat/completions",
        chat(tools=[BAD_SCHEMA_TOOL]),
        400,
        "Invalid schema at 'tools[0].function.parameters.properties.x.type'",
    ),
    "invalid tool name": (
        "/v1/chat/completions",
        chat(tools=[{"type": "function", "function": {"name": "get weather!"}}]),
        400,
        "tools[0].function.name",
    ),
    "several choices": ("/v1/chat/completions", chat(n=3), 400, "n=1"),
    "empty prompt": ("/v1/completions", {"model": MODEL, "prompt": ""}, 400, "'prompt' is empty"),
    "token id outside the vocabulary": (
        "/v1/completions",
        {"model": MODEL, "prompt": [1, 10**6]},
        400,
        "outside the vocabulary",
    ),
    "batched prompts": (
        "/v1/completions",
        {"model": MODEL, "prompt": ["a", "b"]},
        400,
        "one prompt per request",
    ),
    "unknown path": ("/v1/engines", {}, 404, "Not Found"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_requests_get_a_clear_4xx(
    server: Server, client: openai.OpenAI, case: str
) -> None:
    path, body, status, fragment = MALFORMED[case]
    if isinstance(body, bytes):
        response = post(server, path, raw=body)
    else:
        response = post(server, path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert fragment in error["message"]
    assert error["type"] == "invalid_request_error"
    # and the server goes on serving
    done = client.completions.create(model=MODEL, prompt="ok", max_tokens=2, temperature=0)
    assert done.usage.completion_tokens == 2


def test_wrong_method_is_a_json_405(server: Server) -> None:
    response = httpx.get(server.url + "/v1/chat/completions")
    assert (
        response.status_code == 405 and "Method Not Allowed" in response.json()["error"]["message"]
    )


def test_prompt_cache_keeps_the_most_recent_within_its_budget() -> None:
    class State:
        def __init__(self, nbytes: int) -> None:
            self.nbytes = nbytes

    cache: PromptCache[State] = PromptCache(budget_bytes=100)
    a, ab, abc = State(40), State(40), State(40)
    assert cache.put([1], a) and cache.put([1, 2], ab)
    assert cache.longest_prefix([1, 2, 3], max_length=3) == ((1, 2), ab)
    assert cache.longest_prefix([1, 2, 3], max_length=1) == ((1,), a)  # (1,) is now most recent
    assert cache.longest_prefix([2, 1], max_length=2) is None
    assert cache.put([1, 2, 3], abc)  # over budget: the least recently used, (1, 2), goes
    assert (1, 2) not in cache and [1] in cache and cache.nbytes == 80
    assert not cache.put([9], State(101)) and len(cache) == 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_cli_requires_the_api_key(model_dir: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "flashmoe_native.cli", "serve", "--model", str(model_dir)]
    command += ["--device", "cpu", "--port", str(port), "--api-key", "sekret"]
    command += ["--served-model-name", MODEL, "--log-level", "warning"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        key = {"Authorization": "Bearer sekret"}

        def up() -> bool:
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            try:
                return httpx.get(url + "/health", headers=key).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(up, "flashmoe serve to listen", timeout=90)
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            denied = httpx.get(url + "/v1/models", headers=headers)
            assert denied.status_code == 401
            assert denied.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=url + "/v1", api_key="sekret", max_retries=0)
        done = good.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
        )
        assert done.usage.completion_tokens >= 1
    finally:
        process.terminate()
        _, err = process.communicate(timeout=30)
    assert f"at http://127.0.0.1:{port}/v1" in err
