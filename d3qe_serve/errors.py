"""Every error d3qe-serve raises, in one tree under `D3QEServeError`.

Each error is also the built-in exception it behaves as (`ValueError` for input that cannot be used,
`RuntimeError` for a step that failed, `FileNotFoundError`, `ImportError`), so callers that catch those
keep working. Libraries raise these; only `d3qe_serve.cli` turns them into messages and exit codes.

    D3QEServeError
    ├── InputError (ValueError)                input that cannot be used; the message names it
    │   ├── ImageError                         an image: empty, undecodable, truncated, too large or small
    │   ├── VideoError                         a video: unreadable, no frames, too long
    │   ├── CheckpointError                    a checkpoint that cannot be read or lacks what inference needs
    │   ├── ManifestError                      an export's manifest: missing, of another format, altered
    │   ├── UnsupportedError                   a runtime/precision/device combination that is not offered
    │   ├── BulkError                          a bulk input, output or target that cannot be used
    │   └── EvidenceError                      an image's evidence could not be had; the message says why
    ├── NotFoundError (FileNotFoundError)      a file or folder that was named does not exist
    ├── MissingDependencyError (ImportError)   what this needs is not installed; the message names the extra
    ├── ValidationError (RuntimeError)         an exported artifact disagrees with eager beyond its tolerance
    ├── MissingProviderError (RuntimeError)    a GPU asked for, and the runtime cannot use one
    ├── CarryError (RuntimeError)              the GPU run's carry: too large to travel, or a file not as built
    └── ServerError (RuntimeError)             the server could not be found, prepared, started or reached
        ├── ServerNotReadyError                the server or a model did not become ready in time
        ├── ModelMismatchError                 the served model does not have the interface asked for
        └── RolloutError                       a rollout or rollback refused or failed, undone: the live one serves
"""

from __future__ import annotations

__all__ = [
    "BulkError",
    "CarryError",
    "CheckpointError",
    "D3QEServeError",
    "EvidenceError",
    "ImageError",
    "InputError",
    "ManifestError",
    "MissingDependencyError",
    "MissingProviderError",
    "ModelMismatchError",
    "NotFoundError",
    "RolloutError",
    "ServerError",
    "ServerNotReadyError",
    "UnsupportedError",
    "ValidationError",
    "VideoError",
]


class D3QEServeError(Exception):
    """The base of every error d3qe-serve raises."""


class InputError(D3QEServeError, ValueError):
    """Input that cannot be used; the message names the item and the problem."""


class ImageError(InputError):
    """An image that cannot be scored: empty, undecodable, truncated, too large or too small."""


class VideoError(InputError):
    """A video that cannot be scored; the message names the file and the problem."""


class CheckpointError(InputError):
    """A checkpoint that cannot be read, or does not hold what inference needs."""


class ManifestError(InputError):
    """A manifest that is missing, of another format, or whose fields are not what this version writes."""


class UnsupportedError(InputError):
    """A runtime, precision and device combination this version does not offer."""


class BulkError(InputError):
    """A bulk input, output or target that cannot be used; the message names the problem."""


class NotFoundError(D3QEServeError, FileNotFoundError):
    """A file or folder that was named does not exist."""


class MissingDependencyError(D3QEServeError, ImportError):
    """What this needs is not installed; the message says which extra installs it."""


class ValidationError(D3QEServeError, RuntimeError):
    """An exported artifact disagrees with the eager model beyond its precision's tolerance."""


class MissingProviderError(D3QEServeError, RuntimeError):
    """A GPU was asked for and the installed runtime cannot use one: an error, never a silent CPU run."""


class CarryError(D3QEServeError, RuntimeError):
    """The GPU run's carry (`benchmarks.gpu_carry`) exceeds what a device run takes, or a file of it is not the
    one its manifest records."""


class ServerError(D3QEServeError, RuntimeError):
    """The server could not be found, prepared, started or reached; the message says why."""


class ServerNotReadyError(ServerError):
    """The server or a model did not become ready in time."""


class ModelMismatchError(ServerError):
    """The served model does not have the interface asked for (its inputs, outputs or dtypes differ)."""


class EvidenceError(InputError):
    """The server could not give the evidence for an image; the message names the image and the problem."""


class RolloutError(ServerError):
    """A rollout or rollback the server refused or that failed; it was undone, the live version keeps serving."""
