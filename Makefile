# kiln: `make run` sets everything up and runs the pipeline; `make test` sets up and runs the tests.
VENV := .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
FASHION_MNIST := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup dataset browser run flow deploy test lint

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

# Debian ships Fashion-MNIST; without it, prepare falls back to torchvision's download.
dataset:
	@[ -e $(FASHION_MNIST)/train-images-idx3-ubyte.gz ] || { $(SUDO) apt-get update -qq && \
	  $(SUDO) apt-get install -y -qq dataset-fashion-mnist; } || \
	  echo "warning: could not install dataset-fashion-mnist; prepare will try to download Fashion-MNIST"

# Debian's Chromium for the MLflow UI test (tests/test_mlflow_ui.py drives it with Playwright; no browser download).
# Without it that test would skip, so a failed install fails `make test`.
browser:
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

run: setup dataset
	dvc repro
	dvc metrics show

flow: setup dataset
	python -m flows.pipeline

test: setup dataset browser
	pytest

lint: setup
	ruff check .
