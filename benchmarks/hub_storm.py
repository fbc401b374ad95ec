"""An upload storm: 100 clients report to a real hub at once, while manifests keep being read.

One run, about two to four minutes on two cores:

1. `feddiffuse-hub init` (paper-fmnist, method full, one round, quorum 100), 100 client
   tokens, then `feddiffuse-hub serve` on a free loopback port, in its own process;
2. 100 seeded random paper-fmnist deltas (no training), one per client;
3. idle: a prober process reads one client's manifest over and over, one request at a time,
   for a few seconds: the latency with nothing else going on;
4. the storm: 100 lightweight asyncio + httpx clients, each reading its manifest and then
   uploading its delta streamed in 64 KiB chunks (like the edge client), all at once, while
   the prober keeps reading manifests: the latency during the storm, and the upload
   throughput (all bytes / from the first request to the last receipt);
5. the round closes (every participant reported) and the hub aggregates; the hub process's
   peak RSS (VmHWM, reset just before the storm) covers the storm and the aggregation;
6. the hub is stopped, the global model is written with `feddiffuse-hub export`, and compared
   with an in-memory FedAvg of the same 100 deltas by the core (`RoundState`, clients in the
   hub's canonical order): bit for bit (`torch.equal` on every tensor), and its sha256 with
   the version the core's encoder gives the same tensors.

Every upload must be accepted exactly once: 100 receipts for 100 distinct clients, each with
the sha256 of what that client sent, and the hub's own record (admin status and database)
listing the same 100 uploads; the script exits non-zero otherwise.

Run: .venv/bin/python benchmarks/hub_storm.py [--clients 100] [--idle-seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

MANIFEST = "/api/v1/manifest"  # feddiffuse.shared.protocol.API_PREFIX + "/manifest"


# -- the prober: a separate, light process (no torch), so its timing is not the uploaders' ----

def _probe(url: str, token: str, out: str, stop_file: str, max_seconds: float) -> None:
    """Read the manifest one request at a time until `stop_file` exists or time is up;
    write [[start, seconds, status], ...] (start on the monotonic clock) to `out`."""
    import httpx

    samples = []
    deadline = time.monotonic() + max_seconds
    with httpx.Client(base_url=url, timeout=60,
                      headers={"Authorization": f"Bearer {token}"}) as client:
        client.get(MANIFEST)  # connect first: latency of a request, not of a handshake
        while time.monotonic() < deadline and not os.path.exists(stop_file):
            t0 = time.monotonic()
            status = client.get(MANIFEST).status_code
            samples.append([t0, time.monotonic() - t0, status])
            time.sleep(0.01)
    Path(out).write_text(json.dumps(samples))


def _start_probe(url: str, token: str, work: Path, name: str,
                 max_seconds: float) -> tuple[subprocess.Popen, Path, Path]:
    out, stop = work / f"{name}.json", work / f"{name}.stop"
    proc = subprocess.Popen([sys.executable, __file__, "--_probe", url, token, str(out),
                             str(stop), str(max_seconds)])
    return proc, out, stop


def _finish_probe(proc: subprocess.Popen, out: Path, stop: Path) -> list[list[float]]:
    stop.touch()
    if proc.wait(timeout=120) != 0:
        raise RuntimeError("the manifest prober failed")
    return json.loads(out.read_text())


def _percentile(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank), in milliseconds."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return 1000 * ordered[rank - 1]


# -- the storm -------------------------------------------------------------------------------------

async def _storm(url: str, bodies: dict[str, bytes], tokens: dict[str, str], chunk: int
                 ) -> tuple[float, float, dict[str, tuple[int, bytes]], list[str], int]:
    """Every client: its manifest, then its upload, all at once. Returns (start, end,
    client -> (status, response body), problems, number of 503 answers retried)."""
    import httpx

    limits = httpx.Limits(max_connections=len(bodies) + 5,
                          max_keepalive_connections=len(bodies) + 5)
    problems: list[str] = []
    busy: list[str] = []  # one entry per 503 (too many uploads in progress)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        async def one(c: str) -> tuple[int, bytes]:
            auth = {"Authorization": f"Bearer {tokens[c]}"}
            m = await client.get(MANIFEST, headers=auth)
            manifest = m.json()
            if m.status_code != 200 or manifest["phase"] != "open" or manifest["round"] != 1:
                problems.append(f"{c}: manifest {m.status_code} {m.text[:200]}")
            body = bodies[c]

            async def chunks():
                for i in range(0, len(body), chunk):
                    yield body[i:i + chunk]

            while True:  # like the edge client: a 503 is retried after its Retry-After
                r = await client.put(f"/api/v1/rounds/{manifest['round']}/update",
                                     content=chunks(),
                                     headers={**auth, "Content-Length": str(len(body))})
                if r.status_code != 503:
                    return r.status_code, r.content
                busy.append(c)
                await asyncio.sleep(float(r.headers.get("retry-after", "1")))

        async def reported(c: str) -> tuple[int, bytes]:
            try:
                return await one(c)
            except httpx.TransportError as exc:  # a reset, a cut-off connection: no answer
                problems.append(f"{c}: no answer, {type(exc).__name__} "
                                f"{time.monotonic() - t0:.2f} s into the storm: {exc!r}")
                return 0, b""

        t0 = time.monotonic()
        results = await asyncio.gather(*(reported(c) for c in bodies))
        t1 = time.monotonic()
    return t0, t1, dict(zip(bodies, results, strict=True)), problems, len(busy)


def _wait_closed(url: str, admin: str, timeout: float = 600) -> dict:
    """Poll the admin status until round 1 is in the history (closed and aggregated)."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = httpx.get(f"{url}/api/v1/admin/status", headers={"Authorization": f"Bearer {admin}"},
                      timeout=60)
        status = r.json()
        if r.status_code == 200 and status["history"]:
            return status
        time.sleep(0.2)
    raise RuntimeError("round 1 did not close")


def _how_it_ended(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


def _watch(proc: subprocess.Popen, started: float, stopping: threading.Event,
           log: Path) -> threading.Thread:
    """Say at once (on stderr) if the hub process ends before we stop it, and how."""
    def watch() -> None:
        while not stopping.is_set():
            if proc.poll() is not None:
                print(f"  HUB DIED {time.monotonic() - started:.1f} s into the run: "
                      f"{_how_it_ended(proc.returncode)} (log: {log})", file=sys.stderr,
                      flush=True)
                return
            time.sleep(0.1)

    thread = threading.Thread(target=watch, name="hub-watch", daemon=True)
    thread.start()
    return thread


def run(work: Path, clients: int, idle_seconds: float) -> bool:
    import hub_load  # beside this file: the load benchmark's helpers
    import torch
    from safetensors.torch import load_file

    from feddiffuse.hub import FederationSettings, init_hub
    from feddiffuse.hub.store import open_store
    from feddiffuse.hub.tokens import create_client_token
    from feddiffuse.hub.weights import encode_global, single_threaded_torch
    from feddiffuse.shared.model import segment_of
    from feddiffuse.shared.protocol import UploadReceipt
    from feddiffuse.shared.rounds import RoundState
    from feddiffuse.shared.wire import decode_tensors, sha256_hex

    started = time.monotonic()
    print(f"hub_storm: {clients} clients, paper-fmnist, method full; torch {torch.__version__}, "
          f"{os.cpu_count()} CPU(s), load average {os.getloadavg()[0]:.2f} at the start; "
          f"workdir {work}")

    # 1. the hub and its clients
    root = work / "hub"
    admin, version = init_hub(root, FederationSettings(
        name="storm", preset="paper-fmnist", method="full", rounds=1, local_epochs=1,
        min_clients=clients))
    store = open_store(root / "hub.sqlite3")
    try:
        tokens = {f"c{i:03d}": create_client_token(store, f"c{i:03d}") for i in range(clients)}
    finally:
        store.close()
    base = load_file(root / "blobs" / f"{version}.safetensors")
    shapes = {n: tuple(t.shape) for n, t in base.items()}

    # 2. the deltas (seeded, random: no training)
    t = time.monotonic()
    bodies = {c: hub_load.delta_body(shapes, "paper-fmnist", version, seed=i, samples=100 + i)
              for i, c in enumerate(tokens)}
    total = sum(len(b) for b in bodies.values())
    print(f"  {clients} deltas of {len(bodies['c000']) / 1e6:.2f} MB ({total / 1e6:.0f} MB in "
          f"all) made in {time.monotonic() - t:.1f} s")

    port = hub_load._free_port()
    url = f"http://127.0.0.1:{port}"
    log = work / "hub.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([hub_load.HUB_EXE, "serve", str(root), "--port", str(port),
                                 "--log-level", "warning"], stdout=out, stderr=subprocess.STDOUT)
    stopping = threading.Event()
    _watch(proc, started, stopping, log)
    try:
        hub_load._wait_http(f"{url}/api/v1/health", proc)

        # 3. idle latency
        probe, p_out, p_stop = _start_probe(url, tokens["c000"], work, "idle", idle_seconds)
        time.sleep(idle_seconds)
        idle = [s for s in _finish_probe(probe, p_out, p_stop) if s[2] == 200]
        rss_idle = hub_load._proc_kb(proc.pid, "VmRSS")

        # 4. the storm, with the prober running through it
        hub_load._reset_peak(proc.pid)
        probe, p_out, p_stop = _start_probe(url, tokens["c000"], work, "storm", 900)
        time.sleep(1.0)  # the prober is up and connected before the first upload
        t0, t1, results, problems, retried = asyncio.run(
            _storm(url, bodies, tokens, hub_load.CHUNK))
        storm_all = _finish_probe(probe, p_out, p_stop)
        storm = [s for s in storm_all if t0 <= s[0] and s[0] + s[1] <= t1]
        probe_errors = [s for s in storm_all if s[2] != 200]
        unanswered = [p for p in problems if ": no answer" in p]
        if unanswered:  # the round cannot close: say so now rather than wait for it
            for p in unanswered[:10]:
                print(f"  PROBLEM: {p}")
            alive = ("still serving" if proc.poll() is None
                     else _how_it_ended(proc.returncode))
            raise SystemExit(f"FAILED: {len(unanswered)} upload(s) got no answer; the hub "
                             f"process is {alive} (hub log: {log})")

        # 5. the round closes and is aggregated; the hub's peak memory
        status = _wait_closed(url, admin)
        aggregated_at = time.monotonic()
        rss_peak = hub_load._proc_kb(proc.pid, "VmHWM")
    finally:
        stopping.set()
        if proc.poll() is not None:
            print(f"  the hub had ended on its own: {_how_it_ended(proc.returncode)}",
                  file=sys.stderr)
        else:
            hub_load._stop(proc)

    # Every upload accepted exactly once, by the receipts and by the hub's records.
    receipts = {}
    for c, (code, content) in results.items():
        if code != 200:
            problems.append(f"{c}: upload {code} {content[:200]!r}")
            continue
        receipt = UploadReceipt.model_validate_json(content)
        receipts[c] = receipt
        if receipt.client_id != c or receipt.sha256 != sha256_hex(bodies[c]) or receipt.round != 1:
            problems.append(f"{c}: receipt {receipt}")
    summary = status["history"][0]
    store = open_store(root / "hub.sqlite3")
    try:
        rows = store.uploads(1)
        row1 = store.round(1)
    finally:
        store.close()
    recorded = {u.client: u.sha256 for u in rows}
    exactly_once = (len(receipts) == clients and len(rows) == clients
                    and recorded == {c: sha256_hex(b) for c, b in bodies.items()}
                    and sorted(summary["reported"]) == sorted(tokens)
                    and summary["missing"] == [] and status["federation"]["finished"])

    # 6. the exported global vs the core's in-memory FedAvg of the same deltas
    exported = work / "global.safetensors"
    res = subprocess.run([hub_load.HUB_EXE, "export", str(root), str(exported)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"feddiffuse-hub export failed: {res.stderr}")
    t = time.monotonic()
    with single_threaded_torch():  # as the hub aggregates: like for like
        state = RoundState.open("full", 1, sorted(tokens), base,
                                {n: segment_of(n) for n in base}, seed=0)
        for c in sorted(bodies):
            deltas, meta = decode_tensors(bodies[c], shapes)
            state.accept(c, deltas, int(meta["feddiffuse.num_samples"]), len(bodies[c]))
        expected = state.finalize().global_state
    fedavg_s = time.monotonic() - t
    got = load_file(exported)
    bit_equal = set(got) == set(expected) and all(torch.equal(got[n], expected[n])
                                                  for n in expected)
    max_diff = max(float((got[n] - expected[n]).abs().max()) for n in expected)
    expected_version = sha256_hex(encode_global(expected, "paper-fmnist", 2))
    exported_version = sha256_hex(exported.read_bytes())

    # The table
    seconds = t1 - t0
    idle_lat = [s[1] for s in idle]
    storm_lat = [s[1] for s in storm]
    i50, i99 = _percentile(idle_lat, 50), _percentile(idle_lat, 99)
    s50, s99 = _percentile(storm_lat, 50), _percentile(storm_lat, 99)
    rows_out = [
        ("uploads accepted (receipts)", f"{len(receipts)}/{clients}"),
        ("uploads recorded by the hub (db, admin status)",
         f"{len(rows)} distinct clients, {len(summary['reported'])} reported, "
         f"{len(summary['missing'])} missing"),
        ("every upload accepted exactly once", str(exactly_once)),
        ("storm wall time (first manifest to last receipt)", f"{seconds:.2f} s"),
        ("upload throughput", f"{total / 1e6 / seconds:.1f} MB/s ({total / 1e6:.0f} MB)"),
        ("uploads answered 503 and retried (Retry-After)", str(retried)),
        ("aggregation (closing to closed, in the hub)",
         f"{row1.closed_at - row1.closing_at:.2f} s"),
        ("hub RSS idle / peak over storm + aggregation",
         f"{hub_load._mb(rss_idle):.0f} MiB / {hub_load._mb(rss_peak):.0f} MiB"),
        ("manifest latency idle   p50 / p99",
         f"{i50:.1f} ms / {i99:.1f} ms  (n={len(idle_lat)})"),
        ("manifest latency storm  p50 / p99",
         f"{s50:.1f} ms / {s99:.1f} ms  (n={len(storm_lat)}, {len(probe_errors)} errors)"),
        ("storm / idle latency    p50 / p99", f"{s50 / i50:.1f}x / {s99 / i99:.1f}x"),
        ("storm p99 within the 50 ms target", f"{s99 <= 50.0} ({s99:.1f} ms)"),
        ("export == in-memory FedAvg, bit for bit", f"{bit_equal} (max |diff| {max_diff:.3g})"),
        ("exported sha256 == the core's version of it", str(exported_version == expected_version)),
    ]
    width = max(len(k) for k, _ in rows_out)
    print()
    print(f"  {'measure':<{width}}  value")
    print(f"  {'-' * width}  {'-' * 44}")
    for k, v in rows_out:
        print(f"  {k:<{width}}  {v}")
    print()
    print(f"  (in-memory FedAvg of the same deltas here: {fedavg_s:.2f} s; round closed "
          f"{aggregated_at - t1:.1f} s after the last receipt; load average "
          f"{os.getloadavg()[0]:.2f} at the end; run took {time.monotonic() - started:.0f} s)")
    for p in problems[:10]:
        print(f"  PROBLEM: {p}")
    ok = (exactly_once and not problems and bit_equal and exported_version == expected_version
          and not probe_errors)
    if not ok:
        print(f"FAILED (hub log: {log})")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--idle-seconds", type=float, default=5.0)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep everything here (default: a temporary folder, removed)")
    parser.add_argument("--_probe", dest="probe", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        url, token, out, stop, max_seconds = args.probe
        _probe(url, token, out, stop, float(max_seconds))
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="hub-storm-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        ok = run(work, args.clients, args.idle_seconds)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
