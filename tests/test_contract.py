"""The wire contract (`d3qe_serve.contract`): declared once, torch-free, and what the writer, the model and the
clients actually use."""

from __future__ import annotations

import ast
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc.model_config_pb2 as mc
from google.protobuf import text_format
from tritonclient.utils import np_to_triton_dtype, triton_to_np_dtype

from d3qe_serve import contract
from d3qe_serve.contract import TensorSpec
from d3qe_serve.d3qe import load_detector, preprocess
from d3qe_serve.d3qe.config import PRESETS
from d3qe_serve.d3qe.parts import eager_tensors, part_specs, sizes
from d3qe_serve.errors import ManifestError
from d3qe_serve.serving.manifest import Manifest, PartEntry
from d3qe_serve.serving.repository import ensemble_name, write_repository

REPO = Path(__file__).resolve().parents[1]


def test_the_contract_imports_no_torch_and_nothing_else_of_the_package():
    code = "import sys, d3qe_serve.contract\nprint(*sys.modules)"
    modules = set(
        subprocess.run(
            [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.split()
    )
    assert "torch" not in modules
    assert {m for m in modules if m.startswith("d3qe_serve")} == {"d3qe_serve", "d3qe_serve.contract"}


def test_triton_dtype_names_are_tritonclients():
    for name, triton in contract.TRITON_DTYPES.items():
        assert contract.triton_dtype(name) == triton == np_to_triton_dtype(np.dtype(name))
    assert contract.triton_dtype(np.bytes_) == "BYTES" and contract.triton_dtype(np.dtype("float32")) == "FP32"
    with pytest.raises(ValueError, match="no Triton data type"):
        contract.triton_dtype("complex64")
    with pytest.raises(ValueError, match="not a numpy dtype"):
        TensorSpec("X", "flaot32", (-1,))
    with pytest.raises(ValueError, match="must be a batch axis"):
        TensorSpec("X", "float32", (-1, -2))


def _manifest(cfg) -> Manifest:
    """A manifest of `cfg`'s parts as the export records them (no artifacts: the writer reads none)."""
    parts = {
        name: PartEntry(
            "onnxruntime",
            "fp32",
            f"{name}/1/model.onnx",
            "0" * 64,
            0,
            list(s.inputs),
            list(s.outputs),
            {},
            8,
            0.0,
            {"passed": True},
        )
        for name, s in part_specs(cfg).items()
    }
    return Manifest("", {}, {}, None, None, "stats", cfg.to_json(), "onnxruntime", "fp32", 8, parts)


def _config(repo: Path, model: str) -> mc.ModelConfig:
    return text_format.Parse((repo / model / "config.pbtxt").read_text(), mc.ModelConfig())


def _tensors(fields) -> list[tuple[str, np.dtype, list[int]]]:
    """A config's tensors as (name, numpy dtype, dims), the dtype read back through tritonclient's table."""
    out = []
    for t in fields:
        triton = mc.DataType.Name(t.data_type).removeprefix("TYPE_").replace("STRING", "BYTES")
        out.append((t.name, np.dtype(triton_to_np_dtype(triton)), list(t.dims)))
    return out


def _declared(specs: tuple[TensorSpec, ...]) -> list[tuple[str, np.dtype, list[int]]]:
    return [(t.name, np.dtype(t.dtype), list(t.dims)) for t in specs]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_the_writers_configs_are_the_contract(preset, tmp_path):
    cfg = PRESETS[preset]
    write_repository(tmp_path, _manifest(cfg), threads=1, decoders=1)
    shapes = sizes(cfg)
    for name, entrance in contract.entrances(shapes).items():
        computed = tuple(t for t in entrance.outputs if t.name not in contract.PROVENANCE)
        # the gate clients call: the entrance; its ensemble: the same but the provenance, which the gate adds
        for model, outputs in ((name, entrance.outputs), (ensemble_name(name), computed)):
            config = _config(tmp_path, model)
            assert config.max_batch_size > 0  # the batch axis is Triton's, implicit in the dims
            assert _tensors(config.input) == _declared(entrance.inputs), model
            assert _tensors(config.output) == _declared(outputs), model
        assert entrance.output_names[-2:] == contract.PROVENANCE
        steps = _config(tmp_path, ensemble_name(name)).ensemble_scheduling.step
        produced = {entrance.input.name} | {v for s in steps for v in s.output_map.values()}
        assert {t.name for t in computed} <= produced, name
        for s in steps:
            assert set(s.input_map.values()) <= produced, f"{name}: {s.model_name} takes a tensor nobody gives"
    for name, part in contract.parts(shapes).items():
        config = _config(tmp_path, name)
        assert (_tensors(config.input), _tensors(config.output)) == (_declared(part.inputs), _declared(part.outputs))
    pixels = contract.tensors(shapes)[contract.PIXELS]
    for first in ("preprocess", "preprocess_rgb"):
        assert _tensors(_config(tmp_path, first).output) == _declared((pixels,))


def test_the_writer_refuses_an_export_whose_tensors_are_not_the_contracts(tmp_path):
    manifest = _manifest(PRESETS["tiny"])
    head = manifest.parts["d3qe_head"]
    head.outputs = [dataclasses.replace(head.outputs[0], dtype="float16"), *head.outputs[1:]]
    with pytest.raises(ManifestError, match="d3qe_head was exported with tensors .* export again"):
        write_repository(tmp_path, manifest)
    del manifest.parts["d3qe_head"]
    with pytest.raises(ManifestError, match="no d3qe_head"):
        write_repository(tmp_path, manifest)


def test_manifest_json_keeps_the_tensors_written_format(tmp_path):
    manifest = _manifest(PRESETS["tiny"])
    data = json.loads(manifest.text())
    assert data["parts"]["vq_encoder"]["inputs"] == [{"name": "PIXELS", "dtype": "float32", "shape": [-1, 3, 256, 256]}]
    manifest.write(tmp_path)
    assert Manifest.read(tmp_path).parts == manifest.parts
    data["parts"]["vq_encoder"]["inputs"][0]["dtype"] = "flaot32"
    with pytest.raises(ManifestError, match=r"parts.vq_encoder.inputs: PIXELS: .*not a numpy dtype"):
        Manifest.from_json(data)


def test_the_eager_model_gives_the_contracts_tensors(tiny_checkpoint, fixture_images):
    model = load_detector(tiny_checkpoint)
    pixels = torch.stack([preprocess(p.read_bytes()) for p in fixture_images[:2]])
    got = eager_tensors(model, pixels)
    declared = {n: t for n, t in contract.tensors(sizes(model.cfg)).items() if n in got}
    assert (
        set(got) == set(declared) == {n for p in contract.parts().values() for n in (*p.input_names, *p.output_names)}
    )
    for name, tensor in got.items():
        assert str(tensor.dtype).removeprefix("torch.") == declared[name].dtype, name
        assert tuple(tensor.shape) == declared[name].concrete_shape(2), name


def _pil_modes(tree: ast.AST) -> set[int]:
    """The string constants that are PIL image modes (`img.convert("RGB")`, `Image.new("RGB", size)`)."""
    return {
        id(node.args[0])
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in ("convert", "new")
        and node.args
        and isinstance(node.args[0], ast.Constant)
    }


def test_the_clients_restate_no_name_of_the_contract():
    """No client module (nor the soak, which speaks the wire protocol itself) spells a tensor or entrance name, or a
    Triton dtype of the contract, as a string of its own: each reads them from the contract. (The parts' names are
    the server's business; "evidence" is also a client module's name.)"""
    tensors = contract.tensors()
    names = {*tensors, *contract.entrances(), *(t.triton_dtype for t in tensors.values())}
    restated = []
    for path in sorted([*(REPO / "client").rglob("*.py"), REPO / "benchmarks" / "soak.py"]):
        tree = ast.parse(path.read_text())
        modes = _pil_modes(tree)
        restated += [
            f"{path.relative_to(REPO)}:{node.lineno}: {node.value!r}"
            for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and node.value in names and id(node) not in modes
        ]
    assert not restated, restated


def test_one_default_entrance_per_meaning():
    from d3qe_serve.client import evidence, grpc_client, reward, video

    assert grpc_client.DEFAULT_MODEL == contract.IMAGE_ENTRANCE
    assert not hasattr(video, "VIDEO_MODEL") and not hasattr(evidence, "EVIDENCE_MODEL")
    assert not hasattr(reward, "DEFAULT_MODEL")
    assert reward.D3QEReward.__init__.__kwdefaults__["model"] == contract.RGB_ENTRANCE
