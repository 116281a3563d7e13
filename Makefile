# Two entry points for a newcomer: `make demo` and `make test`. Both create .venv by themselves.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
# The CPU build of torch: a looser requirement pulls a multi-GB CUDA build.
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.installed

.PHONY: venv lock demo test test-fast bench-model bench-infer bench-plan clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -c constraints.txt -e ".[dev,plot]"
	@touch $(STAMP)

venv: $(STAMP)

# Re-resolve the dependencies to their newest releases and record them in constraints.txt.
lock: $(STAMP)
	printf '%s\n' "$(TORCH)" > $(VENV)/torch-pin.txt
	$(BIN)/pip install -q --upgrade --upgrade-strategy eager -c $(VENV)/torch-pin.txt -e ".[dev,plot]"
	{ sed -n '1,2p' constraints.txt; $(BIN)/pip freeze --exclude-editable | grep -v -E '^(torch|longcat)=='; } > constraints.tmp
	mv constraints.tmp constraints.txt

demo: $(STAMP)
	$(BIN)/longcat demo

# Full suite. Exit code 5 (no tests collected) is an error, not a pass.
test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow" tests

# Benchmarks: `longcat bench --help`. Numbers and the commands behind them: docs/BENCHMARKS.md.
bench-model: $(STAMP)
	$(BIN)/longcat bench model

bench-infer: $(STAMP)
	$(BIN)/longcat bench infer

bench-plan: $(STAMP)
	$(BIN)/longcat bench plan

clean:
	rm -rf $(VENV) build dist src/*.egg-info
