# The two commands of the README: `make demo` and `make test`. Both prepare .venv first.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo demo-generate demo-detect demo-fold demo-transcribe test test-fast lint bench
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh

demo: setup
	$(VENV)/bin/layerwise demo

demo-generate: setup
	$(VENV)/bin/layerwise demo --task generate

demo-detect: setup
	$(VENV)/bin/layerwise demo --task detect

demo-fold: setup
	$(VENV)/bin/layerwise demo --task fold

demo-transcribe: setup
	$(VENV)/bin/layerwise demo --task transcribe

# One pytest-xdist worker per core; a test file stays in one worker, so its module fixtures are built once.
test: setup
	$(PY) -m pytest -q -n auto --dist loadfile

test-fast: setup
	$(PY) -m pytest -q -n auto --dist loadfile -m "not slow"

lint: setup
	$(VENV)/bin/ruff check layerwise tests benchmarks

bench: setup
	$(PY) benchmarks/loop_overhead.py
	$(PY) benchmarks/decode.py
	$(PY) benchmarks/checkpoint_cost.py
	$(PY) benchmarks/explain_speed.py
	$(PY) benchmarks/generate.py
	$(PY) benchmarks/serve_load.py
	$(PY) benchmarks/shift.py
	$(PY) benchmarks/detect.py
	$(PY) benchmarks/fold.py
	$(PY) benchmarks/transcribe.py
	$(PY) benchmarks/startup.py
