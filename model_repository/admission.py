"""Triton python-backend model `d3qe` (and `d3qe_tensor`): the gate in front of its ensemble.

`serving.repository.write_repository` copies this file to `<repository>/d3qe/1/model.py` and
`<repository>/d3qe_tensor/1/model.py`; its config's typed parameters (`serving.model_params.GateParameters`)
name the ensemble behind it.
Overload is refused by this model's queue policy, before any work (see `admission_config`). Each
instance forwards the requests of one batch to the ensemble, one request each, and answers them when
they come back: the instances bound the work inside the ensemble, and every request gets the
ensemble's own answer.
"""

from __future__ import annotations

import asyncio
import json
import re

import triton_python_backend_utils as pb_utils

from d3qe_serve.serving.model_params import GateParameters


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        self.ensemble = GateParameters.from_config(config).ensemble
        self.inputs = [t["name"] for t in config["input"]]
        self.outputs = [t["name"] for t in config["output"]]
        # The python backend (2.51) returns a BLS error without its status code: always INTERNAL. The steps
        # that check a client's input (preprocess, check_pixels) start their messages with the input's
        # name, "IMAGE: ", "IMAGE[2]: ", "PIXELS: ": those are the client's fault, as they were in the ensemble.
        names = "|".join(map(re.escape, self.inputs))
        self.bad_input = re.compile(rf"^in ensemble '[^']*', ({names})(\[\d+\])?: ")

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
            error = pb_utils.TritonError(message, code)
        else:
            return pb_utils.InferenceResponse([pb_utils.get_output_tensor_by_name(answer, n) for n in self.outputs])
        return pb_utils.InferenceResponse(error=error)
