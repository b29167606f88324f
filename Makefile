# Everything the project needs is installed into .venv by these targets; nothing by hand.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv bytecode demo test test-fast bench clean

venv: $(STAMP)

# torch first, pinned: its CPU wheel is on this disk, and any other spelling pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null || { echo "need $(PY)"; exit 1; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[convert,test]'
	touch $(STAMP)

# Our modules as bytecode, as an installed wheel has them: the editable install compiles nothing, and where
# PYTHONDONTWRITEBYTECODE is set every CLI process compiled them again (30 ms of CPU per `prefetch warm` hit).
# A module edited since is recompiled in memory (Python checks each .pyc against its source), never run stale.
bytecode: venv
	$(BIN)/python -m compileall -q prefetch serving

# Main job on the embedded default: sqlite registry + local artifacts, no servers.
demo: bytecode
	$(BIN)/python scripts/demo.py

test: bytecode
	$(BIN)/python -m pytest tests -q -p no:cacheprovider

bench: bytecode
	$(BIN)/python scripts/bench_fetch.py
	$(BIN)/python scripts/bench_coldstart.py
	$(BIN)/python scripts/bench_convert.py
	$(BIN)/python scripts/bench_memory.py
	$(BIN)/python scripts/bench_multiplex.py
	$(BIN)/python scripts/bench_peers.py

clean:
	rm -rf $(VENV) build *.egg-info
	find prefetch serving -name __pycache__ -prune -exec rm -rf {} +
