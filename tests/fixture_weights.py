"""Regenerates the reference fixture's weights by the rule in fixtures/REFERENCE.md."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import torch

FIXTURE = Path(__file__).parent / "fixtures" / "tiny"


def fixture_state_dict(weights_json: Path = FIXTURE / "weights.json") -> dict[str, torch.Tensor]:
    """The upstream-format D³QE state dict the fixture's expected outputs were computed with."""
    spec = json.loads(weights_json.read_text())
    state = {}
    for e in spec["entries"]:
        seed = zlib.crc32(f"{spec['salt']}:{e['key']}".encode())
        n = np.random.default_rng(seed).standard_normal(tuple(e["shape"]))
        v = e["mean"] + e["std"] * (np.abs(n) if e["abs"] else n)
        if e["exp"]:
            v = np.exp(v)
        if e["floor"]:
            v = np.floor(v)
        state[e["key"]] = torch.from_numpy(np.asarray(v).astype(e["dtype"]))
    return state
