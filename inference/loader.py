"""Find, download and load the model to serve, with the `hndsr` package (safetensors + config, no pickle).

`MODEL_URI` forms:
- `models:/hndsr@production` (an alias; the server follows it when it moves), `models:/hndsr/3` (a version);
- a local folder: the three checkpoint folders (autoencoder/, operator/, diffusion/), or a model exported
  with `mlflow artifacts download -u models:/hndsr/3 -d DIR` (its `artifacts/checkpoints`), for hosts
  without a tracking server.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import tempfile
import time
from pathlib import Path

import torch

from hndsr.checkpoint import STAGES, CheckpointError, load_model, weights_hash
from hndsr.monitoring import REFERENCE_FILE, Reference
from inference.acceleration import accelerate
from inference.engine import LoadedModel

log = logging.getLogger("hndsr.inference")

_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


class ModelLoadError(RuntimeError):
    """The model cannot be found or loaded; the message says why."""


class ModelIntegrityError(ModelLoadError):
    """A registered version's weight files are not the ones it was registered with (or it has no recorded hashes):
    it is never served, and retrying cannot help until the artifact store is restored."""


class RegistryUnavailable(ModelLoadError):
    """The registry could not be read (unreachable, or its database locked): nothing was loaded, nothing failed."""


def pick_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"HNDSR_DEVICE={setting} but CUDA is not available on this host")
    return device


def _checkpoints_in(folder: Path) -> Path:
    for candidate in (folder, folder / "artifacts" / "checkpoints", folder / "checkpoints"):
        if (candidate / "autoencoder").is_dir():
            return candidate
    raise ModelLoadError(f"{folder} holds no model: expected autoencoder/, operator/ and diffusion/ checkpoint "
                         "folders (or artifacts/checkpoints/ of an exported registry version)")


def alias_uri(model_uri: str, alias: str) -> str | None:
    """`models:/NAME@alias` for a MODEL_URI that names NAME by an alias, else None (no roll-outs)."""
    match = _MODELS_URI.match(model_uri)
    return f"models:/{match['name']}@{alias}" if match and match["alias"] else None


def record_backout(model_uri: str, version: str, tags: dict[str, str]) -> None:
    """Tag registered `version` of MODEL_URI's model (the server backed it out of a roll-out)."""
    from registry.store import Registry

    Registry(_MODELS_URI.match(model_uri)["name"]).set_tags(version, tags)


def current_version(model_uri: str) -> str | None:
    """The version an alias URI points to now (None for fixed versions and local folders); RegistryUnavailable,
    with the reason on one line, when the registry cannot be read now."""
    match = _MODELS_URI.match(model_uri)
    if not match or not match["alias"]:
        return None
    from registry.store import Registry

    with _registry_errors(match["name"]):
        return Registry(match["name"]).alias_version(match["alias"])


def backed_out(model_uri: str, version: str) -> str | None:
    """Why registered `version` of MODEL_URI's model was backed out of a roll-out (its `canary.backed_out.reason`
    tag, written by the server that backed it out), or None if it never was."""
    match = _MODELS_URI.match(model_uri)
    if not match:
        return None
    from registry.store import Registry

    with _registry_errors(match["name"]):
        tags = Registry(match["name"]).get(version).tags
    if tags.get("canary.backed_out") != "true":
        return None
    return tags.get("canary.backed_out.reason") or "backed out of a roll-out"


def quiet_store_errors() -> None:
    """MLflow's database store logs every SQLAlchemy error it raises with its whole traceback (some 60 lines for a
    locked SQLite file); the server reports each on one line itself (`_registry_errors`), so those are not logged
    twice. Called by `hndsr serve`."""
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)


@contextlib.contextmanager
def _registry_errors(name: str):
    """Registry and database errors as RegistryUnavailable with their first line (never a traceback: a locked
    SQLite database raises SQLAlchemy's OperationalError with some 60 lines)."""
    from mlflow.exceptions import MlflowException

    from registry.store import RegistryError

    try:
        yield
    except (RegistryError, MlflowException, OSError) as exc:
        raise RegistryUnavailable(f"{name}: {first_line(exc)}") from None
    except Exception as exc:  # SQLAlchemy errors of a database tracking URI (locked, gone)
        if type(exc).__module__.startswith("sqlalchemy"):
            raise RegistryUnavailable(f"{name}: the tracking database cannot be read now: {first_line(exc)}") \
                from None
        raise


def first_line(exc: BaseException) -> str:
    """An exception's message on one line (its type when it has none), at most 500 characters."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:500]


def load(model_uri: str, device: torch.device, *, version: str | None = None, precision: str = "auto",
         compile: str = "auto", min_psnr_db: float = 45.0, max_batch: int = 1) -> LoadedModel:
    """Load the model at `model_uri` (for an alias: `version` if given, else where it points), choose and check
    its reduced precision and compilation on the reference input (inference/acceleration.py), which warms it up."""
    start = time.perf_counter()
    match = _MODELS_URI.match(model_uri)
    if match:
        loaded = _load_registered(match, device, version)
    elif "://" in model_uri or model_uri.startswith("models:"):
        raise ModelLoadError(f"MODEL_URI={model_uri!r}: use models:/NAME@ALIAS, models:/NAME/VERSION or a local folder")
    else:
        folder = Path(model_uri)
        if not folder.is_dir():
            raise ModelLoadError(f"MODEL_URI={model_uri!r} is neither a models:/ URI nor an existing folder")
        checkpoints = _checkpoints_in(folder)
        model = _load_checkpoints(checkpoints, device)
        config = json.loads((checkpoints / "diffusion" / "config.json").read_text())
        loaded = LoadedModel(model, {"version": "local", "alias": None, "source": str(folder.resolve()),
                                     "run_id": config.get("run_id"), "dataset_hash": config.get("dataset_hash"),
                                     "metrics": {}}, device)
        loaded.reference = _local_reference(checkpoints)
    loaded.acceleration = accelerate(loaded.model, device, precision=precision, compile=compile,
                                     min_psnr_db=min_psnr_db, max_batch=max_batch)
    loaded.info["inference"] = loaded.acceleration.report()
    loaded.info["default_steps"] = loaded.model.defaults.steps
    loaded.info["scale_range"] = [loaded.model.min_scale, loaded.model.max_scale]
    loaded.info["data"] = loaded.model.data.to_config()  # the bands it takes and each data type's mapping
    loaded.info["device"] = str(device)
    loaded.info["reference"] = loaded.reference.summary() if loaded.reference is not None else None
    log.info("loaded model %s (version %s) on %s in %.1f s; %s%s", model_uri, loaded.info["version"], device,
             time.perf_counter() - start, loaded.acceleration.precision,
             ", compiled UNet" if loaded.acceleration.compiled else "")
    return loaded


def _load_checkpoints(checkpoints: Path, device: torch.device):
    try:
        return load_model(checkpoints).to(device)
    except (CheckpointError, OSError, KeyError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the checkpoints in {checkpoints}: {exc}") from None


def _load_registered(match: re.Match, device: torch.device, version: str | None) -> LoadedModel:
    from mlflow.exceptions import MlflowException

    from registry.store import IntegrityError, Registry, RegistryError, scores_from_tags

    name, alias = match["name"], match["alias"]
    try:
        registry = Registry(name, must_exist=True)
        version = version or (registry.alias_version(alias) if alias else match["version"])
        if version is None:
            raise ModelLoadError(f"registered model {name!r} has no alias {alias!r}: promote a version first "
                                 "(`hndsr registry promote`)")
        registered = registry.get(version)
        with tempfile.TemporaryDirectory() as tmp:
            # Every weight file checked against the hashes recorded at registration before anything is built.
            checkpoints = registry.download_checkpoints(version, Path(tmp), verify=registered)
            try:
                model = load_model(checkpoints).to(device)
                reference = _read_reference(checkpoints)  # its hash was checked with the weights'
            except (CheckpointError, KeyError, ValueError) as exc:  # registered broken: no `dvc` advice applies
                raise ModelLoadError(f"{name} version {version} cannot be loaded: {str(exc).split('; ')[0]}") \
                    from None
    except IntegrityError as exc:
        raise ModelIntegrityError(f"{name} {exc}") from None
    except (RegistryError, MlflowException, OSError) as exc:  # unreachable, missing, or a failed download
        message = first_line(exc)
        raise ModelLoadError(message if message.startswith(f"{name} ") else f"{name}: {message}") from None
    tags = registered.tags
    info = {"name": name, "version": version, "alias": alias, "source": f"models:/{name}/{version}",
            "run_id": registered.run_id, "dataset_hash": tags.get("dataset_hash"),
            "git_commit": tags.get("git_commit"), "gate": tags.get("gate.decision"),
            "metrics": scores_from_tags(tags)}
    return LoadedModel(model, info, device, reference=reference)


def _read_reference(checkpoints: Path) -> Reference | None:
    """The monitoring reference beside the checkpoints (hndsr.monitoring), or None when there is none."""
    path = checkpoints / REFERENCE_FILE
    if not path.is_file():
        return None
    return Reference.from_record(json.loads(path.read_text()))


def _local_reference(checkpoints: Path) -> Reference | None:
    """A local folder's monitoring reference, if it has one written for these weights (the evaluate stage
    records their hashes in it); else None, logged: the server then reports consistency but no input drift."""
    try:
        reference = _read_reference(checkpoints)
    except (ValueError, KeyError) as exc:
        log.warning("%s/%s cannot be read (%s); serving without a monitoring reference", checkpoints, REFERENCE_FILE,
                    exc)
        return None
    if reference is None:
        log.info("%s has no %s (written by the evaluate stage): no input-drift figures, consistency only",
                 checkpoints, REFERENCE_FILE)
        return None
    weights = {stage: weights_hash(checkpoints / stage) for stage in STAGES}
    if reference.record.get("models") != weights:
        log.warning("%s/%s was written for other weights (re-run the evaluate stage); serving without it",
                    checkpoints, REFERENCE_FILE)
        return None
    return reference

