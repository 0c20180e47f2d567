"""`d3qe bulk`: score many images on Ray Data into a Parquet dataset that a rerun resumes.

    d3qe bulk INPUT --out OUT.parquet [--repo DIR | --url HOST:PORT] [--address RAY_ADDRESS]
              [--concurrency N] [--num-cpus C] [--num-gpus G] [--batch-size B] [--retry-errors]

INPUT is a folder (searched recursively for images, as `d3qe score` searches it), a Parquet or CSV table
with a column of paths or URIs (`--column`), or a list file of one path or URI per line; relative paths
are relative to the folder the command runs in, URIs are read through pyarrow's filesystems (file://,
s3://, gs://, ...). OUT is a folder of Parquet files, one row per input (`bulk.store.output_schema`).
Each of a pool of Ray actors holds the export's parts in its process (on CPU or a GPU) or a gRPC client
of a running server (`--url`). Without `--address` the command starts a local Ray on this machine.

A rerun with the same OUT skips the sources OUT already holds and adds its rows in new files. A source
whose row holds an error is skipped too; `--retry-errors` deletes those rows and scores them again. OUT
holds the scores of one export: a run with another export (another manifest id) is refused.

The options map onto `d3qe_serve.bulk.options.BulkOptions`, run by `d3qe_serve.bulk.pipeline.score_bulk`.
"""

from __future__ import annotations

import argparse

from d3qe_serve.bulk.options import BulkOptions

DEFAULTS = BulkOptions(input="", out="")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="a folder (recursive), a Parquet or CSV table of paths/URIs, or a list file")
    p.add_argument("--out", required=True, help="the Parquet dataset (a folder) to write or resume; a path or URI")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--repo", help="actors run this export in-process (default: build/model_repository)")
    where.add_argument("--url", help="actors send the images to the server at this gRPC address instead")
    p.add_argument("--model", default=DEFAULTS.model, help="--url: the ensemble taking encoded images")
    p.add_argument("--address", help="the Ray cluster to run on (default: start a local Ray here)")
    p.add_argument("--concurrency", type=int, help="scoring actors (default: as many as the cluster's CPUs/GPUs fit)")
    p.add_argument(
        "--num-cpus", type=float, default=DEFAULTS.num_cpus, help="CPUs per actor; in-process, its intra-op threads"
    )
    p.add_argument(
        "--num-gpus", type=float, default=DEFAULTS.num_gpus, help="GPUs per actor (fractions share one): parts on cuda"
    )
    p.add_argument(
        "--batch-size", type=int, default=DEFAULTS.batch_size, help="images per actor call and per forward pass/request"
    )
    p.add_argument(
        "--threshold", type=float, help="P(generated) for the verdict (default: the served one, or the export's)"
    )
    p.add_argument("--column", help="a table's column of paths or URIs (default: its only one, or 'source')")
    p.add_argument("--retry-errors", action="store_true", help="score again the sources whose row in OUT is an error")
    p.add_argument(
        "--ready-timeout", type=float, default=DEFAULTS.ready_timeout, help="--url: seconds to wait for the server"
    )


def run(args: argparse.Namespace) -> int:
    """Exit status 0 when every image of this run scored, 1 when some failed (each row holds its error), 2 when
    the run could not start (bad options, input, output or target: `cli.main` maps BulkError)."""
    options = BulkOptions(
        input=args.input,
        out=args.out,
        repo=args.repo,
        url=args.url,
        model=args.model,
        address=args.address,
        concurrency=args.concurrency,
        num_cpus=args.num_cpus,
        num_gpus=args.num_gpus,
        batch_size=args.batch_size,
        threshold=args.threshold,
        column=args.column,
        retry_errors=args.retry_errors,
        ready_timeout=args.ready_timeout,
    )
    from d3qe_serve.bulk.pipeline import score_bulk  # imports Ray, or says which extra installs it

    report = score_bulk(options)
    print(
        f"d3qe bulk: {report.scored} images scored ({report.failed} failed: their rows hold the error) in "
        f"{report.seconds:.1f} s, {report.images_per_s:.2f} images/s on {report.actors} actors; {report.skipped} "
        f"sources already in the output skipped; {report.duplicates} duplicates (identical bytes: scored once, a row "
        f"each); export {report.manifest_id}"
    )
    return 1 if report.failed else 0
