"""The fidelity corpus: size, names, kinds, decodable bytes, determinism across processes, the `limit` subset."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from d3qe_serve import d3qe
from d3qe_serve.d3qe.preprocess import MAX_PIXELS, MIN_SIDE
from d3qe_serve.export.corpus import CorpusItem, corpus, corpus_digest, write_corpus

KINDS = {"photo", "crop", "rescale", "rotate", "jpeg", "webp", "mode", "synthetic"}
ROOT = Path(__file__).resolve().parent.parent
SUBSET = 64


@pytest.fixture(scope="module")
def items() -> list[CorpusItem]:
    return corpus()


@pytest.fixture(scope="module")
def subset() -> list[CorpusItem]:
    return corpus(SUBSET)


def test_size_names_and_kinds(items):
    assert len(items) >= 500
    names = [item.name for item in items]
    assert len(set(names)) == len(names)
    assert {item.kind for item in items} == KINDS


def test_every_item_decodes_within_the_model_limits(items):
    for item in items:
        with Image.open(io.BytesIO(item.data)) as image:
            image.load()
            width, height = image.size
            assert min(width, height) >= MIN_SIDE, item.name
            assert width * height < MAX_PIXELS, item.name
            assert item.extension == ("jpg" if image.format == "JPEG" else image.format.lower())


def test_same_digest_in_separate_processes(subset):
    """Different hash seeds too, so nothing may depend on set or str-hash order."""
    code = f"from export.corpus import corpus, corpus_digest; print(corpus_digest(corpus({SUBSET})))"
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            cwd=ROOT,
            env={**os.environ, "PYTHONHASHSEED": str(hash_seed)},
            stdout=subprocess.PIPE,
            text=True,
        )
        for hash_seed in (1, 2)
    ]
    digests = [run.communicate(timeout=120)[0].strip() for run in runs]
    assert [run.returncode for run in runs] == [0, 0]
    assert digests == [corpus_digest(subset)] * 2


def test_limit_is_an_even_subset_of_every_kind(items, subset):
    assert len(subset) == SUBSET
    assert {item.kind for item in subset} == KINDS
    position = {item.name: i for i, item in enumerate(items)}
    # The full corpus's items, bytes included, in its order and spread to its end (not its first SUBSET items).
    assert [items[position[item.name]] for item in subset] == subset
    positions = [position[item.name] for item in subset]
    assert positions == sorted(positions)
    assert positions[-1] > len(items) * 0.9
    assert sorted(item.kind for item in corpus(len(KINDS))) == sorted(KINDS)


def test_seed_changes_bytes_not_names():
    first, second = corpus(len(KINDS)), corpus(len(KINDS), seed=1)
    assert [item.name for item in first] == [item.name for item in second]
    assert corpus_digest(first) != corpus_digest(second)


def test_preprocess_accepts_a_subset():
    for item in corpus(16):
        pixels = d3qe.preprocess(item.data)
        assert pixels.shape == (3, 256, 256) and pixels.dtype == torch.float32, item.name
        assert float(pixels.min()) >= 0.0 and float(pixels.max()) <= 1.0, item.name


def test_write_corpus(tmp_path):
    few = corpus(len(KINDS))
    paths = write_corpus(tmp_path, few)
    assert paths == [tmp_path / f"{item.name}.{item.extension}" for item in few]
    assert [path.read_bytes() for path in paths] == [item.data for item in few]


def test_import_is_cheap():
    code = "import sys, export.corpus; assert 'skimage' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
