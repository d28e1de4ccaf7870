# Everything bootstraps .venv on first use, with uv (from PyPI, into the venv), faster than pip.
# torch: the CPU build `torch==2.13.0+cpu` where pip is configured with a local wheel folder
# (`find-links`, as on the CI machines) that holds it, installed by uv in the same call as the
# package (one resolution, parallel downloads: 69 -> 50 s on the AVX2 EPYC, fresh uv cache);
# elsewhere pip installs $(TORCH) first and uv finds the package's range already satisfied.
# Pinning the local version `+cpu` keeps uv off PyPI's CUDA build (PyPI has no `+cpu` release).
# --compile-bytecode: uv writes no .pyc by default, and where PYTHONDONTWRITEBYTECODE is set (CI
# machines) every Ray worker would compile torch, ray and deepspeed again as it starts (+3.8 s
# each, measured). For the same reason `demo` and `test` compile t2v's own modules (an editable
# install: uv does not): 0.3 -> 0.1 s of a core in every process that imports them (compileall
# skips what is up to date; Python ignores a .pyc older than its source).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH ?= torch==2.13.0
TORCH_LOCAL ?= torch==2.13.0+cpu
UV := $(BIN)/python -m uv pip install -q --compile-bytecode --python $(BIN)/python
export RAY_AUTH_MODE ?= disabled
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DS_ACCELERATOR ?= cpu
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: demo test browser chaos lint bench venv clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q uv
	links="$${PIP_FIND_LINKS:-$$($(BIN)/python -m pip config get global.find-links 2>/dev/null)}"; \
	if $(BIN)/python -c "import torch" 2>/dev/null; then $(UV) -e '.[dev]'; \
	elif [ -n "$$links" ] && ls "$$links"/$(subst ==,-,$(TORCH_LOCAL))-*.whl >/dev/null 2>&1; \
	then $(UV) --find-links "$$links" '$(TORCH_LOCAL)' -e '.[dev]'; \
	else $(BIN)/python -m pip install -q '$(TORCH)' && $(UV) -e '.[dev]'; fi
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m compileall -q t2v jobs
	$(BIN)/t2v demo $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check t2v jobs tests cluster

# The web page's test drives a real headless browser: Debian's chromium, installed here where
# apt-get runs as root (~20 s, --no-install-recommends); elsewhere that one test skips, and says so.
test: lint browser
	$(BIN)/python -m compileall -q t2v jobs
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)

browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && { export DEBIAN_FRONTEND=noninteractive; \
	       apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 \
	       || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends \
	            chromium >/dev/null; }; }; } \
	  || echo "note: chromium is not installed, so the browser test of the web page will skip"

# Every chaos scenario (tests/chaos), the long ones too, ROUNDS times with a fresh random seed
# each; then the ledger as the table of RELIABILITY.md.
ROUNDS ?= 1
chaos: $(STAMP)
	mkdir -p runs && rm -f runs/chaos-ledger.jsonl
	for i in $$(seq $(ROUNDS)); do \
	  T2V_CHAOS_SEED=$$(od -An -N4 -tu4 /dev/urandom | tr -d ' ') \
	  T2V_CHAOS_LEDGER=$(CURDIR)/runs/chaos-ledger.jsonl \
	  $(BIN)/python -m pytest tests/chaos --chaos $(PYTEST_ARGS) || exit 1; done
	$(BIN)/python -m tests.chaos.ledger runs/chaos-ledger.jsonl

bench: $(STAMP)
	$(BIN)/python tests/benchmarks/bench_data.py $(ARGS)
	$(BIN)/python tests/benchmarks/bench_model.py
	$(BIN)/python tests/benchmarks/bench_compile.py
	$(BIN)/python tests/benchmarks/bench_train.py
	$(BIN)/python tests/benchmarks/bench_startup.py
	$(BIN)/python tests/benchmarks/bench_memory.py
	$(BIN)/python tests/benchmarks/bench_render.py
	$(BIN)/python tests/benchmarks/bench_vae_tiling.py
	$(BIN)/python tests/benchmarks/bench_sequence_parallel.py
	$(BIN)/python tests/benchmarks/bench_quality.py
	$(BIN)/python tests/benchmarks/bench_serve.py

clean:
	rm -rf $(VENV) runs .pytest_cache
