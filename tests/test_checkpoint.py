"""Checkpoint loading: architecture inference, presets, and a clear error for each kind of bad file."""

from __future__ import annotations

import pytest
import torch

from d3qe_serve import d3qe
from d3qe_serve.d3qe.config import PRESETS, config_from_state_dict


def test_sizes_inferred_from_fixture_equal_tiny_preset(tiny_state):
    assert config_from_state_dict(tiny_state) == PRESETS["tiny"]


def test_full_preset_sizes_round_trip():
    with pytest.warns(UserWarning, match="random weights"):
        model = d3qe.load_detector(preset="full")
    assert config_from_state_dict(model.state_dict()) == PRESETS["full"]
    # CLIP ViT-L/14 visual (~303M) + VQ-16 encoder + head
    assert 320e6 < sum(p.numel() for p in model.parameters()) < 360e6


def test_seeded_weights_are_reproducible(expected):
    x = torch.from_numpy(expected["x"][:1])
    with pytest.warns(UserWarning), torch.inference_mode():
        a = d3qe.load_detector(preset="tiny", seed=3)(x)
        b = d3qe.load_detector(preset="tiny", seed=3)(x)
        c = d3qe.load_detector(preset="tiny", seed=4)(x)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_model_is_in_eval_mode(tiny_checkpoint):
    assert not any(m.training for m in d3qe.load_detector(tiny_checkpoint).modules())


def test_unknown_preset_and_mode():
    with pytest.raises(ValueError, match="unknown preset"):
        d3qe.load_detector(preset="huge")
    with pytest.raises(ValueError, match="freq_bias"), pytest.warns(UserWarning):
        d3qe.load_detector(preset="tiny", freq_bias="sometimes")


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        d3qe.load_detector(tmp_path / "nope.pth")


def test_truncated_file(tiny_checkpoint, tmp_path):
    cut = tmp_path / "cut.pth"
    cut.write_bytes(tiny_checkpoint.read_bytes()[:100_000])
    with pytest.raises(d3qe.CheckpointError, match="truncated"):
        d3qe.load_detector(cut)


def test_foreign_file(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("this is not a checkpoint\n")
    with pytest.raises(d3qe.CheckpointError, match="not a PyTorch checkpoint"):
        d3qe.load_detector(text)


class _Payload:
    def __reduce__(self):
        return (print, ("code ran during unpickling",))


def test_pickle_with_code_is_refused(tmp_path, capsys):
    evil = tmp_path / "evil.pth"
    torch.save({"model": {"x": _Payload()}}, evil)
    with pytest.raises(d3qe.CheckpointError, match="refused to unpickle"):
        d3qe.load_detector(evil)
    assert "code ran" not in capsys.readouterr().out


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pth"
    torch.save({"model": {"a": torch.zeros(1), "b": "text"}}, path)
    with pytest.raises(d3qe.CheckpointError, match="not tensors"):
        d3qe.load_detector(path)


def test_all_problems_named_in_one_error(tiny_state, tmp_path):
    state = dict(tiny_state)
    del state["fc.4.weight"]
    del state["clip_model.visual.ln_post.bias"]
    state["mixed_proj.1.bias"] = torch.zeros(7)
    state["feature_processor.9.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save({"model": state}, path)
    with pytest.raises(d3qe.CheckpointError) as err:
        d3qe.load_detector(path)
    msg = str(err.value)
    assert "4 problems" in msg
    assert "missing: fc.4.weight" in msg and "missing: clip_model.visual.ln_post.bias" in msg
    assert "wrong shape: mixed_proj.1.bias is (7,), expected (256,)" in msg
    assert "unknown: feature_processor.9.weight" in msg


def test_missing_size_key_still_lists_everything(tiny_state, tmp_path):
    state = {k: v for k, v in tiny_state.items() if not k.startswith("feature_processor.3.")}
    path = tmp_path / "no_d3at.pth"
    torch.save({"model": state}, path)
    with pytest.raises(d3qe.CheckpointError, match="missing: feature_processor.3.pos_embed"):
        d3qe.load_detector(path)


def test_unused_upstream_keys_are_ignored(tiny_state, tmp_path):
    """Text tower and VQ decoder keys are in every upstream checkpoint; inference never reads them."""
    assert any(k.startswith("clip_model.transformer.") for k in tiny_state)
    assert any(k.startswith("vq_model.decoder.") for k in tiny_state)
    model = d3qe.load_detector(_save(tiny_state, tmp_path / "ok.pth"))
    assert not any(k.startswith(("vq_model.decoder", "clip_model.token_embedding")) for k in model.state_dict())


def test_bad_vq_checkpoint(tiny_checkpoint, tmp_path):
    not_vq = _save({"encoder.conv_in.weight": torch.zeros(1)}, tmp_path / "not_vq.pt")
    with pytest.raises(d3qe.CheckpointError, match="wrong shape: vq_model.encoder.conv_in.weight"):
        d3qe.load_detector(tiny_checkpoint, not_vq)


def test_corrupt_safetensors(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(d3qe.CheckpointError, match="safetensors"):
        d3qe.load_detector(path)


def _save(state, path):
    torch.save({"model": state}, path)
    return path
