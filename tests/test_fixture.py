"""The eager model against the authors' own outputs on the regenerated fixture weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from d3qe_serve import d3qe
from tests.helpers import LOGIT_TOL


@pytest.fixture(scope="module", params=["reference", "stats"])
def model_and_mode(request, tiny_checkpoint):
    return d3qe.load_detector(tiny_checkpoint, freq_bias=request.param), request.param


def test_tensor_inputs_match_upstream(model_and_mode, expected):
    model, mode = model_and_mode
    x = torch.from_numpy(expected["x"])
    with torch.inference_mode():
        logits = model(x)
        _, indices = model.vq_model(x)
    assert logits.shape == (3, 1) and logits.dtype == torch.float32
    np.testing.assert_allclose(logits.numpy(), expected[f"x_logits_{mode}"], rtol=0, atol=LOGIT_TOL)
    np.testing.assert_array_equal(indices.numpy(), expected["x_indices"])


def test_images_match_upstream(model_and_mode, expected, fixture_images):
    model, mode = model_and_mode
    x = torch.stack([d3qe.preprocess(p) for p in fixture_images])
    with torch.inference_mode():
        logits = model(x)
        _, indices = model.vq_model(x)
    np.testing.assert_allclose(logits.numpy(), expected[f"image_logits_{mode}"], rtol=0, atol=LOGIT_TOL)
    np.testing.assert_array_equal(indices.numpy(), expected["image_indices"])


def test_modes_differ(tiny_checkpoint, expected):
    """The fixture only discriminates the modes if they give different logits."""
    x = torch.from_numpy(expected["x"])
    with torch.inference_mode():
        ref = d3qe.load_detector(tiny_checkpoint, freq_bias="reference")(x)
        stats = d3qe.load_detector(tiny_checkpoint, freq_bias="stats")(x)
    assert (ref - stats).abs().max() > 1e-2


def test_preprocess_equals_upstream_transform(expected, fixture_images):
    for i, path in enumerate(fixture_images):
        x = d3qe.preprocess(path)
        assert x.shape == (3, 256, 256) and x.dtype == torch.float32
        np.testing.assert_array_equal((x * 255).round().to(torch.uint8).numpy(), expected["image_tensors_u8"][i])


def test_preprocess_accepts_bytes_and_pil(fixture_images):
    from PIL import Image

    path = fixture_images[0]
    ref = d3qe.preprocess(path)
    assert torch.equal(d3qe.preprocess(path.read_bytes()), ref)
    assert torch.equal(d3qe.preprocess(Image.open(path)), ref)


def test_vq_checkpoint_replaces_tokenizer(tiny_state, tiny_vq_checkpoint, tmp_path, expected):
    """A D³QE checkpoint with a scrambled tokenizer plus the real VQ checkpoint = the real model."""
    state = dict(tiny_state)
    state["vq_model.quantize.embedding.weight"] = torch.randn_like(state["vq_model.quantize.embedding.weight"])
    broken = tmp_path / "broken_vq.pth"
    torch.save({"model": state}, broken)
    x = torch.from_numpy(expected["x"])
    with torch.inference_mode():
        assert not np.array_equal(d3qe.load_detector(broken).vq_model(x)[1].numpy(), expected["x_indices"])
        logits = d3qe.load_detector(broken, tiny_vq_checkpoint)(x)
    np.testing.assert_allclose(logits.numpy(), expected["x_logits_reference"], rtol=0, atol=LOGIT_TOL)


def test_safetensors_round_trip(tiny_checkpoint, tmp_path, expected):
    model = d3qe.load_detector(tiny_checkpoint, freq_bias="stats")
    path = d3qe.save_inference_weights(model, tmp_path / "tiny.safetensors")
    again = d3qe.load_detector(path, freq_bias="stats")
    x = torch.from_numpy(expected["x"])
    with torch.inference_mode():
        np.testing.assert_allclose(again(x).numpy(), expected["x_logits_stats"], rtol=0, atol=LOGIT_TOL)
    # nothing unused is carried into served weights
    assert not any(k.startswith(("vq_model.decoder.", "clip_model.transformer.")) for k in d3qe.read_state_dict(path))


def test_vq_checkpoint_alone_gives_fixture_tokens(tiny_vq_checkpoint, expected):
    """No D³QE checkpoint: seeded head, but the tokenizer is the one given."""
    with pytest.warns(UserWarning, match="random weights"):
        model = d3qe.load_detector(vq_checkpoint=tiny_vq_checkpoint, preset="tiny")
    with torch.inference_mode():
        _, indices = model.vq_model(torch.from_numpy(expected["x"]))
    np.testing.assert_array_equal(indices.numpy(), expected["x_indices"])
