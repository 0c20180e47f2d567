from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.fixture_weights import FIXTURE, fixture_state_dict
from tests.helpers import export_checkpoint


@pytest.fixture(scope="session")
def expected() -> dict[str, np.ndarray]:
    with np.load(FIXTURE / "expected.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="session")
def fixture_images(expected) -> list[Path]:
    return [FIXTURE / "images" / str(name) for name in expected["image_names"]]


@pytest.fixture(scope="session")
def tiny_state() -> dict[str, torch.Tensor]:
    return fixture_state_dict()


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_state, tmp_path_factory) -> Path:
    """The fixture's weights as the authors' trainer saves them: {"model": state_dict, ...}."""
    path = tmp_path_factory.mktemp("ckpt") / "d3qe_tiny.pth"
    torch.save({"model": tiny_state, "total_steps": 1000}, path)
    return path


@pytest.fixture(scope="session")
def tiny_vq_checkpoint(tiny_state, tmp_path_factory) -> Path:
    """The tokenizer part alone, laid out like LlamaGen's vq_ds16_c2i.pt."""
    path = tmp_path_factory.mktemp("ckpt") / "vq_tiny.pt"
    vq = {k.removeprefix("vq_model."): v for k, v in tiny_state.items() if k.startswith("vq_model.")}
    torch.save({"model": vq}, path)
    return path


@pytest.fixture(scope="session")
def tiny_repository(tiny_checkpoint, tmp_path_factory) -> Path:
    """The fixture checkpoint exported by `d3qe export` (ONNX Runtime fp32): a complete Triton repository."""
    return export_checkpoint(tiny_checkpoint, tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="session")
def tiny_server(tiny_repository, tmp_path_factory):
    """A real tritonserver on free loopback ports serving `tiny_repository`; its log is in the session's tmp.

    Shared memory is on (off by default) for the client's shared-memory tests.
    """
    from d3qe_serve.serving.endpoints import free_endpoints
    from d3qe_serve.serving.server import TritonServer

    log_path = tmp_path_factory.mktemp("triton") / "server.log"
    with (
        log_path.open("w") as log,
        TritonServer(tiny_repository, free_endpoints(), log=log, shared_memory=True) as server,
    ):
        yield server
