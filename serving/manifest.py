"""`manifest.json` beside the artifacts: what was exported, from what, with what, and how it validated.

One typed record (`Manifest` and its `PartEntry`s, whose tensors are the wire contract's
`d3qe_serve.contract.TensorSpec`s), one reader (`Manifest.read`, which checks the format and every field)
and one artifact check (`Manifest.artifact`). The export writes it; the runners, the repository writer,
the demo and the benchmarks read it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from d3qe_serve.contract import TensorSpec
from d3qe_serve.errors import ManifestError

MANIFEST = "manifest.json"
FORMAT = "d3qe-export/1"
# A part's fields added since the format began (issue 22): written only where set
ADDED_PART_FIELDS = ("quantized", "calibration", "inference_precision", "extra_files")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_record(path: str | Path | None) -> dict | None:
    """Name, sha256 and size of a weights file (None: seeded weights)."""
    if path is None:
        return None
    path = Path(path)
    return {"file": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size}


@dataclass
class PartEntry:
    runtime: str  # onnxruntime, openvino, tensorrt or torch
    precision: str  # fp32, fp16, bf16 or int8 (which int8: `quantization`)
    file: str  # relative to the repository
    sha256: str
    bytes: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    dynamic_axes: dict[str, dict[str, str]]
    max_batch: int
    export_seconds: float
    validation: dict = field(default_factory=dict)  # export.validate.validate_part's record
    opset: int | None = None
    # int8: "static" (calibrated) or "dynamic"; exports before static int8 wrote a description here instead
    # ("onnxruntime quantize_dynamic: ..."), read as it is (`quantization_kind`).
    quantization: str | None = None
    quantized: str | None = None  # int8: which operations the quantiser took, and how
    calibration: dict | None = None  # static int8: the corpus images it was calibrated on (indices, digest)
    inference_precision: str | None = None  # openvino: the INFERENCE_PRECISION_HINT it is compiled with
    # Files the artifact reads beside it (OpenVINO IR: its weights, model.bin), relative path → sha256;
    # checked with it. `bytes` counts them too.
    extra_files: dict[str, str] | None = None
    source_onnx: str | None = None  # tensorrt: the ONNX the engine was built from
    plugin: bool = False  # tensorrt: D³AT attention through the fused-kernel plugin

    @property
    def passed(self) -> bool:
        return bool(self.validation.get("passed"))

    @property
    def quantization_kind(self) -> str | None:
        """ "static", "dynamic" or None (no int8), for manifests of every version."""
        if self.quantization is None or self.quantization in ("static", "dynamic"):
            return self.quantization
        return "dynamic" if "quantize_dynamic" in self.quantization else "static"

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


@dataclass
class Manifest:
    created: str
    machine: dict
    tools: dict
    checkpoint: dict | None
    vq_checkpoint: dict | None
    freq_bias: str
    config: dict  # D3QEConfig.to_json()
    runtime: str
    precision: str
    max_batch: int
    parts: dict[str, PartEntry] = field(default_factory=dict)
    seeded_weights: dict | None = None  # {"preset", "seed"} without a checkpoint: the scores mean nothing
    validation_inputs: list[str] = field(default_factory=list)
    end_to_end: dict | None = None
    tuning: dict | None = None  # `d3qe tune` (export.tune): every candidate measured, and why each part got its choice
    passed: bool = False
    format: str = FORMAT

    def d3qe_config(self) -> Any:
        """The architecture as `d3qe.config.D3QEConfig` (imported here: reading a manifest needs no torch)."""
        from d3qe_serve.d3qe.config import D3QEConfig

        return D3QEConfig.from_json(self.config)

    def describe(self) -> tuple[str, str]:
        """'runtime' and 'precision', per part where they differ (e.g. 'onnxruntime', 'fp32/int8/fp32')."""

        def joined(values: list[str]) -> str:
            return values[0] if len(set(values)) == 1 else "/".join(values)

        entries = list(self.parts.values())
        return joined([e.runtime for e in entries]), joined([e.precision for e in entries])

    def artifact(self, repo_dir: Path, part: str) -> Path:
        """The path of `part`'s artifact, checked: validated at export, present, and the very file validated
        (and so are the files it reads beside it, `PartEntry.extra_files`).

        A truncated or altered artifact may still load, then score wrongly: its sha256 is compared first.
        """
        if part not in self.parts:
            raise KeyError(f"{repo_dir}: no part {part!r} in the manifest; it has {sorted(self.parts)}")
        entry = self.parts[part]
        if not entry.passed:
            raise ManifestError(f"{repo_dir}: {part} failed validation at export: {entry.validation.get('problems')}")
        path = Path(repo_dir) / entry.file
        for file, sha256 in {entry.file: entry.sha256, **(entry.extra_files or {})}.items():
            found = Path(repo_dir) / file
            if not found.is_file():
                raise FileNotFoundError(f"{part}: artifact {found} named in the manifest is missing")
            if sha256_file(found) != sha256:
                raise ManifestError(
                    f"{part}: {found} is not the file exported (its sha256 differs from manifest.json): "
                    "corrupt or changed since the export; export again"
                )
        return path

    def to_json(self) -> dict:
        """The manifest as JSON holds it (tensor shapes as lists); a part's fields added since the format began
        (`ADDED_PART_FIELDS`) only where set, so that a manifest written before them reads back as written
        (and keeps its `id`)."""
        data = json.loads(json.dumps(dataclasses.asdict(self)))
        for part in data["parts"].values():
            for name in ADDED_PART_FIELDS:
                if part.get(name) is None:
                    part.pop(name, None)
        return data

    def text(self) -> str:
        """The manifest as `write` writes it."""
        return json.dumps(self.to_json(), indent=2) + "\n"

    @property
    def id(self) -> str:
        """The export's identity: sha256 of `text()`, i.e. `sha256sum manifest.json` of an export as written.

        It covers every artifact's sha256, the weights' checksums and the validation, so a score recorded
        with it names the very model that computed it (`d3qe bulk` writes it into every row; the served
        gates carry it as their `manifest_id` parameter).
        """
        return hashlib.sha256(self.text().encode()).hexdigest()

    def write(self, out_dir: Path) -> Path:
        path = Path(out_dir) / MANIFEST
        path.write_text(self.text())
        return path

    @classmethod
    def from_json(cls, data: dict, where: str = MANIFEST) -> Manifest:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ManifestError(f"{where}: format {found!r}, expected {FORMAT!r}")
        fields = _fields(cls, data, where)
        fields["parts"] = {
            name: _part(entry, f"{where}: parts.{name}") for name, entry in fields.get("parts", {}).items()
        }
        return cls(**fields)

    @classmethod
    def read(cls, repo_dir: Path) -> Manifest:
        path = Path(repo_dir) / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"no {MANIFEST} in {repo_dir}: export there first (d3qe export --out DIR)")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ManifestError(f"{path}: not JSON ({e})") from e
        return cls.from_json(data, str(path))


def _fields(cls: type, data: dict, where: str) -> dict:
    """`data` as keyword arguments of the dataclass `cls`; every unknown and missing field named in one error."""
    if not isinstance(data, dict):
        raise ManifestError(f"{where}: expected an object, got {type(data).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    required = {
        n for n, f in known.items() if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    unknown, missing = sorted(data.keys() - known.keys()), sorted(required - data.keys())
    if unknown or missing:
        raise ManifestError(f"{where}: unknown fields {unknown}, missing fields {missing}")
    return dict(data)


def _part(data: dict, where: str) -> PartEntry:
    fields = _fields(PartEntry, data, where)
    for key in ("inputs", "outputs"):
        fields[key] = [_tensor(t, f"{where}.{key}") for t in fields[key]]
    return PartEntry(**fields)


def _tensor(data: dict, where: str) -> TensorSpec:
    fields = _fields(TensorSpec, data, where)
    try:
        return TensorSpec(**fields)
    except ValueError as e:  # a dtype or shape the wire cannot carry
        raise ManifestError(f"{where}: {e}") from e
