"""The one module that talks to the MLflow Model Registry.

Where: `MLFLOW_TRACKING_URI` (a tracking server `http(s)://...`, or a database URL), default the local
`sqlite:///mlflow.db` the training stages log to (`hndsr.provenance`). The registry is the tracking store's.
The registry's own actions (registering a version, a gate decision) are MLflow runs in the pipeline's experiment.

Tag format of a version (`candidate_tags` in registry.promote writes them, `scores_from_tags` reads them back):
`eval.x<scale>.<metric>` (test metrics per scale, e.g. `eval.x2.5.psnr`), `dataset_hash`, `git_commit`,
`params_hash`, `run_id.<stage>`, `weights.<stage>`, `candidate_id`, and the gate's `gate.*` tags.

Every call that can fail for a reason the user can fix raises `RegistryError` with one line saying what to do:
the server unreachable, the registered model or a version missing. A server that is down is found by a quick
`/health` probe before anything is written, so no command leaves half its work behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from hndsr.errors import UserError
from hndsr.provenance import git_commit, local_artifact_location, tracking_uri

log = logging.getLogger("hndsr.registry")

CHECKPOINTS = "checkpoints"  # the artifact holding models/{autoencoder,operator,diffusion}
# A tracking server that stops answering mid-command fails it within seconds, not after MLflow's default
# minutes of retries (users can still set these themselves).
# Downloads go through the tracking server's proxy: on an S3 artifact store MLflow's server also offers clients
# presigned S3 URLs, which name the server's own S3 endpoint (http://minio:9000 inside the compose network), one a
# client elsewhere cannot reach; MLflow then retries each file for minutes before falling back to the proxy.
_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
                  "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD": "false"}


class RegistryError(UserError, RuntimeError):
    """The registry cannot do what was asked; the message says why and what to do."""


class IntegrityError(RegistryError):
    """A version's checkpoints are not the weights it was registered with (the artifact store was altered), or it
    has no recorded hashes to check them against."""


def weight_tags(checkpoints: Path) -> dict[str, str]:
    """`weights.<stage>`: the SHA-256 of each stage's model.safetensors in `checkpoints`."""
    from hndsr.checkpoint import STAGES, weights_hash

    return {f"weights.{stage}": weights_hash(Path(checkpoints) / stage) for stage in STAGES}


def check_weights(version: Version, checkpoints: Path) -> dict[str, str]:
    """IntegrityError unless every weight file in `checkpoints` (a downloaded copy of `version`) has the SHA-256
    recorded in the version's `weights.<stage>` tags at registration. Every load of a registered version (the
    server, its hot reloads and roll-outs, `hndsr registry promote --version`) calls this before using them.
    Returns the checked hashes by stage."""
    found = weight_tags(checkpoints)
    recorded = {key: version.tags.get(key) for key in found}
    if not all(recorded.values()):
        raise IntegrityError(f"version {version.version} has no recorded weight hashes (tags weights.<stage>): it was "
                             "not registered by `hndsr registry`, so its weights cannot be checked; register it again")
    changed = [key for key in recorded if found[key] != recorded[key]]
    if changed:
        stages = ", ".join(key.removeprefix("weights.") for key in changed)
        raise IntegrityError(f"version {version.version}: the {stages} weights in the artifact store are not the ones "
                             f"it was registered with (SHA-256 {found[changed[0]][:12]}, recorded "
                             f"{recorded[changed[0]][:12]}): the artifact store was altered; restore its files or "
                             "register a new version")
    check_reference(version, checkpoints)
    return {key.removeprefix("weights."): digest for key, digest in found.items()}


REFERENCE_TAG = "reference.sha256"  # the SHA-256 of the version's monitoring reference (hndsr.monitoring)


def check_reference(version: Version, checkpoints: Path) -> None:
    """IntegrityError unless the monitoring reference in `checkpoints` is the one registered: present with the
    recorded SHA-256 when the version records one, absent when it does not (versions registered before references
    were recorded have neither)."""
    from hndsr.monitoring import REFERENCE_FILE

    path = Path(checkpoints) / REFERENCE_FILE
    recorded = version.tags.get(REFERENCE_TAG)
    found = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
    if found != recorded:
        raise IntegrityError(f"version {version.version}: its monitoring reference ({REFERENCE_FILE}) in the artifact "
                             f"store is {'missing' if found is None else f'SHA-256 {found[:12]}'}, registered "
                             f"{'without one' if recorded is None else f'with SHA-256 {recorded[:12]}'}: the artifact "
                             "store was altered; restore its files or register a new version")


@dataclass(frozen=True)
class Version:
    """One registered model version, as the rest of the code sees it."""

    version: str
    aliases: tuple[str, ...]
    tags: dict[str, str]
    run_id: str | None
    source: str
    status: str
    created_ms: int


def eval_tags(scores: dict[str, dict], metrics: Iterable[str]) -> dict[str, str]:
    """Tags `eval.x<scale>.<metric>` for the per-scale evaluation `scores` (eval.json's "scales")."""
    return {f"eval.x{scale}.{m}": str(values[m]) for scale, values in scores.items() for m in metrics
            if m in values}


def scores_from_tags(tags: dict[str, str]) -> dict[str, dict]:
    """The per-scale evaluation metrics a version was registered with (inverse of `eval_tags`)."""
    scores: dict[str, dict] = {}
    for key, value in tags.items():
        if key.startswith("eval.x") and key.count(".") >= 2:  # eval.x<scale>.<metric>; scales like 2.5 hold a dot
            scale, metric = key[len("eval.x"):].rsplit(".", 1)
            scores.setdefault(scale, {})[metric] = float(value)
    return scores


def redact(uri: str) -> str:
    """The URI without a password, for logs and reports."""
    parts = urllib.parse.urlsplit(uri)
    if parts.password:
        netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    return uri


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Raise RegistryError unless the tracking server at an http(s) URI answers its health check."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
            if response.status == 200:
                return
            reason = f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        reason = f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        reason = str(getattr(exc, "reason", exc))
    raise RegistryError(f"cannot reach the MLflow tracking server at {redact(uri)} ({reason}); start it, or point "
                        f"MLFLOW_TRACKING_URI at a running one")


class Registry:
    """The registered model `name` in the registry at `uri` (default: `hndsr.provenance.tracking_uri()`)."""

    def __init__(self, name: str, uri: str | None = None, *, must_exist: bool = False) -> None:
        for key, value in _HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        self.name = name
        # New experiments keep artifacts beside the local default database; read before MLflow exports the URI.
        self._artifact_location = None if uri else local_artifact_location()
        self.uri = uri or tracking_uri()
        check_reachable(self.uri)
        if must_exist and self.uri.startswith("sqlite:///") and not Path(self.uri[len("sqlite:///"):]).is_file():
            raise RegistryError(f"no MLflow database at {self.uri[len('sqlite:///'):]}: nothing is registered yet; "
                                "run `dvc repro` (or `hndsr registry promote`) first")
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        if must_exist:
            self.require_model()

    # -- reading ------------------------------------------------------------------------------------------

    def exists(self) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(self.name)
            return True
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return False
            raise RegistryError(f"the registry at {redact(self.uri)} failed: {exc.message}") from None

    def require_model(self) -> None:
        if not self.exists():
            raise RegistryError(f"no registered model {self.name!r} at {redact(self.uri)}; register one with "
                                "`hndsr registry promote` (the last `dvc repro` stage) first")

    def aliases(self) -> dict[str, str]:
        return {alias: str(v) for alias, v in self.client.get_registered_model(self.name).aliases.items()}

    def alias_version(self, alias: str) -> str | None:
        """The version `alias` points to now, or None."""
        from mlflow.exceptions import MlflowException

        try:
            return str(self.client.get_model_version_by_alias(self.name, alias).version)
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
                return None
            raise RegistryError(f"the registry at {redact(self.uri)} failed: {exc.message}") from None

    def get(self, version: str) -> Version:
        from mlflow.exceptions import MlflowException

        try:
            mv = self.client.get_model_version(self.name, str(version))
        except MlflowException:
            raise RegistryError(f"{self.name} has no version {version} at {redact(self.uri)}") from None
        return _version(mv)

    def versions(self) -> list[Version]:
        """Every version, newest first."""
        found = self.client.search_model_versions(f"name = '{self.name}'", max_results=10000)
        by_version: dict[str, list[str]] = {}
        for alias, version in self.aliases().items():  # search results do not carry aliases on every store
            by_version.setdefault(version, []).append(alias)
        versions = [_version(mv, by_version.get(str(mv.version))) for mv in found]
        return sorted(versions, key=lambda v: int(v.version), reverse=True)

    def find(self, tag: str, value: str) -> Version | None:
        """The newest version whose tag `tag` equals `value`."""
        return next((v for v in self.versions() if v.tags.get(tag) == value), None)

    # -- writing ------------------------------------------------------------------------------------------

    def register(self, checkpoints: Path, *, python_model: Path, experiment: str, tags: dict[str, str],
                 run_tags: dict[str, str], signature, input_example, pip_requirements: list[str]) -> Version:
        """Log `checkpoints` (a folder of the three stage checkpoints) with the pyfunc model-from-code file
        `python_model` as the model of a new MLflow run, and register it as a new version with `tags` and the
        SHA-256 of each weight file (`weights.<stage>`, checked by `check_weights` at every load). If logging
        fails, the run ends FAILED and nothing is registered."""
        import mlflow

        import hndsr

        tags = {**tags, **weight_tags(checkpoints)}

        with self._run("register", experiment=experiment, tags=run_tags) as run_id:
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(python_model),
                artifacts={CHECKPOINTS: str(checkpoints)},
                code_paths=[str(Path(hndsr.__file__).parent)],
                signature=signature,
                input_example=input_example,
                pip_requirements=pip_requirements,
            )
            if not self.exists():
                self._create_model()
            mv = self.client.create_model_version(self.name, source=info.model_uri, run_id=run_id, tags=tags,
                                                  model_id=info.model_id)
        log.info("registered %s version %s (run %s)", self.name, mv.version, run_id)
        return self.get(mv.version)

    def _create_model(self) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(
                self.name, description="HNDSR super-resolution (autoencoder + neural operator + DDIM diffusion); "
                                       "promoted by the quality gate of `hndsr registry promote`")
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":  # another promotion created it just now: fine
                raise

    def set_tags(self, version: str, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self._upsert(f"tag {key} of version {version}",
                         lambda k=key, v=value: self.client.set_model_version_tag(self.name, str(version), k, str(v)),
                         lambda k=key: k in self.get(version).tags)

    def move_alias(self, alias: str, version: str) -> None:
        self._upsert(f"alias {alias}", lambda: self.client.set_registered_model_alias(self.name, alias, str(version)),
                     lambda: self.alias_version(alias) is not None)

    @staticmethod
    def _upsert(what: str, write, exists) -> None:
        """MLflow's SQL store writes a tag or an alias as "look it up, then UPDATE or INSERT": two first writes of the
        same key at once (two concurrent promotions of the same weights) both INSERT, one fails on the unique key.
        The key exists by then, so writing again updates it (the later write wins, as it would have). Any other
        failure (the key still absent) is raised."""
        from mlflow.exceptions import MlflowException

        try:
            write()
        except MlflowException:
            if not exists():
                raise
            log.info("%s was created concurrently by another promotion; writing it again", what)
            write()

    def delete_alias(self, alias: str) -> None:
        self.client.delete_registered_model_alias(self.name, alias)

    def delete_version(self, version: str) -> None:
        self.client.delete_model_version(self.name, str(version))

    def log_run(self, name: str, *, experiment: str, tags: dict[str, str], metrics: dict[str, float],
                artifacts: list[Path]) -> str:
        """An MLflow run recording a registry action (the gate's decision); returns its id."""
        import mlflow

        with self._run(name, experiment=experiment, tags=tags) as run_id:
            mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
            for path in artifacts:
                mlflow.log_artifact(str(path))
        return run_id

    @contextlib.contextmanager
    def _run(self, name: str, *, experiment: str, tags: dict[str, str]) -> Iterator[str]:
        """A run of the pipeline's experiment (created if new), tagged `stage = name` like the training runs."""
        import mlflow
        from mlflow.exceptions import MlflowException

        mlflow.set_tracking_uri(self.uri)
        found = mlflow.get_experiment_by_name(experiment)
        if found is None:
            try:
                experiment_id = mlflow.create_experiment(experiment, artifact_location=self._artifact_location)
            except MlflowException:  # another promotion created it just now (a unique-name error): use that one
                found = mlflow.get_experiment_by_name(experiment)
                if found is None:
                    raise
        if found is not None:
            experiment_id = found.experiment_id
        all_tags = {"stage": name, "git_commit": git_commit(), **tags}
        with mlflow.start_run(experiment_id=experiment_id, run_name=name, tags=all_tags) as run:
            log.info("MLflow run %s (%s) at %s", run.info.run_id, name, redact(self.uri))
            yield run.info.run_id

    # -- loading ------------------------------------------------------------------------------------------

    def model_uri(self, version: str) -> str:
        return f"models:/{self.name}/{version}"

    def download_checkpoints(self, version: str, destination: Path, *, verify: Version | None = None) -> Path:
        """Download version `version`'s checkpoints (not its code) into `destination`; returns the folder
        holding autoencoder/, operator/ and diffusion/. With `verify` (the version's record), the weights are
        checked against its recorded hashes (`check_weights`) before they are returned."""
        import mlflow

        with tempfile.TemporaryDirectory() as tmp:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=self.model_uri(version), dst_path=tmp,
                                                             tracking_uri=self.uri))
            source = local / "artifacts" / CHECKPOINTS
            if not source.is_dir():
                moved = self._missing_local_artifacts(version)
                if moved is not None:
                    raise RegistryError(
                        f"{self.name} version {version}: its artifacts are recorded at {moved}, which does not exist: "
                        "the folder holding them was moved or copied after they were logged (a local MLflow database "
                        "stores absolute paths). Move it back, re-run `dvc repro` here to register the model anew, "
                        "or keep runs on a tracking server (docs/tutorials/tracking-server.md)")
                raise RegistryError(f"{self.name} version {version} has no {CHECKPOINTS} artifact; it was not "
                                    "registered by `hndsr registry`")
            shutil.copytree(source, destination, dirs_exist_ok=True)
        if verify is not None:
            check_weights(verify, destination)
        return destination

    def _missing_local_artifacts(self, version: str) -> str | None:
        """The local folder a version's artifacts are recorded in, when it does not exist; else None."""
        from urllib.parse import unquote, urlparse

        try:
            source = self.client.get_model_version(self.name, str(version)).source
            if source.startswith("models:/m-"):  # a logged model (MLflow 3): its own artifact location
                location = self.client.get_logged_model(source[len("models:/"):]).artifact_location
            else:
                return None
        except Exception:  # noqa: BLE001 - only a better message is at stake; the caller reports the missing artifact
            return None
        parsed = urlparse(location)
        if parsed.scheme not in ("", "file"):
            return None
        path = Path(unquote(parsed.path))
        return str(path) if not path.exists() else None

    def load_pyfunc(self, version: str):
        """The version as MLflow loads it (pyfunc flavour, code and artifacts from the registry)."""
        import mlflow

        mlflow.set_tracking_uri(self.uri)
        return mlflow.pyfunc.load_model(self.model_uri(version))


def _version(mv, aliases: list[str] | None = None) -> Version:
    return Version(version=str(mv.version), aliases=tuple(sorted(aliases if aliases is not None else mv.aliases or ())), tags=dict(mv.tags or {}),
                   run_id=mv.run_id, source=mv.source, status=str(mv.status),
                   created_ms=int(mv.creation_timestamp or 0))
