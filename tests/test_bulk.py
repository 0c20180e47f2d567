"""`d3qe bulk` (the `d3qe_serve.bulk` pipeline) on a local Ray: the eager model's scores, one row per input, bad
files as rows, resuming."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from d3qe_serve.bulk.options import BulkOptions
from d3qe_serve.bulk.store import output_schema
from d3qe_serve.cli.main import main
from d3qe_serve.serving.manifest import MANIFEST, Manifest, sha256_file
from tests.helpers import LOGIT_TOL

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module: `d3qe bulk` uses a Ray already initialised in its process."""
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def images(fixture_images, tmp_path_factory) -> Path:
    """The fixture's images in a folder and a subfolder, beside four broken files."""
    folder = tmp_path_factory.mktemp("bulk") / "images"
    (folder / "sub").mkdir(parents=True)
    for i, path in enumerate(fixture_images):
        shutil.copy(path, folder / ("sub" if i % 2 else "") / path.name)
    jpeg = next(p for p in fixture_images if p.suffix == ".jpg").read_bytes()
    (folder / "sub" / "truncated.jpg").write_bytes(jpeg[:300])
    (folder / "noise.png").write_bytes(bytes(range(256)) * 8)
    (folder / "text.png").write_text("not an image\n")
    (folder / "empty.jpg").write_bytes(b"")
    return folder


def score_json(*argv: str) -> dict[str, dict]:
    """`d3qe score … --json`'s rows by source."""
    with contextlib.redirect_stdout(io.StringIO()) as out:
        main(["score", "--json", *argv])
    return {r["source"]: r for r in map(json.loads, out.getvalue().splitlines())}


@pytest.fixture(scope="module")
def eager(images, tiny_checkpoint) -> dict[str, dict]:
    """The independent truth: `d3qe score --runtime eager` with the checkpoint the repository was exported from."""
    return score_json("--runtime", "eager", "--checkpoint", str(tiny_checkpoint), str(images))


def read_out(out: Path) -> list[dict]:
    return pq.read_table(out, schema=output_schema()).to_pylist()


def assert_rows_match(
    rows: list[dict], expected: dict[str, dict], manifest_id: str | None, sources: list[str] | None = None
) -> None:
    """One row per source (`sources`, default: the expected ones), each with the eager score (or the same error)
    and the export's id."""
    assert sorted(r["source"] for r in rows) == sorted(sources or expected)
    for row in rows:
        want = expected[row["source"]]
        assert row["manifest_id"] == manifest_id
        assert row["error"] == want["error"], row["source"]
        if want["error"] is None:
            assert row["logit"] == pytest.approx(want["logit"], abs=LOGIT_TOL), row["source"]
            assert row["probability"] == pytest.approx(want["probability"], abs=LOGIT_TOL)
            assert row["verdict"] == want["verdict"]
        else:
            assert row["logit"] is None and row["verdict"] is None


def test_score_runtime_exported_gives_the_eager_scores(tiny_repository, images, eager, capsys):
    rows = score_json("--runtime", "exported", "--repo", str(tiny_repository), "--batch-size", "3", str(images))
    assert set(rows) == set(eager)
    for source, row in rows.items():
        assert row["error"] == eager[source]["error"]
        if row["error"] is None:
            assert row["logit"] == pytest.approx(eager[source]["logit"], abs=LOGIT_TOL)
    capsys.readouterr()
    assert main(["score", "--runtime", "exported", "--repo", str(images), str(images)]) == 2
    assert "no manifest.json in" in capsys.readouterr().err


def test_bulk_folder_gives_the_eager_scores_one_row_per_file(local_ray, tiny_repository, images, eager, tmp_path):
    out = tmp_path / "scores.parquet"
    argv = ["bulk", str(images), "--out", str(out), "--repo", str(tiny_repository), "--batch-size", "3"]
    assert main(argv) == 1  # some images failed: each is a row with its error
    manifest_id = sha256_file(tiny_repository / MANIFEST)
    assert Manifest.read(tiny_repository).id == manifest_id
    assert_rows_match(read_out(out), eager, manifest_id)
    assert sum(r["error"] is not None for r in eager.values()) == 4


def test_bulk_resumes_and_retries_errors(local_ray, tiny_repository, images, eager, tmp_path, capsys):
    """A list file (a missing path, a file:// URI, blank lines) scored in two goes, then its errors again."""
    sources = sorted(eager)
    missing = str(images / "gone.png")
    uri = (images / Path(sources[0]).relative_to(images)).absolute().as_uri()
    first = [*sources[:5], missing]
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(first) + "\n\n")
    out = tmp_path / "scores.parquet"
    argv = ["bulk", str(listing), "--out", str(out), "--repo", str(tiny_repository), "--concurrency", "1"]
    main(argv)
    files = {p: p.read_bytes() for p in out.glob("*.parquet")}
    assert sorted(r["source"] for r in read_out(out)) == sorted(first)

    listing.write_text("\n".join([*sources, missing, uri, ""]) + "\n")
    capsys.readouterr()
    main(argv)
    assert f"{len(sources) - 5 + 1} images scored" in capsys.readouterr().out  # the rest and the URI only
    assert {p: p.read_bytes() for p in files} == files  # the first run's rows untouched
    rows = read_out(out)
    expected = {**eager, missing: {"error": f"no such image file: {missing}"}, uri: eager[sources[0]]}
    assert_rows_match(rows, expected, Manifest.read(tiny_repository).id)

    # the text file is an image now: --retry-errors scores every failed source again, nothing else
    png = next(s for s in sources if s.endswith(".png") and eager[s]["error"] is None)
    text = next(s for s in sources if s.endswith("text.png"))
    Path(text).write_bytes(Path(png).read_bytes())
    main([*argv, "--retry-errors"])
    failed = [s for s, r in expected.items() if r["error"] is not None]
    assert f"{len(failed)} images scored" in capsys.readouterr().out
    expected[text] = eager[png]
    assert_rows_match(read_out(out), expected, Manifest.read(tiny_repository).id)
    Path(text).write_text("not an image\n")  # as the other tests expect it


def test_bulk_parquet_table_gives_a_row_per_row(local_ray, tiny_repository, images, eager, tmp_path):
    """A table's column of sources, through the library: a source listed twice gets two rows, an empty cell a row
    with its error; the report counts what this run wrote."""
    sources = sorted(eager)
    column = [*sources, sources[0], None]
    table = tmp_path / "inputs.parquet"
    pq.write_table(pa.table({"label": list(range(len(column))), "path": column}), table)
    from d3qe_serve.bulk.pipeline import score_bulk

    out = tmp_path / "scores.parquet"
    options = BulkOptions(str(table), str(out), repo=tiny_repository, column="path", concurrency=1, num_cpus=2)
    report = score_bulk(options)
    manifest_id = Manifest.read(tiny_repository).id
    failed = sum(eager[s]["error"] is not None for s in column if s) + 1  # the broken files, the empty cell
    assert (report.scored, report.failed, report.skipped, report.actors) == (len(column), failed, 0, 1)
    assert report.manifest_id == manifest_id
    assert sorted(report.files) == sorted(str(p) for p in out.glob("*.parquet"))
    rows = read_out(out)
    expected = {**eager, "": {"error": "empty source: no path or URI"}}
    assert_rows_match(rows, expected, manifest_id, [*sources, sources[0], ""])


def test_bulk_refuses_to_mix_exports_and_foreign_files(tiny_repository, images, tmp_path, capsys):
    """Checked before Ray starts: an OUT of another export's rows, or holding another table, is refused."""
    out = tmp_path / "scores.parquet"
    out.mkdir()
    row = {"source": "a.png", "logit": 1.0, "probability": 0.7, "verdict": "generated", "manifest_id": "0" * 64}
    pq.write_table(pa.Table.from_pylist([row], schema=output_schema()), out / "old.parquet")
    argv = ["bulk", str(images), "--out", str(out), "--repo", str(tiny_repository)]
    assert main(argv) == 2
    assert "holds scores from export ['000" in capsys.readouterr().err
    pq.write_table(pa.table({"path": ["a.png"]}), out / "old.parquet")
    assert main(argv) == 2
    assert "old.parquet: not a d3qe bulk output file" in capsys.readouterr().err


@pytest.mark.server
def test_bulk_through_a_server(local_ray, tiny_server, tiny_repository, images, eager, tmp_path):
    out = tmp_path / "scores.parquet"
    argv = ["bulk", str(images), "--out", str(out), "--url", tiny_server.endpoints.grpc_url, "--concurrency", "1"]
    assert main(argv) == 1
    rows = read_out(out)
    assert sorted(r["source"] for r in rows) == sorted(eager)
    for row in rows:  # the server decodes and reports bad images in its own words
        want = eager[row["source"]]
        assert row["manifest_id"] == Manifest.read(tiny_repository).id
        assert (row["error"] is None) == (want["error"] is None), row
        if want["error"] is None:
            assert row["logit"] == pytest.approx(want["logit"], abs=LOGIT_TOL)


def test_bulk_scores_identical_files_once_and_gives_each_its_row(local_ray, tiny_repository, images, eager, tmp_path):
    """Copies under other names (and a broken file twice): one content scored once, every source a row with its
    twin's score; the report counts the duplicates; a file that cannot be read stays a content of its own."""
    folder = tmp_path / "copies"
    shutil.copytree(images, folder)
    good = sorted(s for s, r in eager.items() if r["error"] is None)
    twins = {folder / "again" / Path(good[0]).name: good[0], folder / f"copy_{Path(good[1]).name}": good[1]}
    twins[folder / "again" / f"twice_{Path(good[0]).name}"] = good[0]
    broken = next(s for s, r in eager.items() if s.endswith("text.png"))
    twins[folder / "again" / "text_copy.png"] = broken
    for copy, original in twins.items():
        copy.parent.mkdir(exist_ok=True)
        shutil.copy(original, copy)
    from d3qe_serve.bulk.pipeline import score_bulk

    out = tmp_path / "scores.parquet"
    report = score_bulk(BulkOptions(str(folder), str(out), repo=tiny_repository, concurrency=1, num_cpus=2))
    # the folder's own files under their new names, then the copies with their originals' scores
    expected = {str(folder / Path(s).relative_to(images)): r for s, r in eager.items()}
    expected |= {str(c): eager[o] for c, o in twins.items()}
    assert report.scored == len(expected) and report.duplicates == len(twins)
    assert_rows_match(read_out(out), expected, Manifest.read(tiny_repository).id)
    logits = {r["source"]: r["logit"] for r in read_out(out)}
    for copy, original in twins.items():  # the very same score, not merely a close one
        assert logits[str(copy)] == logits[str(folder / Path(original).relative_to(images))]
