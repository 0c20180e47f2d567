"""`d3qe bench` end to end on the fixture export: every configuration agrees with eager; the reports are written."""

from __future__ import annotations

import json

import numpy as np
import pytest

from d3qe_serve.benchmarks.bench import synthetic_images, timed_batches
from d3qe_serve.cli.main import main
from d3qe_serve.d3qe import preprocess

pytestmark = [pytest.mark.server, pytest.mark.slow]


def test_bench_writes_reports_and_every_configuration_matches_eager(
    tiny_repository, tiny_server, tiny_checkpoint, tmp_path
):
    out = tmp_path / "results"
    args = ["bench", "--repo", str(tiny_repository), "--checkpoint", str(tiny_checkpoint), "--images", "3"]
    assert main([*args, "--concurrency", "1", "2", "--url", tiny_server.endpoints.grpc_url, "--out", str(out)]) == 0
    report = json.loads((out / "bench.json").read_text())
    names = [r["name"] for r in report["rows"]]
    served = f"triton gRPC {tiny_repository.name}"
    assert names == [
        "eager (upstream-style), batch 1",
        "eager (upstream-style), batch 4",
        f"in-process {tiny_repository.name}",
        f"{served}, 1 clients",
        f"{served}, 2 clients",
    ]
    assert report["eager_reference"] in names[:2]
    for row in report["rows"]:
        assert row["failed"] == 0 and row["images_per_s"] > 0
        assert row["max_abs_dlogit"] < 1e-4 and row["verdict_agreement"] == 1.0  # the fixture's fp32 tolerance
        assert row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
    assert report["rows"][3]["images"] == 16  # the cpu profile's minimum requests per level
    # the server's own statistics count exactly the timed requests, in every model on their path
    for row in report["rows"][3:]:
        profile = row["time_profile"]
        for model in ("d3qe", "d3qe_pipeline", "preprocess", "vq_encoder", "clip_visual", "d3qe_head"):
            assert profile[model]["requests"] == 16, (row["name"], model, profile[model])
        assert "evidence" not in profile  # plain scoring never runs the evidence part
        assert profile["d3qe_pipeline"]["total_ms"] <= profile["d3qe"]["total_ms"] <= row["p99_ms"]
    assert report["server_batch_policy"]["preprocess"]["max_batch_size"] >= 1
    md = (out / "bench.md").read_text()
    assert f"| {served}, 2 clients |" in md and "| vq_encoder | 16 |" in md
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_decoding_ahead_on_threads_keeps_every_image_in_its_place():
    images = synthetic_images(7)
    want = np.array([preprocess(b).numpy().mean() for b in images])

    def forward(pixels: np.ndarray) -> np.ndarray:
        return pixels.mean(axis=(1, 2, 3))

    for decoders in (1, 3):
        seconds, latencies, got = timed_batches(images, 3, 1, forward, f"{decoders} decoders", decoders=decoders)
        np.testing.assert_array_equal(got, want)
        assert len(latencies) == len(images) and seconds > 0
