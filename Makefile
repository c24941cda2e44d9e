# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
EXTRAS := $(VENV)/.test-extras

.PHONY: install test-extras demo test lint bench clean

install: $(STAMP) $(EXTRAS)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[test]"
	touch $(STAMP)

# Loaders that tests/test_loaders.py checks our GPTQ exports against: transformers' GPTQ integration (optimum +
# GPTQModel) and GPTQModel itself. GPTQModel is installed without its dependencies (they pin GPU stacks); these
# are the pure-Python ones it imports on CPU.
test-extras: $(EXTRAS)

$(EXTRAS): $(STAMP)
	GPTQMODEL_CPU_WORKERS=2 $(PY) -m pip install --no-deps "gptqmodel==7.7.*" "optimum==2.3.0" "pypcre==0.6.4" \
		"logbar==0.4.15" "device-smi==0.5.7" "tokenicer==0.0.14" "defuser==0.0.28"
	touch $(EXTRAS)

demo: $(STAMP)
	$(PY) train.py fit --config configs/pretrain/quickstart.yaml

test: $(STAMP) $(EXTRAS)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) -m pip install -e ".[bench]"
	@for script in benchmarks/*.py; do echo "== $$script"; $(PY) $$script || exit 1; done

clean:
	rm -rf runs artifacts lightning_logs .pytest_cache
