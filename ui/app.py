"""The review page: for people who drop files on a page and look, on loopback (`d3qe ui` serves it).

A Starlette app (`create_app`, configured by `Settings`) served by uvicorn (`serve_ui`). The page and its
script are static files (`ui/static/`); its API scores through the project's client against the running
Triton server, so there is no second inference path: images at the `d3qe` entrance (the same requests
as `d3qe score`), videos frame by frame at `d3qe_rgb` (`client.video`, the timeline and its flagged
spans), and one image's evidence at `d3qe_evidence` (`client.evidence`), asked for only when the
reviewer opens it.

Uploads are bounded (bytes per file, files per request, bytes per request) and each item fails
alone, with the same errors the API gives. Nothing uploaded is written anywhere but Starlette's
spooled temporary files and, for a video while it is decoded, a temporary folder: both are removed
when the request ends.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from pathlib import Path

import tritonclient.grpc as grpcclient
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from tritonclient.utils import InferenceServerException

from d3qe_serve.client.evidence import EvidenceError
from d3qe_serve.client.grpc_client import DEFAULT_MODEL, DEFAULT_URL, D3QEClient, ServerNotReadyError
from d3qe_serve.client.results import DEFAULT_THRESHOLD
from d3qe_serve.client.video import DEFAULT_FPS, VIDEO_SUFFIXES, VideoError, VideoResult, score_video
from d3qe_serve.contract import EVIDENCE_ENTRANCE, RGB_ENTRANCE

STATIC = Path(__file__).parent / "static"
LOOPBACK = "127.0.0.1"
DEFAULT_PORT = 8080
MB = 1 << 20


@dataclass(frozen=True)
class Settings:
    """The page's server (`url`, gRPC), its upload limits (per file, files per request, per request), the
    frames scored per second of video, the verdict's threshold (None: the one each answer carries, the server's;
    a video's verdict then upstream's) and the seconds one request may take."""

    url: str = DEFAULT_URL
    max_file_mb: float = 100.0
    max_files: int = 100
    max_request_mb: float = 1024.0
    fps: float = DEFAULT_FPS
    threshold: float | None = None
    timeout: float = 120.0

    @property
    def max_file_bytes(self) -> int:
        return int(self.max_file_mb * MB)


@dataclass
class Upload:
    """One uploaded file: its name as the browser sent it (a label, never a path), and its spooled file."""

    name: str
    file: UploadFile
    error: str | None = None


@dataclass
class Clients:
    """The app's clients of the server, one per entrance it scores through, opened with the app and closed
    with it (their channels and the models' metadata serve every request)."""

    images: D3QEClient  # `d3qe`: encoded files; also asks `d3qe_evidence` for an image's evidence
    frames: D3QEClient  # `d3qe_rgb`: a video's decoded frames

    @classmethod
    def open(cls, settings: Settings) -> Clients:
        options = {"timeout": settings.timeout, "threshold": settings.threshold}
        return cls(
            D3QEClient(settings.url, DEFAULT_MODEL, **options), D3QEClient(settings.url, RGB_ENTRANCE, **options)
        )

    def close(self) -> None:
        self.images.close()
        self.frames.close()


def _is_video(name: str) -> bool:
    return Path(name).suffix.lower() in VIDEO_SUFFIXES


async def _uploads(request: Request, settings: Settings, field: str) -> list[Upload]:
    """The request's files under `field`, each over the size limit marked with its error; the request refused
    (413) when it is larger than a whole request may be or holds more files than allowed."""
    length = request.headers.get("content-length")
    if length is not None and int(length) > settings.max_request_mb * MB:
        raise HTTPException(413, f"request of {int(length) / MB:.1f} MB: the limit is {settings.max_request_mb:g} MB")
    try:
        form = await request.form(max_files=settings.max_files, max_fields=settings.max_files)
    except HTTPException as e:  # Starlette names the limit crossed ("Too many files. Maximum number of files is …")
        raise HTTPException(413 if "Too many" in str(e.detail) else 400, e.detail) from e
    files = [f for f in form.getlist(field) if isinstance(f, UploadFile)]
    if not files:
        raise HTTPException(400, f"no files in the form field {field!r}")
    uploads = []
    for f in files:
        upload = Upload(f.filename or "unnamed", f)
        if f.size is not None and f.size > settings.max_file_bytes:
            upload.error = f"file of {f.size / MB:.1f} MB: the limit is {settings.max_file_mb:g} MB a file"
        uploads.append(upload)
    return uploads


def _read(upload: Upload) -> bytes:
    upload.file.file.seek(0)
    return upload.file.file.read()


def _score_video(settings: Settings, clients: Clients, upload: Upload, folder: Path, index: int) -> dict:
    path = folder / f"{index}{Path(upload.name).suffix.lower()}"  # our name: the upload's is only a label
    with open(path, "wb") as out:
        upload.file.file.seek(0)
        shutil.copyfileobj(upload.file.file, out)
    try:
        result = score_video(
            path,
            clients.frames,
            fps=settings.fps,
            threshold=DEFAULT_THRESHOLD if settings.threshold is None else settings.threshold,
            source=upload.name,
            progress=False,
        )
    except VideoError as e:
        result = VideoResult.failed(upload.name, str(e).replace(str(path), upload.name))
    finally:
        path.unlink(missing_ok=True)
    return {"kind": "video", **result.as_dict()}


def score_uploads(settings: Settings, clients: Clients, uploads: list[Upload]) -> list[dict]:
    """One result per upload, in upload order: images in batches through the `d3qe` entrance, then videos."""
    rows: list[dict | None] = [None] * len(uploads)
    for i, u in enumerate(uploads):
        if u.error is not None:
            rows[i] = {"kind": "video" if _is_video(u.name) else "image", "source": u.name, "error": u.error}
    images = [i for i, u in enumerate(uploads) if rows[i] is None and not _is_video(u.name)]
    if images:
        scored = clients.images.score((uploads[i].name, _read(uploads[i])) for i in images)
        for i, result in zip(images, scored, strict=True):
            rows[i] = {"kind": "image", **result.as_dict()}
    videos = [i for i, row in enumerate(rows) if row is None]
    if videos:
        with tempfile.TemporaryDirectory(prefix="d3qe-ui-") as folder:
            for i in videos:
                rows[i] = _score_video(settings, clients, uploads[i], Path(folder), i)
    return rows


def evidence_of(clients: Clients, upload: Upload) -> dict:
    if upload.error is not None:
        raise EvidenceError(f"{upload.name}: {upload.error}")
    if _is_video(upload.name):
        raise EvidenceError(f"{upload.name}: the evidence view is for images; a video's frames are on its timeline")
    return clients.images.evidence((upload.name, _read(upload)), EVIDENCE_ENTRANCE).as_dict()


def _server_error(e: Exception) -> JSONResponse:
    message = e.message() if isinstance(e, InferenceServerException) else str(e)
    return JSONResponse({"error": f"the Triton server at the configured URL did not answer: {message}"}, 503)


def create_app(settings: Settings = Settings()) -> Starlette:
    """The page and its API, talking to the Triton server at `settings.url`."""
    clients = Clients.open(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await run_in_threadpool(clients.close)  # waits for calls still running

    async def info(request: Request) -> JSONResponse:
        def ready() -> dict[str, bool]:
            grpc = grpcclient.InferenceServerClient(settings.url)
            try:
                return {m: grpc.is_model_ready(m) for m in (DEFAULT_MODEL, RGB_ENTRANCE, EVIDENCE_ENTRANCE)}
            finally:
                grpc.close()

        try:
            models = await run_in_threadpool(ready)
        except InferenceServerException as e:
            return _server_error(e)
        return JSONResponse({**asdict(settings), "models": models, "video_suffixes": sorted(VIDEO_SUFFIXES)})

    async def score(request: Request) -> JSONResponse:
        uploads = await _uploads(request, settings, "files")
        try:
            rows = await run_in_threadpool(score_uploads, settings, clients, uploads)
        except (ServerNotReadyError, InferenceServerException) as e:
            return _server_error(e)
        finally:
            for u in uploads:
                await u.file.close()
        return JSONResponse({"results": rows})

    async def evidence(request: Request) -> JSONResponse:
        uploads = await _uploads(request, settings, "file")
        if len(uploads) != 1:
            raise HTTPException(400, f"the evidence is for one image at a time, got {len(uploads)} files")
        try:
            return JSONResponse(await run_in_threadpool(evidence_of, clients, uploads[0]))
        except EvidenceError as e:
            return JSONResponse({"source": uploads[0].name, "error": str(e)}, 422)
        except (ServerNotReadyError, InferenceServerException) as e:
            return _server_error(e)
        finally:
            await uploads[0].file.close()

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": exc.detail}, exc.status_code)

    routes = [
        Route("/api/info", info),
        Route("/api/score", score, methods=["POST"]),
        Route("/api/evidence", evidence, methods=["POST"]),
        Mount("/", StaticFiles(directory=STATIC, html=True)),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error}, lifespan=lifespan)


def serve_ui(settings: Settings = Settings(), *, port: int = DEFAULT_PORT) -> None:
    """Serve the page on loopback (127.0.0.1:`port`) until interrupted."""
    import uvicorn

    uvicorn.run(create_app(settings), host=LOOPBACK, port=port, log_level="warning")
