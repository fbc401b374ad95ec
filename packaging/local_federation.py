#!/usr/bin/env python3
"""Run a whole FedDiffuse federation on this computer, every part as its own process.

    python packaging/local_federation.py [--clients 3] [--split iid] [--method usplit]
        [--rounds 2] [--local-epochs 1] [--limit 192] [--seed 0] [--out local-federation]
        [--recipe fast] [--eval-samples 0] [--replace]

What it does, with the installed commands (feddiffuse, feddiffuse-hub, feddiffuse-client):

1. `feddiffuse partition --dataset fashion-mnist --export OUT/data` writes each client's share
   of Fashion-MNIST (--limit images in all, split --split) as PNG files, one folder per client;
2. `feddiffuse-hub init OUT/hub` creates the hub (--method, --rounds, --local-epochs, the `tiny`
   preset by default), `feddiffuse-hub token create` one token per client (client-00, ...),
   and `feddiffuse-hub serve` serves it on a free loopback port;
3. one `feddiffuse-client join` process per client trains on its folder (its state
   under OUT/clients/<name>, its output in OUT/logs/<name>.log) until the federation ends;
4. the script polls `feddiffuse-hub status OUT/hub --json`, prints a line per round, and at
   the end prints the hub's status table, exports the model to sample from to
   OUT/global.safetensors (`feddiffuse-hub export`: the recipe's EMA of the global model)
   and writes a grid of samples to OUT/samples.png (`feddiffuse-client sample` with
   client-00's state: the model it fetched when the federation finished, plus its personal
   segments, if the method keeps any);
5. with --eval-samples N, `feddiffuse evaluate` scores N samples of OUT/global.safetensors
   with fd_fmnist and KID and prints them beside the real-vs-real floor.

`make demo` runs it with the settings of the README's demo. The default run (tiny preset,
3 clients x 64 images, 2 rounds of 1 local epoch) takes about a minute on two CPU cores.
Every child process is stopped when the script ends, on an error or on Ctrl-C. Fashion-MNIST
must be installed (`feddiffuse fetch-data`, or --data-dir).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
HEARTBEAT_S = 15.0  # a progress line at least this often while a round trains


def command(name: str) -> str:
    """The console script beside this Python, else the one on PATH."""
    local = BIN / name
    return str(local) if local.exists() else name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(threads: int, home: Path | None = None) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if home is not None:
        env["FEDDIFFUSE_HOME"] = str(home)
    return env


class Children:
    """The processes this script started; all of them are stopped on the way out."""

    def __init__(self) -> None:
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, args: list[str], log: Path, env: dict[str, str]
              ) -> subprocess.Popen:
        with open(log, "ab") as out:
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)
        self.procs[name] = proc
        return proc

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def run(args: list[str], env: dict[str, str], echo: bool = False) -> str:
    done = subprocess.run(args, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args[:2])} failed:\n{done.stdout}{done.stderr}")
    if echo:
        print(done.stdout, end="")
    return done.stdout


def last_token(output: str) -> str:
    return [line.strip() for line in output.splitlines() if line.startswith("fdh_")][-1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Run a FedDiffuse federation on loopback: one hub process and K client "
                    "processes over Fashion-MNIST shares written by `feddiffuse partition`.",
        epilog="Outputs: OUT/global.safetensors, OUT/samples.png, OUT/hub (the hub "
               "directory), OUT/logs (one log per process), OUT/data (the shares).")
    p.add_argument("--clients", type=int, default=3, help="number of clients K (default 3)")
    p.add_argument("--split", default="iid", help="iid, label-skew or quantity-skew")
    p.add_argument("--beta", type=float, default=0.5, help="Dirichlet beta of the skews")
    p.add_argument("--method", default="usplit", help="full, usplit, ulatdec or udec")
    p.add_argument("--preset", default="tiny", help="UNet preset (default tiny)")
    p.add_argument("--rounds", type=int, default=2, help="federated rounds (default 2)")
    p.add_argument("--local-epochs", type=int, default=1, help="local epochs (default 1)")
    p.add_argument("--limit", type=int, default=192,
                   help="Fashion-MNIST images in all, shared among the clients (default 192)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="clients' batch size (default: the recipe's)")
    p.add_argument("--lr", type=float, default=None,
                   help="clients' peak learning rate (default: the recipe's)")
    p.add_argument("--recipe", default="fast", help="training recipe: fast or paper")
    p.add_argument("--seed", type=int, default=0, help="partition and hub seed (default 0)")
    p.add_argument("--min-clients", type=int, default=None,
                   help="quorum of a round (default: all K)")
    p.add_argument("--round-timeout", type=float, default=None,
                   help="seconds before a round closes with the quorum (default: none)")
    p.add_argument("--data-dir", default=None, help="folder holding Fashion-MNIST")
    p.add_argument("--samples", type=int, default=16, help="images in the sample grid")
    p.add_argument("--sample-steps", type=int, default=20, help="DDIM steps of the samples")
    p.add_argument("--eval-samples", type=int, default=0,
                   help="score this many DDIM-50 samples of the final model with fd_fmnist "
                        "and KID (default 0: no evaluation)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--timeout", type=float, default=3600,
                   help="give up after this many seconds (default 3600)")
    p.add_argument("--out", type=Path, default=Path("local-federation"),
                   help="a new or empty output folder (default ./local-federation)")
    p.add_argument("--replace", action="store_true",
                   help="replace OUT if it holds an earlier run of this script")
    args = p.parse_args(argv)
    if args.clients < 1 or args.rounds < 1 or args.local_epochs < 1:
        p.error("--clients, --rounds and --local-epochs must be at least 1")
    if args.eval_samples < 0 or args.eval_samples == 1:
        p.error("--eval-samples must be 0 (no evaluation) or at least 2")
    if args.out.exists() and any(args.out.iterdir()):
        if not args.replace:
            p.error(f"{args.out} is not empty; give a new folder with --out (or --replace)")
        if not (args.out / "hub").is_dir() or not (args.out / "logs").is_dir():
            p.error(f"{args.out} does not hold an earlier run of this script; not replacing "
                    "it")
        shutil.rmtree(args.out)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out.resolve()
    data, hub_dir, logs = out / "data", out / "hub", out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = child_env(args.threads)
    names = [f"client-{i:02d}" for i in range(args.clients)]
    children = Children()

    def on_signal(signum, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    started = time.monotonic()
    try:
        print(f"[1/5] partitioning Fashion-MNIST ({args.limit} images, {args.split}) "
              f"among {args.clients} clients into {data}")
        part = [command("feddiffuse"), "partition", "--dataset", "fashion-mnist",
                "--clients", str(args.clients), "--split", args.split, "--beta", str(args.beta),
                "--limit", str(args.limit), "--seed", str(args.seed), "--preset", args.preset,
                "--export", str(data)]
        if args.data_dir:
            part += ["--data-dir", args.data_dir]
        run(part, env, echo=True)

        print(f"[2/5] creating the hub in {hub_dir}")
        init = [command("feddiffuse-hub"), "init", str(hub_dir), "--preset", args.preset,
                "--method", args.method, "--rounds", str(args.rounds), "--local-epochs",
                str(args.local_epochs), "--min-clients", str(args.min_clients or args.clients),
                "--seed", str(args.seed), "--recipe", args.recipe,
                "--name", "local-federation"]
        if args.batch_size is not None:
            init += ["--batch-size", str(args.batch_size)]
        if args.lr is not None:
            init += ["--lr", str(args.lr)]
        if args.round_timeout is not None:
            init += ["--round-timeout", str(args.round_timeout)]
        admin = last_token(run(init, env))
        tokens = {n: last_token(run([command("feddiffuse-hub"), "token", "create",
                                     str(hub_dir), n], env)) for n in names}
        (out / "admin-token").write_text(admin + "\n")
        (out / "admin-token").chmod(0o600)

        port = free_port()
        url = f"http://127.0.0.1:{port}"
        print(f"[3/5] serving the hub on {url} and starting {args.clients} clients")
        children.start("hub", [command("feddiffuse-hub"), "serve", str(hub_dir), "--port",
                               str(port), "--log-level", "warning"], logs / "hub.log", env)
        for n in names:
            children.start(n, [command("feddiffuse-client"), "join", "--hub", url, "--token",
                               tokens[n], "--data", str(data / n), "--device", "cpu", "--wait"],
                           logs / f"{n}.log", child_env(args.threads, out / "clients" / n))

        print(f"[4/5] training: {args.rounds} round(s) of {args.method} on {args.preset}, "
              f"recipe {args.recipe} (logs in {logs})")
        wait_until_finished(hub_dir, children, env, started + args.timeout, started)
        run([command("feddiffuse-hub"), "status", str(hub_dir)], env, echo=True)

        model = out / "global.safetensors"
        grid = out / "samples.png"
        print(f"[5/5] exporting the model and sampling {args.samples} images")
        run([command("feddiffuse-hub"), "export", str(hub_dir), str(model)], env, echo=True)
        for n in names:  # they leave on their own once the federation is finished
            try:
                children.procs[n].wait(60)
            except subprocess.TimeoutExpired:
                pass
        all_threads = os.cpu_count() or 1  # training is over: sampling may use every core
        run([command("feddiffuse-client"), "sample", "--n", str(args.samples), "--steps",
             str(args.sample_steps), "--out", str(grid), "--device", "cpu"],
            child_env(all_threads, out / "clients" / names[0]), echo=True)
        quality = None
        if args.eval_samples:
            print(f"      scoring {args.eval_samples} DDIM-50 samples of {model.name} "
                  "(feddiffuse evaluate) ...", flush=True)
            ev_args = [command("feddiffuse"), "evaluate", "--checkpoint", str(model),
                       "--dataset", "fashion-mnist", "--samples", str(args.eval_samples),
                       "--metrics", "fd_fmnist,kid", "--device", "cpu", "--json"]
            if args.data_dir:
                ev_args += ["--data-dir", args.data_dir]
            quality = json.loads(run(ev_args, child_env(all_threads)))
            (out / "evaluation.json").write_text(json.dumps(quality, indent=2) + "\n")
        version = hashlib.sha256(model.read_bytes()).hexdigest()
        print(f"\nDone in {time.monotonic() - started:.0f} s. Outputs:")
        print(f"  global model  {model} (version {version[:16]}...)")
        print(f"  samples       {grid} ({names[0]}'s model)")
        if quality is not None:
            for line in quality_lines(quality):
                print(f"  {line}")
        print(f"  hub           {hub_dir} (feddiffuse-hub status {hub_dir})")
        print(f"  logs          {logs}")
        print(f"  client data   {data}")
        return 0
    except KeyboardInterrupt:
        print("\nInterrupted: stopping the hub and the clients.", file=sys.stderr)
        return 130
    finally:
        children.stop_all()


def quality_lines(report: dict) -> list[str]:
    """`feddiffuse evaluate --json` as lines: each metric beside its real-vs-real floor."""
    lines = []
    for name, m in report["metrics"].items():
        if m.get("value") is None:
            continue
        floor = m.get("real_vs_real")
        lines.append(f"{name:<13} {m['value']:.4g} on {m.get('samples')} samples "
                     f"(real-vs-real floor {'n/a' if floor is None else f'{floor:.4g}'}; "
                     "lower is better)")
    return lines


def wait_until_finished(hub_dir: Path, children: Children, env: dict[str, str],
                        deadline: float, started: float) -> dict:
    seen: set[int] = set()
    last_beat = time.monotonic()
    while True:
        for name, proc in children.procs.items():
            if proc.poll() is not None and proc.returncode != 0:
                raise SystemExit(f"{name} stopped with exit code {proc.returncode}; see its "
                                 f"log in {hub_dir.parent / 'logs'}")
        status = json.loads(run([command("feddiffuse-hub"), "status", str(hub_dir), "--json"],
                                env))
        for h in status["history"]:
            if h["round"] not in seen:
                seen.add(h["round"])
                loss = h["mean_loss"]
                print(f"  round {h['round']} closed after {time.monotonic() - started:.0f} s: "
                      f"{len(h['reported'])}/{len(h['participants'])} reported, "
                      f"mean loss {loss if loss is None else f'{loss:.4f}'}, "
                      f"{h['bytes_in'] / 1e6:.2f} MB in, {h['bytes_out'] / 1e6:.2f} MB out",
                      flush=True)
                last_beat = time.monotonic()
        if status["federation"]["finished"]:
            return status
        now = time.monotonic()
        current = status.get("current")
        if current is not None and now - last_beat >= HEARTBEAT_S:
            last_beat = now
            print(f"  round {current['round']}/{status['federation']['rounds']} training: "
                  f"{len(current['reported'])}/{len(current['participants'])} reported "
                  f"({now - started:.0f} s)", flush=True)
        if time.monotonic() > deadline:
            raise SystemExit("timed out waiting for the federation; see the logs")
        time.sleep(2.0)


if __name__ == "__main__":
    sys.exit(main())
