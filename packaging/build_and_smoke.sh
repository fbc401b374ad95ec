#!/usr/bin/env bash
# Build the three wheels (feddiffuse-core, feddiffuse-hub, feddiffuse-client) and install them
# into fresh virtual environments as a smoke test:
#
#   client venv: torch + core + client wheels; `feddiffuse-client` works, no web server in it
#   hub venv:    torch + core + hub wheels;    `feddiffuse-hub` works, no Textual in it
#   then a tiny federation on loopback: hub init/token/serve, one client round, a sample grid.
#
# Usage: packaging/build_and_smoke.sh [WORK_DIR]      (default: a new temporary folder)
# Env:   PYTHON (default python3), KEEP=1 keeps WORK_DIR, SKIP_E2E=1 skips the round.
# torch and torchvision come from pip's local disk here (torch==2.14.1, torchvision==0.29.1);
# each venv takes about a minute and 5.5 GB.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
WORK="${1:-$(mktemp -d -t feddiffuse-smoke.XXXXXX)}"
TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)
HUB_PID=""

say() { printf '\n== %s\n' "$*"; }
cleanup() {
    if [[ -n "$HUB_PID" ]]; then kill "$HUB_PID" 2>/dev/null || true; wait "$HUB_PID" 2>/dev/null || true; fi
    if [[ "${KEEP:-0}" != 1 ]]; then rm -rf "$WORK"; else echo "kept $WORK"; fi
}
trap cleanup EXIT
mkdir -p "$WORK"

say "copying the sources to $WORK/src (the build leaves the checkout untouched)"
mkdir -p "$WORK/src"
for dist in shared hub edge_client; do
    mkdir -p "$WORK/src/$dist"
    (cd "$ROOT/$dist" && tar --exclude='*.egg-info' --exclude=build --exclude=dist \
        --exclude=__pycache__ -cf - .) | (cd "$WORK/src/$dist" && tar -xf -)
done

say "building the wheels"
"$PYTHON" -m venv "$WORK/build-venv"
"$WORK/build-venv/bin/python" -m pip install --quiet build
for dist in shared hub edge_client; do
    "$WORK/build-venv/bin/python" -m build --wheel --outdir "$WORK/dist" "$WORK/src/$dist" \
        > "$WORK/build-$dist.log" 2>&1 || { cat "$WORK/build-$dist.log"; exit 1; }
done
ls -l "$WORK/dist"
CORE_WHL=$(ls "$WORK/dist"/feddiffuse_core-*.whl)
HUB_WHL=$(ls "$WORK/dist"/feddiffuse_hub-*.whl)
CLIENT_WHL=$(ls "$WORK/dist"/feddiffuse_client-*.whl)
"$PYTHON" - "$CLIENT_WHL" <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
assert not any(n.startswith("feddiffuse/__init__") for n in names), "namespace must stay PEP 420"
styles = [n for n in names if n.endswith(".tcss")]
assert len(styles) >= 4, f"the client wheel lacks its .tcss styles: {styles}"
print(f"client wheel: {len(names)} files, {len(styles)} style sheets")
PY

install() {  # install VENV WHEEL...
    local venv="$1"; shift
    "$PYTHON" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet "${TORCH_PINS[@]}" "$@"
}

say "client venv: core + client wheels"
install "$WORK/client-venv" "$CORE_WHL" "$CLIENT_WHL"
C="$WORK/client-venv/bin"
"$C/feddiffuse-client" --help > /dev/null
"$C/feddiffuse-client" version
"$C/feddiffuse" --help > /dev/null
if "$C/python" -c "import fastapi" 2>/dev/null || "$C/python" -c "import uvicorn" 2>/dev/null; then
    echo "error: the client venv holds the web server"; exit 1
fi
"$C/python" -c "import feddiffuse, textual; assert getattr(feddiffuse, '__file__', None) is None"

say "hub venv: core + hub wheels"
install "$WORK/hub-venv" "$CORE_WHL" "$HUB_WHL"
H="$WORK/hub-venv/bin"
"$H/feddiffuse-hub" --help > /dev/null
"$H/feddiffuse-hub" version
if "$H/python" -c "import textual" 2>/dev/null; then
    echo "error: the hub venv holds Textual"; exit 1
fi

if [[ "${SKIP_E2E:-0}" == 1 ]]; then say "done (round skipped)"; exit 0; fi

say "one round on loopback: hub serve + client join --once + client sample"
export OMP_NUM_THREADS=1
PORT=$("$C/python" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])")
"$H/feddiffuse-hub" init "$WORK/hub" --preset tiny --method udec --rounds 1 --local-epochs 1 \
    --batch-size 8 --name smoke > "$WORK/admin-token"
TOKEN=$("$H/feddiffuse-hub" token create "$WORK/hub" alice)
"$H/feddiffuse-hub" serve "$WORK/hub" --port "$PORT" --log-level warning > "$WORK/hub.log" 2>&1 &
HUB_PID=$!
for _ in $(seq 1 120); do
    "$C/python" -c "import httpx,sys; sys.exit(httpx.get('http://127.0.0.1:$PORT/api/v1/health').status_code != 200)" 2>/dev/null && break
    sleep 0.5
done
"$C/python" - "$WORK/images" <<'PY'
import sys
from pathlib import Path
import numpy as np
from PIL import Image
folder = Path(sys.argv[1]); folder.mkdir(parents=True)
rng = np.random.default_rng(0)
for i in range(16):
    Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(folder / f"{i}.png")
PY
export FEDDIFFUSE_HOME="$WORK/client-home"
"$C/feddiffuse-client" join --hub "http://127.0.0.1:$PORT" --token "$TOKEN" \
    --data "$WORK/images" --device cpu --once
"$C/feddiffuse-client" status
"$C/feddiffuse-client" sample --n 4 --steps 2 --out "$WORK/grid.png" --device cpu
test -s "$WORK/grid.png"
say "smoke test passed"
