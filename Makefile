# The two commands of the README: `make demo` and `make test` (plus `make bench`).
# Each creates .venv on first use; stamp files re-install only when pyproject.toml (or constraints.txt) changes.
# constraints.txt, when present, pins every package to the versions the project was tested with
# (`make CONSTRAINTS=` installs unpinned); where it cannot resolve (another Python or platform) the
# install falls back to unpinned with a warning, so `make` still works there.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONSTRAINTS ?= $(wildcard constraints.txt)
PIP_CONSTRAINTS := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))

.PHONY: demo test bench bench-gpu lint clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip >/dev/null
	$(BIN)/pip install $(PIP_CONSTRAINTS) -e '.[dev]' || { test -n "$(CONSTRAINTS)" && \
		echo "make: $(CONSTRAINTS) does not resolve here (another Python or platform?); installing unpinned" >&2 && \
		$(BIN)/pip install -e '.[dev]'; }
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m genart_lightning.demo

# pytest-xdist: the suite's processes run one torch thread each (tests/conftest.py), so workers fill the cores;
# a test file stays in one worker (tests/conftest.py; loadgroup needs pytest < 9.2). --durations: where the minutes went. Tests that fork the
# pytest process for DDP (marker ddp_fork) run afterwards without xdist: a forked xdist worker hung once.
TEST_WORKERS ?= 3

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --durations=25 -m "not ddp_fork"
	$(BIN)/python -m pytest -q -m ddp_fork

bench: $(STAMP)
	$(BIN)/pip install -q $(PIP_CONSTRAINTS) -r benchmarks/requirements.txt
	$(BIN)/python -m benchmarks.run_all

bench-gpu: $(STAMP)
	$(BIN)/pip install -q $(PIP_CONSTRAINTS) -r benchmarks/requirements.txt
	$(BIN)/python -m benchmarks.bench_gpu

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs demo_out
