"""The server against clients that misbehave and a shutdown that runs out of time, as a real `hndsr serve`
process driven through raw sockets: stalled headers and bodies, too many connections, aborted uploads, SIGTERM
with a request longer than the drain."""

from __future__ import annotations

import re
import signal
import socket
import threading
import time

import httpx
import pytest

from tests.serving.test_server import Server, png, post, write_model

pytestmark = pytest.mark.slow

TIMEOUT_S = 2.0
LIMIT = 60
MULTIPART_START = (b"POST /v1/super-resolve HTTP/1.1\r\nHost: test\r\n"
                   b"Content-Type: multipart/form-data; boundary=zz\r\nContent-Length: 100000\r\n\r\n"
                   b'--zz\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n' + b"x" * 200)


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    s = Server({"MODEL_URI": str(write_model(tmp / "models", seed=0)), "HNDSR_CLIENT_TIMEOUT_S": str(TIMEOUT_S),
                "HNDSR_MAX_CONNECTIONS": str(LIMIT)}, tmp)
    s.wait_ready()
    yield s
    s.stop()


def connect(server: Server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.settimeout(TIMEOUT_S + 10)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def metric(text: str, line_start: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start))


def test_stalled_clients_are_cut_off_while_others_are_served(guarded):
    before = httpx.get(f"{guarded.url}/metrics").text
    opened = time.monotonic()
    silent = [connect(guarded) for _ in range(10)]  # connect and send nothing
    headers = [connect(guarded) for _ in range(10)]  # half the headers, then nothing
    bodies = [connect(guarded) for _ in range(10)]  # the headers and 200 bytes of a 100 kB body, then nothing
    for sock in headers:
        sock.sendall(b"POST /v1/super-resolve HTTP/1.1\r\nHost: test\r\n")
    for sock in bodies:
        sock.sendall(MULTIPART_START)
    drip = connect(guarded)  # headers one byte every 0.4 s: never complete in time

    def trickle() -> None:
        for byte in b"GET /healthz HTTP/1.1\r\nHost: test\r\nX-Slow: " + b"a" * 100:
            try:
                drip.sendall(bytes([byte]))
            except OSError:
                return
            time.sleep(0.4)

    threading.Thread(target=trickle, daemon=True).start()
    normal = post(guarded.url, png(16, 16), steps="0")  # meanwhile, a well-behaved client is served
    assert normal.status_code == 200 and time.monotonic() - opened < TIMEOUT_S

    for sock in silent + headers + [drip]:
        answer = read_until_closed(sock)
        assert answer.startswith(b"HTTP/1.1 408 ") and b"HNDSR_CLIENT_TIMEOUT_S" in answer
    for sock in bodies:
        assert read_until_closed(sock) == b""  # cut off mid-upload: nothing to answer to
    assert time.monotonic() - opened < TIMEOUT_S + 5
    for sock in silent + headers + bodies + [drip]:
        sock.close()
    after = httpx.get(f"{guarded.url}/metrics").text
    line = 'hndsr_client_timeouts_total{phase="%s"}'
    assert metric(after, line % "headers") - metric(before, line % "headers") == 21
    assert metric(after, line % "body") - metric(before, line % "body") == 10
    assert re.search(r'hndsr_requests_total\{route="/v1/super-resolve",status="408",version=""\} 10\.0', after)
    assert not re.search(r'hndsr_requests_total\{[^}]*status="5\d\d"\}', after)
    assert post(guarded.url, png(16, 16), steps="0").status_code == 200


def test_beyond_the_connection_limit_work_gets_503_and_probes_are_served(guarded):
    held = [connect(guarded) for _ in range(LIMIT + 2)]
    try:
        time.sleep(0.3)
        refused = post(guarded.url, png(16, 16), steps="0")
        assert refused.status_code == 503 and refused.headers["retry-after"]
        assert refused.json()["error"] == "too_many_connections" and str(LIMIT) in refused.json()["detail"]
        assert httpx.get(f"{guarded.url}/readyz").status_code == 200
        assert httpx.get(f"{guarded.url}/healthz").status_code == 200
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.3)
    assert post(guarded.url, png(16, 16), steps="0").status_code == 200
    assert 'hndsr_rejections_total{reason="too_many_connections"} 1.0' in httpx.get(f"{guarded.url}/metrics").text


def test_an_aborted_upload_is_a_client_event_not_a_server_error(guarded):
    log_before = guarded.log.read_text()
    for _ in range(3):
        sock = connect(guarded)
        sock.sendall(MULTIPART_START)
        time.sleep(0.2)
        sock.close()  # the client goes away mid-upload
    time.sleep(0.5)
    metrics = httpx.get(f"{guarded.url}/metrics").text
    assert re.search(r'hndsr_requests_total\{route="/v1/super-resolve",status="499",version=""\} 3\.0', metrics)
    assert not re.search(r'hndsr_requests_total\{[^}]*status="5\d\d"\}', metrics)
    new = guarded.log.read_text()[len(log_before):].splitlines()
    assert len(new) == 3 and all("closed the connection while sending POST /v1/super-resolve" in line
                                 and " INFO " in line and "499" in line for line in new), new


def test_sigterm_drains_then_answers_503_to_what_is_still_running(tmp_path):
    s = Server({"MODEL_URI": str(write_model(tmp_path / "models", seed=0)), "HNDSR_DRAIN_S": "1.5",
                "HNDSR_MAX_STEPS": "1000", "HNDSR_WORKERS": "1"}, tmp_path)
    s.wait_ready()
    try:
        result = {}
        long = threading.Thread(target=lambda: result.update(r=post(s.url, png(200, 200), scale="4", steps="600")))
        long.start()
        time.sleep(1.0)
        s.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        # Draining: still listening; not ready, no new work, alive.
        ready = httpx.get(f"{s.url}/readyz")
        assert ready.status_code == 503 and ready.json() == {"status": "draining"}
        assert httpx.get(f"{s.url}/healthz").status_code == 200
        new = post(s.url, png(16, 16), steps="0")
        assert new.status_code == 503 and new.json()["error"] == "shutting_down" and new.headers["retry-after"]
        long.join(timeout=60)
        answer = result["r"]  # longer than the drain: answered, not dropped
        assert answer.status_code == 503 and answer.json()["error"] == "shutting_down"
        assert answer.headers["retry-after"] and "HNDSR_DRAIN_S" in answer.json()["detail"]
        assert s.process.wait(timeout=60) in (0, -signal.SIGTERM)
        log = s.log.read_text()
        assert "draining 1 request(s) in flight" in log and "answering 503 to 1 request(s)" in log
        assert "Traceback" not in log
    finally:
        s.stop()
