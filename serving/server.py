"""uvicorn, as `hndsr serve` runs it: connections with client read timeouts and a limit (`protocol_class`), and
a shutdown that drains (`DrainingServer`).

Connections: uvicorn's h11 protocol with client read timeouts and a connection limit, so a client that stalls or
trickles cannot pin the server.

- Headers: a request's headers must arrive in full within `client_timeout_s` of the moment the server starts
  waiting for them (a new connection, or the end of the previous answer on a kept-alive one: uvicorn closes an
  idle kept-alive connection after its own 5 s before that). Otherwise the server answers 408 and closes.
- Body: while a request's body is being received, a gap of more than `client_timeout_s` between two pieces of
  it closes the connection (nginx's `client_body_timeout`); the request is counted as status 408. A gap the
  server causes itself (it stopped reading because the application has not taken the data yet) never counts.
- Connections: beyond `max_connections` open connections, a request is answered 503 with `Retry-After` and a
  JSON body, except the health probes (`/healthz`, `/readyz`), which are always served.

Hooks: `on_timeout(phase)` (phase "headers" or "body") and `on_refused()` count them in the metrics.

Shutdown: on the first SIGTERM/SIGINT the server keeps listening: /healthz stays 200, /readyz and new work get
503 (serving/app.py), requests in flight go on. The drain ends when none is in flight, or after `drain_s`, when
those still running are answered 503 with Retry-After (`State.until_drained`). Only then does uvicorn's own
shutdown run (listener closed, answers still being written get `ANSWER_S`, the lifespan stops the engine).
A second signal ends the drain at once.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("hndsr.serving")

ANSWER_S = 10  # after the drain, how long answers still being written may take before connections are cut
TIMED_OUT = "hndsr.read_timeout"  # set in the ASGI scope of a request whose body stalled
ALWAYS_SERVED = frozenset({"/healthz", "/readyz"})


def _raw_response(status: int, reason: str, code: str, detail: str, headers: dict[str, str] | None = None) -> bytes:
    body = json.dumps({"error": code, "detail": detail}).encode()
    lines = [f"HTTP/1.1 {status} {reason}", "content-type: application/json", f"content-length: {len(body)}",
             "connection: close", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def protocol_class(*, client_timeout_s: float, max_connections: int, on_timeout: Callable[[str], None],
                   on_refused: Callable[[], None]) -> type[H11Protocol]:
    """A uvicorn HTTP protocol class (`uvicorn.Config(http=...)`) with these limits."""

    class TimedH11Protocol(H11Protocol):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self._timer = None
            self._phase: str | None = None  # "headers" | "body" | None (not waiting for the client)
            app = self.app

            async def limited(scope, receive, send) -> None:
                """Over the connection limit: 503 for everything but the health probes."""
                if len(self.connections) > max_connections and scope.get("path") not in ALWAYS_SERVED:
                    on_refused()
                    body = json.dumps({"error": "too_many_connections", "detail": (
                        f"the server holds its limit of {max_connections} connections; retry shortly")}).encode()
                    await send({"type": "http.response.start", "status": 503, "headers": [
                        (b"content-type", b"application/json"), (b"retry-after", b"2"), (b"connection", b"close")]})
                    await send({"type": "http.response.body", "body": body})
                    return
                await app(scope, receive, send)

            self.app = limited

        # -- when the server waits for the client ----------------------------------------------------------

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._follow()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._phase == "body":
                self._cancel()  # a gap is measured from the latest piece
            self._follow()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._follow()

        def connection_lost(self, exc) -> None:
            self._cancel()
            self._phase = None
            super().connection_lost(exc)

        def _waiting_for(self) -> str | None:
            if self.transport is None or self.transport.is_closing():
                return None
            state = self.conn.their_state
            if state is h11.IDLE:
                # Between requests uvicorn's keep-alive timer runs until a first byte arrives.
                return "headers" if self.timeout_keep_alive_task is None else None
            if state is h11.SEND_BODY:
                return "body"
            return None

        def _follow(self) -> None:
            phase = self._waiting_for()
            if phase != self._phase:
                self._cancel()
                self._phase = phase
            if phase is not None and self._timer is None:
                self._timer = self.loop.call_later(client_timeout_s, self._expired)

        def _cancel(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _expired(self) -> None:
            self._timer = None
            phase = self._waiting_for()
            if phase is None or phase != self._phase:
                self._follow()
                return
            if phase == "body" and self.flow.read_paused:  # the server is behind, not the client
                self._follow()
                return
            client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
            if phase == "headers":
                log.info("%s sent no complete request headers within %g s; answered 408 and closed", client,
                         client_timeout_s)
                self.transport.write(_raw_response(
                    408, "Request Timeout", "request_timeout",
                    f"the request headers did not arrive within {client_timeout_s:g} s (HNDSR_CLIENT_TIMEOUT_S)"))
            else:
                log.info("%s sent no data for %g s while uploading the body of %s %s; closed", client,
                         client_timeout_s, self.scope.get("method"), self.scope.get("path"))
                self.scope[TIMED_OUT] = True  # the application counts the request as 408
            on_timeout(phase)
            self._phase = None
            self.transport.close()

    return TimedH11Protocol


class DrainingServer(uvicorn.Server):
    """uvicorn's server with the drain described above; `state` is the app's serving.state.State."""

    def __init__(self, config: uvicorn.Config, state) -> None:
        super().__init__(config)
        self.state = state
        self._drain_until: float | None = None
        self._announced = False

    def handle_exit(self, sig, frame) -> None:  # a signal handler: only sets flags, on_tick acts on them
        if self._drain_until is None and not self.should_exit:
            self._captured_signals.append(sig)  # uvicorn re-raises it after shutting down, as it does itself
            self._drain_until = time.monotonic() + self.state.settings.drain_s
            self.state.draining = True
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        state = self.state
        if self._drain_until is not None and not state.drain_over.is_set():
            if not self._announced:
                self._announced = True
                log.info("shutting down: draining %d request(s) in flight for up to %g s (HNDSR_DRAIN_S); new work "
                         "gets 503", state.in_flight, state.settings.drain_s)
            if state.in_flight == 0:
                log.info("drained: no request in flight")
                state.drain_over.set()
                self.should_exit = True
            elif self.should_exit or time.monotonic() >= self._drain_until:
                log.warning("drain over: answering 503 to %d request(s) still in flight", state.in_flight)
                state.drain_over.set()
                self.should_exit = True
        return await super().on_tick(counter)
