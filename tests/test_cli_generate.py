"""Generation, `flashmoe infer` and `flashmoe chat` end to end on a converted tiny random model."""

from __future__ import annotations

import io
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_tool_constraint import TOOLS, check_arguments

from flashmoe_native import Engine
from flashmoe_native.chat import SHELL_TOOL, ChatSession
from flashmoe_native.generate import (
    ContentDelta,
    Finished,
    GenerationEvent,
    Generator,
    ReasoningDelta,
    ToolCallDelta,
)
from flashmoe_native.sampling import SamplingParams
from flashmoe_native.tool_calls import ToolCall

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def model_dir(chat_model: Callable[[int, int], Path]) -> Path:
    return chat_model(7, 8)


@pytest.fixture(scope="module")
def generator(model_dir: Path) -> Generator:
    return Generator(Engine(model_dir, device="cpu"), model_dir)


def collect(events: Any) -> tuple[list[GenerationEvent], Finished]:
    events = list(events)
    assert isinstance(events[-1], Finished)
    return events, events[-1]


def test_stream_adds_up_to_the_message_and_counts_usage(generator: Generator) -> None:
    prompt = generator.encode_chat([{"role": "user", "content": "Hello there!"}])
    sampling = SamplingParams(temperature=1.0, seed=5)
    events, done = collect(generator.generate(prompt, max_tokens=40, sampling=sampling))
    reasoning = "".join(e.text for e in events if isinstance(e, ReasoningDelta))
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    assert done.message.reasoning_content == reasoning  # the prompt opened <think>
    assert done.message.content == content
    usage = done.usage
    assert (usage.prompt_tokens, usage.cached_prompt_tokens) == (len(prompt), 0)
    assert 1 <= usage.completion_tokens <= 40
    assert done.reason == ("length" if usage.completion_tokens == 40 else "stop")
    assert usage.prefill_stats["tokens"] == len(prompt)
    # every token but the last sampled one went through the engine
    assert usage.decode_stats["tokens"] == usage.completion_tokens - 1
    assert generator.engine.position == len(prompt) + usage.completion_tokens - 1
    # the same seed gives the same reply, after the engine is reset for the non-extending prompt
    again = collect(generator.generate(prompt, max_tokens=40, sampling=sampling))[1]
    assert again.message == done.message


def test_follow_up_prefills_only_new_tokens(generator: Generator, model_dir: Path) -> None:
    first = generator.encode_chat([{"role": "user", "content": "First question"}])
    collect(generator.generate(first, max_tokens=12, sampling=GREEDY))
    new = generator.tokenizer.encode(
        generator.template.render_continuation([{"role": "user", "content": "Second"}])
    )
    context, consumed = generator.context_tokens, generator.engine.position
    done = collect(generator.generate(context + new, max_tokens=12, sampling=GREEDY))[1]
    assert done.usage.cached_prompt_tokens == consumed
    # what was generated but not yet run (the last token), then the new turn
    assert done.usage.prefill_stats["tokens"] == len(context) - consumed + len(new)
    # a fresh engine given the whole prompt at once gives the same greedy reply
    fresh = Generator(Engine(model_dir, device="cpu"), model_dir)
    again = collect(fresh.generate(context + new, max_tokens=12, sampling=GREEDY))[1]
    assert again.message == done.message and again.usage.cached_prompt_tokens == 0


def test_cancel_stops_between_tokens(generator: Generator) -> None:
    prompt = generator.tokenizer.encode("Once upon a time")
    cancel = threading.Event()
    seen = 0
    stream = generator.generate(prompt, max_tokens=50, parse=False, sampling=GREEDY, cancel=cancel)
    done = None
    for event in stream:
        if isinstance(event, ContentDelta):
            seen += 1
            if seen == 3:
                cancel.set()
        if isinstance(event, Finished):
            done = event
    assert done is not None and done.reason == "cancelled"
    assert done.usage.completion_tokens <= 3 + 2  # a token may decode to no text yet


def test_stop_strings_cut_the_text(generator: Generator) -> None:
    prompt = generator.tokenizer.encode("def main():")
    text = collect(generator.generate(prompt, max_tokens=30, parse=False, sampling=GREEDY))[1]
    full = text.message.content
    assert len(full) > 12
    stop = full[6:9]
    cut = collect(
        generator.generate(prompt, max_tokens=30, parse=False, sampling=GREEDY, stop=[stop])
    )[1]
    assert cut.message.content == full[: full.index(stop)]
    assert cut.reason == "stop"


def test_random_weights_give_100_of_100_valid_forced_tool_calls(generator: Generator) -> None:
    # random weights ignore the prompt, so a short one keeps the test fast; the chat test below
    # covers the template's full tool prompt
    prompt = generator.encode_chat(
        [{"role": "user", "content": "Call a tool."}], enable_thinking=False
    )
    names: dict[str, int] = {}
    for seed in range(100):
        choice = "get_time" if seed % 10 == 0 else "required"
        events, done = collect(
            generator.generate(
                prompt,
                max_tokens=128,
                sampling=SamplingParams(temperature=1.0, seed=seed),
                tools=TOOLS,
                tool_choice=choice,
            )
        )
        message = done.message
        assert message.malformed_tool_calls == [] and message.tool_calls, message
        assert done.reason == "tool_calls"
        assert [e.call for e in events if isinstance(e, ToolCallDelta)] == message.tool_calls
        for call in message.tool_calls:
            check_arguments(call.name, call.arguments)
            names[call.name] = names.get(call.name, 0) + 1
        if choice != "required":
            assert [c.name for c in message.tool_calls] == [choice]
    assert set(names) == {"get_weather", "get_time", "get_nothing"}


def run_cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flashmoe_native.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )


def test_infer_cli_streams_and_reports(model_dir: Path) -> None:
    common = ["--model", str(model_dir), "--device", "cpu", "--tokens", "24", "--temperature", "0"]
    done = run_cli("infer", *common, "--prompt", "Hello!")
    report = done.stderr
    for line in ("prompt ", "generation  ", "time to first token", "decode per token  mixer"):
        assert line in report
    assert "(stopped: " in report and "expert I/O wait" in report
    raw = run_cli("infer", *common, "--raw", "--prompt", "def main():", "--experts-per-token", "1")
    assert (
        raw.stdout
        == run_cli(
            "infer", *common, "--raw", "--prompt", "def main():", "--experts-per-token", "1"
        ).stdout
    )
    assert raw.stdout.strip()
    # four layers, one routed expert each
    assert "decode experts  4.0 loaded" in raw.stderr


def test_chat_cli_over_stdin(model_dir: Path) -> None:
    turns = "Hello!\nAnd a second question?\n/clear\nThird, after clearing\n/quit\n"
    done = run_cli(
        "chat",
        "--model",
        str(model_dir),
        "--device",
        "cpu",
        "--max-tokens",
        "12",
        "--seed",
        "1",
        "--show-think",
        stdin=turns,
    )
    out = done.stdout
    assert out.startswith("flashmoe chat: ")
    assert out.count("> ") >= 4 and "(conversation cleared)" in out


def test_chat_keeps_the_conversation_in_the_engine(generator: Generator) -> None:
    out = io.StringIO()
    session = ChatSession(generator, out=out, ask=lambda _: "n", sampling=GREEDY, max_tokens=10)
    session.send("First")
    position = generator.engine.position
    unconsumed = len(generator.context_tokens) - position  # the reply's last token
    before = generator.engine.stats()["prefill_tokens"]
    session.send("Second")
    continuation = generator.template.render_continuation([{"role": "user", "content": "Second"}])
    new_tokens = generator.tokenizer.encode(continuation)
    assert generator.engine.stats()["prefill_tokens"] - before == unconsumed + len(new_tokens)
    assert generator.engine.position >= position + unconsumed + len(new_tokens)
    session.clear()
    assert generator.engine.position == 0


def test_chat_shell_tool_runs_only_what_the_user_confirms(
    generator: Generator, tmp_path: Path
) -> None:
    asked: list[str] = []
    out = io.StringIO()
    session = ChatSession(
        generator,
        out=out,
        ask=lambda question: asked.append(question) or "n",
        sampling=SamplingParams(temperature=1.0, seed=3),
        tools=[SHELL_TOOL],
        tool_choice="required",  # random weights would rarely call it on their own
        max_tokens=120,
    )
    session.send("List the files here")
    assert asked  # every call asked first, and every one was declined
    assert "The model wants to run:" in out.getvalue()
    marker = tmp_path / "ran"
    call = ToolCall(
        id="call_1", name="run_shell", arguments={"command": f"touch {marker} && echo done"}
    )
    session.ask = lambda _: "n"
    assert session._run_tool(call) == "The user declined to run this command."
    assert not marker.exists()
    session.ask = lambda _: "y"
    assert session._run_tool(call) == "exit code 0\ndone"
    assert marker.exists()
    # what the user approves is shown as it is: no escape sequence or bidi override can hide part
    session.ask = lambda _: "n"
    sneaky = "echo safe\x1b[2K\r\u202erm -rf ~"
    session._run_tool(ToolCall(id="call_2", name="run_shell", arguments={"command": sneaky}))
    assert "echo safe\\x1b[2K\\x0d\\u202erm -rf ~" in out.getvalue()


def test_ids_beyond_the_tokenizer_never_come_out(generator: Generator) -> None:
    # the model's vocabulary is padded past the tokenizer's, as Qwen's is
    assert generator.vocab_size > generator.tokenizer.vocab_size
    prompt = generator.tokenizer.encode("Random")
    sampling = SamplingParams(temperature=5.0, seed=0)  # flat: padding ids would surely be drawn
    collect(generator.generate(prompt, max_tokens=200, parse=False, sampling=sampling))
    assert max(generator.context_tokens) < generator.tokenizer.vocab_size


class BiasedEngine:
    """The real engine with one token's logit raised, to make the model want that token."""

    def __init__(self, engine: Engine, token: int, bias: float) -> None:
        self._engine, self._token, self._bias = engine, token, bias

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def _biased(self, logits: np.ndarray) -> np.ndarray:
        logits = logits.copy()
        logits[self._token] += self._bias
        return logits

    def prefill(self, tokens: list[int]) -> np.ndarray:
        return self._biased(self._engine.prefill(tokens))

    def step(self, token: int) -> np.ndarray:
        return self._biased(self._engine.step(token))


def test_tool_choice_none_never_opens_a_call(model_dir: Path) -> None:
    plain = Generator(Engine(model_dir, device="cpu"), model_dir)
    call_open = plain.tokenizer.token_id("<tool_call>")
    assert call_open is not None
    engine = BiasedEngine(plain.engine, call_open, bias=1e4)  # type: ignore[arg-type]
    generator = Generator(engine, model_dir)
    prompt = generator.encode_chat([{"role": "user", "content": "Hi"}], enable_thinking=False)
    wants_call = collect(generator.generate(prompt, max_tokens=80, sampling=GREEDY, tools=TOOLS))[1]
    assert generator.context_tokens[len(prompt)] == call_open
    # the biased model keeps opening calls until the budget ends; every one of them closed
    assert wants_call.message.tool_calls and wants_call.message.malformed_tool_calls == []
    for call in wants_call.message.tool_calls:
        check_arguments(call.name, call.arguments)
    refused = collect(
        generator.generate(prompt, max_tokens=80, sampling=GREEDY, tools=TOOLS, tool_choice="none")
    )[1]
    assert call_open not in generator.context_tokens[len(prompt) :]
    assert refused.message.tool_calls == [] and refused.reason != "tool_calls"
