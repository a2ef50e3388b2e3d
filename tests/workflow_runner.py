"""A GitHub Actions job run as a runner runs it, for the tests of .github/workflows (marker `workflows`).

Each `run:` step in order, in the job's checkout, under `bash -e` (the runner's default shell on Linux), with the
job's and the step's `env`, `CI`/`GITHUB_ACTIONS`, and `GITHUB_STEP_SUMMARY`, `GITHUB_OUTPUT`, `GITHUB_ENV`,
`GITHUB_PATH` as files; `if:` is success() unless it says always() or failure(). `${{ secrets.X }}` and
`${{ inputs.X }}` take test values (a missing secret is empty, as on GitHub); any other expression fails the run,
so a workflow cannot use what this runner does not do. `uses:` steps and `services:` are stood in for by what
STAND_INS names (checkout = the clone, setup-python = a venv, upload-artifact = a folder, a PostgreSQL service =
this machine's server); an action without a stand-in fails the run, so a new one cannot slip past. Every stand-in
used is listed in the result."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

EXPRESSION = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")
STAND_INS = {
    "actions/checkout": "the job's clone of the repository at the commit under test",
    "actions/setup-python": "a venv of this machine's Python 3.11 on PATH (no pip cache)",
    "actions/upload-artifact": "a copy of `path` into the run's artifacts folder",
}


@dataclass
class Step:
    name: str
    outcome: str  # success | failure | skipped | stood-in
    output: str = ""
    seconds: float = 0.0


@dataclass
class JobResult:
    job: str
    steps: list[Step] = field(default_factory=list)
    summary: str = ""
    stand_ins: list[str] = field(default_factory=list)
    artifacts: Path | None = None

    @property
    def conclusion(self) -> str:
        return "failure" if any(s.outcome == "failure" for s in self.steps) else "success"

    def step(self, name: str) -> Step:
        return next(s for s in self.steps if s.name == name)

    def log(self) -> str:
        return "\n".join(f"--- {s.name}: {s.outcome} ({s.seconds:.0f} s)\n{s.output[-3000:]}" for s in self.steps)


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def step_name(step: dict) -> str:
    """The name the Actions UI shows: `name`, else `Run <first line>` or the action."""
    if "name" in step:
        return step["name"]
    if "uses" in step:
        return step["uses"]
    return "Run " + step["run"].strip().splitlines()[0]


def substitute(text: str, secrets: dict[str, str], inputs: dict[str, object]) -> str:
    def value(match: re.Match) -> str:
        expression = match.group(1)
        scope, _, name = expression.partition(".")
        if scope == "secrets" and re.fullmatch(r"\w+", name):
            return secrets.get(name, "")
        if scope == "inputs" and re.fullmatch(r"\w+", name):
            given = inputs.get(name, "")
            return str(given).lower() if isinstance(given, bool) else str(given)
        raise ValueError(f"expression ${{{{ {expression} }}}} is not supported by tests/workflow_runner.py")

    return EXPRESSION.sub(value, text)


def _condition(step: dict, failed: bool) -> bool:
    condition = str(step.get("if", "success()")).strip()
    condition = EXPRESSION.sub(lambda m: m.group(1), condition)
    if condition == "always()":
        return True
    if condition == "failure()":
        return failed
    if condition == "success()":
        return not failed
    raise ValueError(f"if: {condition} is not supported by tests/workflow_runner.py")


def clean_path(path: str) -> str:
    """PATH without this test run's own virtual environment: a step must find what its job installs."""
    own = Path(sys.executable).parent.resolve()
    return os.pathsep.join(p for p in path.split(os.pathsep) if p and Path(p).resolve() != own)


@dataclass
class Runner:
    """What the machine gives every job: a tool cache (the setup-python venv), a folder for artifacts, and extra
    PATH entries (stand-ins for tools the hosted runner has, e.g. the compose v2 client)."""
    root: Path
    extra_path: list[str] = field(default_factory=list)
    base_env: dict[str, str] = field(default_factory=dict)

    def setup_python(self, version: str) -> Path:
        venv = self.root / "toolcache" / f"python-{version}"
        if not (venv / "bin" / "python").exists():
            python = shutil.which(f"python{version}") or shutil.which("python3")
            subprocess.run([python, "-m", "venv", str(venv)], check=True, capture_output=True)
        version_out = subprocess.run([str(venv / "bin" / "python"), "--version"], capture_output=True, text=True)
        assert version_out.stdout.split()[1].startswith(version), version_out.stdout
        return venv / "bin"

    def run_job(self, workflow: Path, job_name: str, checkout: Path, *, secrets: dict[str, str] | None = None,
                inputs: dict[str, object] | None = None, step_env: dict[str, dict[str, str]] | None = None,
                services: dict[str, str] | None = None) -> JobResult:
        """Run one job in `checkout`. `step_env`: extra environment for named steps (the test says why);
        `services`: for each service container of the job, what stands in for it on this machine."""
        secrets, inputs, step_env, services = secrets or {}, inputs or {}, step_env or {}, services or {}
        job = load(workflow)["jobs"][job_name]
        result = JobResult(job=f"{workflow.name}:{job_name}", artifacts=self.root / "artifacts" / job_name)
        for service in job.get("services", {}):
            if service not in services:
                raise ValueError(f"{result.job}: no stand-in for the service container {service!r}")
            result.stand_ins.append(f"service {service}: {services[service]}")
        files = self.root / "files" / job_name
        shutil.rmtree(files, ignore_errors=True)
        files.mkdir(parents=True)
        env = {**{k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HNDSR_", "AWS_", "PYTEST_"))},
               **self.base_env, "CI": "true", "GITHUB_ACTIONS": "true", "GITHUB_WORKSPACE": str(checkout),
               "RUNNER_TEMP": str(files)}
        env["PATH"] = os.pathsep.join([*self.extra_path, clean_path(env.get("PATH", ""))])
        env.update({k: substitute(str(v), secrets, inputs) for k, v in job.get("env", {}).items()})
        (files / "env").touch()
        (files / "path").touch()
        failed = False
        summaries = []
        deadline = time.monotonic() + 60 * float(job.get("timeout-minutes", 360))
        for number, step in enumerate(job["steps"]):
            name = step_name(step)
            if not _condition(step, failed):
                result.steps.append(Step(name, "skipped"))
                continue
            start = time.monotonic()
            if "uses" in step:
                outcome = self._stand_in(step, checkout, env, result)
                result.steps.append(Step(name, outcome, seconds=time.monotonic() - start))
                failed = failed or outcome == "failure"
                continue
            summary = files / f"summary-{number}.md"
            summary.touch()
            output = files / f"output-{number}"
            step_environment = {**env, **{k: substitute(str(v), secrets, inputs) for k, v in step.get("env", {}).items()},
                                **step_env.get(name, {}), "GITHUB_STEP_SUMMARY": str(summary),
                                "GITHUB_OUTPUT": str(output), "GITHUB_ENV": str(files / "env"),
                                "GITHUB_PATH": str(files / "path")}
            script = files / f"step-{number}.sh"
            script.write_text(substitute(step["run"], secrets, inputs))
            try:
                done = subprocess.run(["bash", "-e", str(script)], cwd=checkout / step.get("working-directory", "."),
                                      env=step_environment, capture_output=True, text=True,
                                      timeout=max(1.0, deadline - time.monotonic()))
                outcome, text = ("success" if done.returncode == 0 else "failure"), done.stdout + done.stderr
                if done.returncode != 0:
                    text += f"\n[exit code {done.returncode}]"
            except subprocess.TimeoutExpired as timeout:
                outcome, text = "failure", f"{timeout.stdout or ''}{timeout.stderr or ''}\n[job timeout-minutes reached]"
            result.steps.append(Step(name, outcome, text, time.monotonic() - start))
            summaries.append(summary.read_text())
            failed = failed or outcome == "failure"
            self._apply_env_files(files, env)
        result.summary = "".join(summaries)
        return result

    def _apply_env_files(self, files: Path, env: dict[str, str]) -> None:
        for line in (files / "env").read_text().splitlines():
            if "=" in line:
                key, _, value = line.partition("=")
                env[key] = value
        added = [line for line in (files / "path").read_text().splitlines() if line]
        if added:
            env["PATH"] = os.pathsep.join([*reversed(added), env["PATH"]])
        (files / "env").write_text("")
        (files / "path").write_text("")

    def _stand_in(self, step: dict, checkout: Path, env: dict[str, str], result: JobResult) -> str:
        action = step["uses"].split("@", 1)[0]
        if action not in STAND_INS:
            raise ValueError(f"{result.job}: no stand-in for the action {step['uses']!r} (tests/workflow_runner.py)")
        given = step.get("with", {})
        result.stand_ins.append(f"{step['uses']}: {STAND_INS[action]}")
        if action == "actions/setup-python":
            env["PATH"] = os.pathsep.join([str(self.setup_python(str(given["python-version"]))), env["PATH"]])
        elif action == "actions/upload-artifact":
            found = sorted(checkout.glob(given["path"]))
            if not found:
                return "success" if given.get("if-no-files-found") in ("ignore", "warn") else "failure"
            target = result.artifacts / given["name"]
            target.mkdir(parents=True, exist_ok=True)
            for path in found:
                shutil.copy(path, target / path.name)
        return "stood-in"
