# The two commands of the README: `make run` and `make test`. Both create the
# virtualenv on first use (torch comes from this machine's local wheel index).
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.mmq-installed

.PHONY: run test lint bench

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/mmq demo

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) bench/attention.py
	$(PY) bench/text_embed.py
