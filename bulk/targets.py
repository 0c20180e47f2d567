"""What the scoring actors score with: an export's parts in the actor's process, or a running server.

A target is built on the driver, checked there (`manifest_id`, before any actor starts) and sent to every
actor, which opens its scorer once (`scorer`). Both scorers keep results in input order, failures in
their slot (the `client.results.Scorer` contract).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from d3qe_serve.client.grpc_client import DEFAULT_MODEL, D3QEClient
from d3qe_serve.client.results import Scorer
from d3qe_serve.errors import BulkError, ManifestError, ServerNotReadyError

REQUESTS_IN_FLIGHT = 2  # served: per actor, so that the server batches one request while the next is sent


class Target(Protocol):
    """What scores the images: checked once on the driver, opened once in each actor."""

    def manifest_id(self) -> str | None:
        """The id of the export that scores (`serving.manifest.Manifest.id`), None where it is not known;
        raises BulkError when the target cannot be used."""
        ...

    def scorer(self, threshold: float | None, batch_size: int) -> Scorer:
        """A scorer of (source, image) items, opened in the actor that calls it; `threshold` None: the one the
        target serves (the server's, or the export's operating point)."""
        ...


@dataclass(frozen=True)
class Exported:
    """The parts of the export at `repo`, chained in the actor's process (`serving.inprocess.load_exported`)
    on `device` with `threads` intra-op threads."""

    repo: str
    device: str = "cpu"
    threads: int | None = None

    def manifest_id(self) -> str:
        """The export's id, its artifacts checked first (here, before any actor loads them)."""
        from d3qe_serve.serving.manifest import Manifest

        try:
            manifest = Manifest.read(Path(self.repo))
            for part in manifest.parts:
                manifest.artifact(Path(self.repo), part)
        except (OSError, KeyError, ManifestError) as e:
            raise BulkError(str(e)) from e
        return manifest.id

    def scorer(self, threshold: float | None, batch_size: int) -> Scorer:
        from d3qe_serve.serving.inprocess import load_exported, score_exported
        from d3qe_serve.serving.operating_point import OperatingPoint

        runners = load_exported(Path(self.repo), self.device, self.threads)
        threshold = OperatingPoint.read(Path(self.repo)).threshold if threshold is None else threshold
        return lambda items: score_exported(runners, items, threshold=threshold, batch_size=batch_size)


@dataclass(frozen=True)
class Served:
    """The server at `url` (gRPC), sent encoded images at `model` (`client.grpc_client.D3QEClient`)."""

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

    def scorer(self, threshold: float | None, batch_size: int) -> Scorer:
        client = D3QEClient(
            self.url, self.model, batch_size=batch_size, concurrency=REQUESTS_IN_FLIGHT, threshold=threshold
        )
        return client.score
