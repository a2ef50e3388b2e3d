"""Docker for the tests that build and run the images (marker `container`) and the compose stack: the engine
(`make tools` installs and starts it), the serving image built by the project's own script, containers that are
always removed, and the address at which containers reach servers the tests start on this host."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import REPO

SERVE_TEST_TAG = "hndsr-serve:test"
HOST_CA_CERTS = Path("/usr/local/share/ca-certificates")


def docker(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} exited {result.returncode}: {result.stderr[-3000:]}")
    return result


def require_engine() -> None:
    """A Docker engine that answers. Missing, the tests fail with what to run, except where
    HNDSR_CONTAINER_OPTIONAL=1 says the host cannot run one: there they are skipped, visibly."""
    problem = None
    if not shutil.which("docker"):
        problem = "no docker client"
    elif subprocess.run(["docker", "info"], capture_output=True, timeout=60).returncode != 0:
        problem = "the Docker engine does not answer (is dockerd running?)"
    if problem:
        message = f"{problem}: `make tools` installs Debian's docker.io and starts dockerd"
        if os.environ.get("HNDSR_CONTAINER_OPTIONAL") == "1":
            pytest.skip(message)
        pytest.fail(message)


def build_serve_image(tag: str = SERVE_TEST_TAG) -> dict:
    """The serving image as `make image` builds it (deploy/images/build.sh: the local Debian base, this host's
    extra CA certificates, torch's CPU build). Returns the build's seconds and the image's size."""
    command = [str(REPO / "deploy" / "images" / "build.sh"), "--tag", tag, "--local-base", "--cpu-torch"]
    if HOST_CA_CERTS.is_dir():
        command += ["--ca-certs", str(HOST_CA_CERTS)]
    start = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, timeout=1500)
    seconds = time.monotonic() - start
    assert result.returncode == 0, f"{' '.join(command)}: {result.stderr[-4000:]}"
    size = int(docker("image", "inspect", "--format", "{{.Size}}", tag).stdout)
    print(f"serving image {tag}: built in {seconds:.0f} s, {size / 1e6:.0f} MB")
    return {"tag": tag, "seconds": seconds, "bytes": size}


def bridge_gateway() -> str:
    """This host's address on Docker's default bridge: where containers reach servers the tests start here."""
    config = json.loads(docker("network", "inspect", "bridge", "--format", "{{json .IPAM.Config}}").stdout)[0]
    # The engine fills Gateway in only when it was configured; by default the bridge is the subnet's first address.
    return config.get("Gateway") or str(next(ipaddress.ip_network(config["Subnet"]).hosts()))


class Container:
    """`docker run -d` of an image; `remove()` always runs (the tests' finalizers)."""

    def __init__(self, image: str, *, env: dict[str, str] | None = None, ports: tuple[int, ...] = (),
                 options: tuple[str, ...] = (), args: tuple[str, ...] = ()) -> None:
        self.name = f"hndsr-test-{uuid.uuid4().hex[:8]}"
        command = ["run", "-d", "--name", self.name, *options]
        for key, value in (env or {}).items():
            command += ["-e", f"{key}={value}"]
        for port in ports:
            command += ["-p", f"127.0.0.1::{port}"]
        docker(*command, image, *args)

    def inspect(self) -> dict:
        return json.loads(docker("inspect", self.name).stdout)[0]

    def url(self, port: int) -> str:
        host = self.inspect()["NetworkSettings"]["Ports"][f"{port}/tcp"][0]
        return f"http://127.0.0.1:{host['HostPort']}"

    def logs(self) -> str:
        result = docker("logs", self.name, check=False)
        return result.stdout + result.stderr

    def exec(self, *args: str) -> str:
        return docker("exec", self.name, *args).stdout

    def wait_healthy(self, timeout: float) -> float:
        """Seconds until the image's own HEALTHCHECK says healthy; fails on exit or timeout with the logs."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            state = self.inspect()["State"]
            if not state["Running"]:
                pytest.fail(f"container exited {state['ExitCode']}: {self.logs()[-3000:]}")
            if state.get("Health", {}).get("Status") == "healthy":
                return time.monotonic() - start
            time.sleep(1)
        pytest.fail(f"container not healthy in {timeout} s ({self.inspect()['State'].get('Health')}): "
                    f"{self.logs()[-3000:]}")

    def remove(self) -> None:
        docker("rm", "-f", "-v", self.name, check=False)
