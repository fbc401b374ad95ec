"""The API's endpoints (feddiffuse.shared.protocol), under API_PREFIX."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Annotated

import anyio
from fastapi import APIRouter, Depends, Header, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from feddiffuse.shared.model import SEGMENTS
from feddiffuse.shared.protocol import (
    CONTENT_SHA256_HEADER,
    PROTOCOL_VERSION,
    SAFETENSORS_MEDIA_TYPE,
    ErrorBody,
    ErrorCode,
    ExtendRequest,
    FederationInfo,
    HubStatus,
    Manifest,
    RoundPhase,
    UploadReceipt,
)

from .coordinator import Caller, Hub
from .downloads import etag_matches, file_response, not_modified, requested_range
from .errors import HubError
from .services import UploadSlots
from .uploads import UploadReceiver

MAX_MANIFEST_WAIT_S = 30.0  # the longest a manifest request is held (long poll)
FEED_BATCH = 1 << 20  # bytes of body handed to the receiver at once (bounds memory per upload)
_bearer = HTTPBearer(auto_error=False, description="A client token, or the admin token.")


def _errors(*statuses: int) -> dict:
    return {s: {"model": ErrorBody} for s in (400, 401, 403, *statuses)}


router = APIRouter()


def get_hub(request: Request) -> Hub:
    return request.app.state.hub


def get_upload_slots(request: Request) -> UploadSlots:
    return request.app.state.upload_slots


async def authenticate(request: Request, credentials: Annotated[
        HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> Caller:
    # In the event loop: one read of the store (WAL: never waits on a writer), cheaper than a
    # trip to a worker thread, which can wait behind a storm of uploads.
    if credentials is None:
        raise HubError(ErrorCode.UNAUTHORIZED, "send your token as 'Authorization: Bearer "
                       "<token>'", {"WWW-Authenticate": "Bearer"})
    caller = get_hub(request).identify(credentials.credentials)
    request.state.caller = caller.name
    return caller


async def client_caller(caller: Annotated[Caller, Depends(authenticate)]) -> Caller:
    if caller.is_admin:
        raise HubError(ErrorCode.FORBIDDEN, "the admin token is not a client's; use a client "
                       "token (feddiffuse-hub token create)")
    return caller


async def admin_caller(caller: Annotated[Caller, Depends(authenticate)]) -> Caller:
    if not caller.is_admin:
        raise HubError(ErrorCode.FORBIDDEN, "this endpoint needs the admin token")
    return caller


ClientCaller = Annotated[Caller, Depends(client_caller)]
AnyCaller = Annotated[Caller, Depends(authenticate)]
AdminCaller = Annotated[Caller, Depends(admin_caller)]


@router.head("/health", include_in_schema=False)
@router.get("/health", tags=["service"])
async def health() -> dict:
    """Liveness probe; needs no token."""
    return {"status": "ok", "protocol": PROTOCOL_VERSION}


@router.get("/federation", response_model=FederationInfo, responses=_errors(), tags=["client"])
def federation(request: Request, caller: AnyCaller) -> FederationInfo:
    """The federation's settings and progress."""
    return get_hub(request).federation_info()


@router.get("/manifest", response_model=Manifest, responses=_errors(), tags=["client"])
async def manifest(request: Request, caller: ClientCaller,
                   wait: Annotated[float, Query(ge=0, le=MAX_MANIFEST_WAIT_S, description=(
                       "Long poll: when the caller has nothing to do now (reported, or not "
                       "in this round), hold the answer up to this many seconds until a "
                       "round opens or the federation moves on."))] = 0.0) -> Manifest:
    """What the caller does in the current round."""
    hub = get_hub(request)
    generation = hub.generation  # read first: a change after this point is never missed
    answer = hub.manifest(caller.name)  # a few reads, in the loop (see `authenticate`)
    if wait <= 0 or answer.phase not in (RoundPhase.REPORTED, RoundPhase.WAITING):
        return answer
    loop = asyncio.get_running_loop()
    changed = asyncio.Event()

    def wake() -> None:  # called from the thread that opened or published a round
        loop.call_soon_threadsafe(changed.set)

    hub.add_listener(wake)
    try:
        if hub.generation == generation:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), wait)
    finally:
        hub.remove_listener(wake)
    return await run_in_threadpool(hub.manifest, caller.name)


@router.head("/models/{version}", response_class=Response, include_in_schema=False)
@router.get(
    "/models/{version}", response_class=Response,
    responses={200: {"content": {SAFETENSORS_MEDIA_TYPE: {}},
                     "description": "the safetensors file"},
               206: {"description": "the requested byte range"},
               304: {"description": "the caller's copy (If-None-Match) is current"},
               **_errors(404, 416)},
    tags=["client"])
def download_model(
    request: Request,
    caller: AnyCaller,
    version: Annotated[str, Path(description="sha256 of the global model")],
    segments: Annotated[str | None, Query(
        description=f"comma separated, of {', '.join(SEGMENTS)}; all when absent")] = None,
    base: Annotated[str | None, Query(
        description="a version the caller holds: send the update from it to this version, "
                    "in the federation's downlink codec")] = None,
    range_header: Annotated[str | None, Header(alias="Range")] = None,
    if_range: Annotated[str | None, Header(alias="If-Range")] = None,
    if_none_match: Annotated[str | None, Header(alias="If-None-Match")] = None,
) -> Response:
    """A global model version, or some of its segments, as safetensors."""
    hub = get_hub(request)
    served = hub.model_file(version, segments, base)
    if etag_matches(if_none_match, served.etag):
        return not_modified(served)
    byte_range = requested_range(range_header, if_range, served.etag, served.size)
    if request.method == "HEAD":
        return file_response(served, byte_range, head=True)
    round_index = hub.downloads.accounting_round()  # the round current when it started

    def sent(n: int) -> None:
        hub.downloads.record(round_index, caller, served, n)

    return file_response(served, byte_range, head=False, on_sent=sent)


@router.put(
    "/rounds/{round_index}/update", response_model=UploadReceipt,
    responses=_errors(404, 409, 413, 422), tags=["client"],
    openapi_extra={"requestBody": {"required": True, "content": {
        SAFETENSORS_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}}}})
async def upload_update(
    request: Request,
    caller: ClientCaller,
    round_index: Annotated[int, Path(ge=1, le=1_000_000)],
) -> UploadReceipt:
    """Upload the caller's delta for a round (a safetensors file, streamed)."""
    hub = get_hub(request)
    # A refusal from here on is answered before the rest of the body is read, and the
    # connection is closed after the answer (app.HubMiddleware).
    ticket = await run_in_threadpool(hub.prepare_upload, caller.name, round_index)
    with get_upload_slots(request).taken():
        receiver = UploadReceiver(ticket, hub.blobs, hub.layout,
                                  request.headers.get(CONTENT_SHA256_HEADER))
        try:
            receiver.check_declared_length(_content_length(request))
            # Hashing, checking and writing run in worker threads (their own pool, so that
            # manifests never queue behind uploads), a batch at a time, while the event loop
            # goes on parsing HTTP.
            batch = bytearray()
            if not receiver.stop_reading:
                async for chunk in request.stream():
                    batch += chunk
                    if len(batch) >= FEED_BATCH:
                        await _in_upload_thread(request, receiver.feed, bytes(batch))
                        batch.clear()
                        if receiver.stop_reading:
                            break
            if batch and not receiver.stop_reading:
                await _in_upload_thread(request, receiver.feed, bytes(batch))
            received = await _in_upload_thread(request, receiver.finish)
            return await _in_upload_thread(request, hub.commit_upload, ticket, received)
        except ClientDisconnect:
            raise HubError(ErrorCode.BAD_REQUEST, "the client went away before the upload "
                           "ended") from None
        finally:
            receiver.discard()


@router.get("/admin/status", response_model=HubStatus, responses=_errors(), tags=["admin"])
def admin_status(request: Request, caller: AdminCaller) -> HubStatus:
    """The federation, the current round, who has reported, the deadline, the history."""
    return get_hub(request).status()


@router.post("/admin/rounds/current/close", response_model=HubStatus,
             responses=_errors(409), tags=["admin"])
def admin_close(request: Request, caller: AdminCaller) -> HubStatus:
    """Close the current round now and aggregate what has been reported (at least one)."""
    return get_hub(request).close_round_now()


@router.post("/admin/rounds/current/extend", response_model=HubStatus,
             responses=_errors(409), tags=["admin"])
def admin_extend(request: Request, caller: AdminCaller, body: ExtendRequest) -> HubStatus:
    """Move the current round's deadline back by `seconds` (from now if it has passed)."""
    return get_hub(request).extend_round(body.seconds)


def _content_length(request: Request) -> int | None:
    value = request.headers.get("content-length")
    if value is None or not (value.isascii() and value.isdecimal()):
        return None
    return int(value) if len(value) <= 18 else 10**18  # past any cap; int() takes <= 4300


UPLOAD_THREADS = 4  # worker threads for upload bodies: hashing and checking, on few cores


async def _in_upload_thread(request: Request, func, *args):
    state = request.app.state
    limiter = getattr(state, "upload_limiter", None)
    if limiter is None:  # made in the event loop that serves
        limiter = state.upload_limiter = anyio.CapacityLimiter(UPLOAD_THREADS)
    return await anyio.to_thread.run_sync(func, *args, limiter=limiter)
