"""Fixtures of the rollout and cache tests: a second tiny checkpoint and its export, a served copy of the
fixture's export with model control on (the key in a file) and a response cache, and load that keeps scoring."""

from __future__ import annotations

import json
import secrets
import shutil
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from d3qe_serve.contract import IMAGE_ENTRANCE, LOGIT, MANIFEST_ID, THRESHOLD
from tests.fixture_weights import FIXTURE, fixture_state_dict
from tests.helpers import export_checkpoint, image_input

OTHER_SALT = "d3qe-fixture-rollout"  # the fixture's weights drawn again with another salt: another checkpoint


@pytest.fixture(scope="session")
def other_checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("other_ckpt")
    spec = json.loads((FIXTURE / "weights.json").read_text())
    (folder / "weights.json").write_text(json.dumps({**spec, "salt": OTHER_SALT}))
    path = folder / "d3qe_other.pth"
    torch.save({"model": fixture_state_dict(folder / "weights.json"), "total_steps": 1}, path)
    return path


@pytest.fixture(scope="session")
def other_export(other_checkpoint, tmp_path_factory) -> Path:
    """The second checkpoint exported as the fixture's is (ONNX Runtime fp32)."""
    return export_checkpoint(other_checkpoint, tmp_path_factory.mktemp("other_export"))


def eager_logits(checkpoint: Path, images: list[Path]) -> dict[str, float]:
    """The eager model's logit of each image (by file name), from `checkpoint`."""
    from d3qe_serve.serving.inprocess import WeightOptions, open_eager

    score = open_eager(WeightOptions(checkpoint))
    return {Path(r.source).name: r.logit for r in score((str(p), p) for p in images)}


def key_file(folder: Path) -> tuple[Path, str]:
    key = secrets.token_urlsafe(32)
    path = folder / "model-control.key"
    path.write_text(key + "\n")
    path.chmod(0o600)
    return path, key


def served_copy(repository: Path, dest: Path) -> Path:
    """A copy of an export to serve and roll out into (a rollout changes the repository it serves)."""
    return Path(shutil.copytree(repository, dest))


@dataclass
class Answer:
    image: str
    logit: float
    manifest_id: str
    threshold: float


@dataclass
class Load:
    """`clients` threads sending one image a request to an entrance, without retries, until stopped: every
    request is counted as sent, then answered or failed (with the server's message)."""

    url: str
    images: list[Path]
    clients: int = 3
    model: str = IMAGE_ENTRANCE
    sent: int = 0
    answers: list[Answer] = field(default_factory=list)
    failures: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(self.clients)]
        self._data = [(p.name, p.read_bytes()) for p in self.images]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=600)

    def _run(self, k: int) -> None:
        with grpcclient.InferenceServerClient(self.url) as client:
            i = k
            while not self._stop.is_set():
                name, data = self._data[i % len(self._data)]
                i += 1
                with self._lock:
                    self.sent += 1
                try:
                    r = client.infer(self.model, [image_input([data])])
                except InferenceServerException as e:
                    with self._lock:
                        self.failures[f"{e.status()}: {e.message()}"] += 1
                    continue
                answer = Answer(
                    name,
                    float(r.as_numpy(LOGIT).item()),
                    r.as_numpy(MANIFEST_ID).item().decode(),
                    float(r.as_numpy(THRESHOLD).item()),
                )
                with self._lock:
                    self.answers.append(answer)

    def wait_for(self, answers: int, timeout: float = 300.0) -> None:
        """Until `answers` more answers came (or the time is up)."""
        import time

        target, deadline = len(self.answers) + answers, time.monotonic() + timeout
        while len(self.answers) < target and time.monotonic() < deadline:
            time.sleep(0.1)

    @property
    def lost(self) -> int:
        return self.sent - len(self.answers) - sum(self.failures.values())


def logit(client: grpcclient.InferenceServerClient, image: bytes, model: str = IMAGE_ENTRANCE) -> tuple[float, str]:
    r = client.infer(model, [image_input([image])])
    return float(r.as_numpy(LOGIT).item()), r.as_numpy(MANIFEST_ID).item().decode()


def close(a: float, b: float, tol: float) -> bool:
    return bool(np.isclose(a, b, rtol=0, atol=tol))
