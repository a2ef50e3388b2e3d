import pytest
import yaml

from hndsr.config import ConfigError
from pipeline.config import EtlParams, load_params


def _write(tmp_path, etl):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"etl": etl}))
    return path


def test_the_repository_params_are_valid():
    params = load_params("params.yaml")
    assert params.source == "bluemarble"
    assert any(s != int(s) for s in params.scales), "the default scales must include a non-integer one"
    assert params.effective_group_by == "block"


@pytest.mark.parametrize(
    ("etl", "message"),
    [
        ({"tile_sise": 120}, r"etl\.tile_sise: unknown key"),
        ({"splits": {"train": 0.8, "val": 0.1, "test": 0.2}}, r"etl\.splits: train \+ val \+ test must sum to 1"),
        ({"splits": {"train": 0.8, "val": 0.1, "tset": 0.1}}, r"etl\.splits\.tset: unknown key"),
        ({"splits": {"train": 1.2, "val": -0.1, "test": -0.1}}, r"etl\.splits\.train: must be between 0 and 1"),
        ({"scales": [2, 1.0]}, r"etl\.scales\[1\]: every scale must be greater than 1"),
        ({"scales": [0.5]}, r"etl\.scales\[0\]: every scale must be greater than 1"),
        ({"scales": []}, r"etl\.scales: list at least one scale"),
        ({"scales": [2, 2]}, r"etl\.scales: contains duplicates"),
        ({"tile_size": 128, "scales": [2, 3]}, r"etl\.scales\[1\]: tile_size 128 / scale 3\.0 is not a whole"),
        ({"tile_size": "big"}, r"etl\.tile_size: expected an integer"),
        ({"group_by": "tile"}, r"etl\.group_by: must be one of"),
        ({"group_regex": "("}, r"etl\.group_regex: not a valid regular expression"),
        ({"min_tile_std": -1}, r"etl\.min_tile_std: must be >= 0"),
        ({"source": "bluemarble", "lr_source": "lr/"}, r"etl\.lr_source: only a folder or s3"),
        ({"bands": [0, 1, 2]}, r"etl\.bands: list 1-based band indexes"),
        ({"bands": [1, 2, 3, 4], "band_names": ["r", "g", "b"]}, r"etl\.band_names: 3 names for 4 bands"),
        ({"band_names": ["r", "r", "b"]}, r"etl\.band_names: names must be distinct"),
        ({"bands": [1, 2, 3, 4], "source_bands": {"s2/*": [3, 2, 1]}},
         r"etl\.source_bands\.s2/\*: must list 4 1-based band indexes"),
        ({"max_nodata_share": 1.0}, r"etl\.max_nodata_share: must be in \[0, 1\)"),
        ({"radiometry": {"method": "minmax"}}, r"etl\.radiometry\.method: must be one of fixed, percentile"),
        ({"radiometry": {"scale": {"8bit": 100}}}, r"etl\.radiometry\.scale\.8bit: unknown kind"),
        ({"radiometry": {"scale": {"16bit": 0}}}, r"etl\.radiometry\.scale\.16bit: must be a positive number"),
        ({"radiometry": {"percentiles": [99, 1]}}, r"etl\.radiometry\.percentiles: must be \[low, high\]"),
    ],
)
def test_bad_params_are_refused_naming_the_key(tmp_path, etl, message):
    with pytest.raises(ConfigError, match=message):
        load_params(_write(tmp_path, etl))


def test_missing_section_and_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train: {}\n")
    with pytest.raises(ConfigError, match="has no `etl` section"):
        load_params(path)
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")


def test_group_by_auto_means_image_for_folders():
    assert EtlParams(source="imagery/").effective_group_by == "image"
    assert EtlParams(source="imagery/", group_by="block").effective_group_by == "block"
