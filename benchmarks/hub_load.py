"""The hub under load: aggregation memory, concurrent uploads, upload memory vs body size.

Three measurements, each against a baseline taken in the same run:

1. aggregation peak memory for K = 10 and K = 100 paper-fmnist uploads (method full), in a
   fresh process that opens the hub and redoes the round from its stored uploads; the
   baseline is a naive aggregation that loads every upload first. Peak RSS above the
   process's RSS before aggregating (Linux /proc: VmHWM after resetting it via clear_refs).
2. 50 clients uploading paper-fmnist deltas at once over loopback to `feddiffuse-hub serve`
   (httpx, streamed in 64 KiB chunks like the edge client): all must be accepted, the
   published model must equal an in-memory FedAvg of the same deltas bit for bit; reported in
   MB/s against the same 50 bodies sent to a bare uvicorn app that only drains them.
3. upload handling memory vs body size: the serve process's peak RSS growth while it takes
   one upload of the tiny (4 MB), paper-fmnist (12 MB) and paper-celeba (60 MB) presets.

Run: .venv/bin/python benchmarks/hub_load.py [--only aggregate|uploads|memory] [--clients 50]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from feddiffuse.hub import FederationSettings, Hub, init_hub
from feddiffuse.hub.store import open_store
from feddiffuse.hub.tokens import create_client_token
from feddiffuse.hub.uploads import UploadReceiver
from feddiffuse.hub.weights import encode_global, single_threaded_torch
from feddiffuse.shared.model import segment_of
from feddiffuse.shared.protocol import API_PREFIX
from feddiffuse.shared.rounds import RoundState
from feddiffuse.shared.wire import decode_tensors, encode_tensors, sha256_hex

HUB_EXE = shutil.which("feddiffuse-hub") or str(Path(sys.prefix) / "bin" / "feddiffuse-hub")
CHUNK = 1 << 16


# -- memory, from /proc ------------------------------------------------------------------------

def _proc_kb(pid: int | str, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak(pid: int | str) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS


def _mb(kb: int) -> float:
    return kb / 1024


# -- building hubs and deltas ------------------------------------------------------------------

def make_hub(root: Path, preset: str, clients: int, method: str = "full") -> dict[str, str]:
    init_hub(root, FederationSettings(name=root.name, preset=preset, method=method, rounds=1,
                                      local_epochs=1))
    store = open_store(root / "hub.sqlite3")
    try:
        return {f"c{i:03d}": create_client_token(store, f"c{i:03d}") for i in range(clients)}
    finally:
        store.close()


def delta_body(shapes: dict[str, tuple[int, ...]], preset: str, version: str, seed: int,
               samples: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    deltas = {n: torch.randn(s, generator=g) * 1e-3 for n, s in shapes.items()}
    return encode_tensors(deltas, {"kind": "delta", "preset": preset, "round": 1,
                                   "base_version": version, "num_samples": samples,
                                   "segments": "encoder,bottleneck,decoder",
                                   "mean_loss": 0.1})


def fill_round(root: Path, tokens: dict[str, str]) -> int:
    """Accept one upload per client through the hub's own upload path (no HTTP, no closing)."""
    total = 0
    with Hub.open(root, serve=True) as hub:  # opens round 1
        version = hub.store.federation().current_version
        for i, client in enumerate(tokens):
            body = delta_body(hub.layout.shapes, hub.settings.preset, version, i, 100 + i)
            ticket = hub.prepare_upload(client, 1)
            receiver = UploadReceiver(ticket, hub.blobs, hub.layout)
            for start in range(0, len(body), 1 << 20):
                receiver.feed(body[start:start + (1 << 20)])
            hub.commit_upload(ticket, receiver.finish())
            total += len(body)
    return total


# -- 1. aggregation memory ---------------------------------------------------------------------

def _child_aggregate(root: str, naive: bool) -> None:
    """In a fresh process: peak memory of redoing round 1 from its stored uploads."""
    from safetensors.torch import load_file

    store = open_store(Path(root) / "hub.sqlite3")
    uploads = store.uploads(1)
    version = store.federation().current_version
    store.close()
    torch.set_num_threads(1)  # as the hub does while aggregating: a like-for-like baseline
    rss0 = _proc_kb("self", "VmRSS")
    _reset_peak("self")
    t0 = time.perf_counter()
    if naive:  # the baseline: every upload in memory, then averaged
        base = load_file(Path(root) / "blobs" / f"{version}.safetensors")
        loaded = [load_file(Path(root) / "blobs" / f"{u.sha256}.safetensors") for u in uploads]
        total = sum(u.num_samples for u in uploads)
        out = {n: base[n] + sum(d[n] * u.num_samples for d, u in zip(loaded, uploads,
                                                                      strict=True)) / total
               for n in base}
        del out, loaded
    else:
        Hub.open(root, serve=True).close()  # start-up redoes the round: the hub's own path
    seconds = time.perf_counter() - t0
    print(json.dumps({"rss0_kb": rss0, "hwm_kb": _proc_kb("self", "VmHWM"),
                      "seconds": seconds}))


def _run_child(*args: str) -> dict:
    res = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                         check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def bench_aggregation(work: Path, ks: list[int]) -> None:
    print(f"\n== 1. Aggregation memory, paper-fmnist, method full (K = {ks}) ==")
    rows = []
    for k in ks:
        root = work / f"agg-{k}"
        tokens = make_hub(root, "paper-fmnist", k)
        t0 = time.perf_counter()
        total = fill_round(root, tokens)
        fill_s = time.perf_counter() - t0
        shutil.copytree(root, work / f"agg-{k}-naive")
        hub = _run_child("--_aggregate", str(root))
        naive = _run_child("--_aggregate", str(work / f"agg-{k}-naive"), "--_naive")
        store = open_store(root / "hub.sqlite3")
        assert store.round(1).status == "closed"
        store.close()
        rows.append((k, total, hub, naive))
        print(f"  K={k:>3}: {total / 1e6:8.1f} MB of uploads stored in {fill_s:5.1f} s "
              f"(validated and fsynced, {total / 1e6 / fill_s:6.1f} MB/s)")
        shutil.rmtree(work / f"agg-{k}-naive")
    model_mb = 2_996_315 * 4 / 2**20
    print(f"  model: {model_mb:.1f} MiB of fp32 parameters; an upload (full) is the same size")
    print(f"  {'K':>5}  {'hub peak above start':>21}  {'in models':>9}  {'time':>7}   "
          f"{'naive load-all peak':>20}  {'time':>7}")
    for k, _total, hub, naive in rows:
        hp = _mb(hub["hwm_kb"] - hub["rss0_kb"])
        npk = _mb(naive["hwm_kb"] - naive["rss0_kb"])
        print(f"  {k:>5}  {hp:>17.1f} MiB  {hp / model_mb:>9.1f}  {hub['seconds']:>6.2f}s   "
              f"{npk:>16.1f} MiB  {naive['seconds']:>6.2f}s")
    if len(rows) >= 2:
        (k1, _, h1, n1), (k2, _, h2, n2) = rows[0], rows[-1]
        ratio = (h2["hwm_kb"] - h2["rss0_kb"]) / (h1["hwm_kb"] - h1["rss0_kb"])
        nratio = (n2["hwm_kb"] - n2["rss0_kb"]) / (n1["hwm_kb"] - n1["rss0_kb"])
        print(f"  peak ratio K={k2} / K={k1}: hub {ratio:.2f}x, naive {nratio:.2f}x "
              f"(K grew {k2 / k1:.0f}x)")


# -- 2. concurrent uploads over loopback ---------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            httpx.get(url, timeout=2)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError("server did not start")


def _start_hub(root: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([HUB_EXE, "serve", str(root), "--port", str(port),
                             "--log-level", "warning"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    _wait_http(f"http://127.0.0.1:{port}{API_PREFIX}/health", proc)
    return proc


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


async def _upload_all(url: str, bodies: dict[str, bytes], tokens: dict[str, str]
                      ) -> tuple[float, list[int]]:
    limits = httpx.Limits(max_connections=len(bodies) + 5,
                          max_keepalive_connections=len(bodies) + 5)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        async def one(c: str) -> int:
            body = bodies[c]

            async def chunks():
                for i in range(0, len(body), CHUNK):
                    yield body[i:i + CHUNK]

            r = await client.put(f"{API_PREFIX}/rounds/1/update", content=chunks(),
                                 headers={"Authorization": f"Bearer {tokens[c]}",
                                          "Content-Length": str(len(body))})
            return r.status_code

        t0 = time.perf_counter()
        statuses = await asyncio.gather(*(one(c) for c in bodies))
        return time.perf_counter() - t0, list(statuses)


def _chunks(body: bytes):
    for i in range(0, len(body), CHUNK):
        yield body[i:i + CHUNK]


def _sink_app():
    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        n, more = 0, True
        while more:
            message = await receive()
            n += len(message.get("body", b""))
            more = message.get("more_body", False)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b'{"bytes": %d}' % n})

    return app


def bench_uploads(work: Path, clients: int) -> None:
    print(f"\n== 2. {clients} concurrent paper-fmnist uploads over loopback ==")
    root = work / "uploads"
    tokens = make_hub(root, "paper-fmnist", clients)
    port = _free_port()
    proc = _start_hub(root, port)
    try:
        store = open_store(root / "hub.sqlite3")
        version = store.federation().current_version
        store.close()
        from safetensors.torch import load_file

        base = load_file(root / "blobs" / f"{version}.safetensors")
        shapes = {n: tuple(t.shape) for n, t in base.items()}
        bodies = {c: delta_body(shapes, "paper-fmnist", version, i, 100 + i)
                  for i, c in enumerate(tokens)}
        total = sum(len(b) for b in bodies.values())
        print(f"  {clients} bodies of {len(next(iter(bodies.values()))) / 1e6:.2f} MB, "
              f"{total / 1e6:.0f} MB in all")
        seconds, statuses = asyncio.run(_upload_all(f"http://127.0.0.1:{port}", bodies,
                                                    tokens))
        accepted = statuses.count(200)
        t_close = time.perf_counter()
        while True:
            store = open_store(root / "hub.sqlite3")
            row = store.round(1)
            store.close()
            if row.status == "closed":
                break
            if time.perf_counter() - t_close > 300:
                raise RuntimeError("the round did not close")
            time.sleep(0.1)
        aggregation_s = row.closed_at - row.closing_at
    finally:
        _stop(proc)

    # The same uploads, FedAvg'd in memory by the shared core (sorted by client id).
    t0 = time.perf_counter()
    with single_threaded_torch():  # as the hub aggregates: like for like
        state = RoundState.open("full", 1, list(tokens), base,
                                {n: segment_of(n) for n in base}, seed=0)
        for c in sorted(bodies):
            deltas, meta = decode_tensors(bodies[c], shapes)
            state.accept(c, deltas, int(meta["feddiffuse.num_samples"]), len(bodies[c]))
        expected = state.finalize().global_state
    memory_s = time.perf_counter() - t0
    expected_version = sha256_hex(encode_global(expected, "paper-fmnist", 2))
    published = load_file(root / "blobs" / f"{row.result_version}.safetensors")
    equal = all(torch.equal(published[n], expected[n]) for n in expected)

    # Baseline: the same bodies, same client, to a bare uvicorn app that drains them.
    sink_port = _free_port()
    sink = subprocess.Popen([sys.executable, __file__, "--_sink", str(sink_port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_http(f"http://127.0.0.1:{sink_port}/", sink)
        sink_s, sink_statuses = asyncio.run(_upload_all(f"http://127.0.0.1:{sink_port}",
                                                        bodies, tokens))
    finally:
        _stop(sink)
    assert sink_statuses.count(200) == clients

    hub_mbs, sink_mbs = total / 1e6 / seconds, total / 1e6 / sink_s
    print(f"  accepted: {accepted}/{clients} (statuses {sorted(set(statuses))})")
    print(f"  hub:      {seconds:6.2f} s  {hub_mbs:7.1f} MB/s  (stream to disk, sha256, "
          f"header + finiteness checks, fsync, one transaction each)")
    print(f"  baseline: {sink_s:6.2f} s  {sink_mbs:7.1f} MB/s  (bare uvicorn app draining "
          f"the same bodies)")
    print(f"  hub / baseline throughput: {hub_mbs / sink_mbs:.2f}x")
    print(f"  aggregation of {clients} uploads in the hub: {aggregation_s:.2f} s (reading "
          f"each from disk); in-memory FedAvg of the same bodies here: {memory_s:.2f} s")
    print(f"  published model equals the in-memory FedAvg bit for bit: {equal}; "
          f"version matches: {row.result_version == expected_version}")
    if accepted != clients or not equal or row.result_version != expected_version:
        raise SystemExit("FAILED: not every upload was accepted or the result differs")


# -- 3. upload memory vs body size --------------------------------------------------------------

def bench_upload_memory(work: Path) -> None:
    print("\n== 3. Upload handling memory vs body size (serve process, method full) ==")
    print(f"  {'preset':<13} {'body':>9}  {'server peak RSS growth':>22}  {'of the body':>11}")
    for preset in ("tiny", "paper-fmnist", "paper-celeba"):
        root = work / f"mem-{preset}"
        tokens = make_hub(root, preset, 2)  # two clients: one upload does not close the round
        port = _free_port()
        proc = _start_hub(root, port)
        try:
            url = f"http://127.0.0.1:{port}"
            store = open_store(root / "hub.sqlite3")
            version = store.federation().current_version
            store.close()
            from safetensors.torch import load_file

            shapes = {n: tuple(t.shape) for n, t in
                      load_file(root / "blobs" / f"{version}.safetensors").items()}
            body = delta_body(shapes, preset, version, 1, 10)
            auth = {"Authorization": f"Bearer {tokens['c000']}"}
            # Warm up the request path with a refused upload (a stale base).
            stale = delta_body({n: shapes[n] for n in list(shapes)[:1]}, preset, "0" * 64, 2, 1)
            httpx.put(f"{url}{API_PREFIX}/rounds/1/update", content=stale, headers=auth)
            time.sleep(0.2)
            rss0 = _proc_kb(proc.pid, "VmRSS")
            _reset_peak(proc.pid)

            r = httpx.put(f"{url}{API_PREFIX}/rounds/1/update", content=_chunks(body),
                          headers=auth, timeout=120)
            assert r.status_code == 200, r.text
            growth = _mb(_proc_kb(proc.pid, "VmHWM") - rss0)
        finally:
            _stop(proc)
        print(f"  {preset:<13} {len(body) / 1e6:>6.1f} MB  {growth:>18.1f} MiB  "
              f"{growth * 2**20 / len(body):>10.1%}")
        shutil.rmtree(root)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["aggregate", "uploads", "memory"])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--ks", default="10,100", help="K values for the aggregation memory")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--_aggregate", dest="child_aggregate", help=argparse.SUPPRESS)
    parser.add_argument("--_naive", dest="child_naive", action="store_true",
                        help=argparse.SUPPRESS)
    parser.add_argument("--_sink", dest="child_sink", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_aggregate:
        _child_aggregate(args.child_aggregate, args.child_naive)
        return
    if args.child_sink:
        import uvicorn

        uvicorn.run(_sink_app(), host="127.0.0.1", port=args.child_sink, log_level="warning",
                    lifespan="off")
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="hub-load-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"hub_load: torch {torch.__version__}, {os.cpu_count()} CPU(s), workdir {work}")
    started = time.perf_counter()
    try:
        if args.only in (None, "aggregate"):
            bench_aggregation(work, [int(k) for k in args.ks.split(",")])
        if args.only in (None, "uploads"):
            bench_uploads(work, args.clients)
        if args.only in (None, "memory"):
            bench_upload_memory(work)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\ndone in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
