#!/bin/sh
# Written by d3qe_serve.serving.server_config.container_script() from the ServerConfig `d3qe serve` uses:
# change it there (tests/test_deploy.py checks that this file is what it writes).
#
# The container's command: tritonserver on the exported repository with `d3qe serve`'s flags, plus the
# native configs. Extra arguments go to tritonserver.
#
# --model-config-name=native   each part's configs/native.pbtxt (onnxruntime_onnx / tensorrt_plan),
#                              config.pbtxt for every model without one (the python-backend models)
# --model-control-mode=none    the repository is fixed for the pod's life
# --disable-auto-complete-config   the configs are complete; auto-completion would start a python
#                              stub per model just to ask it
# --*-restricted-*             the model-repository, logging, trace and shared-memory APIs need a
#                              header whose value is drawn here and given to nobody: they are off.
#                              Shared memory above all: Triton 2.51 lets a client map any /dev/shm
#                              region, the python backend's own included.
# Ports are Triton's defaults (HTTP 8000, gRPC 8001, metrics 8002), listening on all addresses.
set -eu
key=$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')
exec tritonserver \
    --model-repository="${D3QE_MODEL_REPOSITORY:-/models}" \
    --model-config-name=native \
    --model-control-mode=none \
    --disable-auto-complete-config \
    --strict-readiness=true \
    --exit-on-error=true \
    --grpc-restricted-protocol="model-repository,logging,trace,shared-memory:d3qe-admin=$key" \
    --http-restricted-api="model-repository,logging,trace,shared-memory:d3qe-admin=$key" \
    "$@"
