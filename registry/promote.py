"""Register the pipeline's model as a new version and promote it through the quality gate.

`promote()` is the `promote` DVC stage and the CI gate:

1. checks, before writing anything, that the tracking server answers and that the candidate (models/ with
   metrics/eval.json scoring exactly those weights) is complete;
2. registers the candidate (or finds the version that already holds the same weights);
3. runs the gate (`registry.gate`) on the version as loaded back from the registry;
4. on a pass, moves the alias, but only if it still points to the version the gate compared against (else it
   compares again with the new one); the replaced version is recorded for `hndsr registry rollback`;
5. writes the decision with every check to reports/promotion.json, to the version's tags and to an MLflow run.

A rejected version stays registered, tagged `gate.decision = rejected` with its reasons; the alias does not
move. If the gate itself fails (an error, not a rejection), a version registered by this call is deleted again.

`promote(version=N)` gates a version already registered (`hndsr registry promote --version N`): its checkpoints
come from the registry (checked against the weight hashes it was registered with), its scores from its tags.
`rollback()` moves the alias back and records why on the version it took the alias from (`rolled_back`,
`rollback.*` tags, and a `rollback` MLflow run). The pipeline's own promotion never brings a rolled-back version
back; `promote(version=N, reason=...)` does, deliberately: the gate runs in full and the re-promotion is
recorded (`promoted.reason`, `promoted.at`, a `promote` MLflow run).
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path

from hndsr.atomic import atomic_write_bytes
from hndsr.checkpoint import STAGES, load_model, weights_hash
from hndsr.monitoring import REFERENCE_FILE
from hndsr.params import load_common, load_evaluate, load_params, params_hash
from hndsr.provenance import git_commit
from hndsr.reference import reference_input
from registry import gate
from registry.config import PromoteParams, load_promote
from registry.store import (
    REFERENCE_TAG,
    Registry,
    RegistryError,
    Version,
    check_weights,
    eval_tags,
    redact,
    scores_from_tags,
)

log = logging.getLogger("hndsr.registry")

EVAL_METRICS = ("psnr", "ssim", "bicubic_psnr", "bicubic_ssim", "prior_psnr", "detail_ratio", "consistency_nrmse",
                "spectral_angle_deg", "shift_px")
MAX_ATTEMPTS = 3  # comparisons against a production alias that keeps moving before giving up
PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")  # the pyfunc flavour, logged as model from code
# What the pyfunc flavour needs at load time besides mlflow (which MLflow adds itself).
PYFUNC_REQUIREMENTS = ("torch", "numpy", "pillow", "safetensors", "pyyaml", "pandas", "rasterio")


@dataclass(frozen=True)
class Candidate:
    models_dir: Path
    scores: dict[str, dict]  # eval.json "scales"
    evaluation: dict  # all of eval.json
    weights: dict[str, str]  # stage -> sha256 of model.safetensors
    run_ids: dict[str, str]  # stage -> MLflow run id of its training
    id: str  # candidate_id(): the same weights with the same behaviour (sampling defaults, ...) are one candidate

    @property
    def dataset_hash(self) -> str:
        return self.evaluation.get("dataset_hash", "")


def load_candidate(models_dir: str | Path, metrics_dir: str | Path) -> Candidate:
    """The trained checkpoints with their evaluation; RegistryError if either is missing or they disagree."""
    models_dir, eval_path = Path(models_dir), Path(metrics_dir) / "eval.json"
    if not eval_path.is_file():
        raise RegistryError(f"the candidate has no evaluation metrics ({eval_path} is missing); run `dvc repro` "
                            "(stage evaluate) first")
    evaluation = json.loads(eval_path.read_text())
    if not evaluation.get("scales"):
        raise RegistryError(f"{eval_path} holds no per-scale metrics; re-run `dvc repro` (stage evaluate)")
    load_model(models_dir)  # every checkpoint present and of one lineage (CheckpointError says what to re-run)
    weights = {stage: weights_hash(models_dir / stage) for stage in STAGES}
    if evaluation.get("models") != weights:
        raise RegistryError(f"{eval_path} scored other weights than {models_dir}/ holds; re-run `dvc repro` "
                            "(stage evaluate) so the metrics belong to this model")
    reference = models_dir / REFERENCE_FILE
    if reference.is_file() and json.loads(reference.read_text()).get("models") != weights:
        raise RegistryError(f"{reference} belongs to other weights than {models_dir}/ holds; re-run `dvc repro` "
                            "(stage evaluate writes it)")
    configs = {stage: json.loads((models_dir / stage / "config.json").read_text()) for stage in STAGES}
    run_ids = {stage: config.get("run_id", "") for stage, config in configs.items()}
    return Candidate(models_dir, evaluation["scales"], evaluation, weights, run_ids, candidate_id(weights, configs))


# What a checkpoint's config.json says about how the model behaves (beside its weights): the networks' arguments,
# the pixel interface, the scale range, and the diffusion stage's sampling defaults and scheduler. Not its
# provenance (run id, study, dataset hash, upstream hashes: implied by the weights) nor the validation table.
BEHAVIOUR_KEYS = ("config", "data", "scale_range", "sampling", "scheduler")


def candidate_id(weights: dict[str, str], configs: dict[str, dict]) -> str:
    """SHA-256 over each stage's weight hash and behaviour (BEHAVIOUR_KEYS of its config.json). The same weights
    with other sampling defaults answer differently, so they are another candidate (another version)."""
    parts = []
    for stage in sorted(weights):
        behaviour = {key: configs[stage][key] for key in BEHAVIOUR_KEYS if key in configs[stage]}
        parts.append(f"{stage}:{weights[stage]}:{json.dumps(behaviour, sort_keys=True)}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def registered_candidate(version: Version, checkpoints: Path) -> Candidate:
    """A registered version as a candidate: its downloaded `checkpoints` (which must hold the weights it was
    registered with) and the evaluation recorded in its tags."""
    tags = version.tags
    scores = scores_from_tags(tags)
    if not scores:
        raise RegistryError(f"version {version.version} carries no evaluation tags (eval.x<scale>.*): it was not "
                            "registered by `hndsr registry`; promote a pipeline candidate instead")
    weights = check_weights(version, checkpoints)
    evaluation = {"dataset_hash": tags.get("dataset_hash", ""), "steps": tags.get("eval.steps"),
                  "seed": tags.get("eval.seed"), "scales": scores}
    run_ids = {stage: tags.get(f"run_id.{stage}", "") for stage in STAGES}
    return Candidate(checkpoints, scores, evaluation, weights, run_ids, tags.get("candidate_id", ""))


def candidate_tags(candidate: Candidate, params_path: str | Path) -> dict[str, str]:
    document = load_params(params_path)
    # what made the model: not the gate's own section, nor `cluster` (where per-file work ran; the same bytes anywhere)
    model_params = {name: document[name] for name in document if name not in ("promote", "cluster")}
    tags = {
        "candidate_id": candidate.id,
        "dataset_hash": candidate.dataset_hash,
        "git_commit": git_commit(),
        "params_hash": params_hash(model_params),
        "eval.steps": str(candidate.evaluation.get("steps")),
        "eval.seed": str(candidate.evaluation.get("seed")),
        "gate.decision": "pending",
    }
    tags.update({f"weights.{stage}": digest for stage, digest in candidate.weights.items()})
    reference = candidate.models_dir / REFERENCE_FILE
    if reference.is_file():
        tags[REFERENCE_TAG] = hashlib.sha256(reference.read_bytes()).hexdigest()
    tags.update({f"run_id.{stage}": run_id for stage, run_id in candidate.run_ids.items()})
    tags.update(eval_tags(candidate.scores, EVAL_METRICS))
    return tags


def _pyfunc_signature_and_example(channels: int):
    import base64

    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    from hndsr import raster
    from hndsr.images import encode_png, to_uint8

    inputs = Schema([ColSpec("string", "image"), ColSpec("double", "scale"),
                     ColSpec("long", "steps", required=False), ColSpec("long", "seed", required=False)])
    outputs = Schema([ColSpec("string", "image"), ColSpec("long", "height"), ColSpec("long", "width")])
    crop = to_uint8(reference_input(channels)[..., :32, :32])[0]  # (32, 32, C)
    data = encode_png(crop) if channels == 3 else raster.encode_geotiff(  # a model of other bands takes TIFF
        crop.transpose(2, 0, 1), raster.output_profile("uint8", channels, 32, 32))
    example = pd.DataFrame([{"image": base64.b64encode(data).decode("ascii"), "scale": 4.0, "steps": 0, "seed": 0}])
    return ModelSignature(inputs=inputs, outputs=outputs), example


def _channels(models_dir: Path) -> int:
    """The band count the candidate's autoencoder takes (its config; 3 in checkpoints from before bands)."""
    config = json.loads((models_dir / "autoencoder" / "config.json").read_text())
    return int(config["config"].get("channels", 3))


def _requirements() -> list[str]:
    pins = []
    for name in PYFUNC_REQUIREMENTS:
        try:
            pins.append(f"{name}=={package_version(name).split('+')[0]}")
        except PackageNotFoundError:
            pins.append(name)
    return pins


def register(registry: Registry, candidate: Candidate, params_path: str | Path, experiment: str) -> tuple[Version, bool]:
    """The version holding `candidate`'s weights: an existing one, or a new one. Returns (version, created)."""
    existing = registry.find("candidate_id", candidate.id) if registry.exists() else None
    if existing is not None:
        log.info("version %s already holds these weights; gating it again", existing.version)
        return existing, False
    tags = candidate_tags(candidate, params_path)
    signature, example = _pyfunc_signature_and_example(_channels(candidate.models_dir))
    with tempfile.TemporaryDirectory() as tmp:
        checkpoints = Path(tmp) / "checkpoints"
        for stage in STAGES:  # weights + config only; metrics.json stays with the pipeline
            (checkpoints / stage).mkdir(parents=True)
            for name in ("config.json", "model.safetensors"):
                (checkpoints / stage / name).write_bytes((candidate.models_dir / stage / name).read_bytes())
        reference = candidate.models_dir / REFERENCE_FILE  # the monitoring reference travels with the version
        if reference.is_file():
            (checkpoints / REFERENCE_FILE).write_bytes(reference.read_bytes())
        version = registry.register(checkpoints, python_model=PYFUNC_FILE, experiment=experiment, tags=tags,
                                    run_tags={"candidate_id": candidate.id, "dataset_hash": candidate.dataset_hash},
                                    signature=signature, input_example=example, pip_requirements=_requirements())
    # Two promotions of the same weights at once both find none above and both register. The registry has no
    # compare-and-set, so each resolves it after the fact, the same way: the lowest version holding these weights
    # survives, and whoever registered a higher one deletes it and gates the survivor instead.
    same = sorted((v for v in registry.versions() if v.tags.get("candidate_id") == candidate.id),
                  key=lambda v: int(v.version))
    if same and same[0].version != version.version:
        log.info("version %s holds the same weights (registered concurrently); deleting version %s, registered by "
                 "this run, and gating version %s", same[0].version, version.version, same[0].version)
        registry.delete_version(version.version)
        return same[0], False
    return version, True


def _production_scores(registry: Registry, production: str, candidate: Candidate, local_model,
                       params_path: str | Path) -> tuple[dict | None, dict, str]:
    """(production scores, candidate scores, note) on one test split; production scores None if that cannot be
    had (the note says why). Same dataset hash: the registered evaluations. Different: both models scored
    again on the candidate's test split, when that split is here."""
    tags = registry.get(production).tags
    registered = scores_from_tags(tags)
    if tags.get("dataset_hash") == candidate.dataset_hash and registered:
        return registered, candidate.scores, "(same test split)"
    from hndsr.evaluation import score
    from hndsr.splits import dataset_hash, load_pairs

    common, eparams = load_common(params_path), load_evaluate(params_path)
    here = dataset_hash(common.data_dir) if (Path(common.data_dir) / "manifest.json").is_file() else None
    if here != candidate.dataset_hash:
        return None, candidate.scores, (
            f"cannot compare: production v{production} was evaluated on dataset {tags.get('dataset_hash', '?')[:12]}, "
            f"the candidate on {candidate.dataset_hash[:12]}, and the candidate's test split is not in "
            f"{common.data_dir} to re-evaluate both (run `dvc pull` or `dvc repro` first)")
    log.info("production v%s was evaluated on another dataset; re-evaluating it and the candidate on this test split",
             production)
    test = load_pairs(common.data_dir, "test")
    with tempfile.TemporaryDirectory() as tmp:
        production_model = load_model(registry.download_checkpoints(production, Path(tmp),
                                                                     verify=registry.get(production)))
    if production_model.data != local_model.data:  # other bands or radiometry: the pixels mean other things
        return None, candidate.scores, (
            f"cannot compare: production v{production} takes {production_model.data.describe()} with radiometry "
            f"{_radiometry(production_model.data)}, the candidate {local_model.data.describe()} with "
            f"{_radiometry(local_model.data)}; replacing a model with one of other bands or radiometry is a "
            "deliberate choice: promote it under another registered model name (promote.model_name)")
    kwargs = {"seed": eparams.seed, "batch_size": eparams.batch_size, "device": "cpu", "baselines": False}
    production_scores = score(production_model, test, steps=production_model.defaults.steps, **kwargs)
    candidate_scores = score(local_model, test, steps=local_model.defaults.steps, **kwargs)
    return production_scores, candidate_scores, f"(both re-evaluated on the candidate's test split, dataset " \
                                                f"{candidate.dataset_hash[:12]})"


def _radiometry(spec) -> str:
    return ", ".join(f"{kind} {r.method}" for kind, r in sorted(spec.radiometry.items()))


def promote(params_path: str | Path = "params.yaml", report_path: str | Path | None = "reports/promotion.json", *,
            before_move: Callable[[], None] | None = None, version: str | None = None,
            reason: str | None = None, to: str | None = None) -> dict:
    """Register and gate the pipeline's model, or with `version` gate that registered version again (`reason`:
    why, recorded; needed to bring back a rolled-back version). `to`: the alias a pass moves (default the
    production alias; e.g. "candidate" to roll the version out gradually, docs/tutorials/rollout.md).
    Returns the report (also written to `report_path` unless None). `before_move` runs between the final alias
    check and the move (tests race)."""
    params: PromoteParams = load_promote(params_path)
    common = load_common(params_path)
    # Fails here, before anything is written, if the server is down.
    registry = Registry(params.model_name, must_exist=version is not None)
    with tempfile.TemporaryDirectory() as tmp:
        if version is None:
            candidate = load_candidate(common.models_dir, common.metrics_dir)
            local_model = load_model(common.models_dir)
            registered, created = register(registry, candidate, params_path, common.experiment)
        else:
            registered, created = registry.get(version), False
            if registered.tags.get("canary.backed_out") == "true":
                log.warning("v%s was backed out of a roll-out by the server on %s (%s); gating it again as asked",
                            version, registered.tags.get("canary.backed_out.at", "?"),
                            registered.tags.get("canary.backed_out.reason", "no reason recorded"))
            candidate = registered_candidate(registered, registry.download_checkpoints(version, Path(tmp)))
            local_model = load_model(candidate.models_dir)
        try:
            report = _gate(registry, params, candidate, local_model, registered.version, params_path, before_move,
                           explicit=version is not None, reason=reason, target=to or params.alias)
        except BaseException:
            if created:
                log.error("the gate failed; deleting version %s registered by this run", registered.version)
                registry.delete_version(registered.version)
            raise
        document = json.dumps(report, indent=2, sort_keys=True).encode() + b"\n"
        if report_path is not None:
            atomic_write_bytes(Path(report_path), document)
        logged = Path(tmp) / "promotion.json"
        logged.write_bytes(document)
        run_id = registry.log_run(
            "promote", experiment=common.experiment,
            tags={"model_name": params.model_name, "model_version": registered.version, "decision": report["decision"],
                  "candidate_id": candidate.id, "dataset_hash": candidate.dataset_hash,
                  **({"requested_version": version} if version else {}), **({"reason": reason} if reason else {})},
            metrics={"passed": float(report["decision"] != "rejected"),
                     **{f"check_{c['name']}": float(c["passed"]) for c in report["checks"]},
                     **_numbers(report)},
            artifacts=[logged])
    registry.set_tags(registered.version, {"gate.run_id": run_id})
    return report


def _rollback_check(tags: dict[str, str], version: str, alias: str, explicit: bool, reason: str | None) -> gate.Check:
    """A version rolled back out of the alias comes back only when asked for by number, with a reason."""
    if tags.get("rolled_back") != "true":
        return gate.Check("not_rolled_back", True, "never rolled back" if "rollback.at" not in tags else
                          f"rolled back on {tags['rollback.at']}, re-promoted on {tags.get('promoted.at', '?')}", {})
    why = f"version {version} was rolled back out of {alias} on {tags.get('rollback.at', '?')} " \
          f"({tags.get('rollback.reason', 'no reason recorded')})"
    values = {"rolled_back_at": tags.get("rollback.at"), "rollback_reason": tags.get("rollback.reason")}
    if explicit and reason:
        return gate.Check("not_rolled_back", True, f"{why}; promoted again deliberately: {reason}",
                          {**values, "reason": reason})
    if explicit:
        return gate.Check("not_rolled_back", False, f"{why}; to bring it back, say what was fixed with --reason",
                          values)
    return gate.Check("not_rolled_back", False, f"{why}; once that is fixed, promote it deliberately with "
                      f"`hndsr registry promote --version {version} --reason '...'`, or register a new candidate",
                      values)


def _gate(registry: Registry, params: PromoteParams, candidate: Candidate, local_model, version: str,
          params_path, before_move, *, explicit: bool = False, reason: str | None = None,
          target: str | None = None) -> dict:
    """Run the checks; on a pass move `target` (default: the production alias) to `version`. The comparison is
    always with the production alias's version."""
    target = target or params.alias
    canary = target != params.alias
    registered = registry.load_pyfunc(version).unwrap_python_model().model
    checks = [_rollback_check(registry.get(version).tags, version, params.alias, explicit, reason),
              gate.beats_bicubic(candidate.scores, params),
              gate.consistent(candidate.scores, params),
              gate.registered_copy(local_model, registered, params, version),
              gate.outputs_in_range(registered, params),
              gate.latency(registered, params)]
    before, target_before = registry.alias_version(params.alias), registry.alias_version(target)
    decision, moved_from = "rejected", None
    for attempt in range(1, MAX_ATTEMPTS + 1):
        production = registry.alias_version(params.alias)
        if production == version and canary:
            regression = gate.Check("no_regression", False, f"version {version} already holds {params.alias}: "
                                    f"nothing to roll out as {target}", {"production_version": production})
            break
        if production == version:
            regression = gate.Check("no_regression", True, f"version {version} already holds {params.alias}", {})
            decision = "unchanged" if all(c.passed for c in checks) else "rejected"
            break
        if production is None:
            regression = gate.no_regression(candidate.scores, None, None, params)
        else:
            prod_scores, cand_scores, note = _production_scores(registry, production, candidate, local_model,
                                                                params_path)
            regression = gate.no_regression(cand_scores, prod_scores, production, params, split_note=note) \
                if prod_scores is not None else gate.Check("no_regression", False, note,
                                                           {"production_version": production})
        if not all(c.passed for c in checks + [regression]):
            break
        if before_move is not None:
            before_move()
        now = registry.alias_version(params.alias)
        if now != production:
            log.warning("%s moved from v%s to v%s while the gate ran; comparing again (attempt %d of %d)",
                        params.alias, production, now, attempt + 1, MAX_ATTEMPTS)
            continue
        if canary and registry.alias_version(target) == version:
            decision = "unchanged"
            break
        registry.move_alias(target, version)
        decision, moved_from = "promoted", None if canary else production
        break
    else:
        regression = gate.Check("no_regression", False, f"{params.alias} moved during each of {MAX_ATTEMPTS} "
                                "comparisons; run the gate again", {})
    checks.append(regression)
    after = registry.alias_version(params.alias)
    reasons = [f"{c.name}: {c.detail}" for c in checks if not c.passed]
    report = {
        "model": params.model_name, "version": version, "alias": target, "production_alias": params.alias,
        "decision": decision,
        "reasons": reasons, "checks": [c.to_dict() for c in checks],
        "production_before": before, "production_after": after, "replaced": moved_from,
        "target_before": target_before, "target_after": registry.alias_version(target) if canary else after,
        "candidate": {"id": candidate.id, "dataset_hash": candidate.dataset_hash, "weights": candidate.weights,
                      "training_runs": candidate.run_ids},
        "tracking_uri": redact(registry.uri), "requested": {"version": version, "reason": reason} if explicit else None,
        "thresholds": {k: v for k, v in params.__dict__.items() if k not in ("model_name", "alias")},
    }
    tags = {"gate.decision": "promoted" if decision != "rejected" else "rejected",
            "gate.reasons": "; ".join(reasons)[:4000] or "all checks passed",
            "gate.checks": json.dumps({c.name: c.passed for c in checks}, sort_keys=True),
            "gate.latency_ms": str(next(c for c in checks if c.name == "latency").values.get("median_ms")),
            "gate.compared_with": str(regression.values.get("production_version", "none")), "gate.target": target}
    if decision == "promoted":
        tags["promoted.at"] = _now()
        if reason:
            tags["promoted.reason"] = reason[:4000]
        if registry.get(version).tags.get("rolled_back") == "true":
            tags["rolled_back"] = "false"  # brought back deliberately; rollback.* tags keep the history
    if moved_from is not None:
        tags["previous_production"] = moved_from
        registry.set_tags(moved_from, {"replaced_by": version})
    registry.set_tags(version, tags)
    return report


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _numbers(report: dict) -> dict[str, float]:
    numbers = {}
    for check in report["checks"]:
        values = check["values"]
        if check["name"] == "latency":
            numbers["latency_ms"] = values["median_ms"]
        elif check["name"] == "beats_bicubic" and values.get("gain_db"):
            numbers["min_gain_over_bicubic_db"] = min(values["gain_db"].values())
        elif check["name"] == "outputs_in_range":
            numbers["out_of_range_fraction"] = values["out_of_range_fraction"]
    return numbers


def rollback(params_path: str | Path = "params.yaml", reason: str = "") -> tuple[str, str]:
    """Move the alias back to the version the current one replaced, recording `reason` on the version taken out
    (tags `rolled_back`, `rollback.reason`, `rollback.at`, `rollback.to`) and as a `rollback` MLflow run.
    Returns (from, to)."""
    if not reason.strip():
        raise RegistryError("say why the version is rolled back (--reason): it is recorded, and it is what an "
                            "operator reads before promoting that version again")
    params, common = load_promote(params_path), load_common(params_path)
    registry = Registry(params.model_name, must_exist=True)
    current = registry.alias_version(params.alias)
    if current is None:
        raise RegistryError(f"{params.model_name} has no {params.alias!r} alias: nothing to roll back")
    previous = registry.get(current).tags.get("previous_production")
    if not previous:
        raise RegistryError(f"{params.model_name} v{current} holds {params.alias} but replaced no earlier version: "
                            "nothing to roll back to")
    registry.get(previous)  # still registered?
    registry.move_alias(params.alias, previous)
    registry.set_tags(current, {"rolled_back": "true", "rollback.reason": reason[:4000], "rollback.at": _now(),
                                "rollback.to": previous})
    registry.log_run("rollback", experiment=common.experiment,
                     tags={"model_name": params.model_name, "model_version": current, "restored_version": previous,
                           "reason": reason[:4000]},
                     metrics={}, artifacts=[])
    log.info("%s: %s moved back from v%s to v%s", params.model_name, params.alias, current, previous)
    return current, previous


# -- gradual roll-outs (docs/tutorials/rollout.md) -----------------------------------------------------

CANARY_ALIAS = "candidate"


def rollout_status(params_path: str | Path = "params.yaml", alias: str = CANARY_ALIAS,
                   server: str | None = None) -> dict:
    """Both versions of a roll-out as the registry holds them and, with `server` (a running `hndsr serve`), as
    the server reports them live (its GET /rollout)."""
    params = load_promote(params_path)
    registry = Registry(params.model_name, must_exist=True)
    document: dict = {"model": params.model_name, "versions": {}}
    for role, name in (("production", params.alias), ("candidate", alias)):
        version = registry.alias_version(name)
        tags = registry.get(version).tags if version else {}
        document["versions"][role] = {
            "alias": name, "version": version, "gate": tags.get("gate.decision"),
            "scores": scores_from_tags(tags) if version else {},
            "backed_out": {k.removeprefix("canary.backed_out."): v for k, v in tags.items()
                           if k.startswith("canary.backed_out.")} or None}
    if server is not None:
        document["live"] = _live(server)
    return document


def _live(server: str) -> dict:
    import urllib.error
    import urllib.request

    url = server.rstrip("/") + "/rollout"
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return json.loads(answer.read())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise RegistryError(f"cannot read the server's roll-out numbers at {url}: {exc}") from None


def rollout_promote(params_path: str | Path = "params.yaml", alias: str = CANARY_ALIAS,
                    reason: str | None = None) -> dict:
    """Finish a roll-out: gate the version `alias` points to against production (the full gate, as
    `promote --version`), move production to it and remove `alias`. Returns the gate's report."""
    params = load_promote(params_path)
    registry = Registry(params.model_name, must_exist=True)
    version = registry.alias_version(alias)
    if version is None:
        raise RegistryError(f"{params.model_name} has no {alias!r} alias: nothing is rolling out "
                            f"(start one with `hndsr registry promote --to {alias}`)")
    tags = registry.get(version).tags
    if tags.get("canary.backed_out") == "true":
        raise RegistryError(f"v{version} was backed out of the roll-out by the server on "
                            f"{tags.get('canary.backed_out.at', '?')}: {tags.get('canary.backed_out.reason', '')}; "
                            f"end it with `hndsr registry rollout abort`")
    report = promote(params_path, None, version=version, reason=reason or f"roll-out of v{version} finished")
    if report["decision"] in ("promoted", "unchanged"):
        registry.delete_alias(alias)
        log.info("%s: roll-out of v%s finished; %s removed", params.model_name, version, alias)
    return report


def rollout_abort(params_path: str | Path = "params.yaml", alias: str = CANARY_ALIAS,
                  reason: str = "") -> str:
    """End a roll-out without promoting: remove `alias` (servers stop routing to it at their next poll) and
    record why on the version. Returns the version."""
    if not reason.strip():
        raise RegistryError("say why the roll-out is aborted (--reason): it is recorded on the version")
    params, common = load_promote(params_path), load_common(params_path)
    registry = Registry(params.model_name, must_exist=True)
    version = registry.alias_version(alias)
    if version is None:
        raise RegistryError(f"{params.model_name} has no {alias!r} alias: nothing is rolling out")
    registry.delete_alias(alias)
    registry.set_tags(version, {"rollout.aborted.at": _now(), "rollout.aborted.reason": reason[:4000]})
    registry.log_run("rollout_abort", experiment=common.experiment,
                     tags={"model_name": params.model_name, "model_version": version, "alias": alias,
                           "reason": reason[:4000]}, metrics={}, artifacts=[])
    return version
