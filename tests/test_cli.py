from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest

from d3qe_serve.cli.main import main
from d3qe_serve.errors import MissingDependencyError, NotFoundError
from d3qe_serve.serving.inprocess import WeightOptions, open_eager, open_exported
from tests.helpers import LOGIT_TOL


def test_score_eager_prints_fixture_logits(tiny_checkpoint, fixture_images, expected, tmp_path, capsys):
    folder = tmp_path / "imgs"
    (folder / "nested").mkdir(parents=True)
    for p in fixture_images:
        shutil.copy(p, folder / "nested" / p.name)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    code = main(["score", "--runtime", "eager", "--checkpoint", str(tiny_checkpoint), "--json", str(folder)])
    rows = {r["source"].split("/")[-1]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert code == 1  # one image failed
    assert "not a decodable image" in rows["broken.png"]["error"]
    for name, logit in zip(expected["image_names"], expected["image_logits_reference"][:, 0], strict=True):
        row = rows[str(name)]
        assert abs(row["logit"] - logit) < LOGIT_TOL
        assert abs(row["probability"] - 1 / (1 + np.exp(-logit))) < 1e-5
        assert row["verdict"] == ("generated" if logit > 0 else "real")


def test_in_process_runtimes_raise_errors_that_the_command_reports(tmp_path, monkeypatch, capsys):
    with pytest.raises(NotFoundError, match="no manifest.json"):
        open_exported(tmp_path)
    assert main(["score", "--runtime", "exported", "--repo", str(tmp_path), "x.png"]) == 2
    assert capsys.readouterr().err.startswith(f"d3qe score: no manifest.json in {tmp_path}")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # not installed, as far as an import can tell
    with pytest.raises(MissingDependencyError, match=r"onnxruntime: pip install 'd3qe-serve\[serve\]'"):
        open_exported(tmp_path)
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(MissingDependencyError, match=r"torch: pip install 'd3qe-serve\[model\]'"):
        open_eager(WeightOptions())
