# `make demo`, `make test` and `make lint` each build .venv on first use (python3 -m venv + pinned requirements-dev.txt).
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
QUESTION ?= Who created Python?

export PIP_DISABLE_PIP_VERSION_CHECK := 1
export PIP_NO_INPUT := 1

.PHONY: demo test lint serve

demo: $(INSTALLED)
	$(VENV)/bin/lazyprefill generate --model smollm2 --prompt-file examples/python_license.txt \
		--question "$(QUESTION)" --compare

serve: $(INSTALLED)
	$(VENV)/bin/lazyprefill serve --model smollm2

test: $(INSTALLED)
	$(PY) -m pytest -q -n auto --maxprocesses 4

lint: $(INSTALLED)
	$(VENV)/bin/ruff check .

$(INSTALLED): requirements-dev.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet -e '.[gguf,serve,lm-eval]'
	touch $@
