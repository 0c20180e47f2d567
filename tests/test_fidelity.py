"""The fidelity benchmark on a slice of the corpus with the tiny fixture: each runtime within its documented bound.

The bounds are the export's tolerances (`export.validate.TOLERANCES`, quoted in docs/export.md): at
least `min_index_agreement` of the code indices equal, no flip where the two best codes are not tied,
LOGIT within `max_abs` (fp32: on the images none of whose tokens flipped). A served repository must give
the logits of the same artifacts run in-process.
"""

from __future__ import annotations

import numpy as np
import pytest

from d3qe_serve import d3qe
from d3qe_serve.benchmarks.fidelity import Config, eager_config, measure, repo_config
from d3qe_serve.export.corpus import corpus
from d3qe_serve.export.validate import TOLERANCES
from d3qe_serve.serving.manifest import Manifest

SLICE = 12


@pytest.fixture(scope="module")
def report(tiny_repository, tiny_checkpoint, tiny_server):
    model = d3qe.load_detector(tiny_checkpoint, freq_bias=Manifest.read(tiny_repository).freq_bias)
    configs = [
        repo_config(tiny_repository, "cpu"),
        eager_config(model, "bf16", "cpu"),
        Config("served", "triton", "-", url=tiny_server.endpoints.grpc_url, limit=6),
    ]
    return {r["config"].split(":")[0]: r for r in measure(model, configs, corpus(SLICE), batch=4)["rows"]}


@pytest.mark.server
@pytest.mark.slow
def test_onnxruntime_fp32_within_its_bound(report):
    r, bound = report["model_repository"], TOLERANCES["fp32"]
    assert r["images"] == SLICE and r["failed"] == 0
    assert r["flips_outside_ties"] == 0
    assert r["token_agreement"] >= bound.min_index_agreement
    assert r["dlogit_images_without_flips"]["max"] <= bound.max_abs["LOGIT"]
    assert r["verdict_agreement"] == 1.0


@pytest.mark.server
@pytest.mark.slow
def test_torch_bf16_within_its_bound(report):
    r, bound = report["torch bf16"], TOLERANCES["bf16"]
    assert r["flips_outside_ties"] == 0
    assert r["token_agreement"] >= bound.min_index_agreement
    assert r["dlogit"]["max"] <= bound.max_abs["LOGIT"]
    assert r["dlogit"]["max"] > 1e-4  # it did run in bf16


@pytest.mark.server
@pytest.mark.slow
def test_served_equals_the_same_artifacts_in_process(report):
    served, local = report["served"], report["model_repository"]
    assert served["images"] == 6 and served["failed"] == 0
    in_process = np.array(local["per_image_dlogit"])[served["image_indices"]]
    np.testing.assert_allclose(served["per_image_dlogit"], in_process, rtol=0, atol=1e-5)
