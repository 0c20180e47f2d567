"""What a bulk run is asked to do: `BulkOptions`, the typed record `pipeline.score_bulk` takes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from d3qe_serve.bulk.targets import Exported, Served, Target
from d3qe_serve.client.grpc_client import DEFAULT_MODEL
from d3qe_serve.errors import BulkError


@dataclass(frozen=True)
class BulkOptions:
    """A bulk run: the sources of `input` (a folder, a Parquet or CSV table, or a list file; a path or URI)
    scored into the store at `out`, by the export at `repo` in each actor or by the server at `url`.

    `address`: the Ray cluster to run on (None: a local Ray of its own, unless this process has initialised
    one). `concurrency` actors (None: as many as the cluster's CPUs, or GPUs with `num_gpus`, hold at once),
    each with `num_cpus` CPUs (in-process: its intra-op threads) and `num_gpus` GPUs (in-process: the parts
    on cuda); `batch_size` images per actor call and per forward pass or request. `column`: a table's
    column of sources (None: its only one, or 'source'). `retry_errors`: sources whose row holds an error
    are scored again. `model` and `ready_timeout` apply to `url`.
    """

    input: str
    out: str
    repo: str | Path | None = None
    url: str | None = None
    model: str = DEFAULT_MODEL
    address: str | None = None
    concurrency: int | None = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    batch_size: int = 8
    threshold: float | None = None  # None: the served threshold, or the export's operating point
    column: str | None = None
    retry_errors: bool = False
    ready_timeout: float = 30.0

    def __post_init__(self) -> None:
        if self.batch_size < 1 or (self.concurrency is not None and self.concurrency < 1) or self.num_cpus <= 0:
            raise BulkError("--batch-size, --concurrency and --num-cpus must be positive")
        if self.repo is not None and self.url is not None:
            raise BulkError("score with an export (--repo) or a server (--url), not both")

    def target(self) -> Target:
        """The server at `url`, else the export at `repo` (default: `d3qe export`'s) on the actors' resources."""
        if self.url:
            return Served(self.url, self.model, self.ready_timeout)
        from d3qe_serve.serving.server_config import DEFAULT_REPOSITORY

        device = "cuda" if self.num_gpus > 0 else "cpu"
        return Exported(str(Path(self.repo or DEFAULT_REPOSITORY).absolute()), device, max(1, round(self.num_cpus)))
