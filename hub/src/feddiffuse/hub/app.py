"""The hub's ASGI app: FastAPI routes, JSON errors for everything, a request log, and the
background task that moves rounds on (deadlines) even when no request arrives."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from http import HTTPStatus

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from feddiffuse.shared.model import SEGMENTS
from feddiffuse.shared.protocol import API_PREFIX, ErrorBody, ErrorCode

from .coordinator import Hub
from .errors import HubError, error_status
from .limits import ServeLimits
from .routes import router
from .services import UploadSlots
from .uploads import DRAIN_LIMIT

log = logging.getLogger("feddiffuse.hub")
access_log = logging.getLogger("feddiffuse.hub.access")

_CODE_OF_STATUS = {401: ErrorCode.UNAUTHORIZED, 403: ErrorCode.FORBIDDEN,
                   404: ErrorCode.NOT_FOUND, 405: ErrorCode.METHOD_NOT_ALLOWED,
                   408: ErrorCode.REQUEST_TIMEOUT, 413: ErrorCode.TOO_LARGE,
                   416: ErrorCode.RANGE_NOT_SATISFIABLE, 503: ErrorCode.UNAVAILABLE}


def _error(code: ErrorCode, message: str, status: int | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    # A message may quote what a client sent (e.g. upload metadata with a lone surrogate,
    # which JSON can parse but UTF-8 cannot encode): escape what UTF-8 cannot carry.
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    body = ErrorBody(code=code, message=message).model_dump(mode="json")
    return JSONResponse(body, status_code=status or error_status(code), headers=headers)


async def _on_hub_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HubError)
    return _error(exc.code, exc.message, headers=exc.headers or None)


async def _on_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    code = _CODE_OF_STATUS.get(status, ErrorCode.BAD_REQUEST if status < 500
                               else ErrorCode.INTERNAL)
    if status == 404:
        message = f"there is no {request.url.path[:200]!r} on this hub (the API is under " \
                  f"{API_PREFIX})"
    elif status == 405:
        message = f"{request.method} is not allowed on {request.url.path[:200]!r}"
    else:
        detail = exc.detail if isinstance(exc.detail, str) else None
        message = detail or HTTPStatus(status).phrase
    return _error(code, message, status, dict(exc.headers or {}) or None)


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    parts = []
    for err in exc.errors()[:3]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "request"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return _error(ErrorCode.BAD_REQUEST, "; ".join(parts) or "the request is malformed")


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("%s %s failed", printable(request.method, 20), printable(request.url.path),
              exc_info=exc)
    return _error(ErrorCode.INTERNAL, "the hub failed to handle this request; its log says why")


def _size(n: int) -> str:
    return f"{n / 1e6:.2f}MB" if n >= 100_000 else f"{n}B"


def printable(text: str, limit: int = 200) -> str:
    """`text` (a client chose it) as one log-safe line: control and other non-printing
    characters (newlines, NUL, ANSI escapes, U+2028) become escapes, so that nothing a client
    sends can forge a log line or make the log binary."""
    text = text[:limit]
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(c if c.isprintable() and c != "\\" else
                   c.encode("unicode_escape").decode("ascii") for c in text)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            text = value.strip()
            return int(text) if text.isdigit() and len(text) <= 18 else 10**18
    return None


def _has_body(scope: Scope) -> bool:
    for name, value in scope["headers"]:
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip(b"0 ")):
            return True
    return False


class HubMiddleware:
    """Logs one line per request (what the client chose escaped), bounds the idle time within
    a request body, closes the connection after refusing a body it has not read (after
    reading and dropping at most DRAIN_LIMIT more bytes, so that the client sees the answer),
    then lets the hub move its rounds on (a due close runs here, after the answer)."""

    def __init__(self, app: ASGIApp, hub: Hub, limits: ServeLimits) -> None:
        self.app = app
        self.hub = hub
        self.limits = limits
        # An honest body is at most an upload of the whole model: one that size is read to
        # its end after a refusal (its client then sees the answer); a bigger one only
        # DRAIN_LIMIT further, then the connection is cut.
        self.honest_body = hub.layout.upload_cap(SEGMENTS) + DRAIN_LIMIT

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        seen = {"status": 500, "in": 0, "out": 0}
        body = {"done": not _has_body(scope), "stalled": False}
        idle = self.limits.body_idle_timeout_s

        async def guarded_receive() -> Message:
            if body["done"]:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), idle)
            except TimeoutError:
                body["stalled"] = True
                raise HubError(ErrorCode.REQUEST_TIMEOUT, f"no byte of the request's body "
                               f"arrived for {idle:g} s; the connection is closed") from None
            if message["type"] == "http.request":
                seen["in"] += len(message.get("body", b""))
                body["done"] = not message.get("more_body", False)
            else:
                body["done"] = True
            return message

        async def drain() -> None:
            declared = _content_length(scope)
            limit = seen["in"] + DRAIN_LIMIT
            if declared is None or declared <= self.honest_body:
                limit = max(limit, self.honest_body)
            with contextlib.suppress(HubError):
                while not body["done"] and not body["stalled"] and seen["in"] < limit:
                    await guarded_receive()

        async def guarded_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
                if message["status"] >= 400 and not body["done"]:
                    await drain()
                    message = {**message, "headers": [
                        *[(k, v) for k, v in message.get("headers", [])
                          if k.lower() != b"connection"], (b"connection", b"close")]}
            elif message["type"] == "http.response.body":
                seen["out"] += len(message.get("body", b""))
            await send(message)

        # Reads only, O(1): e.g. a round whose deadline passed closes before this request.
        if self.hub.due(quick=True):
            await _run(self.hub.advance)
        try:
            await self.app(scope, guarded_receive, guarded_send)
        finally:
            client = scope.get("client")
            caller = scope.get("state", {}).get("caller", "-")
            query = f"?{scope['query_string'].decode('latin-1')}" if scope.get(
                "query_string") else ""
            access_log.info('%s %s "%s %s%s" %d in=%s out=%s %.3fs',
                            f"{client[0]}:{client[1]}" if client else "-", printable(caller),
                            printable(scope["method"], 20), printable(scope["path"]),
                            printable(query), seen["status"], _size(seen["in"]),
                            _size(seen["out"]), time.perf_counter() - started)
        # What a request can change for the rounds (an upload, an admin's close, extend or
        # revocation) is acted on at once, and so is what the quick check saw due (a closing
        # round is aggregated after the answer); a read changes nothing else, and the
        # background tick catches what the CLI moves. Under a storm this spares every read
        # the round's O(participants) check.
        if scope["method"] not in ("GET", "HEAD") or self.hub.due(quick=True):
            await _run(self.hub.tick)


async def _run(step) -> None:
    try:
        await anyio.to_thread.run_sync(step)
    except Exception:
        log.exception("moving the rounds on failed")


def create_app(hub: Hub, *, tick_interval: float = 1.0,
               limits: ServeLimits | None = None) -> FastAPI:
    """The ASGI app serving `hub` (opened with serve=True to drive rounds). Serve it with
    `server.uvicorn_config(app, limits)` to bound the time to receive headers too."""
    from importlib.metadata import version

    limits = (limits or ServeLimits()).validated()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async def ticker() -> None:
            while True:
                await asyncio.sleep(tick_interval)
                await _run(hub.tick)
                await _run(hub.housekeeping)

        task = asyncio.create_task(ticker())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    app = FastAPI(
        title="FedDiffuse hub",
        version=version("feddiffuse-hub"),
        summary="Federated training of a diffusion model: manifests, model downloads, "
                "client updates.",
        openapi_url=f"{API_PREFIX}/openapi.json",
        docs_url=f"{API_PREFIX}/docs",
        redoc_url=None,
        lifespan=lifespan,
        redirect_slashes=False,  # a trailing slash is a 404, not a redirect built from Host
    )
    app.state.hub = hub
    app.state.limits = limits
    app.state.upload_slots = UploadSlots(limits.max_uploads_in_progress, limits.retry_after_s)
    app.include_router(router, prefix=API_PREFIX)
    app.add_exception_handler(HubError, _on_hub_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(Exception, _on_unexpected)
    app.add_middleware(HubMiddleware, hub=hub, limits=limits)
    return app
