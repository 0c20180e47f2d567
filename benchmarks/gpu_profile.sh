#!/usr/bin/env bash
# The GPU profile of `d3qe bench`: the same benchmark as on CPU, on a machine with an NVIDIA GPU.
#
#   bash benchmarks/gpu_profile.sh [CHECKPOINT]        (from the repository root)
#
# Exports the model for cuda in each runtime installed there (torch bf16 and fp16 always; ONNX Runtime
# fp32 where onnxruntime-gpu is installed; TensorRT fp16 where tensorrt is), then runs `d3qe bench
# --profile gpu` over all of them: eager fp32 on the GPU, each export in-process, and Triton over gRPC
# serving the first export at 1, 4, 16 and 64 clients. Results go to $OUT when set, else
# benchmarks/results/<gpu>-<date>/. The machine needs the project's packages (pip install '.[all]').
# Without CHECKPOINT: seeded weights.
set -euo pipefail

checkpoint=()
if [[ $# -ge 1 ]]; then checkpoint=(--checkpoint "$1"); fi
d3qe=(python -m cli.main)
work=artifacts/gpu-profile
repos=()

export_for_cuda() {  # runtime precision
    local out="$work/$1-$2"
    "${d3qe[@]}" export "${checkpoint[@]}" --runtime "$1" --precision "$2" --device cuda --max-batch 64 --out "$out"
    repos+=("$out")
}

export_for_cuda torch bf16
export_for_cuda torch fp16
if python -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())"; then
    export_for_cuda onnxruntime fp32
fi
if python -c "import tensorrt" 2>/dev/null; then
    export_for_cuda tensorrt fp16
fi

out=()
if [[ -n "${OUT:-}" ]]; then out=(--out "$OUT"); fi
"${d3qe[@]}" bench --profile gpu "${checkpoint[@]}" --repo "${repos[@]}" "${out[@]}"
