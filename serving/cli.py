"""`hndsr serve`: the HTTP server (settings from the environment: docs/reference/settings.md).

Shutdown (SIGTERM or Ctrl-C) drains: the server keeps accepting connections, answers /readyz and new
super-resolve requests 503 (with Retry-After) and lets the requests in flight finish. The drain ends when none
is left, or after HNDSR_DRAIN_S seconds; requests still running then are answered 503 with Retry-After. Then the
listener closes and the process exits (a second signal ends the drain at once).

Connections: serving/protocol.py (client read timeouts, connection limit).
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys

from hndsr.cli import Command
from serving.settings import SettingsError, load_settings

log = logging.getLogger("hndsr.serving")
EXIT_SETTINGS = 2  # a setting is invalid (the message names the variable)
EXIT_STARTUP = 4  # the model cannot be loaded or started (3 is `hndsr registry promote`'s "rejected")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Serve the model over HTTP: the web page at /, POST /v1/super-resolve, GET /v1/model, /healthz, /readyz, /metrics, /rollout, /docs. "
        "The model comes from MODEL_URI (default models:/hndsr@production, resolved at MLFLOW_TRACKING_URI; "
        "or a local folder); limits and the API key from HNDSR_* variables (docs/reference/settings.md). Exit status: 0 after "
        f"a clean shutdown, {EXIT_SETTINGS} for an invalid setting, {EXIT_STARTUP} when the model cannot be loaded "
        "or started (the reason on one line).")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")


def main(args: argparse.Namespace) -> int:
    import uvicorn

    from hndsr.errors import UserError
    from inference import runtime
    from inference.loader import ModelLoadError, quiet_store_errors
    from serving.app import create_app
    from serving.server import ANSWER_S, DrainingServer, protocol_class

    try:
        settings = load_settings()
        app = create_app(settings)  # reads the clients file, if any
    except SettingsError as exc:
        print(f"hndsr serve: error: {exc}", file=sys.stderr)
        return EXIT_SETTINGS
    state = app.state.hndsr
    quiet_store_errors()
    try:  # the port first: a port in use is said at once, before minutes of loading the model
        listener = listen(args.host, args.port)
    except OSError as exc:
        print(f"hndsr serve: error: cannot start: cannot listen on {args.host}:{args.port}: "
              f"{exc.strerror or exc} (another process holds it? choose another with --port)", file=sys.stderr)
        return EXIT_STARTUP
    try:  # before uvicorn, so a model that cannot start is one line and an exit status, not a lifespan traceback
        state.preloaded = runtime.start(settings, on_batch=state.metrics.batch_size.observe)
    except (ModelLoadError, UserError) as exc:
        print(f"hndsr serve: error: cannot start: {exc}", file=sys.stderr)
        listener.close()
        return EXIT_STARTUP

    http = protocol_class(client_timeout_s=settings.client_timeout_s, max_connections=settings.max_connections,
                          on_timeout=lambda phase: state.metrics.client_timeouts.labels(phase=phase).inc(),
                          on_refused=lambda: state.metrics.rejections.labels(reason="too_many_connections").inc())
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info", lifespan="on", http=http,
                            timeout_graceful_shutdown=ANSWER_S, access_log=False)
    server = DrainingServer(config, state)
    server.run(sockets=[listener])
    if not server.started:
        print("hndsr serve: error: the server did not start (see the log above)", file=sys.stderr)
        return EXIT_STARTUP
    return 0


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (as uvicorn binds it: SO_REUSEADDR, so a restart does not wait for
    TIME_WAIT); OSError when the address is in use or not this host's."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


serve = Command("serve the production model over HTTP (FastAPI + uvicorn)", add_arguments, main)
