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
EXIT_SETTINGS = 2  # a setting is invalid (the message names the variable)
EXIT_STARTUP = 4  # the model cannot be loaded or started (3 is `hndsr registry promote`'s "rejected")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Serve the model over HTTP: POST /v1/super-resolve, GET /v1/model, /healthz, /readyz, /metrics, /docs. "
        "The model comes from MODEL_URI (default models:/hndsr@production, resolved at MLFLOW_TRACKING_URI; "
        "or a local folder); limits and the API key from HNDSR_* variables (README: Serving). Exit status: 0 after "
        f"a clean shutdown, {EXIT_SETTINGS} for an invalid setting, {EXIT_STARTUP} when the model cannot be loaded "
        "or started (the reason on one line).")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")


def main(args: argparse.Namespace) -> int:
    import uvicorn

    from hndsr.errors import UserError
    from serving import runtime
    from serving.app import create_app
    from serving.loader import ModelLoadError

    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"hndsr serve: error: {exc}", file=sys.stderr)
        return EXIT_SETTINGS
    app = create_app(settings)
    state = app.state.hndsr
    try:  # before uvicorn, so a model that cannot start is one line and an exit status, not a lifespan traceback
        state.preloaded = runtime.start(settings, on_batch=state.metrics.batch_size.observe)
    except (ModelLoadError, UserError) as exc:
        print(f"hndsr serve: error: cannot start: {exc}", file=sys.stderr)
        return EXIT_STARTUP

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if not app.state.hndsr.draining:
                log.info("signal %s: draining (up to %g s for requests in flight)", sig, settings.drain_s)
            app.state.hndsr.draining = True
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info", lifespan="on",
                            timeout_graceful_shutdown=int(settings.drain_s), access_log=False)
    server = Server(config)
    server.run()
    if not server.started:
        print("hndsr serve: error: the server did not start (see the log above)", file=sys.stderr)
        return EXIT_STARTUP
    return 0


serve = Command("serve the production model over HTTP (FastAPI + uvicorn)", add_arguments, main)
