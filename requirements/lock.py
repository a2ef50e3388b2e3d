"""Write or check the lock files: every package of the project's environments pinned to one version, with hashes.

    python requirements/lock.py            write requirements/dev.txt and requirements/serve.txt (`make lock`)
    python requirements/lock.py --upgrade  the same, moving every package to its newest allowed version
    python requirements/lock.py --check    fail if the committed files are not what pyproject.toml resolves to

`dev.txt` is the whole pipeline plus the `dev` extra (what `make repro`/`make test` install); `serve.txt` is the
`serve` extra (what the serving image installs). Both include the build backend from `[build-system]`, so the
project itself is installed without fetching anything unpinned. torch is the one package left out: it is pinned
to one version in pyproject.toml, and its build (CPU or CUDA wheel) is a choice of machine, made by TORCH_SPEC
in the Makefile and the serving Dockerfile. The lock is resolved against torch's CPU wheel (whose dependencies
carry no CUDA packages) for CPython 3.11 on Linux x86_64, the platform of the project's machines, CI and image.

Resolving needs `uv` (the Makefile installs it) and the package index; an existing lock file is the starting
point, so without --upgrade only what pyproject.toml changed moves.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCKS = {"dev": ROOT / "requirements" / "dev.txt", "serve": ROOT / "requirements" / "serve.txt"}
TARGET = ["--python-version", "3.11", "--python-platform", "x86_64-manylinux_2_28"]
# Where uv finds torch's CPU wheel (for its dependency metadata): this disk on the project's machines, else
# PyTorch's CPU index page.
TORCH_WHEELS = os.environ.get("TORCH_FIND_LINKS") or (
    "/opt/wheels" if Path("/opt/wheels").is_dir() else "https://download.pytorch.org/whl/cpu/torch/")


def _inputs(name: str, folder: Path) -> list[str]:
    """The uv inputs of lock `name`: requirement files written into `folder`."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    build = folder / "build.in"
    build.write_text("\n".join(project["build-system"]["requires"]) + "\n")
    if name == "dev":
        return [str(ROOT / "pyproject.toml"), "--extra", "dev", str(build)]
    serve = folder / "serve.in"
    serve.write_text("\n".join(project["project"]["optional-dependencies"]["serve"]) + "\n")
    return [str(serve), str(build)]


def compile_lock(name: str, output: Path, *, upgrade: bool = False) -> None:
    uv = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    if uv is None:
        sys.exit("lock: uv not found; run `make lock` (it installs uv into .venv)")
    with tempfile.TemporaryDirectory() as tmp:
        command = [uv, "pip", "compile", *_inputs(name, Path(tmp)), *TARGET, "--generate-hashes",
                   "--no-emit-package", "torch", "--find-links", TORCH_WHEELS, "--no-annotate", "--quiet",
                   "--custom-compile-command", "make lock", "--output-file", str(output)]
        if upgrade:
            command.append("--upgrade")
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"lock: uv failed for {name}:\n{result.stderr}")


def pins(text: str) -> list[str]:
    """`name==version` lines (with markers), without hashes and comments: what a lock decides."""
    return [line.split(" \\")[0].strip() for line in text.splitlines() if re.match(r"^[A-Za-z0-9]", line)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only check that the lock files are up to date")
    parser.add_argument("--upgrade", action="store_true", help="move every package to its newest version")
    args = parser.parse_args()
    if not args.check:
        for name, path in LOCKS.items():
            compile_lock(name, path, upgrade=args.upgrade)
            print(f"lock: wrote {path.relative_to(ROOT)} ({len(pins(path.read_text()))} packages)")
        return 0
    stale = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in LOCKS.items():
            fresh = Path(tmp) / path.name
            if path.is_file():
                shutil.copy(path, fresh)  # uv keeps the pins it finds there
            compile_lock(name, fresh)
            before = pins(path.read_text()) if path.is_file() else []
            after = pins(fresh.read_text())
            if before != after:
                diff = difflib.unified_diff(before, after, str(path.relative_to(ROOT)), "resolved from pyproject.toml",
                                            lineterm="")
                stale.append("\n".join(diff))
            else:
                print(f"lock: {path.relative_to(ROOT)} matches pyproject.toml ({len(after)} packages)")
    if stale:
        print("\n".join(stale))
        print("lock: the lock files do not match pyproject.toml; run `make lock` and commit requirements/",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
