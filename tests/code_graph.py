"""The project's import graph, read from the code (every `import`, also those inside functions), for the tests
that check which package may import which and that `dvc.yaml` declares all the code each stage runs."""

from __future__ import annotations

import ast
import tomllib
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("hndsr", "pipeline", "training", "registry", "inference", "serving")


def module_file(name: str, root: Path = REPO) -> Path | None:
    """The file of project module `name` (`a.b` -> a/b.py or a/b/__init__.py), or None if it is not ours."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def module_name(path: Path, root: Path = REPO) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def imported_modules(path: Path, root: Path = REPO) -> set[str]:
    """The project modules `path` imports anywhere in its code (`from a import b` counts a.b when b is a module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path, root)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(name for name in names if module_file(name, root) is not None)
    return found


def _with_parents(name: str) -> list[str]:
    """Importing a.b.c runs a/__init__.py and a/b/__init__.py first."""
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


@cache
def files_beside(path: Path) -> set[Path]:
    """Files a module reads from beside itself, by the project's one idiom for it: `Path(__file__).with_name(...)`
    (the gate's reference image, the pyfunc model file MLflow loads)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "with_name"
                and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            sibling = path.with_name(node.args[0].value)
            if sibling.is_file():
                found.add(sibling)
    return found


def closure(modules: set[str], root: Path = REPO) -> set[str]:
    """Every project module that importing `modules` can run, with their packages' `__init__` modules, and the
    Python files they load by path (`files_beside`)."""
    seen: set[str] = set()
    todo = [m for name in modules for m in _with_parents(name)]
    while todo:
        name = todo.pop()
        path = module_file(name, root)
        if name in seen or path is None:
            continue
        seen.add(name)
        for imported in imported_modules(path, root):
            todo.extend(_with_parents(imported))
        todo.extend(module_name(f, root) for f in files_beside(path) if f.suffix == ".py")
    return seen


@cache
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def command_module(command: str) -> str:
    """The module providing `hndsr <command>` (entry-point group `hndsr.commands` of pyproject.toml)."""
    commands = pyproject()["project"]["entry-points"]["hndsr.commands"]
    return commands[command].split(":")[0]


def stage_code(cmd: str) -> set[str]:
    """Repository-relative paths of the code a `hndsr ...` stage command runs: the `hndsr` entry point, the
    command's module, everything they import, and the files they read from beside themselves."""
    words = cmd.split()
    if words[0] != "hndsr":
        raise ValueError(f"not a hndsr command: {cmd}")
    entry = pyproject()["project"]["scripts"]["hndsr"].split(":")[0]
    paths = {module_file(m) for m in closure({entry, command_module(words[1])})}
    paths |= {f for p in set(paths) for f in files_beside(p)}
    return {str(p.relative_to(REPO)) for p in paths}
