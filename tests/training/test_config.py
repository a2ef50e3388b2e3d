from pathlib import Path

import pytest
import yaml

from hndsr.config import ConfigError
from hndsr.params import load_common, load_evaluate
from training.config import STAGE_NAMES, load_stage


@pytest.mark.parametrize("path", ["params.yaml", "profiles/gpu.yaml", "profiles/aerial.yaml"])
def test_params_files_are_valid(path):
    common = load_common(path)
    assert common.scale_range[0] < common.scale_range[1]
    for stage in STAGE_NAMES:
        params, extras = load_stage(path, stage)
        # Each stage is an Optuna study over a declared search space; the CPU profiles give the operator and the
        # diffusion stage one long trial (README, the operator's recipe: it beat two short ones within 10 minutes).
        assert params.n_trials >= (1 if stage != "autoencoder" else 2), f"{stage}: too few trials"
        assert params.search, f"{stage} declares no search space"
        assert (extras is not None) == (stage == "diffusion")
    load_evaluate(path)


def _params(tmp_path, **sections):
    document = yaml.safe_load(Path("params.yaml").read_text())
    for name, values in sections.items():
        document[name].update(values)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


@pytest.mark.parametrize(
    ("section", "values", "message"),
    [
        ("train", {"scale_range": [4, 2]}, r"train\.scale_range: must be \[low, high\]"),
        ("train", {"device": "tpu"}, r"train\.device: must be auto, cpu or cuda"),
        ("train_operator", {"iterations": 0}, r"train_operator\.iterations: must be at least 1"),
        ("train_operator", {"crop": 50}, r"train_operator\.crop: must be a multiple of 4"),
        ("train_operator", {"search": {"momentum": {"low": 0.1, "high": 0.9}}}, r"searchable names are `lr`"),
        ("train_operator", {"search": {"lr": {"low": 1.0, "high": 0.1}}}, r"needs low < high"),
        ("train_operator", {"search": {"lr": {"low": 0.0, "high": 0.1, "log": True}}}, r"log range needs low > 0"),
        ("train_operator", {"itrations": 5}, r"train_operator\.itrations: unknown key"),
        ("train_diffusion", {"sampling": {"stepz": [4]}}, r"train_diffusion\.sampling\.stepz: unknown key"),
        ("train_operator", {"ema": 1.0}, r"train_operator\.ema: must be in \[0, 1\)"),
        ("train_operator", {"hf_weight": -1}, r"train_operator\.hf_weight: must be a number >= 0"),
        ("train_autoencoder", {"hf_weight": 0.5}, r"train_autoencoder\.hf_weight: only the operator"),
    ],
)
def test_bad_training_params_name_the_key(tmp_path, section, values, message):
    path = _params(tmp_path, **{section: values})
    with pytest.raises(ConfigError, match=message):
        load_common(path)
        for stage in STAGE_NAMES:
            load_stage(path, stage)


def _keys(document: dict, prefix: str = "") -> set[str]:
    """Every key path of a params document (a stage's `model` and `search` hold free-form choices)."""
    keys = set()
    for key, value in document.items():
        keys.add(prefix + key)
        if isinstance(value, dict) and key not in ("model", "search"):
            keys |= _keys(value, f"{prefix}{key}.")
    return keys


@pytest.mark.parametrize("path", ["profiles/gpu.yaml", "profiles/aerial.yaml"])
def test_a_profile_has_every_key_of_params_yaml_so_make_repro_runs_every_stage(path):
    from registry.config import load_promote

    default = yaml.safe_load(Path("params.yaml").read_text())
    profile = yaml.safe_load(Path(path).read_text())
    assert _keys(default) - _keys(profile) == set(), f"cp {path} params.yaml would leave these out"
    load_promote(path)
