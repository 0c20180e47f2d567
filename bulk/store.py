"""The output of a bulk run: a folder of Parquet files (a path or URI), one row per source, that a rerun resumes.

`ScoreStore` is a Ray Data `Datasink`; its lifecycle, in order:

- `resume`, before any input is read: the sources the store already holds (a run skips them), the files
  checked to be this store's and of this run's export; with `retry_errors` the rows holding an error
  are deleted first, so that their sources are scored again (and later, if this run stops).
- `on_write_start`, on the driver when the first scored rows are ready: the folder is created.
- `write`, in each write task: its rows into one new file, written under a temporary name and then
  moved into place, so that a stopped run leaves whole files only.
- `on_write_complete`, on the driver: the files this run wrote (`written`, their rows and errors counted).
- `on_write_failed`, on the driver: the temporary files of this run's unfinished writes are removed; the
  files already written stay, and a rerun resumes after them.

A store holds the scores of one export (`manifest_id`): rows of another are refused, never mixed.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data.block import Block, BlockAccessor
from ray.data.datasource import Datasink, WriteResult

from d3qe_serve.errors import BulkError

if TYPE_CHECKING:
    from ray.data._internal.execution.interfaces import TaskContext

# Rows gathered into one output file: fewer, larger files than one per block; a stopped run loses the rows
# not yet written (at most about this many per write task), which the next run scores again.
ROWS_PER_FILE = 1024
PARTIAL = ".tmp"  # the suffix of a file being written: not a .parquet file, so never read as output


def output_schema() -> pa.Schema:
    """The store's columns: `client.results.ScoreResult`'s fields, with what produced the row: the export that
    scored it and the threshold of its verdict."""
    return pa.schema(
        [
            ("source", pa.string()),
            ("logit", pa.float64()),
            ("probability", pa.float64()),
            ("verdict", pa.string()),
            ("error", pa.string()),
            ("manifest_id", pa.string()),  # serving.manifest.Manifest.id; null from a server that does not say
            ("threshold", pa.float64()),  # P(generated) above it: "generated"; null for a failed row
        ]
    )


@dataclass(frozen=True)
class WrittenFile:
    """What one write task wrote: its file (None when it had no rows), the rows and how many hold an error."""

    path: str | None
    rows: int
    failed: int


def filesystem(out: str) -> tuple[pafs.FileSystem, str]:
    """`out`'s filesystem and path in it: a URI's (s3://, gs://, ...), else this machine's, the path absolute."""
    if "://" in out:
        return pafs.FileSystem.from_uri(out)
    return pafs.LocalFileSystem(), str(Path(out).absolute())


class ScoreStore(Datasink[WrittenFile]):
    """The Parquet folder at `out` (a path or URI) holding the scores of the export `manifest_id`."""

    def __init__(self, out: str, manifest_id: str | None) -> None:
        self.out = out
        self.manifest_id = manifest_id
        self.fs, self.root = filesystem(out)
        self.run = uuid.uuid4().hex  # names this run's files, so that a failed run removes its own partial ones
        self.written: list[WrittenFile] = []

    def files(self) -> set[str]:
        """The Parquet files the store holds now."""
        info = self.fs.get_file_info(self.root)
        if info.type == pafs.FileType.File:
            raise BulkError(
                f"{self.root} is a file: d3qe bulk writes a folder of Parquet files there, give another --out"
            )
        if info.type == pafs.FileType.NotFound:
            return set()
        found = self.fs.get_file_info(pafs.FileSelector(self.root, recursive=True))
        return {f.path for f in found if f.type == pafs.FileType.File and f.path.endswith(".parquet")}

    def resume(self, retry_errors: bool = False) -> pa.Array:
        """The sources the store already holds a row for, to skip; with `retry_errors` the rows holding an error
        are deleted first (their sources are not among those returned).

        Raises BulkError for a file that is not a store's, or rows of another export.
        """
        done = []
        for path in sorted(self.files()):
            try:
                schema = pq.read_schema(path, filesystem=self.fs).remove_metadata()
                if not schema.equals(output_schema()):
                    raise BulkError(
                        f"{path}: not a d3qe bulk output file of this version (columns {schema.names}, expected "
                        f"{output_schema().names}); move it out of {self.out}"
                    )
                table = pq.read_table(path, filesystem=self.fs)
            except (OSError, pa.ArrowException) as e:
                raise BulkError(f"{path}: not a d3qe bulk output file ({e}); move it out of {self.out}") from e
            others = set(pc.unique(table["manifest_id"]).to_pylist()) - {self.manifest_id}
            if others:
                raise BulkError(
                    f"{self.out} holds scores from export {sorted(others, key=str)}, this run scores with "
                    f"{self.manifest_id}: give another --out (scores of two models are never mixed in one output)"
                )
            failed = pc.is_valid(table["error"])
            if retry_errors and pc.any(failed).as_py():
                table = table.filter(pc.invert(failed))
                if table.num_rows:
                    pq.write_table(table, path + PARTIAL, filesystem=self.fs)
                    self.fs.move(path + PARTIAL, path)
                else:
                    self.fs.delete_file(path)
            done.append(table["source"])
        return pa.chunked_array(done, pa.string()).unique() if done else pa.array([], pa.string())

    @property
    def min_rows_per_write(self) -> int:
        return ROWS_PER_FILE

    def on_write_start(self, schema: pa.Schema | None = None) -> None:
        self.fs.create_dir(self.root, recursive=True)

    def write(self, blocks: Iterable[Block], ctx: TaskContext) -> WrittenFile:
        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        table = pa.concat_tables(tables).cast(output_schema()) if tables else output_schema().empty_table()
        if not table.num_rows:
            return WrittenFile(None, 0, 0)
        name = f"{self.root}/{self.run}-{uuid.uuid4().hex}.parquet"
        pq.write_table(table, name + PARTIAL, filesystem=self.fs)
        self.fs.move(name + PARTIAL, name)
        return WrittenFile(name, table.num_rows, pc.sum(pc.is_valid(table["error"])).as_py() or 0)

    def on_write_complete(self, write_result: WriteResult[WrittenFile]) -> None:
        self.written = [w for w in write_result.write_returns if w.path is not None]

    def on_write_failed(self, error: Exception) -> None:
        found = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        for f in found:
            if Path(f.path).name.startswith(self.run) and f.path.endswith(PARTIAL):
                self.fs.delete_file(f.path)
