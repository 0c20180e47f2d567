"""The serving tier: what runs while D³QE is served, apart from the build-time export.

- `manifest`: the typed `manifest.json` an export writes, its one reader and artifact check
- `runtimes`: in-process runners of exported parts (ONNX Runtime, TensorRT, torch), `load_part`
- `inprocess`: the eager model in this process (`d3qe score --runtime eager`) and the weight options
- `model_params`: the typed parameters of the python-backend models in `model_repository/`
- `repository`: the Triton model repository writer (configs, ensembles, gates)
- `install`: finding a tritonserver and its python backend; `server_config`: its flags as data (and the
  container's command); `endpoints`: its ports; `process`: a supervised child process group
- `server`: `TritonServer`, the supervised server (`d3qe serve`); `grpc_front`: the size-limiting gRPC front
- `rollout`: another export live on a running server, and back (`d3qe rollout`); `operating_point`: the
  served threshold beside an export
- `health`: whether every part's process is alive (`d3qe health`, deploy/'s probes); `supervisor`: `d3qe serve`'s
  watch, which restarts a server with a dead part
- `host`: the machine and tool versions every record carries

It imports the model (`d3qe`) and the client's result types (`client.results`), nothing of `export/`.
"""
