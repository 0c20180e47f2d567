"""Triton python-backend model shared by the parts: `vq_encoder`, `clip_visual`, `d3qe_head` and `evidence`.

`serving.repository.write_repository` copies this file to `<repository>/<part>/1/model.py` for each
part; its config's typed parameters (`serving.model_params.PartParameters`) say which part it hosts.
The model runs the exported artifact through `serving.runtimes.load_part` (ONNX Runtime, TensorRT or
torch, as the manifest says). The dynamic batcher hands `execute` several requests: they
are concatenated along the batch axis, run once and split back. Tensors pass in and out through
DLPack: on a GPU instance the parts hand each other device memory, never host copies. Inputs were
checked before they got here (`preprocess` decodes, `check_pixels` checks tensors from clients). What an
entrance returns (`serving.runtimes.GATE_TENSORS`) goes back in host memory: the gates are CPU instances.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import triton_python_backend_utils as pb_utils

from d3qe_serve.serving.model_params import PartParameters
from d3qe_serve.serving.runtimes import handed_on, load_part


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = PartParameters.from_config(config)
        self.part = params.part
        device = "cpu" if args["model_instance_kind"] == "CPU" else f"cuda:{args['model_instance_device_id']}"
        repository = Path(args["model_repository"]).parent / (params.export or "")  # a rollout's: rollouts/<N>
        self.runner = load_part(repository, self.part, device, params.intra_op_threads, params.compile)
        self.inputs = [i["name"] for i in config["input"]]
        self.outputs = [o["name"] for o in config["output"]]

    def execute(self, requests: list) -> list:
        batches = [{n: self._tensor(r, n) for n in self.inputs} for r in requests]
        feeds = {n: torch.cat([b[n] for b in batches]) for n in self.inputs}
        try:
            outputs = self.runner.run_tensors(feeds)
        except Exception as e:  # the runtime's message names the problem; every request of the run shares it
            error = pb_utils.TritonError(f"{self.part} failed: {e}")
            return [pb_utils.InferenceResponse(error=error) for _ in requests]
        sizes = [len(b[self.inputs[0]]) for b in batches]
        # Dense (DLPack's condition); what an entrance returns in host memory, for its CPU-only gate.
        outputs = handed_on(outputs)
        pieces = {n: torch.split(outputs[n], sizes) for n in self.outputs}
        return [
            pb_utils.InferenceResponse(
                [pb_utils.Tensor.from_dlpack(n, torch.utils.dlpack.to_dlpack(pieces[n][k])) for n in self.outputs]
            )
            for k in range(len(requests))
        ]

    def _tensor(self, request, name: str) -> torch.Tensor:
        """The request's input as a torch tensor on this instance's device, without a host copy on a GPU."""
        return torch.utils.dlpack.from_dlpack(pb_utils.get_input_tensor_by_name(request, name).to_dlpack()).to(
            self.runner.device
        )
