"""One engine serving requests one at a time, in arrival order, on a thread of its own.

The HTTP side submits a request and awaits its generation events on its own asyncio loop; the
worker thread renders and tokenizes the prompt, restores the longest cached prompt state that
the prompt extends, generates, and passes each event back. A client that goes away sets the
request's cancel flag, which generation checks between tokens.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from collections import deque
from pathlib import Path

import jinja2

from .engine import Engine, EngineState
from .generate import Finished, GenerationEvent, Generator
from .openai_schema import ChatRequest, CompletionRequest, GenerationOptions, RequestError
from .prompt_cache import PromptCache

log = logging.getLogger("flashmoe_native.server")

Request = ChatRequest | CompletionRequest


@dataclasses.dataclass(frozen=True)
class Served:
    """What became of one request, for the log and for /health."""

    id: str
    reason: str  # a finish reason, "cancelled", or "error"
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    seconds: float


def client_gone() -> RequestError:
    return RequestError("The client closed the request.", status=499, code="client_closed")


class Ticket:
    """A submitted request; its events come out of `next()` on the loop that submitted it."""

    def __init__(self, request_id: str, request: Request, loop: asyncio.AbstractEventLoop) -> None:
        self.id = request_id
        self.request = request
        self.cancelled = threading.Event()
        self._loop = loop
        self._events: asyncio.Queue[GenerationEvent | RequestError] = asyncio.Queue()

    def cancel(self) -> None:
        """Stop the generation before its next token, or skip the request if it still waits."""
        self.cancelled.set()

    def emit(self, item: GenerationEvent | RequestError) -> None:
        """Called on the worker thread."""
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, item)
        except RuntimeError:  # the loop has closed: nobody is listening any more
            self.cancelled.set()

    async def next(self) -> GenerationEvent:
        """The next event; a refused or failed request raises its RequestError."""
        item = await self._events.get()
        if isinstance(item, RequestError):
            raise item
        return item


class EngineWorker:
    """Owns the engine, its generator and the prompt-state cache; serves tickets in order."""

    def __init__(
        self, engine: Engine, model_dir: str | Path, *, prompt_cache_bytes: int, history: int = 256
    ) -> None:
        self.engine = engine
        self.generator = Generator(engine, model_dir)
        self.cache: PromptCache[EngineState] = PromptCache(prompt_cache_bytes)
        tokenizer = self.generator.tokenizer
        # chat prompts end with the assistant's turn opening: the state just before it is what a
        # later turn of the same conversation starts with
        self._turn_start = tokenizer.token_id("<|im_start|>")
        # no prompt text longer than this many bytes can fit the context
        self._max_prompt_bytes = engine.max_context * max(len(b) for b in tokenizer.token_bytes)
        self.served: deque[Served] = deque(maxlen=history)
        self._queue: queue.Queue[Ticket | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="flashmoe-engine", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        """Requests waiting for the engine (not counting the one it is serving)."""
        return self._queue.qsize()

    def submit(self, request_id: str, request: Request) -> Ticket:
        """Queue a request; call from the asyncio loop that will await its events."""
        self.check_max_tokens(request.options)
        ticket = Ticket(request_id, request, asyncio.get_running_loop())
        self._queue.put(ticket)
        return ticket

    def close(self) -> None:
        """Finish the request being served, then stop; waiting requests are dropped."""
        while True:
            try:
                waiting = self._queue.get_nowait()
            except queue.Empty:
                break
            if waiting is not None:
                waiting.emit(RequestError("The server is shutting down.", status=503))
        self._queue.put(None)
        self._thread.join()

    def check_max_tokens(self, options: GenerationOptions) -> None:
        limit = self.engine.max_context - 1  # the prompt takes at least one position
        if options.max_tokens is not None and options.max_tokens > limit:
            raise RequestError(
                f"max_tokens is too large: {options.max_tokens}. This model supports at most "
                f"{limit} completion tokens.",
                param="max_tokens",
                code="invalid_value",
            )

    # -- on the worker thread

    def _run(self) -> None:
        while (ticket := self._queue.get()) is not None:
            self._serve(ticket)

    def _serve(self, ticket: Ticket) -> None:
        started = time.perf_counter()
        if ticket.cancelled.is_set():
            self._record(ticket.id, "cancelled", 0, 0, 0, started)
            ticket.emit(client_gone())
            return
        try:
            done = self._generate(ticket)
        except RequestError as exc:
            self._record(ticket.id, "error", 0, 0, 0, started)
            ticket.emit(exc)
            return
        except Exception as exc:
            log.exception("%s failed", ticket.id)
            self.generator.reset()  # a failure may have left the engine anywhere
            self._record(ticket.id, "error", 0, 0, 0, started)
            ticket.emit(RequestError(f"Internal error: {exc}", status=500, kind="server_error"))
            return
        usage = done.usage
        self._record(
            ticket.id,
            done.reason,
            usage.prompt_tokens,
            usage.cached_prompt_tokens,
            usage.completion_tokens,
            started,
        )

    def _record(
        self, request_id: str, reason: str, prompt: int, cached: int, completion: int, since: float
    ) -> None:
        served = Served(request_id, reason, prompt, cached, completion, time.perf_counter() - since)
        self.served.append(served)
        log.info(
            "%s: %s, %d prompt tokens (%d cached), %d completion tokens, %.2f s",
            *dataclasses.astuple(served),
        )

    def _generate(self, ticket: Ticket) -> Finished:
        request = ticket.request
        options = request.options
        tokens = self._prompt_tokens(request)
        self._check_context(len(tokens), options.max_tokens)
        try:
            sampling = options.sampling(self.generator.defaults)
        except ValueError as exc:  # a request value the model's defaults make invalid
            raise RequestError(str(exc)) from exc
        chat = isinstance(request, ChatRequest)
        cached = self._reuse(tokens)
        events = self.generator.generate(
            tokens,
            max_tokens=options.max_tokens,
            sampling=sampling,
            stop=options.stop,
            tools=request.tools if chat else None,
            tool_choice=request.tool_choice if chat else "auto",
            parse=chat,
            cancel=ticket.cancelled,
        )
        try:
            # the generator refuses a request only before its first event (e.g. max_tokens
            # too few for a required tool call)
            event = next(events)
        except ValueError as exc:
            raise RequestError(str(exc), param="max_tokens") from exc
        while not isinstance(event, Finished):
            ticket.emit(event)
            event = next(events)
        # the generator counts what its engine already held; part of that was prefilled here
        done = dataclasses.replace(
            event, usage=dataclasses.replace(event.usage, cached_prompt_tokens=cached)
        )
        ticket.emit(done)
        return done

    def _prompt_tokens(self, request: Request) -> list[int]:
        if isinstance(request, CompletionRequest) and isinstance(request.prompt, list):
            vocab = self.generator.vocab_size
            bad = [t for t in request.prompt if not 0 <= t < vocab]
            if bad:
                raise RequestError(
                    f"'prompt' holds token id {bad[0]}, outside the vocabulary (0..{vocab - 1}).",
                    param="prompt",
                )
            return request.prompt
        if isinstance(request, CompletionRequest):
            text = request.prompt
        else:
            try:
                text = self.generator.template.render(
                    request.messages,
                    tools=request.tools,
                    add_generation_prompt=True,
                    enable_thinking=request.enable_thinking,
                )
            except (jinja2.TemplateError, ValueError) as exc:
                raise RequestError(
                    f"The chat template rejected the messages: {exc}", param="messages"
                ) from exc
        size = len(text.encode("utf-8"))
        if size > self._max_prompt_bytes:  # too long for certain: spare the tokenizer
            raise RequestError(
                f"This model's maximum context length is {self.engine.max_context} tokens, and "
                f"a prompt of {size} bytes needs more. Please reduce the length of the prompt.",
                param="messages" if isinstance(request, ChatRequest) else "prompt",
                code="context_length_exceeded",
            )
        tokens = self.generator.tokenizer.encode(text)
        if not tokens:
            raise RequestError("The prompt is empty.", param="prompt")
        return tokens

    def _check_context(self, prompt_tokens: int, max_tokens: int | None) -> None:
        limit = self.engine.max_context
        if prompt_tokens >= limit:
            raise RequestError(
                f"This model's maximum context length is {limit} tokens. However, your prompt "
                f"is {prompt_tokens} tokens, which leaves no room for a reply. Please reduce "
                "the length of the prompt.",
                code="context_length_exceeded",
            )
        if max_tokens is not None and prompt_tokens + max_tokens > limit:
            raise RequestError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, "
                f"{max_tokens} for the completion). Please reduce the length of the prompt or "
                "the completion.",
                param="max_tokens",
                code="context_length_exceeded",
            )

    def _reuse(self, tokens: list[int]) -> int:
        """Bring the engine to the longest known prefix of `tokens`; returns its length.

        Candidates are the engine's own state (the last conversation) and the cached snapshots.
        Then the prompt is prefilled up to its last turn opening and that state is cached, so
        the next turn of this conversation finds it even after other conversations ran.
        """
        generator, engine = self.generator, self.engine
        position = engine.position
        # an exact repeat is left out: reusing it needs the logits the engine no longer has
        live = position if position < len(tokens) else 0
        if live and generator.context_tokens[:live] != tokens[:live]:
            live = 0
        best = self.cache.longest_prefix(tokens, len(tokens) - 1)
        if best is not None and len(best[0]) > live:
            engine.restore(best[1])
            generator.resume(best[0])
            reused = len(best[0])
        elif live:
            reused = live
        else:
            generator.reset()
            reused = 0
        point = self._snapshot_point(tokens)
        if self.cache.budget_bytes and point > reused and tokens[:point] not in self.cache:
            engine.prefill(tokens[reused:point])
            self.cache.put(tokens[:point], engine.snapshot())
            generator.resume(tokens[:point])
        return reused

    def _snapshot_point(self, tokens: list[int]) -> int:
        """Where to snapshot a prompt: at its last turn opening when it has one (the history
        before it re-renders identically next turn), else one token before its end."""
        if self._turn_start is not None:
            for i in range(len(tokens) - 1, 0, -1):
                if tokens[i] == self._turn_start:
                    return i
        return len(tokens) - 1
