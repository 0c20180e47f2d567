#!/usr/bin/env bash
# The GPU run rehearsed without a GPU (`make gpu-rehearsal`, after `make gpu-carry`): everything but CUDA, as the
# device command will run it.
#  1. An interpreter like the GPU machine's: a working python3.12 (on PATH, /usr/bin, or pyenv's: these machines
#     have pyenv's 3.12.1, a shared-libpython build). Where there is none it says so and uses python3.
#  2. A venv like the image (its packages that the run imports): numpy 2, onnx 1.23.1, onnxruntime 1.30, Triton 3.6,
#     regex and huggingface_hub (open_clip's, not carried), a grpcio older than tritonclient needs (the carry's
#     must win), and a torch other than the dev venv's 2.14: the machine's 2.11 under 3.12 (PyPI's CUDA build,
#     which runs on a CPU), else 2.13 CPU from this machine's wheels.
#  3. The real carry (build/gpu-carry, cp312) unpacked offline under /tmp, as the run's install stage does, and
#     its server's libraries resolved; under another Python, a carry of the same versions for it.
#  4. Every stage in its CPU smoke mode under that venv, from that carry (install, gating preflight, export,
#     headline, parity, kernel tests and benchmark; compiled says why it is CUDA only). Results: $REHEARSAL/out.
set -euo pipefail
cd "$(dirname "$0")/.."
REHEARSAL=${REHEARSAL:-build/gpu-rehearsal}
WORK=${WORK:-/tmp/d3qe-gpu-rehearsal}
DEV=.venv/bin/python
PY=""
for candidate in python3.12 /usr/bin/python3.12 "$(pyenv root 2>/dev/null || echo /root/.pyenv)"/versions/3.12*/bin/python3.12; do
  if "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
    PY=$(command -v "$candidate")
    break
  fi
done
if [ -z "$PY" ]; then
  PY=$(command -v python3)
  echo "gpu-rehearsal: no python3.12 on this machine (the GPU machine's is 3.12.3); rehearsing with $($PY -V)"
fi
VERSION=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
TORCH="torch==2.11.0 torchvision==0.26.0"
[ "$VERSION" = 3.12 ] || TORCH="torch==2.13.0 torchvision==0.28.0"
echo "gpu-rehearsal: $("$PY" -V) at $PY, $TORCH"
REHEARSAL=$REHEARSAL/py$VERSION

[ -x "$REHEARSAL/venv/bin/python" ] || "$PY" -m venv "$REHEARSAL/venv"
V="$REHEARSAL/venv/bin/python"
# shellcheck disable=SC2086  # TORCH is two requirements
"$V" -m pip install --quiet --disable-pip-version-check --find-links /opt/wheels \
  $TORCH "numpy>=2" "triton==3.6.0" "onnx==1.23.1" "onnxruntime==1.30.0" \
  onnxscript safetensors pillow scikit-image matplotlib tqdm regex huggingface_hub pytest pytest-timeout "grpcio<1.80"
"$V" -c 'import numpy, torch; assert numpy.__version__ >= "2", numpy.__version__; print("venv:", torch.__version__, "numpy", numpy.__version__)'

[ -f build/gpu-carry/manifest.json ] || { echo "gpu-rehearsal: no build/gpu-carry: run make gpu-carry first" >&2; exit 2; }
rm -rf "$WORK" && mkdir -p "$WORK"
"$DEV" -m d3qe_serve.cli.main gpu-carry unpack build/gpu-carry "$WORK/real-carry"
LD_LIBRARY_PATH="$WORK/real-carry/site/nvidia_pytriton.libs" \
  ldd "$WORK/real-carry/site/pytriton/tritonserver/bin/tritonserver" | { ! grep "not found"; }
echo "gpu-rehearsal: the real carry unpacks offline and its server's libraries resolve"

CARRY=build/gpu-carry
if [ "$VERSION" != 3.12 ]; then
  CARRY=build/gpu-carry-$VERSION
  [ -f "$CARRY/manifest.json" ] || "$DEV" -m d3qe_serve.cli.main gpu-carry build --python "$VERSION" --out "$CARRY"
fi
PYTHON="$V" bash benchmarks/gpu_run.sh --smoke --carry "$CARRY" --work "$WORK/run" --out "$REHEARSAL/out"
