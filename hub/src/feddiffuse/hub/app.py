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

from feddiffuse.shared.protocol import API_PREFIX, ERROR_STATUS, ErrorBody, ErrorCode

from .coordinator import Hub
from .errors import HubError
from .routes import router

log = logging.getLogger("feddiffuse.hub")
access_log = logging.getLogger("feddiffuse.hub.access")

_CODE_OF_STATUS = {401: ErrorCode.UNAUTHORIZED, 403: ErrorCode.FORBIDDEN,
                   404: ErrorCode.NOT_FOUND, 413: ErrorCode.TOO_LARGE,
                   416: ErrorCode.RANGE_NOT_SATISFIABLE}


def _error(code: ErrorCode, message: str, status: int | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    # A message may quote what a client sent (e.g. upload metadata with a lone surrogate,
    # which JSON can parse but UTF-8 cannot encode): escape what UTF-8 cannot carry.
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return JSONResponse(ErrorBody(code=code, message=message).model_dump(mode="json"),
                        status_code=status or ERROR_STATUS[code], headers=headers)


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
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return _error(ErrorCode.INTERNAL, "the hub failed to handle this request; its log says why")


def _size(n: int) -> str:
    return f"{n / 1e6:.2f}MB" if n >= 100_000 else f"{n}B"


class HubMiddleware:
    """Logs one line per request, then lets the hub move its rounds on (a due close runs
    here, after the response has been sent)."""

    def __init__(self, app: ASGIApp, hub: Hub) -> None:
        self.app = app
        self.hub = hub

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        seen = {"status": 500, "in": 0, "out": 0}

        async def counting_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                seen["in"] += len(message.get("body", b""))
            return message

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
            elif message["type"] == "http.response.body":
                seen["out"] += len(message.get("body", b""))
            await send(message)

        await _run(self.hub.advance)  # e.g. close a round whose deadline passed first
        try:
            await self.app(scope, counting_receive, counting_send)
        finally:
            client = scope.get("client")
            caller = scope.get("state", {}).get("caller", "-")
            query = f"?{scope['query_string'].decode('latin-1')}" if scope.get(
                "query_string") else ""
            access_log.info('%s %s "%s %s%s" %d in=%s out=%s %.3fs',
                            f"{client[0]}:{client[1]}" if client else "-", caller,
                            scope["method"], scope["path"], query[:200], seen["status"],
                            _size(seen["in"]), _size(seen["out"]),
                            time.perf_counter() - started)
        await _run(self.hub.tick)


async def _run(step) -> None:
    try:
        await anyio.to_thread.run_sync(step)
    except Exception:
        log.exception("moving the rounds on failed")


def create_app(hub: Hub, *, tick_interval: float = 1.0) -> FastAPI:
    """The ASGI app serving `hub` (opened with serve=True to drive rounds)."""
    from importlib.metadata import version

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async def ticker() -> None:
            while True:
                await asyncio.sleep(tick_interval)
                await _run(hub.tick)

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
    )
    app.state.hub = hub
    app.include_router(router, prefix=API_PREFIX)
    app.add_exception_handler(HubError, _on_hub_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(Exception, _on_unexpected)
    app.add_middleware(HubMiddleware, hub=hub)
    return app
