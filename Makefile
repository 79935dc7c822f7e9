# The README's two commands: `make demo` and `make test`. Each sets up .venv on first use.
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
RECUR   := $(VENV)/bin/recur
STAMP   := $(VENV)/.installed-stamp

.PHONY: install demo demo-loop test unit integration lint kafka-start kafka-stop clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev,bench]"
	@touch $(STAMP)

install: $(STAMP)

demo: install  ## broker, topics, model, worker, synthetic events, recommendations
	$(RECUR) demo

demo-loop: install  ## the closed loop: cold start, snapshots, retrain, live swap, hit rate up
	$(RECUR) demo --loop

test: install  ## every test, integration ones against a real local broker
	$(PY) -m pytest tests -q

unit: install
	$(PY) -m pytest tests/unit -q

integration: install
	$(PY) -m pytest tests/integration -q

lint: install  ## ruff over everything, mypy over the two packages
	$(VENV)/bin/ruff check pipeline models tests
	$(VENV)/bin/mypy -p models -p pipeline

kafka-start: install
	$(RECUR) kafka start

kafka-stop: install
	$(RECUR) kafka stop

clean:
	-$(RECUR) kafka stop
	rm -rf var .pytest_cache
