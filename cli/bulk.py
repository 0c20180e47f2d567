"""`d3qe bulk`: score many images on Ray Data into a Parquet dataset that a rerun resumes.

    d3qe bulk INPUT --out OUT.parquet [--repo DIR | --url HOST:PORT] [--address RAY_ADDRESS]
              [--concurrency N] [--num-cpus C] [--num-gpus G] [--batch-size B] [--retry-errors]

INPUT is a folder (searched recursively for images, as `d3qe score` searches it), a Parquet or CSV table
with a column of paths or URIs (`--column`), or a list file of one path or URI per line; relative paths
are relative to the folder the command runs in, URIs are read through pyarrow's filesystems (file://,
s3://, gs://, ...). Ray Data reads the input and drops the sources already scored (`pending_sources`), a
pool of actors scores the rest (`map_batches` over an actor class) and `write_parquet` writes OUT: a folder
of Parquet files, one row per input (`output_schema`). Each
actor holds the export's parts in this process (`serving.inprocess.score_exported`, on CPU or a GPU) or
a gRPC client of a running server (`--url`). Without `--address` the command starts a local Ray on this
machine; a Ray already initialised in this process (a notebook, a test) is used as it is.

A rerun with the same OUT skips the sources OUT already holds and adds its rows in new files. A source
whose row holds an error is skipped too; `--retry-errors` deletes those rows and scores them again. OUT
holds the scores of one export: a run with another export (another manifest id) is refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from d3qe_serve.client.grpc_client import DEFAULT_MODEL, D3QEClient, ServerNotReadyError
from d3qe_serve.client.results import DEFAULT_THRESHOLD, Item, Scorer, ScoreResult
from d3qe_serve.client.score import expand_paths
from d3qe_serve.errors import BulkError

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.fs as pafs
    from ray.data import Dataset

TABLE_SUFFIXES = {".parquet": "read_parquet", ".csv": "read_csv"}
# The write tasks take no CPU of their own: they run beside actors holding every CPU (the default).
WRITE_TASK_CPUS = 0
BATCHES_PER_BLOCK = 4  # actor calls per block of pending sources: an idle actor takes the next block
# Rows gathered into one output file: fewer, larger files than one per block; a stopped run loses the rows
# not yet written (at most about this many per write task), which the next run scores again.
ROWS_PER_FILE = 1024
REQUESTS_IN_FLIGHT = 2  # --url: per actor, so that the server batches one request while the next is sent


def output_schema() -> pa.Schema:
    """OUT's columns: `client.results.ScoreResult`'s fields, then the export that scored the row."""
    import pyarrow as pa

    return pa.schema(
        [
            ("source", pa.string()),
            ("logit", pa.float64()),
            ("probability", pa.float64()),
            ("verdict", pa.string()),
            ("error", pa.string()),
            ("manifest_id", pa.string()),  # serving.manifest.Manifest.id; null from a server that does not say
        ]
    )


@dataclass(frozen=True)
class Exported:
    """Actors hold the parts of the export at `repo` (`serving.inprocess.load_exported`)."""

    repo: str
    device: str = "cpu"
    threads: int | None = None

    def manifest_id(self) -> str:
        """The export's id, its artifacts checked first (here, before any actor loads them)."""
        from d3qe_serve.serving.manifest import Manifest, ManifestError

        try:
            manifest = Manifest.read(Path(self.repo))
            for part in manifest.parts:
                manifest.artifact(Path(self.repo), part)
        except (OSError, KeyError, ManifestError) as e:
            raise BulkError(str(e)) from e
        return manifest.id

    def scorer(self, threshold: float, batch_size: int) -> Scorer:
        from d3qe_serve.serving.inprocess import load_exported, score_exported

        runners = load_exported(Path(self.repo), self.device, self.threads)
        return lambda items: score_exported(runners, items, threshold, batch_size)


@dataclass(frozen=True)
class Served:
    """Actors send the images to the server at `url` (`client.grpc_client.D3QEClient`)."""

    url: str
    model: str = DEFAULT_MODEL
    ready_timeout: float = 30.0

    def manifest_id(self) -> str | None:
        """The id the server's gate carries (`serving.repository` writes it), None from one that does not;
        the server's readiness and interface are checked first."""
        import tritonclient.grpc as grpcclient

        from d3qe_serve.serving.model_params import GateParameters

        with D3QEClient(self.url, self.model) as client:
            try:
                client.wait_until_ready(timeout=self.ready_timeout)
            except ServerNotReadyError as e:
                raise BulkError(str(e)) from e
        with grpcclient.InferenceServerClient(self.url) as triton:
            config = triton.get_model_config(self.model, as_json=True).get("config", {})
        try:
            return GateParameters.from_config(config).manifest_id
        except ValueError:  # not one of our gates (an ensemble, another server's model): it does not say
            return None

    def scorer(self, threshold: float, batch_size: int) -> Scorer:
        client = D3QEClient(
            self.url, self.model, batch_size=batch_size, concurrency=REQUESTS_IN_FLIGHT, threshold=threshold
        )
        return client.score


def _item(source: str | None, base: Path) -> Item | ScoreResult:
    """What a scorer takes for `source`: a local path (relative ones against `base`), or a URI's bytes read
    through pyarrow's filesystems; a source that cannot be read is its failed result."""
    import pyarrow as pa
    import pyarrow.fs as pafs

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


class ScoringActor:
    """One actor of the pool: opens its scorer once, then scores a batch of sources per call into OUT's rows.

    Each result is matched to its source by position (a scorer reports an unreadable image before the
    batch it was waiting in), so that every source, repeated ones included, gets exactly one row.
    """

    def __init__(
        self, target: Exported | Served, manifest_id: str | None, threshold: float, batch_size: int, base: str
    ) -> None:
        self.score = target.scorer(threshold, batch_size)
        self.manifest_id = manifest_id
        self.base = Path(base)

    def __call__(self, batch: pa.Table) -> pa.Table:
        import pyarrow as pa

        sources = batch.column("source").to_pylist()
        items = [_item(s, self.base) for s in sources]
        results = [r if isinstance(r, ScoreResult) else None for r in items]
        readable = ((str(i), item[1]) for i, item in enumerate(items) if not isinstance(item, ScoreResult))
        for r in self.score(readable):
            i = int(r.source)
            results[i] = dataclasses.replace(r, source=sources[i])
        rows = [{**r.as_dict(), "manifest_id": self.manifest_id} for r in results]
        return pa.Table.from_pylist(rows, schema=output_schema())


def _pending(batch: pa.Table, done: pa.Array, list_file: bool) -> pa.Table:
    """The batch's sources as strings, less those OUT already holds (`done`); a list file's lines trimmed,
    its blank lines (no input) left out."""
    import pyarrow as pa
    import pyarrow.compute as pc

    sources = batch.column("source").cast(pa.string())
    if list_file:
        sources = pc.utf8_trim_whitespace(sources)
        sources = sources.filter(pc.not_equal(sources, ""))
    return pa.table({"source": sources.filter(pc.invert(pc.is_in(sources, value_set=done)))})


def _filesystem(out: str) -> tuple[pafs.FileSystem, str]:
    """OUT's filesystem and path in it: a URI's (s3://, gs://, ...), else this machine's, the path absolute."""
    import pyarrow.fs as pafs

    if "://" in out:
        return pafs.FileSystem.from_uri(out)
    return pafs.LocalFileSystem(), str(Path(out).absolute())


def _parquet_files(fs: pafs.FileSystem, root: str) -> set[str]:
    import pyarrow.fs as pafs

    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File:
        raise BulkError(f"{root} is a file: d3qe bulk writes a folder of Parquet files there, give another --out")
    if info.type == pafs.FileType.NotFound:
        return set()
    found = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    return {f.path for f in found if f.type == pafs.FileType.File and f.path.endswith(".parquet")}


def scored_sources(out: str, manifest_id: str | None, retry_errors: bool) -> pa.Array:
    """The sources OUT already holds a row for, to skip; with `retry_errors` the rows holding an error are
    deleted from OUT first (their sources are scored again, and a run stopped after this scores them later).

    Raises BulkError for a file that is not this command's output, or rows of another export.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    fs, root = _filesystem(out)
    done = []
    for path in sorted(_parquet_files(fs, root)):
        try:
            schema = pq.read_schema(path, filesystem=fs).remove_metadata()
            if not schema.equals(output_schema()):
                raise BulkError(f"{path}: not a d3qe bulk output file (columns {schema.names}); move it out of {out}")
            table = pq.read_table(path, filesystem=fs)
        except (OSError, pa.ArrowException) as e:
            raise BulkError(f"{path}: not a d3qe bulk output file ({e}); move it out of {out}") from e
        others = set(pc.unique(table["manifest_id"]).to_pylist()) - {manifest_id}
        if others:
            raise BulkError(
                f"{out} holds scores from export {sorted(others, key=str)}, this run scores with {manifest_id}: "
                "give another --out (scores of two models are never mixed in one output)"
            )
        failed = pc.is_valid(table["error"])
        if retry_errors and pc.any(failed).as_py():
            table = table.filter(pc.invert(failed))
            if table.num_rows:
                pq.write_table(table, path + ".tmp", filesystem=fs)
                fs.move(path + ".tmp", path)
            else:
                fs.delete_file(path)
        done.append(table["source"])
    return pa.chunked_array(done, pa.string()).unique() if done else pa.array([], pa.string())


def input_dataset(ray_data, source: str, column: str | None) -> tuple[Dataset, bool]:
    """INPUT as a dataset with one string column, `source`; and whether it is a list file's lines.

    A folder's images are named as `d3qe score` names them (relative to the folder given, as given)."""
    suffix = Path(source.rstrip("/")).suffix.lower()
    local = "://" not in source
    if local and Path(source).is_dir() and suffix not in TABLE_SUFFIXES:
        paths = [{"source": str(p)} for p in expand_paths([source])]
        if not paths:
            raise BulkError(f"{source}: no image files in this folder or below")
        return ray_data.from_items(paths), False
    if local and not Path(source).exists():
        raise BulkError(f"{source}: no such file or folder")
    location = str(Path(source).absolute()) if local else source  # Ray's readers run in other processes
    if suffix not in TABLE_SUFFIXES:
        return ray_data.read_text(location).rename_columns({"text": "source"}), True
    ds = getattr(ray_data, TABLE_SUFFIXES[suffix])(location)
    names = ds.schema().names
    if column is None:
        if len(names) != 1 and "source" not in names:
            raise BulkError(f"{source} has columns {names}: name the one holding paths or URIs with --column")
        column = names[0] if len(names) == 1 else "source"
    if column not in names:
        raise BulkError(f"{source} has no column {column!r}; it has {names}")
    return ds.select_columns([column]).rename_columns({column: "source"}), False


def pending_sources(ray_data, args: argparse.Namespace, done: pa.Array, actors: int) -> tuple[Dataset, int]:
    """INPUT's sources that OUT does not hold yet, read and filtered now, in blocks of a few actor calls (and
    at least one block per actor); and how many there are.

    Materialised before any actor exists: Ray Data's read, filter and repartition tasks each need a CPU,
    and the actors hold every CPU (the default), so a task started beside them would wait forever (seen:
    read_text behind two 1-CPU actors, read_parquet's file listing behind one 2-CPU actor, on 2 CPUs).
    """
    ds, list_file = input_dataset(ray_data, args.input, args.column)
    ds = ds.map_batches(_pending, fn_kwargs={"done": done, "list_file": list_file}, batch_format="pyarrow")
    ds = ds.materialize()
    count = ds.count()
    return ds.repartition(max(actors, math.ceil(count / (BATCHES_PER_BLOCK * args.batch_size)))).materialize(), count


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="a folder (recursive), a Parquet or CSV table of paths/URIs, or a list file")
    p.add_argument("--out", required=True, help="the Parquet dataset (a folder) to write or resume; a path or URI")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--repo", help="actors run this export in-process (default: build/model_repository)")
    where.add_argument("--url", help="actors send the images to the server at this gRPC address instead")
    p.add_argument("--model", default=DEFAULT_MODEL, help="--url: the ensemble taking encoded images")
    p.add_argument("--address", help="the Ray cluster to run on (default: start a local Ray here)")
    p.add_argument("--concurrency", type=int, help="scoring actors (default: as many as the cluster's CPUs/GPUs fit)")
    p.add_argument("--num-cpus", type=float, default=1, help="CPUs per actor; in-process, its intra-op threads")
    p.add_argument("--num-gpus", type=float, default=0, help="GPUs per actor (fractions share one): parts on cuda")
    p.add_argument("--batch-size", type=int, default=8, help="images per actor call and per forward pass/request")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, help="P(generated) for the verdict")
    p.add_argument("--column", help="a table's column of paths or URIs (default: its only one, or 'source')")
    p.add_argument("--retry-errors", action="store_true", help="score again the sources whose row in OUT is an error")
    p.add_argument("--ready-timeout", type=float, default=30.0, help="--url: seconds to wait for the server")


def _target(args: argparse.Namespace) -> Exported | Served:
    if args.url:
        return Served(args.url, args.model, args.ready_timeout)
    from d3qe_serve.serving.server import DEFAULT_REPOSITORY

    device = "cuda" if args.num_gpus > 0 else "cpu"
    return Exported(str(Path(args.repo or DEFAULT_REPOSITORY).absolute()), device, max(1, round(args.num_cpus)))


def _actors(ray, args: argparse.Namespace) -> int:
    """--concurrency, else as many actors as the cluster's CPUs (GPUs with --num-gpus) hold at once."""
    if args.concurrency:
        return args.concurrency
    resources = ray.cluster_resources()
    if args.num_gpus > 0:
        return max(1, int(resources.get("GPU", 0) // args.num_gpus))
    return max(1, int(resources.get("CPU", 1) // args.num_cpus))


def run(args: argparse.Namespace) -> int:
    """Exit status 0 when every image of this run scored, 1 when some failed (each row holds its error), 2 when
    the run could not start (bad options, input, output or target)."""
    if args.batch_size < 1 or (args.concurrency is not None and args.concurrency < 1) or args.num_cpus <= 0:
        print("d3qe bulk: --batch-size, --concurrency and --num-cpus must be positive", file=sys.stderr)
        return 2
    if importlib.util.find_spec("ray") is None:
        print("d3qe bulk runs on Ray Data: pip install 'd3qe-serve[bulk]'", file=sys.stderr)
        return 2
    try:
        report = bulk(args)
    except BulkError as e:
        print(f"d3qe bulk: {e}", file=sys.stderr)
        return 2
    return 1 if report["failed"] else 0


def bulk(args: argparse.Namespace) -> dict:
    """Score INPUT's pending sources into OUT (see the module's docstring); returns `summary`'s report."""
    import ray

    target = _target(args)
    manifest_id = target.manifest_id()
    done = scored_sources(args.out, manifest_id, args.retry_errors)
    fs, root = _filesystem(args.out)
    before = _parquet_files(fs, root)
    started = not ray.is_initialized()
    if started:  # --address: that cluster; else a Ray of its own on this machine ("local"), whatever else runs
        ray.init(address=args.address or "local", **({} if args.address else {"include_dashboard": False}))
    try:
        actors = _actors(ray, args)
        ds, count = pending_sources(ray.data, args, done, actors)
        ds = ds.map_batches(
            ScoringActor,
            fn_constructor_kwargs={
                "target": target,
                "manifest_id": manifest_id,
                "threshold": args.threshold,
                "batch_size": args.batch_size,
                "base": os.getcwd(),
            },
            compute=ray.data.ActorPoolStrategy(size=actors),
            batch_format="pyarrow",
            batch_size=args.batch_size,
            num_cpus=args.num_cpus,
            num_gpus=args.num_gpus,
        )
        start = time.perf_counter()
        if count:  # else no actor is started, no file written
            ds.write_parquet(
                root, filesystem=fs, min_rows_per_file=ROWS_PER_FILE, ray_remote_args={"num_cpus": WRITE_TASK_CPUS}
            )
        seconds = time.perf_counter() - start
    finally:
        if started:
            ray.shutdown()
    return summary(fs, sorted(_parquet_files(fs, root) - before), len(done), seconds, actors, manifest_id)


def summary(
    fs: pafs.FileSystem, new_files: Sequence[str], skipped: int, seconds: float, actors: int, manifest_id: str | None
) -> dict:
    """Print what this run wrote (read back from its files) and return it."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    scored = failed = 0
    for path in new_files:
        errors = pq.read_table(path, filesystem=fs, columns=["error"])["error"]
        scored += len(errors)
        failed += pc.sum(pc.is_valid(errors)).as_py() or 0
    report = {
        "scored": scored,
        "failed": failed,
        "skipped": skipped,
        "seconds": seconds,
        "images_per_s": scored / seconds if seconds else 0.0,
        "actors": actors,
        "manifest_id": manifest_id,
    }
    print(
        f"d3qe bulk: {scored} images scored ({failed} failed: their rows hold the error) in {seconds:.1f} s, "
        f"{report['images_per_s']:.2f} images/s on {actors} actors; {skipped} sources already in the output "
        f"skipped; export {manifest_id}"
    )
    return report
