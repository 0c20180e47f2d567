"""`d3qe tune` on the tiny fixture: every candidate measured and recorded, the choice within the bounds, a
candidate that cannot be built recorded and never chosen, and the written repository served."""

from __future__ import annotations

import json

import numpy as np
import pytest

from d3qe_serve.cli.main import main
from d3qe_serve.client.grpc_client import D3QEClient
from d3qe_serve.contract import CLIP_VISUAL, D3QE_HEAD, LOGIT, VQ_ENCODER
from d3qe_serve.export.bounds import BOUNDS
from d3qe_serve.export.tune import TUNING_JSON
from d3qe_serve.export.validate import TOLERANCES
from d3qe_serve.serving.endpoints import free_endpoints
from d3qe_serve.serving.inprocess import open_exported
from d3qe_serve.serving.manifest import Manifest
from d3qe_serve.serving.runtimes import load_part
from d3qe_serve.serving.server import TritonServer
from tests.helpers import LOGIT_TOL

CANDIDATES = {
    # openvino bf16: 89 % of the tiny VQ's codes equal on this CPU; on a CPU without bf16 it fails to build
    VQ_ENCODER: [("onnxruntime", "fp32"), ("torch", "fp32"), ("openvino", "bf16"), ("tensorrt", "fp32")],
    CLIP_VISUAL: [("onnxruntime", "fp32"), ("onnxruntime", "int8-dynamic"), ("openvino", "int8")],
    D3QE_HEAD: [("onnxruntime", "fp32"), ("openvino", "fp32")],
}
BATCHES = ("1", "4")


@pytest.fixture(scope="module")
def tuned(tiny_checkpoint, tmp_path_factory):
    """`d3qe tune --bounds exact` on 6 corpus images, static int8 calibrated on 4 others."""
    out = tmp_path_factory.mktemp("tune") / "tuned"
    args = ["tune", "--checkpoint", str(tiny_checkpoint), "--bounds", "exact", "--out", str(out)]
    args += ["--limit", "6", "--calibration", "4", "--batch", *BATCHES, "--rounds", "1", "--runs", "1"]
    for part, choices in CANDIDATES.items():
        for runtime, precision in choices:
            args += ["--candidate", part, runtime, precision]
    assert main(args) == 0
    return out


def test_the_manifest_records_every_candidate_and_why_each_part_got_its_choice(tuned):
    manifest = Manifest.read(tuned)
    record = manifest.tuning
    assert record["bounds"] == BOUNDS["exact"].as_dict()
    assert record["judged"]["images"] == 6 and record["calibration"]["images"] == 4
    assert not set(record["judged"]["names"]) & {n for n in manifest.validation_inputs}
    assert json.loads((tuned / TUNING_JSON).read_text())["parts"] == record["parts"]
    assert (tuned / "tuning.png").stat().st_size > 0
    for part, choices in CANDIDATES.items():
        tuned_part = record["parts"][part]
        rows = tuned_part["candidates"]
        assert [(r["runtime"], r["precision"]) for r in rows] == choices
        measured = [r for r in rows if r["status"] == "measured"]
        assert len(measured) >= 2, part
        for row in measured:
            assert all(row["speed"]["batches"][b]["images_per_s"] > 0 for b in BATCHES)
            assert row["holds"] == (not row["violations"])
            e2e = row["fidelity"]["end_to_end"]
            assert 0 <= e2e["dlogit"]["p50"] <= e2e["dlogit"]["p99"] <= e2e["dlogit"]["max"]
            assert 0 <= e2e["verdict_agreement"] <= 1
        chosen = [r for r in rows if r["chosen"]]
        assert len(chosen) == 1 and chosen[0]["status"] == "measured"
        assert tuned_part["choice"] == {"runtime": chosen[0]["runtime"], "precision": chosen[0]["precision"]}
        assert tuned_part["reason"] and tuned_part["same_artifact_as_measured"]
        entry = manifest.parts[part]
        assert (entry.runtime, entry.precision) == (chosen[0]["runtime"], chosen[0]["precision"].partition("-")[0])
        faster_within = [r for r in measured if r["holds"] and r["speed"]["score"] > chosen[0]["speed"]["score"]]
        assert chosen[0]["holds"] and not faster_within, part
    vq = {r["runtime"]: r for r in record["parts"][VQ_ENCODER]["candidates"]}
    assert vq["onnxruntime"]["fidelity"]["codes"]["flips_outside_ties"] == 0
    assert "codes" in vq["torch"]["fidelity"] and "cosine" in record["parts"][CLIP_VISUAL]["candidates"][0]["fidelity"]
    assert record["end_to_end"]["images"] == 6 and record["end_to_end"]["flips_outside_ties"] == 0


def test_a_candidate_that_cannot_be_built_is_recorded_and_never_chosen(tuned):
    rows = Manifest.read(tuned).tuning["parts"][VQ_ENCODER]["candidates"]
    tensorrt = next(r for r in rows if r["runtime"] == "tensorrt")
    assert tensorrt["status"] == "failed" and tensorrt["stage"] == "build" and not tensorrt["chosen"]
    assert "tensorrt" in tensorrt["error"]  # not installed here, and a GPU runtime besides
    assert "tensorrt fp32 (build failed)" in Manifest.read(tuned).tuning["parts"][VQ_ENCODER]["reason"]


def test_a_bound_no_reduced_precision_meets_yields_fp32(tuned):
    """`exact` asks CLIP for cosine ≥ 0.99999: int8 does not keep it, so fp32 is chosen whatever int8's speed."""
    record = Manifest.read(tuned).tuning["parts"][CLIP_VISUAL]
    assert record["choice"]["precision"] == "fp32"
    reduced = [r for r in record["candidates"] if r["precision"] != "fp32" and r["status"] == "measured"]
    assert reduced and all(not r["holds"] and any("cosine" in v for v in r["violations"]) for r in reduced)


def test_the_tuned_repository_serves_the_eager_scores(tuned, fixture_images, expected):
    """Served over gRPC, image bytes in: the in-process chain's logits, and eager's within the fp32 tolerance."""
    manifest = Manifest.read(tuned)
    assert manifest.passed
    for part in manifest.parts:
        load_part(tuned, part)  # the artifact checked against the manifest, then loaded
    in_process = [r.logit for r in open_exported(tuned)((p.name, p.read_bytes()) for p in fixture_images)]
    with TritonServer(tuned, free_endpoints()) as server, D3QEClient(server.endpoints.grpc_url) as client:
        results = list(client.score((p.name, p.read_bytes()) for p in fixture_images))
    assert all(r.ok for r in results), [r.error for r in results]
    served = [r.logit for r in results]
    np.testing.assert_allclose(served, in_process, rtol=0, atol=LOGIT_TOL)
    eager = expected["image_logits_reference"][:, 0]
    np.testing.assert_allclose(served, eager, rtol=0, atol=TOLERANCES["fp32"].max_abs[LOGIT])


@pytest.mark.parametrize(
    ("cosines", "holds"),
    [
        ([1.0] * 99 + [0.998], True),  # 99 % at ≥ 0.999, none below 0.995
        ([1.0] * 98 + [0.998] * 2, False),  # 98 % at ≥ 0.999
        ([1.0] * 99 + [0.994], False),  # one below the floor
    ],
)
def test_default_bounds_on_clip_cosines(cosines, holds):
    fidelity = {"cosine": {"per_image": cosines, "min": min(cosines)}}
    assert (not BOUNDS["default"].violations(["CLIP_FEAT"], fidelity)) == holds


def test_vq_bounds_refuse_flips_outside_near_ties_and_low_agreement():
    def codes(agreement: float, outside: int) -> dict:
        return {"codes": {"agreement": agreement, "flips_outside_ties": outside}}

    outputs = ["RESIDUAL", "INDICES"]
    for bounds in BOUNDS.values():  # the codes are the detector's signal: every name holds them to fp32 parity
        assert not bounds.violations(outputs, codes(0.9995, 0))
        assert bounds.violations(outputs, codes(0.9995, 1))
        assert bounds.violations(outputs, codes(0.998, 0))
