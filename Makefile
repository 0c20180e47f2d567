# Everything installs into .venv/ at the repo root; nothing relies on a global environment.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: venv browser test lint demo bench fidelity bench-gpu clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch and torchvision first, pinned together (open_clip needs torchvision).
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# The review page's test drives Debian's Chromium and its driver (as root, as CI runs; once per machine).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; }

test: venv browser
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check .

demo: venv
	$(BIN)/d3qe demo

# Full-size CPU benchmark of the repository `make demo` exported, served, beside an int8-CLIP export
# run in-process (minutes; run it on an idle machine).
bench: venv
	$(BIN)/d3qe export --precision int8 --out build/model_repository_int8
	$(BIN)/d3qe bench --repo build/model_repository build/model_repository_int8

# What each runtime and precision does to the scores, on the 554-image fidelity corpus (about 1 h on 2 cores).
fidelity: venv
	$(BIN)/d3qe export --precision int8 --out build/model_repository_int8
	$(BIN)/d3qe fidelity --repo build/model_repository build/model_repository_int8 --torch bf16 fp16 \
		--server --server-limit 64

# `d3qe bench`'s GPU profile, for a machine with an NVIDIA GPU.
bench-gpu: venv
	bash benchmarks/gpu_profile.sh

clean:
	rm -rf $(VENV) build *.egg-info
