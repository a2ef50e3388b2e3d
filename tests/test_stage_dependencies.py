"""`dvc.yaml` declares what each stage reads, and the packages import one way only.

DVC re-runs a stage only when a declared dependency changes, so code a stage runs but does not declare leaves
stale outputs that `dvc repro` calls up to date. The code a stage runs is computed from the imports
(tests/code_graph.py); the params sections it reads are recorded by the real run in test_dvc_pipeline.py
(`HNDSR_PARAMS_TRACE`) and compared with `undeclared_params` below.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from tests.code_graph import PACKAGES, REPO, closure, imported_modules, module_file, module_name, stage_code

DVC_YAML = REPO / "dvc.yaml"


def _stages(document: dict | None = None) -> dict[str, dict]:
    return (document or yaml.safe_load(DVC_YAML.read_text()))["stages"]


def _is_code(dep: str) -> bool:
    return dep.split("/")[0] in PACKAGES


def _files_under(dep: str, root: Path = REPO) -> set[str]:
    path = root / dep
    if path.is_file():
        return {dep}
    return {str(p.relative_to(root)) for p in path.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}


def code_dep_problems(stage: dict) -> list[str]:
    """What is wrong with a stage's code deps: code it runs that no dep covers, and deps that are missing or
    cover files it does not run (so a change there would re-run it for nothing)."""
    runs = stage_code(stage["cmd"])
    deps = [d for d in stage.get("deps", []) if _is_code(d)]
    covered = set().union(*(_files_under(d) for d in deps)) if deps else set()
    problems = [f"runs {path} but does not list it (or a folder holding it) in deps" for path in sorted(runs - covered)]
    for dep in deps:
        if not (REPO / dep).exists():
            problems.append(f"lists {dep}, which does not exist")
        elif extra := sorted(_files_under(dep) - runs):
            problems.append(f"lists {dep}, which holds code it does not run: {', '.join(extra)}")
    return problems


def undeclared_params(stage: dict, sections_read: list[str]) -> list[str]:
    """Sections the stage's command read (from its params trace) that its `params` do not list whole."""
    declared = {p for p in stage.get("params", []) if isinstance(p, str)}
    return sorted(set(sections_read) - declared)


@pytest.mark.parametrize("name", sorted(_stages()))
def test_each_stage_declares_exactly_the_code_it_runs(name):
    stage = _stages()[name]
    assert stage["cmd"].startswith("hndsr "), "every stage runs a hndsr subcommand"
    assert code_dep_problems(stage) == [], f"dvc.yaml stage {name}"


def test_removing_any_code_dep_from_dvc_yaml_is_caught():
    document = yaml.safe_load(DVC_YAML.read_text())
    checked = 0
    for name, stage in _stages(document).items():
        for dep in [d for d in stage["deps"] if _is_code(d)]:
            broken = copy.deepcopy(stage)
            broken["deps"].remove(dep)
            problems = code_dep_problems(broken)
            assert problems and all("does not list it" in p for p in problems), (name, dep, problems)
            checked += 1
    assert checked > 50


def test_a_dep_on_code_the_stage_does_not_run_is_caught():
    stage = copy.deepcopy(_stages()["etl"])
    stage["deps"].append("serving/app.py")
    assert code_dep_problems(stage) == ["lists serving/app.py, which holds code it does not run: serving/app.py"]


def test_undeclared_params_are_found():
    stage = {"params": ["train", "train_operator", "promote.alias"]}
    assert undeclared_params(stage, ["train", "train_operator"]) == []
    assert undeclared_params(stage, ["train", "evaluate", "promote"]) == ["evaluate", "promote"]


# -- one-way dependencies between the packages (../shared/DESIGN.md, "Layout": the imports column) -----------

ALLOWED = {
    "hndsr": {"hndsr"},
    "pipeline": {"hndsr", "pipeline"},
    "training": {"hndsr", "training"},
    "registry": {"hndsr", "registry"},
    "inference": {"hndsr", "inference", "registry.store"},
    "serving": {"hndsr", "inference", "serving", "registry.store"},
}


def import_violations(root: Path = REPO) -> list[str]:
    """Every import of one project package by another that ALLOWED does not permit."""
    violations = []
    for package, allowed in ALLOWED.items():
        for path in sorted((root / package).rglob("*.py")):
            for imported in sorted(imported_modules(path, root)):
                # a.b allows a.b.c (inside it) and a (whose __init__ runs when a.b is imported)
                if not any(imported == a or imported.startswith(a + ".") or a.startswith(imported + ".")
                           for a in allowed):
                    violations.append(f"{path.relative_to(root)} imports {imported}")
    return violations


def test_packages_import_one_way():
    assert import_violations() == []


def test_serving_runs_no_registry_code_but_the_store():
    """What `hndsr serve` and `hndsr predict` can import: hndsr, inference, serving (the server only) and the one
    registry module that talks to MLflow."""
    modules = closure({"serving.cli", "serving.app"})
    assert {m for m in modules if m.startswith("registry")} <= {"registry", "registry.store"}
    assert not [m for m in modules if m.split(".")[0] in ("training", "pipeline")]
    predict = closure({"inference.cli", "inference.predict"})
    assert {m for m in predict if m.startswith("registry")} <= {"registry", "registry.store"}
    assert not [m for m in predict if m.split(".")[0] in ("training", "pipeline", "serving")]


def import_cycles(root: Path = REPO) -> list[list[str]]:
    """The project's import circles: each strongly connected group of modules (imports inside functions count,
    since they run too), sorted; Tarjan's algorithm over the graph read from the code."""
    graph = {module_name(path, root): sorted(imported_modules(path, root))
             for package in PACKAGES if (root / package).is_dir() for path in sorted((root / package).rglob("*.py"))}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph.get(node, []):
            if other == node:
                continue
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(cycles)


def test_no_module_imports_itself_through_others():
    assert import_cycles() == []


def test_the_cycle_check_can_fail(tmp_path):
    (tmp_path / "training").mkdir()
    (tmp_path / "training" / "__init__.py").write_text("")
    (tmp_path / "training" / "study.py").write_text("from training import distributed\n")
    (tmp_path / "training" / "distributed.py").write_text("def f():\n    from training.study import E\n")
    (tmp_path / "training" / "trainers.py").write_text("from training import distributed\n")
    assert import_cycles(tmp_path) == [["training.distributed", "training.study"]]


def test_the_import_rule_check_can_fail(tmp_path):
    for package in PACKAGES:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "training" / "config.py").write_text("X = 1\n")
    (tmp_path / "registry" / "promote.py").write_text("def f():\n    from training.config import X\n    return X\n")
    (tmp_path / "hndsr" / "cli.py").write_text("import serving\n")
    (tmp_path / "inference" / "loader.py").write_text("from registry import promote\n")
    (tmp_path / "serving" / "app.py").write_text("")
    (tmp_path / "inference" / "predict.py").write_text("def f():\n    from serving import app\n")
    assert import_violations(tmp_path) == ["hndsr/cli.py imports serving", "registry/promote.py imports training.config",
                                           "inference/loader.py imports registry.promote",
                                           "inference/predict.py imports serving", "inference/predict.py imports serving.app"]
    assert module_name(tmp_path / "training" / "config.py", tmp_path) == "training.config"
    assert module_file("numpy", tmp_path) is None
