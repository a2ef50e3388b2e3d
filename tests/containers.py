"""Docker for the tests that build and run the images (marker `container`) and the compose stack: the engine
(`make tools` installs and starts it), the serving and worker images built by the project's own script, the
tracking stack brought up once per session by deploy/images/stack.sh, containers that are always removed, and
the address at which containers reach servers the tests start on this host. A pytest plugin (tests/conftest.py):
its fixtures serve every folder."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO, free_port

SERVE_TEST_TAG = "hndsr-serve:test"
WORKER_TEST_TAG = "hndsr-worker:test"
STACK = REPO / "deploy" / "images" / "stack.sh"
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


def build_worker_image(serve: str, tag: str = WORKER_TEST_TAG) -> str:
    """The scale-out image as `make worker-image` builds it, on the serving image `serve`."""
    command = [str(REPO / "deploy" / "images" / "build.sh"), "--worker", "--serve", serve, "--tag", tag]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, f"{' '.join(command)}: {result.stderr[-4000:]}"
    print(result.stderr.strip().splitlines()[-1])
    return tag


def build_stack_images(serve: str) -> None:
    """The stack's local images (`deploy/images/stack.sh --images`), with `serve` as its serving image."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}, "HNDSR_SERVE_IMAGE": serve}
    result = subprocess.run([str(STACK), "--images"], cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, f"stack.sh --images: {result.stderr[-4000:]}"


class Prebuild:
    """The images of the container tests, built in a background thread from the start of the session: the builds
    wait mostly on the network and the disk, the tests before them on the CPU. The container tests run last
    (`pytest_collection_modifyitems`), and their fixtures take the images from here, or build them themselves
    when nothing was started here (no engine answered at the start: `require_engine` then says why)."""

    def __init__(self) -> None:
        self.pool: ThreadPoolExecutor | None = None
        self.futures: dict[str, Future] = {}

    def start(self) -> None:
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="image-builds")  # one after another, in this order
        serve = self.pool.submit(lambda: build_serve_image()["tag"])
        self.futures = {"serve": serve,
                        "worker": self.pool.submit(lambda: build_worker_image(serve.result())),
                        "stack": self.pool.submit(lambda: build_stack_images(serve.result()))}

    def result(self, name: str, build):
        future = self.futures.get(name)
        return future.result() if future is not None else build()

    def stop(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)


PREBUILD = Prebuild()


def pytest_collection_modifyitems(config, items) -> None:
    """Container tests after all others, so that their images build while the others run."""
    items[:] = ([item for item in items if not item.get_closest_marker("container")]
                + [item for item in items if item.get_closest_marker("container")])


def pytest_collection_finish(session) -> None:
    wanted = any(item.get_closest_marker("container") for item in session.items)
    if wanted and not session.config.option.collectonly and shutil.which("docker") and \
            subprocess.run(["docker", "info"], capture_output=True, timeout=60).returncode == 0:
        PREBUILD.start()


def pytest_sessionfinish(session) -> None:
    PREBUILD.stop()


@pytest.fixture(scope="session")
def serve_image() -> str:
    """The serving image, built once per session (test_image.py, the stack, the worker image)."""
    require_engine()
    return PREBUILD.result("serve", lambda: build_serve_image()["tag"])


@pytest.fixture(scope="session")
def worker_image(serve_image) -> str:
    """The scale-out image (deploy/images/worker.Dockerfile), built once per session on the serving image."""
    return PREBUILD.result("worker", lambda: build_worker_image(serve_image))


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

    def wait(self, timeout: float) -> int:
        """The exit status, once the container's command ends (fails after `timeout` s with its logs)."""
        try:
            return int(docker("wait", self.name, timeout=timeout).stdout.strip())
        except subprocess.TimeoutExpired:
            pytest.fail(f"container {self.name} still running after {timeout} s: {self.logs()[-3000:]}")

    def remove(self) -> None:
        docker("rm", "-f", "-v", self.name, check=False)


class Stack:
    """mlflow/docker-compose.yml with the local override, through deploy/images/stack.sh, under its own compose
    project name and free published ports."""

    def __init__(self, serve_image: str) -> None:
        self.project = f"hndsr-test-{uuid.uuid4().hex[:8]}"
        self.ports = {name: free_port() for name in ("MLFLOW_PORT", "SERVE_PORT", "MINIO_PORT",
                                                     "MINIO_CONSOLE_PORT", "PROMETHEUS_PORT", "GRAFANA_PORT")}
        self.env = {**self.ports, "HNDSR_SERVE_IMAGE": serve_image}

    def compose(self, *args: str, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
               **{k: str(v) for k, v in self.env.items()}}
        result = subprocess.run([str(STACK), "-p", self.project, "--profile", "monitoring", *args], cwd=REPO,
                                env=env, capture_output=True, text=True, timeout=timeout)
        if check:
            assert result.returncode == 0, (f"stack.sh {' '.join(args)}: "
                                            f"{result.stdout[-3000:]}{result.stderr[-3000:]}")
        return result

    def url(self, port: str) -> str:
        return f"http://127.0.0.1:{self.ports[port]}"

    def network(self) -> str:
        """The compose network of the stack: containers started on it reach `mlflow:5000`, `postgres:5432`."""
        label = f"label=com.docker.compose.project={self.project}"
        names = docker("network", "ls", "--filter", label, "--format", "{{.Name}}").stdout.split()
        assert len(names) == 1, names
        return names[0]

    def leftovers(self) -> dict[str, list[str]]:
        label = f"label=com.docker.compose.project={self.project}"
        return {kind: docker(*command, "--filter", label, "-q").stdout.split()
                for kind, command in {"containers": ("ps", "-a"), "volumes": ("volume", "ls"),
                                      "networks": ("network", "ls")}.items()}


def wait_for(url: str, timeout: float, what: str, accept=lambda r: r.status_code == 200) -> httpx.Response:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = httpx.get(url, timeout=5)
            if accept(last):
                return last
        except httpx.HTTPError as error:
            last = error
        time.sleep(1)
    pytest.fail(f"{what} not ready in {timeout} s: {last!r}")


@pytest.fixture(scope="session")
def stack(serve_image) -> Iterator[Stack]:
    """The tracking stack up (PostgreSQL, the S3 store, the MLflow server), shared by the tests that need it;
    taken down with its volumes at the end of the session, which must leave nothing behind."""
    PREBUILD.result("stack", lambda: None)  # else `up` builds them
    running = Stack(serve_image)
    try:
        running.compose("up", "-d", "postgres", "minio", "minio-init", "mlflow")
        wait_for(f"{running.url('MLFLOW_PORT')}/health", 180, "the MLflow server")
        yield running
    finally:
        print(running.compose("logs", "--tail", "30", check=False).stdout[-6000:])
        running.compose("down", "-v", "--remove-orphans", timeout=300, check=False)
    assert running.leftovers() == {"containers": [], "volumes": [], "networks": []}
