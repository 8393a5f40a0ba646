# make demo: every stage at toy scale, then a chat server (PORT=8000, SOURCE=builtin|hub).
# make test: the whole suite (what .ci/run calls).  make install: the virtualenv for running the scripts.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 8000
SOURCE ?= builtin

.PHONY: install demo test

# torch is installed on its own first and pinned: anything that pulls an unpinned torch first
# would bring gigabytes of CUDA packages to a CPU machine.
$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

# what only the tests need (reference implementation, OpenAI client, browser driver)
$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt
	$(PY) -m pip install --quiet -r requirements-test.txt
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) demo.py --source $(SOURCE) --port $(PORT)

test: $(VENV)/.installed-test
	$(PY) -m pytest -q tests
