"""The bulk pipeline: score many images on Ray Data into a `store.ScoreStore` that a rerun resumes.

Ray Data reads the input (`inputs.read_sources`) and drops the sources the store already holds
(`pending_sources`); of identical files (the same sha256 of their bytes) one is scored, the others riding
along as its duplicates; a pool of actors scores them (`map_batches` over `ScoringActor`), and the store
writes their rows, one per source, a duplicate's with its twin's score (`write_datasink`). Each actor holds
a `targets.Target`'s scorer: the export's parts in its process (on CPU or a GPU), or a gRPC client of a
running server. Without `BulkOptions.address` the pipeline starts a local Ray on this machine and stops it at
the end; a Ray already initialised in this process (a notebook, a test) is used as it is.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

from d3qe_serve.errors import MissingDependencyError

try:
    import pyarrow as pa
    import ray
except ModuleNotFoundError as e:
    raise MissingDependencyError(
        f"bulk scoring runs on Ray Data: {e.name} is missing; pip install 'd3qe-serve[bulk]'"
    ) from e

from d3qe_serve.bulk.inputs import content_hashes, pending, read_item, read_sources, unique_contents
from d3qe_serve.bulk.options import BulkOptions
from d3qe_serve.bulk.store import ScoreStore, output_schema
from d3qe_serve.bulk.targets import Target
from d3qe_serve.client.results import ScoreResult

# The write tasks take no CPU of their own: they run beside actors holding every CPU (the default).
WRITE_TASK_CPUS = 0
BATCHES_PER_BLOCK = 4  # actor calls per block of pending sources: an idle actor takes the next block
_HASHED = pa.schema([("source", pa.string()), ("sha256", pa.string())])


@dataclass(frozen=True)
class BulkReport:
    """What a run wrote: rows `scored` (`failed` of them holding an error) in `files`, `skipped` sources the
    store already held, in `seconds` of scoring on `actors` actors, with the export `manifest_id`. `duplicates`
    of the rows are sources whose bytes another source of the run also holds: scored once, each given the row."""

    scored: int
    failed: int
    skipped: int
    seconds: float
    actors: int
    manifest_id: str | None
    files: tuple[str, ...] = ()
    duplicates: int = 0

    @property
    def images_per_s(self) -> float:
        return self.scored / self.seconds if self.seconds else 0.0


class ScoringActor:
    """One actor of the pool: opens its target's scorer once, then turns each batch of sources into the store's
    rows, one per source in the batch's order (a source listed twice gets two rows), followed by one for each of
    its `duplicates` (sources with the same bytes) with the same score."""

    def __init__(
        self, target: Target, manifest_id: str | None, threshold: float | None, batch_size: int, base: str
    ) -> None:
        self.score = target.scorer(threshold, batch_size)
        self.manifest_id = manifest_id
        self.base = Path(base)

    def __call__(self, batch: pa.Table) -> pa.Table:
        items = [read_item(s, self.base) for s in batch.column("source").to_pylist()]
        # A scorer gives its results in input order, each failure in its slot: they fill the readable slots.
        scored = iter(list(self.score([i for i in items if not isinstance(i, ScoreResult)])))
        results = [item if isinstance(item, ScoreResult) else next(scored) for item in items]
        copies = batch.column("duplicates").to_pylist() if "duplicates" in batch.column_names else [[]] * len(items)
        results += [replace(r, source=d) for r, same in zip(results, copies, strict=True) for d in same]
        # the id the answer names (a rollout may switch the export mid-run: the store then refuses the rows)
        rows = [{**r.as_dict(), "manifest_id": r.manifest_id or self.manifest_id} for r in results]
        return pa.Table.from_pylist(rows, schema=output_schema())


def pending_sources(options: BulkOptions, done: pa.Array, actors: int) -> tuple[ray.data.Dataset, int, int]:
    """The input's sources that the store does not hold yet (`done`), read and filtered now, one per distinct
    content (`inputs.unique_contents`: the others in its `duplicates`), in blocks of a few actor calls (and at
    least one block per actor); how many contents there are, and how many duplicates.

    Materialised before any actor exists: Ray Data's read, filter and repartition tasks each need a CPU,
    and the actors hold every CPU (the default), so a task started beside them would wait forever (seen:
    read_text behind two 1-CPU actors, read_parquet's file listing behind one 2-CPU actor, on 2 CPUs).
    """
    ds, list_file = read_sources(options.input, options.column)
    ds = ds.map_batches(pending, fn_kwargs={"done": done, "list_file": list_file}, batch_format="pyarrow")
    hashed = ds.map_batches(content_hashes, fn_kwargs={"base": os.getcwd()}, batch_format="pyarrow")
    # Grouped here, in one table: each row is a source and a hash, far smaller than the images themselves.
    parts = [t.cast(_HASHED) for t in ray.get(hashed.materialize().to_arrow_refs()) if t.num_rows]
    table = pa.concat_tables(parts) if parts else _HASHED.empty_table()  # an emptied block has no columns
    contents = unique_contents(table)
    count, duplicates = contents.num_rows, table.num_rows - contents.num_rows
    blocks = max(actors, math.ceil(count / (BATCHES_PER_BLOCK * options.batch_size)))
    return ray.data.from_arrow(contents).repartition(blocks).materialize(), count, duplicates


def actor_count(options: BulkOptions) -> int:
    """`concurrency`, else as many actors as the cluster's CPUs (GPUs with `num_gpus`) hold at once."""
    if options.concurrency:
        return options.concurrency
    resources = ray.cluster_resources()
    if options.num_gpus > 0:
        return max(1, int(resources.get("GPU", 0) // options.num_gpus))
    return max(1, int(resources.get("CPU", 1) // options.num_cpus))


def score_bulk(options: BulkOptions) -> BulkReport:
    """Score the input's pending sources into the store at `options.out` (see the module's docstring).

    Raises BulkError, before Ray starts, for an input, output or target that cannot be used.
    """
    target = options.target()
    manifest_id = target.manifest_id()
    store = ScoreStore(options.out, manifest_id)
    done = store.resume(options.retry_errors)
    started = not ray.is_initialized()
    if started:  # `address`: that cluster; else a Ray of its own on this machine ("local"), whatever else runs
        ray.init(address=options.address or "local", **({} if options.address else {"include_dashboard": False}))
    try:
        actors = actor_count(options)
        ds, count, duplicates = pending_sources(options, done, actors)
        ds = ds.map_batches(
            ScoringActor,
            fn_constructor_kwargs={
                "target": target,
                "manifest_id": manifest_id,
                "threshold": options.threshold,
                "batch_size": options.batch_size,
                "base": os.getcwd(),
            },
            compute=ray.data.ActorPoolStrategy(size=actors),
            batch_format="pyarrow",
            batch_size=options.batch_size,
            num_cpus=options.num_cpus,
            num_gpus=options.num_gpus,
        )
        start = time.perf_counter()
        if count:  # else no actor is started, no file written
            ds.write_datasink(store, ray_remote_args={"num_cpus": WRITE_TASK_CPUS})
        seconds = time.perf_counter() - start
    finally:
        if started:
            ray.shutdown()
    return BulkReport(
        scored=sum(w.rows for w in store.written),
        failed=sum(w.failed for w in store.written),
        skipped=len(done),
        seconds=seconds,
        actors=actors,
        manifest_id=manifest_id,
        files=tuple(w.path for w in store.written if w.path),
        duplicates=duplicates,
    )
