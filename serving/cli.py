"""`hndsr serve`: the HTTP server (settings from the environment: see serving/settings.py or the README).

On SIGTERM or Ctrl-C the server stops accepting connections, /readyz answers 503 on connections still open,
requests in flight finish (up to HNDSR_DRAIN_S seconds), then the process exits.
"""

from __future__ import annotations

import argparse
import logging
import sys

from hndsr.cli import Command
from serving.settings import SettingsError, load_settings

log = logging.getLogger("hndsr.serving")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Serve the model over HTTP: POST /v1/super-resolve, GET /v1/model, /healthz, /readyz, /metrics, /docs. "
        "The model comes from MODEL_URI (default models:/hndsr@production, resolved at MLFLOW_TRACKING_URI; "
        "or a local folder); limits and the API key from HNDSR_* variables (README: Serving).")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")


def main(args: argparse.Namespace) -> int:
    import uvicorn

    from serving.app import create_app
    from serving.loader import ModelLoadError

    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"hndsr serve: error: {exc}", file=sys.stderr)
        return 2
    app = create_app(settings)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if not app.state.hndsr.draining:
                log.info("signal %s: draining (up to %g s for requests in flight)", sig, settings.drain_s)
            app.state.hndsr.draining = True
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info", lifespan="on",
                            timeout_graceful_shutdown=int(settings.drain_s), access_log=False)
    server = Server(config)
    try:
        server.run()
    except ModelLoadError as exc:
        print(f"hndsr serve: error: cannot load the model: {exc}", file=sys.stderr)
        return 1
    if not server.started:
        print("hndsr serve: error: the server did not start (see the log above)", file=sys.stderr)
        return 1
    return 0


serve = Command("serve the production model over HTTP (FastAPI + uvicorn)", add_arguments, main)
