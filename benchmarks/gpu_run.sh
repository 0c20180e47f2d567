#!/usr/bin/env bash
# The GPU run (`d3qe gpu-run`: cli/gpu_run.py, benchmarks/gpu_run.py) from the repository root with the
# tree on the path, under python3 named explicitly (on the GPU machine it is the one that holds torch;
# PYTHON overrides it). Arguments go to the driver: `--smoke` runs every stage on this CPU at tiny sizes.
# Results go to $OUT (else build/gpu-run).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" -m d3qe_serve.cli.main gpu-run "$@"
