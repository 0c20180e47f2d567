"""Triton's response cache on the entrances (`d3qe serve --cache-mb`), on a real tritonserver.

Truth: the fixture's upstream logits and the uncached answer; after a rollout, the second checkpoint's eager
logit: a cached answer never outlives the model that computed it.
"""

from __future__ import annotations

import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from d3qe_serve.contract import IMAGE_ENTRANCE
from d3qe_serve.serving.endpoints import free_endpoints
from d3qe_serve.serving.manifest import Manifest
from d3qe_serve.serving.rollout import read_key, rollout
from d3qe_serve.serving.server import TritonServer
from tests.helpers import LOGIT_TOL

pytest.register_assert_rewrite("tests.rollout_fixtures")  # a plugin of these tests, imported here first
from tests.rollout_fixtures import close, eager_logits, key_file, logit, served_copy  # noqa: E402

pytest_plugins = ("tests.rollout_fixtures",)  # other_checkpoint, other_export
pytestmark = [pytest.mark.server, pytest.mark.slow]
CACHE_BYTES = 1 << 20


@pytest.fixture(scope="module")
def cached(tiny_repository, tmp_path_factory):
    """A served copy of the fixture's export with a 1 MiB response cache and model control (for a rollout)."""
    folder = tmp_path_factory.mktemp("cache")
    repo = served_copy(tiny_repository, folder / "repo")
    path, key = key_file(folder)
    options = {"admin_key": read_key(path), "cache_bytes": CACHE_BYTES}
    with TritonServer(repo, free_endpoints(), **options) as server:
        yield server, repo, key


def cache_counts(client: grpcclient.InferenceServerClient, version: str) -> tuple[int, int]:
    """The entrance's cache (hits, misses) at `version`."""
    (stats,) = [s for s in client.get_inference_statistics(IMAGE_ENTRANCE).model_stats if s.version == version]
    return stats.inference_stats.cache_hit.count, stats.inference_stats.cache_miss.count


def test_a_repeat_is_answered_from_the_cache_as_the_model_answered_it(cached, fixture_images, expected):
    server, repo, _ = cached
    image, reference = fixture_images[1].read_bytes(), float(expected["image_logits_reference"][1, 0])
    with grpcclient.InferenceServerClient(server.endpoints.grpc_url) as client:
        hits, misses = cache_counts(client, "1")
        first = logit(client, image)
        assert cache_counts(client, "1") == (hits, misses + 1)
        again = logit(client, image)
        assert cache_counts(client, "1") == (hits + 1, misses + 1)
        assert again == first and close(first[0], reference, LOGIT_TOL)
        assert first[1] == Manifest.read(repo).id
        other = logit(client, fixture_images[2].read_bytes())  # other bytes: computed, not the cached answer
        assert close(other[0], float(expected["image_logits_reference"][2, 0]), LOGIT_TOL)
    metrics = urllib.request.urlopen(server.endpoints.metrics_url, timeout=10).read().decode()
    assert f'nv_cache_num_hits_per_model{{model="{IMAGE_ENTRANCE}",version="1"}}' in metrics
    util = [float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("nv_cache_util")]
    assert util and 0 < util[0] <= 1


def test_after_a_rollout_the_same_image_gets_the_new_models_score(
    cached, other_export, other_checkpoint, fixture_images
):
    server, repo, key = cached
    image = fixture_images[1]
    url = server.endpoints.grpc_url
    with grpcclient.InferenceServerClient(url) as client:
        before = logit(client, image.read_bytes())
        assert logit(client, image.read_bytes()) == before  # cached
        rollout(repo, other_export, url=url, key=key)
        after = logit(client, image.read_bytes())
        assert cache_counts(client, "2") == (0, 1)  # a miss: the gate's new version keys its own entries
        assert logit(client, image.read_bytes()) == after
        assert cache_counts(client, "2") == (1, 1)
    assert after[1] == Manifest.read(other_export).id != before[1]
    eager = eager_logits(other_checkpoint, [image])[image.name]
    assert close(after[0], eager, LOGIT_TOL) and not np.isclose(after[0], before[0], atol=1e-3)
