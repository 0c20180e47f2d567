"""Triton python-backend model `d3qe` (and `d3qe_tensor`): the gate in front of its ensemble.

`serving.repository.write_repository` copies this file to `<repository>/d3qe/1/model.py` and
`<repository>/d3qe_tensor/1/model.py`; its config's typed parameters (`serving.model_params.GateParameters`)
name the ensemble behind it, the export answering (its manifest id) and the threshold of its operating point:
each answer carries both, one row per item (the contract's `PROVENANCE`), after the ensemble's outputs.
Overload is refused by this model's queue policy, before any work (see `admission_config`). Each
instance forwards the requests of one batch to the ensemble, one request each, and answers them when
they come back: the instances bound the work inside the ensemble, and every request gets the
ensemble's own answer.
"""

from __future__ import annotations

import asyncio
import json
import re

import numpy as np
import triton_python_backend_utils as pb_utils

from d3qe_serve.contract import LOGIT, MANIFEST_ID, PROVENANCE, THRESHOLD
from d3qe_serve.serving.model_params import GateParameters
from d3qe_serve.serving.operating_point import OperatingPoint


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = GateParameters.from_config(config)
        self.ensemble = params.ensemble
        self.manifest_id = params.manifest_id or ""  # empty: a repository written without one does not say
        self.threshold = OperatingPoint.threshold if params.threshold is None else params.threshold  # upstream's
        self.inputs = [t["name"] for t in config["input"]]
        self.outputs = [t["name"] for t in config["output"] if t["name"] not in PROVENANCE]  # the ensemble's
        self.provenance = [t["name"] for t in config["output"] if t["name"] in PROVENANCE]
        # The python backend (2.51) returns a BLS error without its status code: always INTERNAL. The steps
        # that check a client's input (preprocess, check_pixels) start their messages with the input's
        # name, "IMAGE: ", "IMAGE[2]: ", "PIXELS: ": those are the client's fault, as they were in the ensemble.
        names = "|".join(map(re.escape, self.inputs))
        self.bad_input = re.compile(rf"^in ensemble '[^']*', ({names})(\[\d+\])?: ")
        self.dead_part = re.compile(r"Stub process '[^']*' is not healthy")  # healed (d3qe serve): retryable

    async def execute(self, requests: list) -> list:
        calls = [
            pb_utils.InferenceRequest(
                model_name=self.ensemble,
                inputs=[pb_utils.get_input_tensor_by_name(r, n) for n in self.inputs],
                requested_output_names=self.outputs,
            ).async_exec()
            for r in requests
        ]
        return [self._answer(a) for a in await asyncio.gather(*calls, return_exceptions=True)]

    def _answer(self, answer):
        if isinstance(answer, Exception):  # the call itself failed (the ensemble is not loaded, ...)
            error = pb_utils.TritonError(f"{self.ensemble}: {type(answer).__name__}: {answer}")
        elif answer.has_error():
            message = answer.error().message()
            code = pb_utils.TritonError.INVALID_ARG if self.bad_input.match(message) else answer.error().code()
            if self.dead_part.search(message):
                code = pb_utils.TritonError.UNAVAILABLE
            error = pb_utils.TritonError(message, code)
        else:
            outputs = [pb_utils.get_output_tensor_by_name(answer, n) for n in self.outputs]
            rows = len(outputs[self.outputs.index(LOGIT)].as_numpy())
            return pb_utils.InferenceResponse(outputs + self._provenance(rows))
        return pb_utils.InferenceResponse(error=error)

    def _provenance(self, rows: int) -> list:
        """MANIFEST_ID and THRESHOLD, one row per item of the answer (as many as its LOGIT has)."""
        values = {
            MANIFEST_ID: np.full((rows, 1), self.manifest_id.encode(), dtype=np.object_),
            THRESHOLD: np.full((rows, 1), self.threshold, dtype=np.float32),
        }
        return [pb_utils.Tensor(n, values[n]) for n in self.provenance]
