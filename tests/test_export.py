"""`d3qe export` on the tiny fixture checkpoint: artifacts, manifest, validation, and the fixture's own logits."""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import tritonclient.grpc.model_config_pb2 as mc
from google.protobuf import json_format, text_format

from d3qe_serve import d3qe
from d3qe_serve.cli.main import main
from d3qe_serve.d3qe.parts import PART_NAMES, part_specs
from d3qe_serve.errors import ValidationError
from d3qe_serve.export.corpus import corpus
from d3qe_serve.export.driver import export_repository
from d3qe_serve.export.onnx_export import export_onnx
from d3qe_serve.export.quantize import nodes_in_scopes, quantize_int8
from d3qe_serve.export.validate import TOLERANCES
from d3qe_serve.serving.inprocess import WeightOptions, run_parts
from d3qe_serve.serving.manifest import Manifest, ManifestError, sha256_file
from d3qe_serve.serving.model_params import PartParameters
from d3qe_serve.serving.repository import write_repository
from d3qe_serve.serving.runtimes import MissingProviderError, OnnxRuntimeRunner, load_part
from tests.helpers import LOGIT_TOL


@pytest.fixture(scope="session")
def fixture_pixels(fixture_images) -> np.ndarray:
    return torch.stack([d3qe.preprocess(p) for p in fixture_images]).numpy()


@pytest.fixture(scope="session")
def onnx_repo(tiny_checkpoint, fixture_images, tmp_path_factory):
    """The tiny fixture checkpoint exported once per session, `stats` mode (frequency lookup in the head)."""
    out = tmp_path_factory.mktemp("repo")
    argv = ["export", "--checkpoint", str(tiny_checkpoint), "--freq-bias", "stats", "--out", str(out)]
    assert main([*argv, "--max-batch", "8", "--native-configs", "--images", *map(str, fixture_images[:4])]) == 0
    return out


@pytest.fixture(scope="session")
def onnx_runners(onnx_repo) -> dict:
    return {part: load_part(onnx_repo, part) for part in PART_NAMES}


def test_manifest_records_validated_artifacts(onnx_repo, tiny_checkpoint):
    manifest = Manifest.read(onnx_repo)
    assert manifest.passed and manifest.runtime == "onnxruntime" and manifest.precision == "fp32"
    assert manifest.checkpoint["sha256"] == sha256_file(tiny_checkpoint)
    assert {"torch", "onnx", "onnxruntime", "onnxscript"} <= manifest.tools.keys()
    assert manifest.d3qe_config() == d3qe.PRESETS["tiny"]
    assert manifest.freq_bias == "stats"
    for part in PART_NAMES:
        entry = manifest.parts[part]
        assert entry.file == f"{part}/1/model.onnx"
        assert entry.sha256 == sha256_file(onnx_repo / entry.file)
        validation = entry.validation
        assert validation["passed"] and sorted(validation["batches"], key=int) == ["1", "3", "8"]
        assert validation["tolerance"] == TOLERANCES["fp32"].as_dict()
        for output in entry.outputs:
            measured = validation["worst"][output.name]
            if output.dtype == "int64":  # equal but for near-ties, which are counted
                assert measured["agreement"] >= TOLERANCES["fp32"].min_index_agreement
                assert measured["flips_outside_ties"] == 0 and measured["near_ties"] >= measured["mismatches"]
            else:
                assert measured["max_abs"] <= TOLERANCES["fp32"].max_abs[output.name]
    assert manifest.end_to_end["passed"] and manifest.end_to_end["measured"]["INDICES"]["flips_outside_ties"] == 0
    given = [n for n in manifest.validation_inputs if not n.startswith("corpus:")]  # --images, first
    assert manifest.validation_inputs[len(given) :] == [f"corpus:{item.name}" for item in corpus(8 - len(given))]


def test_manifest_reader_names_what_is_wrong(onnx_repo, tmp_path):
    """One reader: another format, an unknown or a missing field is refused with its name."""
    data = json.loads((onnx_repo / "manifest.json").read_text())
    for change, message in [
        ({"format": "d3qe-export/0"}, r"format 'd3qe-export/0', expected 'd3qe-export/1'"),
        ({"surprise": 1}, r"unknown fields \['surprise'\]"),
    ]:
        (tmp_path / "manifest.json").write_text(json.dumps({**data, **change}))
        with pytest.raises(ManifestError, match=message):
            Manifest.read(tmp_path)
    del data["parts"]["d3qe_head"]["sha256"]
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=r"parts.d3qe_head: unknown fields \[\], missing fields \['sha256'\]"):
        Manifest.read(tmp_path)
    assert Manifest.from_json(json.loads((onnx_repo / "manifest.json").read_text())).to_json() == json.loads(
        (onnx_repo / "manifest.json").read_text()
    )


def test_manifests_from_before_static_int8_read_as_written(onnx_repo):
    """A part's int8 of an older export (a description in `quantization`) reads as dynamic, and the manifest
    reads back to the very same JSON (so its id, which bulk rows and the gates carry, is unchanged)."""
    data = json.loads((onnx_repo / "manifest.json").read_text())
    assert not {"quantized", "calibration", "inference_precision"} & data["parts"]["clip_visual"].keys()
    old = "onnxruntime quantize_dynamic: MatMul/Gemm in clip_model.visual"
    data["parts"]["clip_visual"].update(precision="int8", quantization=old)
    manifest = Manifest.from_json(data)
    assert manifest.parts["clip_visual"].quantization_kind == "dynamic"
    assert manifest.parts["vq_encoder"].quantization_kind is None
    assert manifest.to_json() == data


def test_native_configs_only_when_asked(onnx_repo, tiny_repository):
    """`--native-configs` adds the container's backend configs beside the python-backend ones."""
    for part in PART_NAMES:
        assert "onnxruntime_onnx" in (onnx_repo / part / "configs" / "native.pbtxt").read_text()
        assert (onnx_repo / part / "config.pbtxt").is_file()
        assert not (tiny_repository / part / "configs").exists()


def test_onnx_graphs_have_declared_io_and_dynamic_batch(onnx_repo):
    specs = part_specs(d3qe.PRESETS["tiny"])
    for part, spec in specs.items():
        graph = onnx.load(onnx_repo / part / "1" / "model.onnx", load_external_data=False).graph
        for declared, actual in ((spec.inputs, graph.input), (spec.outputs, graph.output)):
            assert [t.name for t in actual] == [t.name for t in declared]
            for d, a in zip(declared, actual, strict=True):
                dims = a.type.tensor_type.shape.dim
                assert dims[0].dim_param and not dims[0].dim_value  # symbolic batch axis
                assert [x.dim_value for x in dims[1:]] == list(d.shape[1:])
                assert onnx.helper.tensor_dtype_to_np_dtype(a.type.tensor_type.elem_type) == np.dtype(d.dtype)


def test_fixture_logits_reproduced_through_onnxruntime(onnx_runners, expected, fixture_pixels):
    for pixels, prefix in ((expected["x"], "x"), (fixture_pixels, "image")):
        out = run_parts(onnx_runners, pixels)
        np.testing.assert_array_equal(out["INDICES"], expected[f"{prefix}_indices"])
        np.testing.assert_allclose(out["LOGIT"], expected[f"{prefix}_logits_stats"], rtol=0, atol=LOGIT_TOL)
        np.testing.assert_allclose(out["PROB"], 1 / (1 + np.exp(-out["LOGIT"])), rtol=0, atol=1e-6)


def test_reference_mode_head_keeps_indices_input(tiny_checkpoint, onnx_repo, onnx_runners, expected, tmp_path):
    """In `reference` mode the indices do not change the logit, but the ensemble still feeds them."""
    model = d3qe.load_detector(tiny_checkpoint, freq_bias="reference")
    spec = part_specs(model.cfg)["d3qe_head"]
    path = tmp_path / "head.onnx"
    export_onnx(spec, model, path, max_batch=8)
    head = OnnxRuntimeRunner("d3qe_head", Manifest.read(onnx_repo).parts["d3qe_head"], path)  # same tensors
    assert head.session.get_inputs()[1].name == "INDICES"
    out = run_parts({**onnx_runners, "d3qe_head": head}, expected["x"])
    np.testing.assert_allclose(out["LOGIT"], expected["x_logits_reference"], rtol=0, atol=LOGIT_TOL)
    shuffled = {**out, "INDICES": out["INDICES"][:, ::-1].copy()}
    feeds = {n: shuffled[n] for n in head.input_names}
    np.testing.assert_allclose(head(feeds)["LOGIT"], out["LOGIT"], rtol=0, atol=1e-6)
    assert np.abs(onnx_runners["d3qe_head"](feeds)["LOGIT"] - out["LOGIT"]).max() > 1e-4  # stats mode reads them


def test_runner_takes_every_batch_up_to_max_and_names_bad_inputs(onnx_runners, expected):
    vq = onnx_runners["vq_encoder"]
    x = np.concatenate([expected["x"]] * 3)  # 9 images
    assert vq({"PIXELS": x[:2]})["INDICES"].shape == (2, 256)
    with pytest.raises(ValueError, match="batch of 9; this export takes 1 to 8"):
        vq({"PIXELS": x})
    with pytest.raises(ValueError, match="PIXELS has dtype float64, expected float32"):
        vq({"PIXELS": x[:1].astype(np.float64)})
    with pytest.raises(ValueError, match=r"PIXELS has shape \[1, 3, 224, 224\]"):
        vq({"PIXELS": x[:1, :, :224, :224]})
    head = onnx_runners["d3qe_head"]
    with pytest.raises(ValueError, match="missing input CLIP_FEAT"):
        head({"RESIDUAL": np.zeros((1, 8, 16, 16), np.float32), "INDICES": np.zeros((1, 256), np.int64)})


def run_chain_tensors(runners: dict, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    """`run_parts` as the Triton models run it: torch tensors from part to part, on the runners' device."""
    tensors = {"PIXELS": pixels}
    for part in PART_NAMES:
        tensors.update(runners[part].run_tensors({n: tensors[n] for n in runners[part].input_names}))
    return tensors


def test_runner_passes_torch_tensors_through_io_binding(onnx_runners, expected):
    out = run_chain_tensors(onnx_runners, torch.from_numpy(expected["x"]))
    assert all(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in out.values())
    np.testing.assert_array_equal(out["INDICES"].numpy(), expected["x_indices"])
    np.testing.assert_allclose(out["LOGIT"].numpy(), expected["x_logits_stats"], rtol=0, atol=LOGIT_TOL)
    assert torch.equal(out["LOGIT"], torch.from_numpy(run_parts(onnx_runners, expected["x"])["LOGIT"]))
    with pytest.raises(ValueError, match="PIXELS has dtype float64, expected float32"):
        onnx_runners["vq_encoder"].run_tensors({"PIXELS": torch.from_numpy(expected["x"]).double()})


@pytest.mark.skipif(
    not torch.cuda.is_available() or "CUDAExecutionProvider" not in ort.get_available_providers(),
    reason="needs a CUDA GPU and onnxruntime-gpu (none here); the GPU hand-off is unverified",
)
def test_runners_keep_tensors_on_the_gpu(onnx_repo, expected):
    runners = {part: load_part(onnx_repo, part, "cuda") for part in PART_NAMES}
    out = run_chain_tensors(runners, torch.from_numpy(expected["x"]).cuda())
    assert all(t.device.type == "cuda" for t in out.values())
    np.testing.assert_array_equal(out["INDICES"].cpu().numpy(), expected["x_indices"])
    np.testing.assert_allclose(out["LOGIT"].cpu().numpy(), expected["x_logits_stats"], rtol=0, atol=LOGIT_TOL)


@pytest.mark.skipif(
    "CUDAExecutionProvider" in ort.get_available_providers(), reason="onnxruntime-gpu is installed: it runs there"
)
def test_onnx_runtime_without_its_cuda_provider_refuses_a_gpu(onnx_repo):
    with pytest.raises(MissingProviderError, match=r"clip_visual: asked to run on cuda:0.*pip install onnxruntime-gpu"):
        load_part(onnx_repo, "clip_visual", "cuda:0")


def test_only_torch_runtime_parts_compile(onnx_repo, tmp_path):
    with pytest.raises(ValueError, match="d3qe_head: compile applies to the torch runtime"):
        load_part(onnx_repo, "d3qe_head", compile=True)
    with pytest.raises(ValueError, match="compile applies to torch-runtime parts; clip_visual, d3qe_head, evidence"):
        write_repository(tmp_path, Manifest.read(onnx_repo), compile=True)


def test_int8_quantises_only_clips_transformer(onnx_repo, onnx_runners, expected, fixture_pixels, tmp_path):
    """int8 touches MatMul/Gemm inside CLIP's visual tower only; code indices and the head stay fp32."""
    specs = part_specs(d3qe.PRESETS["tiny"])
    assert [p for p, spec in specs.items() if spec.int8_scopes] == ["clip_visual"]
    vq = onnx.load(onnx_repo / "vq_encoder" / "1" / "model.onnx")
    in_encoder = set(nodes_in_scopes(vq, ["encoder"]))
    convs = [n.name for n in vq.graph.node if n.op_type == "Conv"]
    assert in_encoder >= set(convs[:-1]) and convs[-1] not in in_encoder  # the last one is quant_conv
    assert not in_encoder & {n.name for n in vq.graph.node if n.op_type == "ArgMin"}
    path = tmp_path / "clip_int8.onnx"
    quantize_int8(specs["clip_visual"], onnx_repo / "clip_visual" / "1" / "model.onnx", path)
    assert any(n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") for n in onnx.load(path).graph.node)
    entry = Manifest.read(onnx_repo).parts["clip_visual"]
    int8 = run_parts({**onnx_runners, "clip_visual": OnnxRuntimeRunner("clip_visual", entry, path)}, fixture_pixels)
    tolerance = TOLERANCES["int8"]
    np.testing.assert_array_equal(int8["INDICES"], expected["image_indices"])
    assert np.abs(int8["LOGIT"] - expected["image_logits_stats"]).max() <= tolerance.max_abs["LOGIT"]
    assert np.abs(int8["LOGIT"] - expected["image_logits_stats"]).max() > LOGIT_TOL  # it did quantise


def test_torch_runtime_rebuilds_parts_from_safetensors(tiny_checkpoint, expected, tmp_path):
    model = d3qe.load_detector(tiny_checkpoint, freq_bias="stats")
    options = WeightOptions(tiny_checkpoint, freq_bias="stats")
    manifest = export_repository(model, tmp_path, runtime="torch", weights=options, log=lambda _: None)
    assert manifest.passed
    for part in PART_NAMES:
        weights = tmp_path / part / "1" / "model.safetensors"
        assert manifest.parts[part].file == f"{part}/1/model.safetensors"
        assert weights.read_bytes()[8:9] == b"{"  # a safetensors JSON header, no pickle
    out = run_parts({part: load_part(tmp_path, part) for part in PART_NAMES}, expected["x"])
    np.testing.assert_array_equal(out["INDICES"], expected["x_indices"])
    np.testing.assert_allclose(out["LOGIT"], expected["x_logits_stats"], rtol=0, atol=LOGIT_TOL)

    # compiled (Inductor, here on the CPU; CUDA graphs on a GPU), batches padded to a bucket: as eager
    head = load_part(tmp_path, "d3qe_head", compile=True)
    assert head.buckets == (1, 2, 4, 8)
    for batch in (3, 1):  # 3 runs padded to 4
        got = head({n: out[n][:batch] for n in head.input_names})
        assert got["LOGIT"].shape == (batch, 1)
        np.testing.assert_allclose(got["LOGIT"], out["LOGIT"][:batch], rtol=0, atol=1e-5)
    write_repository(tmp_path, manifest, compile=True)  # what `d3qe export --runtime torch --compile` serves
    config = text_format.Parse((tmp_path / "d3qe_head" / "config.pbtxt").read_text(), mc.ModelConfig())
    assert PartParameters.from_config(json_format.MessageToDict(config, preserving_proto_field_name=True)).compile


def test_export_beyond_tolerance_fails_loudly(tiny_checkpoint, tmp_path, monkeypatch):
    """int8 held to fp32's tolerance: the export raises, the manifest says why, and nothing serves it."""
    monkeypatch.setitem(TOLERANCES, "int8", TOLERANCES["fp32"])
    model = d3qe.load_detector(tiny_checkpoint)
    with pytest.raises(ValidationError, match=r"clip_visual: CLIP_FEAT: max \|Δ\| .* > tolerance 0.0001"):
        export_repository(model, tmp_path, precision="int8", max_batch=4, log=lambda _: None)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["passed"] is False
    parts = manifest["parts"]
    assert [parts[p]["precision"] for p in PART_NAMES] == ["fp32", "int8", "fp32"]  # int8 only where declared
    assert parts["clip_visual"]["quantization"] == "dynamic"  # --precision int8 on onnxruntime: as always
    assert parts["clip_visual"]["quantized"].startswith("onnxruntime quantize_dynamic: MatMul/Gemm in clip_model")
    assert [parts[p]["validation"]["passed"] for p in PART_NAMES] == [True, False, True]
    assert sorted(parts["vq_encoder"]["validation"]["batches"], key=int) == ["1", "3", "4"]
    assert not (tmp_path / "d3qe" / "config.pbtxt").exists()  # no Triton repository around failed artifacts
    with pytest.raises(ValueError, match="failed validation"):
        load_part(tmp_path, "clip_visual")


def test_an_altered_artifact_is_refused_by_name(onnx_repo, tmp_path):
    """A truncated or changed file may still load and score wrongly: load_part checks it against the manifest."""
    shutil.copytree(onnx_repo, tmp_path, dirs_exist_ok=True)
    with (tmp_path / "d3qe_head" / "1" / "model.onnx").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(ValueError, match=r"d3qe_head: .* is not the file exported \(its sha256 differs"):
        load_part(tmp_path, "d3qe_head")
    load_part(tmp_path, "vq_encoder")  # the untouched parts still load


def test_unsupported_precision_is_refused_before_exporting(tiny_checkpoint, tmp_path, capsys):
    argv = ["export", "--checkpoint", str(tiny_checkpoint), "--runtime", "onnxruntime", "--precision", "bf16"]
    assert main([*argv, "--out", str(tmp_path)]) == 2
    assert "no bfloat16 kernels" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.skipif(
    importlib.util.find_spec("tensorrt") is None or not torch.cuda.is_available(),
    reason="needs TensorRT (its PyPI wheels fetch libraries from NVIDIA's index) and a CUDA GPU: engines unverified",
)
def test_tensorrt_engines_reproduce_fixture(tiny_checkpoint, expected, tmp_path):
    model = d3qe.load_detector(tiny_checkpoint, freq_bias="stats")
    manifest = export_repository(
        model, tmp_path, runtime="tensorrt", precision="fp32", device="cuda", log=lambda _: None
    )
    assert manifest.passed
    out = run_parts({part: load_part(tmp_path, part, "cuda") for part in PART_NAMES}, expected["x"])
    np.testing.assert_array_equal(out["INDICES"], expected["x_indices"])
    np.testing.assert_allclose(out["LOGIT"], expected["x_logits_stats"], rtol=0, atol=LOGIT_TOL)
