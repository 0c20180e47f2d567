"""The client installs and works where an RL trainer lives: numpy 2 and a torch other than the dev pin.

A fresh venv gets the built wheel with the `video` extra, numpy >= 2 and torch 2.13.0 (not the 2.14.1 of
constraints.txt), from the package index; its reward client then scores a torch uint8 batch against the
real tiny server, and the scores must equal the fixture's.
"""

from __future__ import annotations

import json
import subprocess
import sys
import venv
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import LOGIT_TOL

REPO = Path(__file__).resolve().parents[1]
OTHER_TORCH = "torch==2.13.0"  # the CPU build this machine's pip takes from disk; constraints.txt pins 2.14.1

SCRIPT = """
import json, sys
import numpy, torch
from PIL import Image
from d3qe_serve.client import D3QEReward
paths = json.loads(sys.argv[2])
pixels = [torch.from_numpy(numpy.asarray(Image.open(p).convert("RGB"))).permute(2, 0, 1) for p in paths]
# What a trainer holds: CHW tensors, uint8 and float in [0, 1] (which the reward rounds back to the same uint8).
images = [t if i % 2 else t.float() / 255 for i, t in enumerate(pixels)]
reward = D3QEReward(sys.argv[1], score="neg_logit")
reward.wait_until_ready(60)
scores, info = reward(images)
print(json.dumps({"numpy": numpy.__version__, "torch": torch.__version__, "scores": scores.tolist(),
                  "logits": info["logit"].tolist(), "errors": info["error"]}))
"""


@pytest.fixture(scope="module")
def client_env(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("client-env")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(root), "."],
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = root.glob("d3qe_serve-*.whl")
    venv.create(root / "venv", with_pip=True)
    python = root / "venv" / "bin" / "python"
    cmd = [python, "-m", "pip", "install", "-q", f"{wheel}[video]", "numpy>=2", OTHER_TORCH]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return python


@pytest.mark.slow
@pytest.mark.server
def test_the_reward_client_scores_beside_numpy_2_and_another_torch(client_env, tiny_server, fixture_images, expected):
    out = subprocess.run(
        [client_env, "-c", SCRIPT, tiny_server.endpoints.grpc_url, json.dumps([str(p) for p in fixture_images])],
        capture_output=True,
        text=True,
        timeout=300,
        cwd="/",  # nothing of the checkout on the path: the installed wheel only
    )
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.splitlines()[-1])
    assert got["numpy"].startswith("2.") and got["torch"].startswith("2.13.")
    assert got["errors"] == [None] * len(fixture_images)
    want = expected["image_logits_reference"][:, 0]
    np.testing.assert_allclose(got["logits"], want, rtol=0, atol=LOGIT_TOL)
    np.testing.assert_allclose(got["scores"], -np.asarray(got["logits"]), rtol=0, atol=1e-6)
