# Everything installs into .venv/ at the repo root; nothing relies on a global environment.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: venv browser test lint demo bench fidelity gpu-carry bench-gpu gpu-rehearsal clean

venv: $(VENV)/.installed

# pyproject.toml says the ranges the code needs; constraints.txt pins the versions this environment is built from.
$(VENV)/.installed: pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch and torchvision first, from the constraints (open_clip needs torchvision; pip finds these two on disk here).
	$(BIN)/pip install --quiet -c constraints.txt torch torchvision
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
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

# What the GPU machine lacks (open_clip, tritonclient, the Triton server, numpy<2), from PyPI, repacked to travel
# beside the tree in one device run: build/gpu-carry/ (needs the network; prints its size, fails above 60 MiB).
gpu-carry: venv
	$(BIN)/python -m d3qe_serve.cli.main gpu-carry build

# The GPU run, on the GPU machine (no network, no venv): installs build/gpu-carry under /tmp, then validates and
# measures stage by stage into $$OUT (benchmarks/gpu_run.py; `bash benchmarks/gpu_run.sh --smoke` runs it on a CPU).
bench-gpu:
	bash benchmarks/gpu_run.sh

# The GPU run rehearsed here, all but CUDA (benchmarks/gpu_rehearsal.sh; needs the network): a venv like the GPU
# machine's (numpy 2, torch 2.13 CPU; Python 3.12 where there is one, else this machine's, said so), the real
# carry unpacked offline under /tmp, every stage in its CPU smoke mode from a carry for that Python.
# Results: build/gpu-rehearsal/out.
gpu-rehearsal: gpu-carry
	bash benchmarks/gpu_rehearsal.sh

clean:
	rm -rf $(VENV) build *.egg-info
