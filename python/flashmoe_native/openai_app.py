"""The OpenAI-compatible HTTP API (a Starlette app) over an `EngineWorker`.

Routes: POST /v1/chat/completions and /v1/completions (JSON or server-sent events), GET
/v1/models, /v1/models/{id} and /health. Every error is an OpenAI-shaped JSON body with a 4xx or
5xx status. Each request watches its connection from submission on: a client that disconnects,
while waiting in the queue or while its reply streams, cancels its generation.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from .engine_worker import EngineWorker, Ticket, client_gone
from .generate import Finished, GenerationEvent
from .openai_schema import (
    ChatRequest,
    CompletionRequest,
    RequestError,
    chat_chunk,
    chat_completion,
    parse_chat_request,
    parse_completion_request,
    text_completion,
)
from .tool_calls import ContentDelta, ReasoningDelta, ToolCallDelta


def _error_response(error: RequestError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error.to_json(), status_code=error.status, headers=headers)


class _BearerAuth:
    """ASGI middleware: every HTTP request must carry `Authorization: Bearer <key>`."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app = app
        self._expected = f"Bearer {key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self._expected):
                error = RequestError(
                    "Missing or incorrect API key: send the header 'Authorization: Bearer KEY' "
                    "with the key the server was started with (--api-key).",
                    status=401,
                    code="invalid_api_key",
                )
                await _error_response(error, {"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _read_json(request: Request, limit: int) -> Any:
    too_large = RequestError(
        f"The request body is larger than {limit} bytes (--max-request-mb).",
        status=413,
        code="request_too_large",
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    try:
        return json.loads(body)
    except ValueError as exc:  # bad JSON or bad UTF-8
        raise RequestError(
            f"We could not parse the JSON body of your request: {exc}. The body must be a JSON "
            "object.",
            code="invalid_json",
        ) from exc


async def _cancel_on_disconnect(receive: Receive, ticket: Ticket) -> None:
    # the body has been read, so the next message is the client going away
    while (await receive())["type"] != "http.disconnect":
        pass
    ticket.cancel()


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class _ChatFormat:
    """Chat completion responses: whole, or as `chat.completion.chunk` deltas."""

    def __init__(self, response_id: str, model: str) -> None:
        self.id, self.model, self.created = response_id, model, int(time.time())

    def opening(self) -> list[dict[str, Any]]:
        return [chat_chunk(self.id, self.created, self.model, {"role": "assistant", "content": ""})]

    def delta(self, event: GenerationEvent) -> dict[str, Any] | None:
        delta: dict[str, Any]
        if isinstance(event, ContentDelta):
            delta = {"content": event.text}
        elif isinstance(event, ReasoningDelta):
            delta = {"reasoning_content": event.text}
        elif isinstance(event, ToolCallDelta):
            delta = {"tool_calls": [{"index": event.index, **event.call.to_openai()}]}
        else:  # a malformed call: its text already went out as content
            return None
        return chat_chunk(self.id, self.created, self.model, delta)

    def closing(self, done: Finished, include_usage: bool) -> list[dict[str, Any]]:
        chunks = [chat_chunk(self.id, self.created, self.model, {}, done.reason)]
        if include_usage:
            chunks.append(chat_chunk(self.id, self.created, self.model, None, usage=done.usage))
        return chunks

    def whole(self, done: Finished) -> dict[str, Any]:
        return chat_completion(self.id, self.created, self.model, done)


class _CompletionFormat:
    """Text completion responses: whole, or as streamed text pieces."""

    def __init__(self, response_id: str, model: str) -> None:
        self.id, self.model, self.created = response_id, model, int(time.time())

    def opening(self) -> list[dict[str, Any]]:
        return []

    def delta(self, event: GenerationEvent) -> dict[str, Any] | None:
        if not isinstance(event, ContentDelta):
            return None
        return text_completion(self.id, self.created, self.model, event.text)

    def closing(self, done: Finished, include_usage: bool) -> list[dict[str, Any]]:
        chunks = [text_completion(self.id, self.created, self.model, "", done.reason)]
        if include_usage:
            chunks.append(
                text_completion(self.id, self.created, self.model, None, usage=done.usage)
            )
        return chunks

    def whole(self, done: Finished) -> dict[str, Any]:
        text = done.message.content
        return text_completion(self.id, self.created, self.model, text, done.reason, done.usage)


Format = _ChatFormat | _CompletionFormat


def create_app(
    worker: EngineWorker,
    *,
    model_name: str,
    api_key: str | None = None,
    max_request_bytes: int = 32 << 20,
) -> Starlette:
    """The API over `worker`; `model_name` is the one model id requests may name."""
    created = int(time.time())
    model_card = {"id": model_name, "object": "model", "created": created, "owned_by": "flashmoe"}

    def check_model(name: str) -> None:
        if name != model_name:
            raise RequestError(
                f"The model '{name}' does not exist; this server serves '{model_name}'.",
                status=404,
                param="model",
                code="model_not_found",
            )

    async def stream(
        ticket: Ticket,
        watcher: asyncio.Task[None],
        fmt: Format,
        first: GenerationEvent,
        include_usage: bool,
    ) -> AsyncIterator[str]:
        try:
            for chunk in fmt.opening():
                yield _sse(chunk)
            event = first
            while not isinstance(event, Finished):
                chunk = fmt.delta(event)
                if chunk is not None:
                    yield _sse(chunk)
                try:
                    event = await ticket.next()
                except RequestError as exc:  # failed after the reply had begun
                    yield _sse(exc.to_json())
                    return
            if event.reason != "cancelled":
                for chunk in fmt.closing(event, include_usage):
                    yield _sse(chunk)
                yield "data: [DONE]\n\n"
        finally:
            # runs when the client goes away mid-stream too: stop generating for nobody
            ticket.cancel()
            watcher.cancel()

    async def serve(
        request: Request, job: ChatRequest | CompletionRequest, fmt: Format
    ) -> Response:
        check_model(job.model)
        ticket = worker.submit(fmt.id, job)
        watcher = asyncio.create_task(_cancel_on_disconnect(request.receive, ticket))
        try:
            # an error before the first event (bad prompt, context too long) still gets a 4xx
            event = await ticket.next()
            if job.options.stream:
                body = stream(ticket, watcher, fmt, event, job.options.include_usage)
                headers = {"Cache-Control": "no-cache"}
                return StreamingResponse(body, media_type="text/event-stream", headers=headers)
            while not isinstance(event, Finished):
                event = await ticket.next()
        except BaseException:
            ticket.cancel()
            watcher.cancel()
            raise
        ticket.cancel()
        watcher.cancel()
        if event.reason == "cancelled":
            raise client_gone()
        return JSONResponse(fmt.whole(event))

    async def chat_completions(request: Request) -> Response:
        job = parse_chat_request(await _read_json(request, max_request_bytes))
        return await serve(
            request, job, _ChatFormat(f"chatcmpl-{secrets.token_hex(12)}", model_name)
        )

    async def completions(request: Request) -> Response:
        job = parse_completion_request(await _read_json(request, max_request_bytes))
        return await serve(
            request, job, _CompletionFormat(f"cmpl-{secrets.token_hex(12)}", model_name)
        )

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [model_card]})

    async def model(request: Request) -> Response:
        check_model(request.path_params["model"])
        return JSONResponse(model_card)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": model_name, "queued": worker.queued})

    async def request_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestError)
        return _error_response(exc)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        error = RequestError(
            f"{request.method} {request.url.path}: {exc.detail}",
            status=exc.status_code,
            code="not_found" if exc.status_code == 404 else None,
        )
        return _error_response(error, dict(exc.headers or {}))

    async def internal_error(request: Request, exc: Exception) -> Response:
        error = RequestError(f"Internal error: {exc}", status=500, kind="server_error")
        return _error_response(error)

    handlers: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
        RequestError: request_error,
        HTTPException: http_error,
        Exception: internal_error,
    }
    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/models/{model:path}", model, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
        ],
        middleware=[Middleware(_BearerAuth, key=api_key)] if api_key else [],
        exception_handlers=handlers,
    )
