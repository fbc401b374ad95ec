"""A small in-memory hub that speaks feddiffuse.shared.protocol, for fast client tests.

It drives the shared RoundState like the real hub, records every upload it receives, and can
inject faults: 5xx answers, refused connections, downloads and uploads cut off mid-way. The
client talks to it through an httpx.MockTransport, so no socket is opened.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

import httpx
import torch

from feddiffuse.shared.codecs import decode_payload, parse_codec
from feddiffuse.shared.methods import plan_round
from feddiffuse.shared.model import build_unet, count_parameters, segment_map
from feddiffuse.shared.protocol import (
    API_PREFIX,
    ErrorBody,
    ErrorCode,
    FederationInfo,
    Manifest,
    RoundPhase,
    TrainingSettings,
    UploadReceipt,
)
from feddiffuse.shared.rounds import RoundState
from feddiffuse.shared.wire import encode_tensors, read_metadata_value


@dataclass
class ReceivedUpload:
    client_id: str
    round: int
    names: set[str]
    segments: tuple[str, ...]
    metadata: dict[str, str]
    num_samples: int
    body: bytes = field(default=b"", repr=False)


@dataclass
class Faults:
    """Faults to inject; each counter is consumed by the matching request."""

    refuse: int = 0  # requests answered with a refused connection
    errors_503: int = 0  # requests answered 503
    cut_downloads: int = 0  # model downloads cut off half way
    drop_uploads: int = 0  # uploads read in full, then the connection drops (not recorded)
    lose_upload_response: int = 0  # uploads recorded, then the connection drops
    log: list[str] = field(default_factory=list)


class _CutStream(httpx.SyncByteStream):
    def __init__(self, data: bytes, cut_at: int) -> None:
        self.data = data
        self.cut_at = cut_at

    def __iter__(self) -> Iterator[bytes]:
        yield self.data[: self.cut_at]
        raise httpx.RemoteProtocolError("peer closed connection without sending complete body")


def _error(status: int, code: ErrorCode, message: str) -> httpx.Response:
    return httpx.Response(status, json=ErrorBody(code=code, message=message).model_dump())


class FakeHub:
    def __init__(self, *, method: str = "full", clients: tuple[str, ...] = ("client-a",),
                 rounds: int = 2, local_epochs: int = 1, batch_size: int = 8,
                 preset: str = "tiny", seed: int = 0, uplink_codec: str = "fp32") -> None:
        self.method = method
        self.uplink_codec = uplink_codec
        self.rounds = rounds
        self.local_epochs = local_epochs
        self.batch_size = batch_size
        self.preset = preset
        self.seed = seed
        self.tokens = {f"token-{c}": c for c in clients}
        self.revoked: set[str] = set()
        self.clients = clients
        model = build_unet(preset, seed=seed)
        self.segment_of = segment_map(model)
        self.counts = count_parameters(model)
        self.global_state = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.round = 1
        self.finished = False
        self.uploads: list[ReceivedUpload] = []
        self.requests: list[str] = []
        self.faults = Faults()
        self.lock = threading.Lock()
        self._files: dict[tuple[str, tuple[str, ...]], bytes] = {}
        self._open_round()

    # -- the federation -----------------------------------------------------------------------

    def _open_round(self) -> None:
        self.state = RoundState.open(self.method, self.round, list(self.clients),
                                     self.global_state, self.segment_of, seed=self.seed)
        self.plans = plan_round(self.method, list(self.clients), self.round, self.seed)
        self.version = hashlib.sha256(
            encode_tensors(self.global_state, {"kind": "global", "preset": self.preset})
        ).hexdigest()

    def _finish_round(self) -> None:
        outcome = self.state.finalize()
        self.global_state = outcome.global_state
        if self.round >= self.rounds:
            self.finished = True
            self.version = hashlib.sha256(
                encode_tensors(self.global_state, {"kind": "global", "preset": self.preset})
            ).hexdigest()
            return
        self.round += 1
        self._open_round()

    def manifest_for(self, client_id: str) -> Manifest:
        plan = self.plans[client_id]
        if self.finished:
            phase = RoundPhase.FINISHED
            down = ["encoder", "bottleneck", "decoder"]
        elif client_id in self.state.reported:
            phase, down = RoundPhase.REPORTED, list(plan.download)
        else:
            phase, down = RoundPhase.OPEN, list(plan.download)
        return Manifest(federation="fake", client_id=client_id, phase=phase, round=self.round,
                        rounds=self.rounds, method=self.method, preset=self.preset,
                        global_version=self.version, download_segments=down,
                        upload_segments=list(plan.upload),
                        training=TrainingSettings(local_epochs=self.local_epochs,
                                                  batch_size=self.batch_size, lr=1e-3,
                                                  seed=hash(client_id) % 1000 + self.round),
                        retry_after_s=0.01 if phase == RoundPhase.REPORTED else None,
                        uplink_codec=self.uplink_codec)

    def info(self) -> FederationInfo:
        params = dict(self.counts["segments"])
        params["total"] = self.counts["total_params"]
        return FederationInfo(name="fake", preset=self.preset, method=self.method,
                              rounds=self.rounds, local_epochs=self.local_epochs,
                              min_clients=len(self.clients), round_timeout_s=None,
                              current_round=self.round, finished=self.finished,
                              parameters=params)

    # -- HTTP ---------------------------------------------------------------------------------

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def http_factory(self):
        return lambda: httpx.Client(transport=self.transport())

    def handle(self, request: httpx.Request) -> httpx.Response:
        with self.lock:
            path = request.url.path
            self.requests.append(f"{request.method} {path}")
            f = self.faults
            if f.refuse:
                f.refuse -= 1
                f.log.append("refused")
                raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
            if f.errors_503:
                f.errors_503 -= 1
                f.log.append("503")
                return _error(503, ErrorCode.INTERNAL, "try later")
            auth = request.headers.get("authorization", "")
            token = auth.removeprefix("Bearer ").strip()
            if token not in self.tokens:
                return _error(401, ErrorCode.UNAUTHORIZED, "unknown token")
            if token in self.revoked:
                return _error(403, ErrorCode.FORBIDDEN, "revoked token")
            client_id = self.tokens[token]
            route = path.removeprefix(API_PREFIX)
            if request.method == "GET" and route == "/federation":
                return httpx.Response(200, text=self.info().model_dump_json())
            if request.method == "GET" and route == "/manifest":
                return httpx.Response(200, text=self.manifest_for(client_id).model_dump_json())
            if request.method == "GET" and route.startswith("/models/"):
                return self._download(request, route.removeprefix("/models/"))
            if request.method == "PUT" and route.startswith("/rounds/"):
                return self._upload(request, client_id, int(route.split("/")[2]))
            return _error(404, ErrorCode.NOT_FOUND, "no such endpoint")

    def _download(self, request: httpx.Request, version: str) -> httpx.Response:
        if version != self.version:
            return _error(404, ErrorCode.NOT_FOUND, "unknown version")
        segments = request.url.params.get("segments", "").split(",")
        key = (version, tuple(segments))
        if key not in self._files:  # built once, like the hub's content-addressed blobs
            names = [n for n in self.global_state if self.segment_of[n] in segments]
            self._files[key] = encode_tensors(
                {n: self.global_state[n] for n in names},
                {"kind": "global", "preset": self.preset, "version": version,
                 "segments": ",".join(segments)})
        body = self._files[key]
        digest = hashlib.sha256(body).hexdigest()
        etag = f'"{version}:{",".join(segments)}"'
        headers = {"ETag": etag, "X-Content-SHA256": digest,
                   "Content-Type": "application/octet-stream"}
        start = 0
        rng = request.headers.get("range")
        if rng and request.headers.get("if-range") == etag:
            start = int(rng.split("=")[1].split("-")[0])
            headers["Content-Range"] = f"bytes {start}-{len(body) - 1}/{len(body)}"
            self.faults.log.append(f"range {start}")
        part = body[start:]
        headers["Content-Length"] = str(len(part))
        status = 206 if start else 200
        if self.faults.cut_downloads:
            self.faults.cut_downloads -= 1
            self.faults.log.append("cut download")
            return httpx.Response(status, headers=headers,
                                  stream=_CutStream(part, len(part) // 2))
        return httpx.Response(status, headers=headers, content=part)

    def _upload(self, request: httpx.Request, client_id: str, round_index: int
                ) -> httpx.Response:
        body = request.read()
        if self.faults.drop_uploads:
            self.faults.drop_uploads -= 1
            self.faults.log.append("dropped upload")
            raise httpx.WriteError("connection reset by peer", request=request)
        if self.finished or round_index != self.round:
            return _error(409, ErrorCode.ROUND_CLOSED, f"round {round_index} is closed")
        if client_id in self.state.reported:
            return _error(409, ErrorCode.CONFLICT, "already reported")
        expected = self.state.expected_upload_shapes(client_id)
        try:
            tensors, meta = decode_payload(body, parse_codec(self.uplink_codec), expected)
        except Exception as exc:  # noqa: BLE001 - the fake reports any decoding problem
            return _error(422, ErrorCode.INVALID_UPLOAD, str(exc))
        if read_metadata_value(meta, "base_version") != self.version:
            return _error(409, ErrorCode.STALE_BASE, "stale base")
        num = int(read_metadata_value(meta, "num_samples") or 0)
        segments = tuple(read_metadata_value(meta, "segments").split(","))
        self.uploads.append(ReceivedUpload(client_id, round_index, set(tensors), segments,
                                           dict(meta), num, body))
        self.state.accept(client_id, tensors, num, len(body))
        receipt = UploadReceipt(round=round_index, client_id=client_id,
                                sha256=hashlib.sha256(body).hexdigest(), segments=list(segments),
                                num_samples=num, bytes=len(body), received_at=datetime.now(UTC))
        if self.state.complete:
            self._finish_round()
        if self.faults.lose_upload_response:
            self.faults.lose_upload_response -= 1
            self.faults.log.append("lost upload response")
            raise httpx.ReadError("connection reset by peer", request=request)
        return httpx.Response(200, text=receipt.model_dump_json())


def tensors_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def dump(obj) -> str:  # pragma: no cover - debugging aid
    return json.dumps(obj, indent=2, default=str)
