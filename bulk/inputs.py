"""The input readers: a folder, a list file or a table of sources as a Ray dataset of one column, `source`;
and each source read into the item a scorer takes.

A folder is searched recursively for images, as `d3qe score` searches it; a Parquet or CSV table gives
a column of paths or URIs; any other file is a list of one path or URI per line. Relative paths are
relative to a base folder (the one the command runs in); URIs are read through pyarrow's filesystems
(file://, s3://, gs://, ...). Identical files are found by the sha256 of their bytes (`content_hashes`,
`unique_contents`): the pipeline scores each content once.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import ray.data

from d3qe_serve.client.results import Item, ScoreResult
from d3qe_serve.client.score import expand_paths
from d3qe_serve.errors import BulkError

TABLE_READERS = {".parquet": "read_parquet", ".csv": "read_csv"}  # a table's suffix: its Ray Data reader


def read_folder(folder: str) -> ray.data.Dataset:
    """The folder's images (recursively), named as `d3qe score` names them: relative to the folder as given."""
    paths = [{"source": str(p)} for p in expand_paths([folder])]
    if not paths:
        raise BulkError(f"{folder}: no image files in this folder or below")
    return ray.data.from_items(paths)


def read_list(location: str) -> ray.data.Dataset:
    """A list file's lines, as they are (`pending` trims them and drops the blank ones)."""
    return ray.data.read_text(location).rename_columns({"text": "source"})


def read_table(location: str, column: str | None) -> ray.data.Dataset:
    """A Parquet or CSV table's `column` of sources; without `column`, its only one or the one named 'source'."""
    ds = getattr(ray.data, TABLE_READERS[Path(location.rstrip("/")).suffix.lower()])(location)
    names = ds.schema().names
    if column is None:
        if len(names) != 1 and "source" not in names:
            raise BulkError(f"{location} has columns {names}: name the one holding paths or URIs with --column")
        column = names[0] if len(names) == 1 else "source"
    if column not in names:
        raise BulkError(f"{location} has no column {column!r}; it has {names}")
    return ds.select_columns([column]).rename_columns({column: "source"})


def read_sources(source: str, column: str | None = None) -> tuple[ray.data.Dataset, bool]:
    """`source` (a folder, a table or a list file; a path or URI) as a dataset with one column, `source`; and
    whether it holds a list file's raw lines."""
    suffix = Path(source.rstrip("/")).suffix.lower()
    local = "://" not in source
    if local and Path(source).is_dir() and suffix not in TABLE_READERS:
        return read_folder(source), False
    if local and not Path(source).exists():
        raise BulkError(f"{source}: no such file or folder")
    location = str(Path(source).absolute()) if local else source  # Ray's readers run in other processes
    if suffix in TABLE_READERS:
        return read_table(location, column), False
    return read_list(location), True


def pending(batch: pa.Table, done: pa.Array, list_file: bool) -> pa.Table:
    """The batch's sources as strings, less those already scored (`done`); a list file's lines trimmed, its
    blank lines (no input) left out."""
    sources = batch.column("source").cast(pa.string())
    if list_file:
        sources = pc.utf8_trim_whitespace(sources)
        sources = sources.filter(pc.not_equal(sources, ""))
    return pa.table({"source": sources.filter(pc.invert(pc.is_in(sources, value_set=done)))})


def content_hash(source: str | None, base: Path) -> str | None:
    """The sha256 of the source's bytes (as `read_item` reads them); None where they cannot be read."""
    item = read_item(source, base)
    if isinstance(item, ScoreResult):
        return None
    data = item[1]
    if isinstance(data, bytes):
        return hashlib.sha256(data).hexdigest()
    try:
        with open(data, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return None


def content_hashes(batch: pa.Table, base: str) -> pa.Table:
    """The batch's sources with a column `sha256`, each source's content hash (null where it cannot be read)."""
    sources = batch.column("source").to_pylist()
    hashes = pa.array([content_hash(s, Path(base)) for s in sources], type=pa.string())
    return pa.table({"source": batch.column("source"), "sha256": hashes})


def unique_contents(table: pa.Table) -> pa.Table:
    """One row per distinct content of `table` (columns source, sha256): its first source, and `duplicates`, the
    other sources holding the same bytes; a source whose bytes could not be read is a content of its own."""
    unreadable = table.filter(pc.is_null(table.column("sha256")))
    groups = table.filter(pc.is_valid(table.column("sha256"))).group_by("sha256", use_threads=False)
    grouped = groups.aggregate([("source", "list")])
    lists = grouped.column("source_list").to_pylist()
    return pa.table(
        {
            "source": pa.array([s[0] for s in lists] + unreadable.column("source").to_pylist(), type=pa.string()),
            "duplicates": pa.array(
                [s[1:] for s in lists] + [[] for _ in range(unreadable.num_rows)], type=pa.list_(pa.string())
            ),
        }
    )


def read_item(source: str | None, base: Path) -> Item | ScoreResult:
    """What a scorer takes for `source`: a local path (a relative one against `base`), or a URI's bytes read
    through pyarrow's filesystems; a source that cannot be read is its failed result."""
    if not source:
        return ScoreResult.failed(source or "", "empty source: no path or URI")
    if "://" not in source:
        return source, base / source  # an absolute source stays as it is
    try:
        fs, path = pafs.FileSystem.from_uri(source)
        with fs.open_input_file(path) as f:
            return source, f.read()
    except (OSError, pa.ArrowException) as e:
        return ScoreResult.failed(source, f"cannot read {source}: {e}")
