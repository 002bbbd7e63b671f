# Two commands, each doing its own set-up on a fresh machine:
#   make demo   text-to-image from non-English prompts with the shipped toy model
#   make test   the whole test suite
#   make test-fast  the core's parity tests (tokenizer, text encoder, UNet, VAE, samplers, pipeline) on
#                   small configs, fp32 on the CPU: under two minutes on 2 cores, for use while working
# The CPU build of torch is installed *first* and pinned: a bare `torch` requirement on a machine
# without torch would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH  := torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast bench setup clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,notebooks,ui]" "$(TORCH)"
	# daam, the DAAM reference of tests/test_daam_reference.py: its own requirements pin a 2023 diffusers,
	# so it comes without them (the test stands in for spacy and scipy, which only its parsing uses)
	$(PY) -m pip install -q --no-deps "daam==0.2.0"
	# tomesd and DeepCache, the references of tests/test_skipping.py (token merging, feature caching): they
	# run on the pinned diffusers and need nothing it lacks; without their requirements pip leaves torch alone
	$(PY) -m pip install -q --no-deps "tomesd==0.1.3" "DeepCache==0.1.1"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m altdiff_min demo

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m core

# altdiff-min vs diffusers on the full m9 architecture (random weights); BENCH="--device cuda --dtype fp16" etc.
bench: $(STAMP)
	$(PY) tests/benchmark.py $(BENCH)

clean:
	rm -rf $(VENV) build *.egg-info
