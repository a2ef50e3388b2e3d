"""Shared fixtures: the real images in imagery/ (realsat, geotiff), and local S3 server processes."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# Fixtures of real tracking servers and trained candidates, and of the images and the stack, for every folder
# that needs them (registry, the containers, scale-out and the CI workflows): one definition, so a session trains
# the candidates and builds the images once.
pytest_plugins = ["tests.tracking", "tests.containers"]

REPO = Path(__file__).resolve().parents[1]
REALSAT = Path(os.environ.get("HNDSR_REALSAT", REPO / "imagery" / "realsat"))
GEOTIFF = Path(os.environ.get("HNDSR_GEOTIFF", REPO / "imagery" / "geotiff"))


def _shared_folder(folder: Path, what: str, variable: str) -> Path:
    """A folder of real data: in the repository (imagery/), or where the variable points."""
    if not folder.is_dir():
        pytest.fail(f"{folder} is missing: the tests need the {what} folder (imagery/ in the repository; or set "
                    f"{variable})")
    return folder


@pytest.fixture(scope="session")
def realsat() -> Path:
    """The ten real satellite/aerial images of imagery/realsat (or at $HNDSR_REALSAT)."""
    return _shared_folder(REALSAT, "real-image", "HNDSR_REALSAT")


@pytest.fixture(scope="session")
def geotiff() -> Path:
    """The five real georeferenced rasters of imagery/geotiff (or at $HNDSR_GEOTIFF)."""
    return _shared_folder(GEOTIFF, "real GeoTIFF", "HNDSR_GEOTIFF")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class S3Server:
    endpoint: str
    process: subprocess.Popen

    def env(self, access_key: str = "testing", secret_key: str = "testing") -> dict[str, str]:
        """Environment that points boto3 (and our S3 source) at this server, ignoring ~/.aws."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": access_key,
            "AWS_SECRET_ACCESS_KEY": secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }

    def client(self):
        import boto3

        env = self.env()
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name=env["AWS_DEFAULT_REGION"],
        )


def _start_moto(extra_env: dict[str, str]) -> S3Server:
    executable = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
    if executable is None:
        pytest.fail("moto_server not found: install the dev extra (pip install -e '.[dev]')")
    port = free_port()
    process = subprocess.Popen(
        [executable, "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, **extra_env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"moto_server exited with {process.returncode} before it was ready")
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
            return S3Server(endpoint, process)
        except OSError:
            time.sleep(0.2)
    process.kill()
    pytest.fail("moto_server did not answer within 30 s")


def stop_process(process: subprocess.Popen, timeout: float = 30) -> None:
    """Terminate a server process the tests started; kill it if it does not exit within `timeout` s."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()


def _stop(server: S3Server) -> None:
    stop_process(server.process, timeout=10)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A real S3 API endpoint (moto's server) on a loopback port, accepting any credentials."""
    server = _start_moto({})
    yield server
    _stop(server)


@pytest.fixture(scope="session")
def s3_server_with_auth() -> Iterator[S3Server]:
    """A local S3 server that checks credentials from the first request: unknown keys are refused."""
    server = _start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    yield server
    _stop(server)
