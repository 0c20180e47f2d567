"""The typed parameters of the python-backend models in `model_repository/`, as their configs carry them.

Triton passes a model's config to `initialize` as JSON, its parameters as strings; the repository
writer (`serving.repository`) writes them from these records and each model reads them back with
`from_config`, so both sides agree on names and types.
"""

from __future__ import annotations

from dataclasses import dataclass

from d3qe_serve.contract import IMAGE, RGB


def _strings(config: dict) -> dict[str, str]:
    return {k: v["string_value"] for k, v in config.get("parameters", {}).items()}


@dataclass(frozen=True)
class PartParameters:
    """`model_repository/part.py`: which exported part it hosts, its CPU threads (None: the runtime's default),
    whether a torch-runtime part runs compiled (`serving.runtimes.TorchRunner`), and the export holding its
    artifact, relative to the model repository (None: the repository itself; a rollout's generation is in
    `rollouts/<N>`, `serving.rollout`)."""

    part: str
    intra_op_threads: int | None = None
    compile: bool = False
    export: str | None = None

    def to_parameters(self) -> dict[str, str]:
        params = {"part": self.part}
        if self.intra_op_threads is not None:
            params["intra_op_threads"] = str(self.intra_op_threads)
        if self.compile:
            params["compile"] = "true"
        if self.export is not None:
            params["export"] = self.export
        return params

    @classmethod
    def from_config(cls, config: dict) -> PartParameters:
        params = _strings(config)
        if "part" not in params:
            raise ValueError(f"model {config.get('name')!r}: its config has no 'part' parameter")
        threads = params.get("intra_op_threads")
        return cls(
            params["part"], int(threads) if threads else None, params.get("compile") == "true", params.get("export")
        )


@dataclass(frozen=True)
class GateParameters:
    """`model_repository/admission.py`: the ensemble a gate admits requests to; the id of the export answering
    (`serving.manifest.Manifest.id`) and the threshold of its operating point (`serving.operating_point`), which
    the gate answers with every item (MANIFEST_ID, THRESHOLD) and clients record with their scores."""

    ensemble: str
    manifest_id: str | None = None
    threshold: float | None = None

    def to_parameters(self) -> dict[str, str]:
        params = {"ensemble": self.ensemble}
        if self.manifest_id is not None:
            params["manifest_id"] = self.manifest_id
        if self.threshold is not None:
            params["threshold"] = repr(float(self.threshold))
        return params

    @classmethod
    def from_config(cls, config: dict) -> GateParameters:
        params = _strings(config)
        if "ensemble" not in params:
            raise ValueError(f"model {config.get('name')!r}: its config has no 'ensemble' parameter")
        threshold = params.get("threshold")
        return cls(params["ensemble"], params.get("manifest_id"), float(threshold) if threshold else None)


@dataclass(frozen=True)
class PreprocessParameters:
    """`model_repository/preprocess.py`: the input it reads, IMAGE (encoded files) or RGB (decoded pixels)."""

    input: str

    def to_parameters(self) -> dict[str, str]:
        return {"input": self.input}

    @classmethod
    def from_config(cls, config: dict) -> PreprocessParameters:
        name = _strings(config).get("input")
        if name not in (IMAGE, RGB):
            model = config.get("name")
            raise ValueError(f"model {model!r}: its 'input' parameter must be {IMAGE} or {RGB}, got {name!r}")
        return cls(name)
