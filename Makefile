# The two commands of the README:
#   make serve   set everything up, make the tiny model, serve configs/local.yaml on 127.0.0.1:8000
#   make test    set everything up and run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is installed first, on its own: the build depends on the host. Hosts without a GPU can
# point TORCH_INDEX at PyTorch's CPU wheel index to avoid the large CUDA build from PyPI.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PIP := $(BIN)/python -m pip
PIP_QUIET ?= -q
# `cpu` adds what a CPU-only torch lacks for xfuser (triton); drop it on a CUDA host.
EXTRAS ?= test,cpu

.PHONY: install serve test tiny-model clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(PIP) install $(PIP_QUIET) "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install $(PIP_QUIET) -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

tiny-model: install
	$(BIN)/dit-serve make-tiny-model --family flux

serve: tiny-model
	$(BIN)/serve run --address local configs/local.yaml

test: install
	$(BIN)/python -m pytest tests

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
