"""`d3qe ui`: the review page on loopback (`d3qe_serve.ui.app`), scoring with a running Triton server.

The options map onto `ui.app.Settings`, served by `ui.app.serve_ui`.
"""

from __future__ import annotations

import argparse

from d3qe_serve.ui.app import DEFAULT_PORT, LOOPBACK, Settings, serve_ui


def add_arguments(p: argparse.ArgumentParser) -> None:
    defaults = Settings()
    p.add_argument("--url", default=defaults.url, help="the Triton server's gRPC address (d3qe serve prints it)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="the page's port on 127.0.0.1")
    p.add_argument("--max-file-mb", type=float, default=defaults.max_file_mb, help="largest uploaded file")
    p.add_argument("--max-files", type=int, default=defaults.max_files, help="most files in one upload")
    p.add_argument("--max-request-mb", type=float, default=defaults.max_request_mb, help="largest upload in all")
    p.add_argument("--fps", type=float, default=defaults.fps, help="video frames scored per second of video")
    p.add_argument("--threshold", type=float, default=defaults.threshold, help="P(generated) above it: generated")
    p.add_argument("--timeout", type=float, default=defaults.timeout, help="seconds to wait for one request")


def run(args: argparse.Namespace) -> int:
    settings = Settings(
        url=args.url,
        max_file_mb=args.max_file_mb,
        max_files=args.max_files,
        max_request_mb=args.max_request_mb,
        fps=args.fps,
        threshold=args.threshold,
        timeout=args.timeout,
    )
    print(f"d3qe ui: http://{LOOPBACK}:{args.port}/ (scoring with the server at {settings.url})", flush=True)
    serve_ui(settings, port=args.port)
    return 0
