# Everything the project needs is installed into .venv by these targets; nothing by hand.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-fast bench clean

venv: $(STAMP)

# torch first, pinned: its CPU wheel is on this disk, and any other spelling pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null || { echo "need $(PY)"; exit 1; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[convert,test]'
	touch $(STAMP)

# Main job on the embedded default: sqlite registry + local artifacts, no servers.
demo: venv
	$(BIN)/python scripts/demo.py

test: venv
	$(BIN)/python -m pytest tests -q -p no:cacheprovider

bench: venv
	$(BIN)/python scripts/bench_fetch.py
	$(BIN)/python scripts/bench_coldstart.py
	$(BIN)/python scripts/bench_convert.py
	$(BIN)/python scripts/bench_memory.py
	$(BIN)/python scripts/bench_multiplex.py
	$(BIN)/python scripts/bench_peers.py

clean:
	rm -rf $(VENV) build *.egg-info
