"""The GPU check (benchmarks/gpu_check.py) in its dry run, on the CPU at toy sizes, in an environment of the GPU
machine's image packages plus its kit's (benchmarks/gpu_kit.py): every section runs and reports, so neither the
script nor the kit can rot between GPU days."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

_spec = importlib.util.spec_from_file_location("gpu_kit", REPO / "benchmarks" / "gpu_kit.py")
gpu_kit = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_kit)


def lock_subset(names: set[str]) -> str:
    """The lock's entries (pin and hashes) of `names`: a hash-checked requirements file."""
    text = (REPO / "requirements" / "dev.txt").read_text()
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    blocks = re.split(r"\n(?=[A-Za-z0-9_.-]+==)", "\n".join(lines))
    chosen = [b.strip() for b in blocks if gpu_kit.canonical(b.split("==")[0]) in names]
    assert len(chosen) == len(names), sorted(names)
    return "\n".join(chosen) + "\n"


@pytest.fixture(scope="module")
def gpu_image_python(tmp_path_factory) -> Path:
    """A Python environment holding only what the GPU machine's image has that this project could import
    (gpu_kit.IMAGE at the lock's versions, and this torch) plus the kit's packages (gpu_kit.MISSING) and the
    project's metadata: the check must run there, as on that machine (Python and versions are this machine's)."""
    root = tmp_path_factory.mktemp("gpu-image")
    venv = root / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    requirements = root / "requirements.txt"
    pins = set(gpu_kit.lock_pins())
    requirements.write_text(lock_subset({n for n in (*gpu_kit.IMAGE, *gpu_kit.MISSING) if n in pins}))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", "--python", str(python)]
    result = subprocess.run([*pip, "install", "--no-deps", "--require-hashes", "-r", str(requirements)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    # torch as this machine has it (the image has its own CUDA build): its package folders, linked
    import torch

    torch_site = Path(torch.__file__).parents[1]
    linked = root / "torch"
    linked.mkdir()
    for entry in torch_site.iterdir():
        if entry.name.split("-")[0] in ("torch", "torchgen", "functorch") or entry.name.startswith("torch-"):
            (linked / entry.name).symlink_to(entry)
    (site / "torch-from-this-machine.pth").write_text(f"{linked}\n")
    result = subprocess.run([*pip, "install", "--no-deps", "--no-build-isolation", "-e", str(REPO)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return python


@pytest.fixture(scope="module")
def dry_run(candidates, gpu_image_python, tmp_path_factory):
    """One dry run on the suite's tiny trained candidate, as the GPU machine runs it: in the image's packages plus
    the kit's, from a copy with no git repository."""
    project, tmp = candidates["good"], tmp_path_factory.mktemp("gpu-check")
    report = tmp / "report.json"
    env = {**os.environ, "GIT_DIR": str(tmp / "no-repository"), "GIT_CEILING_DIRECTORIES": str(REPO.parent),
           "PATH": f"{gpu_image_python.parent}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(REPO)}
    env.pop("VIRTUAL_ENV", None)
    result = subprocess.run(
        [str(gpu_image_python), "benchmarks/gpu_check.py", "--dry-run", "--models", str(project / "models"),
         "--data", str(project / "data" / "processed"), "--report", str(report)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=840)
    return result, json.loads(report.read_text()) if report.exists() else None


@pytest.mark.timeout(900)
def test_dry_run_runs_every_section_and_reports_it(dry_run):
    result, report = dry_run
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "sections failed: none" in result.stdout
    for name in ("environment", "tests", "training", "engine", "agreement", "http"):
        assert name in report and "error" not in report[name], (name, report.get(name))
    assert report["environment"]["dry_run"] is True and report["environment"]["probe"]["tflops"] > 0
    # the CUDA tests were collected and skipped here, none failed
    tests = report["tests"]
    assert tests["failed"] == 0 and tests["skipped"] >= 4 and tests["passed"] == 0, tests
    assert all("no CUDA" in t["detail"] for t in tests["tests"].values())
    # the real stages trained, each with its throughput measured from its MLflow runs
    stages = report["training"]["stages"]
    assert list(stages) == ["autoencoder", "operator", "diffusion"]
    assert all(s["samples_per_s"] > 0 and s["peak_memory_mb"] is None for s in stages.values()), stages
    # every size x steps x concurrency row, with sane percentiles
    rows = report["engine"]["latency"]
    assert {(r["size"], r["steps"], r["concurrency"]) for r in rows} == {
        (size, steps, c) for size in (32, 48) for steps in (0, 1) for c in (1, 2)}
    assert all(0 < r["p50_ms"] <= r["p95_ms"] and r["requests_per_s"] > 0 for r in rows)
    assert report["engine"]["unet"]["gflop"] > 0 and report["engine"]["unet"]["of_probe"] > 0
    agreement = report["agreement"]["psnr_db"]
    assert agreement == "identical" or agreement >= 45, report["agreement"]
    servers = report["http"]["servers"]
    for name in ("hndsr serve", "mlflow models serve"):
        assert set(servers[name]["concurrency"]) == {"1", "2"}, servers
        assert all(level["not_200"] == 0 for level in servers[name]["concurrency"].values()), servers
    assert set(report["http"]["ratio"]) == {"1", "2"}


def test_the_kit_covers_the_serving_stack_from_the_lock():
    """`hndsr serve` and `mlflow models serve` import the serving lock's packages: each is on the image or carried,
    but rasterio (the dry run above runs without it)."""
    carried = set(gpu_kit.MISSING) | set(gpu_kit.IMAGE)
    assert set(gpu_kit.lock_pins(REPO / "requirements" / "serve.txt")) - carried == set(gpu_kit.NOT_CARRIED)
    assert set(gpu_kit.MISSING) <= set(gpu_kit.lock_pins())


def test_the_kit_refuses_a_wheel_whose_hash_the_lock_does_not_list(tmp_path, monkeypatch):
    lock = tmp_path / "dev.txt"
    text = (REPO / "requirements" / "dev.txt").read_text()
    pin = re.search(r"^colorlog==\S+ \\\n(?:    --hash=sha256:[0-9a-f]{64}(?: \\)?\n)+", text, re.M)
    lock.write_text(re.sub(r"sha256:[0-9a-f]{64}", "sha256:" + "0" * 64, pin[0]))  # the pin, other hashes
    monkeypatch.setattr(gpu_kit, "LOCK", lock)
    monkeypatch.setattr(gpu_kit, "MISSING", ("colorlog",))
    with pytest.raises(SystemExit, match="does not list for colorlog=="):
        gpu_kit.wheels(tmp_path / "wheels", "3.12")
    assert not list((tmp_path / "wheels").glob("colorlog-*.whl"))
