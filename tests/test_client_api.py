"""The client's public API: what `d3qe_serve.client` exports, and that importing it costs nothing."""

from __future__ import annotations

import subprocess
import sys

import d3qe_serve.client as client

PUBLIC = [
    "AsyncD3QEClient",
    "AsyncD3QEReward",
    "CodeUsage",
    "D3QEClient",
    "D3QEReward",
    "Evidence",
    "FrameScore",
    "RetryPolicy",
    "ScoreResult",
    "SpanRule",
    "VideoResult",
    "score_video",
]


def test_the_public_names_are_these():
    assert client.__all__ == PUBLIC
    for name in PUBLIC:
        value = getattr(client, name)
        assert value.__name__ == name
        assert value.__module__.startswith("d3qe_serve.client.")
    assert set(PUBLIC) <= set(dir(client))


def test_an_unknown_name_is_an_attribute_error():
    try:
        client.NoSuchThing  # noqa: B018
    except AttributeError as e:
        assert "NoSuchThing" in str(e)
    else:
        raise AssertionError("no AttributeError")


def test_importing_the_client_imports_no_grpc_torch_or_pyav():
    code = "import sys, d3qe_serve.client\nprint(*sys.modules)"
    modules = set(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    )
    assert not {"tritonclient", "grpc", "torch", "av"} & modules
