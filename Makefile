# The two commands of diffusers-hold; each sets up what it needs on a machine with Python 3.10+ and make:
#
#   make bench    the memorization benchmark's default run: prints its table and where the figures are
#   make test     ruff and the test suite, with the Hugging Face Hub offline (what CI runs, see .ci/run)
#
# Both create .venv on first use and reuse it afterwards; it is reinstalled only when pyproject.toml, this
# Makefile or TORCH changes. Every command runs .venv/bin/python by path, so an activated venv does not matter.
#
# Variables (on the command line, e.g. `make test PYTEST_ARGS="-k scheduler"`, or exported in the shell):
#   TORCH        what `pip install` gets for torch, written as after `pip install` on a command line. The
#                default is the CPU build of torch 2.13.0; for a CUDA 12.8 build, for example:
#                make test TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
#   PYTHON       the interpreter that creates .venv (default python3)
#   PYTEST_ARGS  more pytest arguments, e.g. "-x tests/test_dynamics.py"
#   BENCH_ARGS   more `diffusers-hold bench` flags, e.g. "--quick --output_dir outputs/bench_quick"

PYTHON ?= python3
TORCH ?= torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
PYTEST_ARGS ?=
BENCH_ARGS ?=

VENV := .venv
VENV_PYTHON := $(VENV)/bin/python
# The extras that the tests (dev, train, bench) and the benchmark (bench) import.
EXTRAS := dev,train,bench
# Written last by the install, so an interrupted install is completed by the next command.
INSTALLED := $(VENV)/installed
# The TORCH that .venv was built with; a different TORCH replaces the installed torch.
TORCH_RECORD := $(VENV)/torch-requirement
# The tests never download anything: a Hub access fails loudly instead.
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1

# $(call quote,text): text as one single-quoted shell word.
quote = '$(subst ','\'',$(1))'

.DEFAULT_GOAL := help
.PHONY: help venv test lint bench clean-venv

help:
	@echo "make bench       run the memorization benchmark (default run; BENCH_ARGS=... adds flags)"
	@echo "make test        ruff and the test suite, offline (PYTEST_ARGS=... adds pytest arguments)"
	@echo "make venv        only build .venv (both commands above do this first)"
	@echo "make clean-venv  remove .venv"
	@echo "The torch build: TORCH=\"...\" (see the top of this Makefile), now:" $(call quote,$(TORCH))

venv: $(INSTALLED)

$(VENV_PYTHON):
	@command -v $(PYTHON) >/dev/null 2>&1 || { \
		echo "make: '$(PYTHON)' not found. Install Python 3.10 or newer, or name one: make ... PYTHON=python3.12" >&2; \
		exit 1; }
	@$(PYTHON) -c "import sys; sys.exit(sys.version_info < (3, 10))" 2>/dev/null || { \
		echo "make: diffusers-hold needs Python 3.10 or newer; '$(PYTHON)' is $$($(PYTHON) --version 2>&1)." \
			"Name a newer one: make ... PYTHON=python3.12" >&2; \
		exit 1; }
	@echo "Creating $(VENV) with $$($(PYTHON) --version 2>&1)"
	@$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); echo "make: '$(PYTHON) -m venv' failed (see above)." >&2; exit 1; }

ifneq ($(strip $(shell cat $(TORCH_RECORD) 2>/dev/null)),$(strip $(TORCH)))
$(TORCH_RECORD): FORCE
endif
$(TORCH_RECORD): | $(VENV_PYTHON)
	@if [ -f $@ ]; then \
		echo "TORCH changed (was: $$(cat $@)): uninstalling the torch in $(VENV)"; \
		$(VENV_PYTHON) -m pip uninstall --yes --quiet torch; \
	fi
	@printf '%s\n' $(call quote,$(TORCH)) > $@

# torch alone from TORCH's index; its own dependencies come with the package's, from the usual index.
$(INSTALLED): pyproject.toml Makefile $(TORCH_RECORD)
	@rm -f $@
	$(VENV_PYTHON) -m pip install --quiet --upgrade pip
	$(VENV_PYTHON) -m pip install --no-deps $(TORCH)
	$(VENV_PYTHON) -m pip install --editable ".[$(EXTRAS)]"
	@$(VENV_PYTHON) -c "import diffusers, torch, transformers; print(f'$(VENV) ready: torch {torch.__version__},' \
		f' diffusers {diffusers.__version__}, transformers {transformers.__version__}')"
	@touch $@

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(OFFLINE) $(VENV_PYTHON) -m pytest -q $(PYTEST_ARGS)

bench: venv
	$(VENV)/bin/diffusers-hold bench --output_dir outputs/bench $(BENCH_ARGS)

clean-venv:
	rm -rf $(VENV)

FORCE:
