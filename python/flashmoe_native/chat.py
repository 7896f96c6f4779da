"""`flashmoe chat`: talk to a model in the terminal.

The conversation stays in the engine between turns: each turn prefills only its own tokens
(the template's rendering of the new messages), never the history again. With `--allow-shell`
the model may run shell commands, each shown to the user and run only once they confirm.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TextIO

from .cli_options import add_model_arguments, add_sampling_arguments, open_engine, sampling_params
from .generate import (
    ContentDelta,
    Finished,
    Generator,
    ReasoningDelta,
    ToolCallDelta,
    ToolCallError,
)
from .sampling import SamplingParams
from .tool_calls import AssistantMessage, ToolCall

SHELL_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "run_shell",
        "description": (
            "Run a shell command on the user's computer and get its exit code and output. "
            "The user sees each command and must approve it before it runs."
        ),
        "parameters": {
            "type": "object",
            "properties": {"command": {"type": "string", "description": "a bash command line"}},
            "required": ["command"],
        },
    },
}
MAX_TOOL_ROUNDS = 8  # model turns in a row that may call tools before the user speaks again
MAX_TOOL_OUTPUT = 8000  # characters of command output handed back to the model
HELP = "commands: /clear forgets the conversation, /quit leaves (so does Ctrl-D)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--system", help="system message")
    parser.add_argument(
        "--show-think", action="store_true", help="show the model's reasoning (dimmed)"
    )
    parser.add_argument("--no-think", action="store_true", help="ask for answers without reasoning")
    parser.add_argument(
        "--allow-shell",
        action="store_true",
        help="let the model run shell commands; you confirm every one",
    )
    parser.add_argument("--shell-timeout", type=float, default=60.0, help="seconds per command")
    parser.add_argument("--max-tokens", type=int, default=4096, help="most tokens per reply")
    add_sampling_arguments(parser)


def _escape(c: str) -> str:
    return f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}"


def visible(text: str, *, strict: bool = False) -> str:
    """`text` with control characters written as escapes, so model output cannot move the
    cursor, recolour or hide text. `strict` (for commands the user must approve) also escapes
    format characters such as bidirectional overrides, which can reorder what is shown."""
    escaped = {"Cc", "Cf"} if strict else {"Cc"}
    return "".join(
        _escape(c) if c not in "\n\t" and unicodedata.category(c) in escaped else c for c in text
    )


class _Style:
    """ANSI styling, only when writing to a terminal."""

    def __init__(self, out: TextIO) -> None:
        self.enabled = out.isatty()

    def dim(self, text: str) -> str:
        return f"\x1b[2m{text}\x1b[0m" if self.enabled and text else text


def run_shell(command: str, timeout: float) -> str:
    """Run `command` with bash; the result as the model will read it."""
    try:
        done = subprocess.run(
            ["bash", "-c", command], capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return f"The command did not finish within {timeout:g} seconds and was stopped."
    output = (done.stdout + done.stderr).strip()
    if len(output) > MAX_TOOL_OUTPUT:
        output = (
            output[:MAX_TOOL_OUTPUT] + f"\n[... {len(output) - MAX_TOOL_OUTPUT} more characters]"
        )
    return f"exit code {done.returncode}\n{output}"


class ChatSession:
    """One conversation: renders each turn's messages and keeps the rest in the engine."""

    def __init__(
        self,
        generator: Generator,
        *,
        out: TextIO,
        ask: Callable[[str], str],
        sampling: SamplingParams,
        system: str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: str = "auto",
        enable_thinking: bool | None = None,
        show_think: bool = False,
        max_tokens: int = 4096,
        stop: Sequence[str] = (),
        shell_timeout: float = 60.0,
    ) -> None:
        self.generator = generator
        self.out = out
        self.ask = ask
        self.sampling = sampling
        self.system = system
        self.tools = list(tools) if tools else None
        self.tool_choice = tool_choice
        self.enable_thinking = enable_thinking
        self.show_think = show_think
        self.max_tokens = max_tokens
        self.stop = list(stop)
        self.shell_timeout = shell_timeout
        self.style = _Style(out)
        self.started = False  # whether the engine holds this conversation

    def clear(self) -> None:
        self.generator.reset()
        self.started = False

    def _prompt(self, new_messages: list[dict[str, Any]]) -> list[int]:
        gen = self.generator
        if not self.started:
            system = [{"role": "system", "content": self.system}] if self.system else []
            return gen.encode_chat(
                system + new_messages, tools=self.tools, enable_thinking=self.enable_thinking
            )
        continuation = gen.template.render_continuation(
            new_messages, tools=self.tools, enable_thinking=self.enable_thinking
        )
        return gen.context_tokens + gen.tokenizer.encode(continuation)

    def _reply(self, new_messages: list[dict[str, Any]]) -> AssistantMessage:
        """Generate one assistant turn after `new_messages`, printing it as it comes."""
        prompt = self._prompt(new_messages)
        out, reasoning_open = self.out, False
        events = self.generator.generate(
            prompt,
            max_tokens=self.max_tokens,
            sampling=self.sampling,
            stop=self.stop,
            tools=self.tools,
            tool_choice=self.tool_choice,
        )
        message = AssistantMessage()
        try:
            for event in events:
                self.started = True  # an event means the engine took the prompt
                if isinstance(event, ReasoningDelta) and self.show_think:
                    if not reasoning_open and not self.style.enabled:
                        out.write("(thinking) ")  # no dimming off a terminal: label it instead
                    out.write(self.style.dim(visible(event.text)))
                    reasoning_open = True
                elif isinstance(event, ContentDelta):
                    if reasoning_open:
                        out.write("\n\n")
                        reasoning_open = False
                    out.write(visible(event.text))
                elif isinstance(event, ToolCallDelta):
                    arguments = event.call.to_openai()["function"]["arguments"]
                    out.write(self.style.dim(f"\n[calls {event.call.name} {visible(arguments)}]"))
                elif isinstance(event, ToolCallError):
                    out.write(self.style.dim(f"\n[malformed tool call: {event.malformed.error}]"))
                elif isinstance(event, Finished):
                    message = event.message
                    if event.reason == "length":
                        out.write(self.style.dim("\n[reply cut at the token limit]"))
                out.flush()
        except KeyboardInterrupt:
            events.close()  # the engine keeps what was generated so far
            out.write(self.style.dim("\n[interrupted]"))
        out.write("\n")
        out.flush()
        return message

    def _run_tool(self, call: ToolCall) -> str:
        if call.name != "run_shell":
            return f"There is no tool named {call.name!r}."
        command = str(call.arguments.get("command", ""))
        self.out.write(f"\nThe model wants to run:\n  {visible(command, strict=True)}\n")
        self.out.flush()
        try:
            answer = self.ask("Run it? [y/N] ")
        except EOFError:
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            return "The user declined to run this command."
        result = run_shell(command, self.shell_timeout)
        self.out.write(self.style.dim(visible(result)) + "\n")
        return result

    def send(self, text: str) -> AssistantMessage:
        """The user says `text`; the model answers, running confirmed tool calls in between."""
        message = self._reply([{"role": "user", "content": text}])
        for _ in range(MAX_TOOL_ROUNDS):
            if not message.tool_calls:
                break
            results = [
                {"role": "tool", "tool_call_id": call.id, "content": self._run_tool(call)}
                for call in message.tool_calls
            ]
            message = self._reply(results)
        return message


def run(args: argparse.Namespace) -> int:
    try:
        import readline  # noqa: F401  (importing it gives input() line editing and history)
    except ImportError:
        pass
    engine = open_engine(args)
    generator = Generator(engine, args.model)
    session = ChatSession(
        generator,
        out=sys.stdout,
        ask=input,
        sampling=sampling_params(args, generator.defaults),
        system=args.system,
        tools=[SHELL_TOOL] if args.allow_shell else None,
        enable_thinking=False if args.no_think else None,
        show_think=args.show_think,
        max_tokens=args.max_tokens,
        stop=args.stop,
        shell_timeout=args.shell_timeout,
    )
    print(f"flashmoe chat: {args.model} on {engine.device}. {HELP}")
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print()
            continue
        if not line:
            continue
        if line == "/quit":
            return 0
        if line == "/clear":
            session.clear()
            print("(conversation cleared)")
            continue
        if line.startswith("/"):
            print(HELP)
            continue
        try:
            session.send(line)
        except ValueError as exc:  # e.g. the context is full
            print(f"error: {exc}. /clear starts a new conversation.")
