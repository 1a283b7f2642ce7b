# kiln: `make run` sets everything up and runs the pipeline; `make test` sets up and runs the tests.
VENV := .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
FASHION_MNIST := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup dataset data postgres browser run flow test lint constraints

# uv installs exactly what pip would (the same constraints, from the package sources pip is configured with, every
# index weighed alike as pip does), faster (docs/ci.md). It compiles bytecode as pip does: where
# PYTHONDONTWRITEBYTECODE is set, nothing else does, and every process would compile torch, Ray and MLflow anew.
PIP_SOURCE = $(shell python3 -m pip config get global.$(1) 2>/dev/null)
UV_SOURCES = UV_INDEX_URL="$(call PIP_SOURCE,index-url)" UV_EXTRA_INDEX_URL="$(call PIP_SOURCE,extra-index-url)" \
	UV_FIND_LINKS="$(call PIP_SOURCE,find-links)" UV_INDEX_STRATEGY=unsafe-best-match

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q -c constraints.txt uv
	$(UV_SOURCES) $(VENV)/bin/uv pip install -q --compile-bytecode --python $(VENV)/bin/python -c constraints.txt -e '.[dev,cluster]'
	touch $@

setup: $(VENV)/.installed

# Debian ships Fashion-MNIST; without it, prepare falls back to torchvision's download.
dataset:
	@[ -e $(FASHION_MNIST)/train-images-idx3-ubyte.gz ] || { $(SUDO) apt-get update -qq && \
	  $(SUDO) apt-get install -y -qq dataset-fashion-mnist; } || \
	  echo "warning: could not install dataset-fashion-mnist; prepare will try to download Fashion-MNIST"

# The raw data as data/raw/fashion-mnist.dvc records it: from DVC's cache or remote, else imported again from Debian's
# package (the same files, so the same hash).
data: setup dataset
	@[ -d data/raw/fashion-mnist ] || dvc pull -q data/raw/fashion-mnist.dvc 2>/dev/null || \
	  dvc update -q data/raw/fashion-mnist.dvc

# Debian's Chromium for the MLflow UI test (tests/test_mlflow_ui.py drives it with Playwright; no browser download).
# Without it that test would skip, so a failed install fails `make test`.
browser:
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

run: data
	kiln run

flow: data
	kiln flow

# Debian's PostgreSQL server for the cluster path (`kiln cluster up` and the cluster tests start their own instance).
postgres:
	@command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; }

test: data browser postgres
	pytest

lint: setup
	ruff check .

# Regenerate constraints.txt after a change to pyproject.toml's dependencies: resolve in a fresh venv, keeping every
# existing pin that still fits, then freeze. Remove a pin from constraints.txt first to let it move.
constraints:
	rm -rf /tmp/kiln-constraints && python3 -m venv /tmp/kiln-constraints
	/tmp/kiln-constraints/bin/python -m pip install -q --upgrade pip
	/tmp/kiln-constraints/bin/python -m pip install -q -c constraints.txt -e '.[dev,cluster]'
	/tmp/kiln-constraints/bin/python -m pip freeze --exclude-editable > constraints.txt
