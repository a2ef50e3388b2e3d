"""The aerial profile from a clone: its sources are the repository's imagery/, and its real ETL keeps every place in
one split, with a test split of several places and sensors (what the README's aerial figures are measured on)."""

import json
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.config import load_params
from pipeline.etl import run_etl
from tests.conftest import REPO

PROFILE = "profiles/aerial.yaml"
LEFT_OUT = {"aerial/s2_l2a_westsahara_desert_rgbn_100m.tif", "geotiff/landsat_4band_2020.tif",  # the profile says why
            "geotiff/landsat8_rgb_uint16.tif"}
# Places of several images, each one split group (etl.group_regex).
PLACES = {"naip": 4, "landsat7": 2, "landsat8": 1, "monterey": 8, "quebec": 2, "kampala": 3}
# The split the README's aerial figures rest on (split_seed 35): four places from four sensors.
TEST_GROUPS = {"aerial/drone_usgs_golfcourse.png", "landsat8", "naip", "realsat/spacenet6_rotterdam_urban.png"}


def test_the_profile_reads_only_the_repositorys_imagery():
    params = load_params(REPO / PROFILE)
    imagery = (REPO / "imagery").resolve()
    for source in params.sources:
        path = (REPO / source).resolve()
        assert path.exists() and path.is_relative_to(imagery), source
    used = {f"{Path(s).name}/{p.name}" for s in params.sources if (REPO / s).is_dir() for p in (REPO / s).iterdir()}
    used |= {f"{Path(s).parent.name}/{Path(s).name}" for s in params.sources if (REPO / s).is_file()}
    images = {f"{p.parent.name}/{p.name}" for p in imagery.glob("*/*") if p.suffix in (".png", ".tif")}
    assert images - used == LEFT_OUT


def test_the_profiles_etl_keeps_places_apart_and_tests_on_several(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the profile's paths are relative to the repository, as `make repro` runs them
    report = run_etl(load_params(PROFILE), tmp_path / "data")
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert manifest["skipped"] == [] and report.manifest["inputs"]["tiles_kept"] > 700
    assert len(manifest["sources"]) == 28
    rows = {split: pq.read_table(tmp_path / "data" / f"{split}.parquet", columns=["source_id", "group_id"]).to_pylist()
            for split in ("train", "val", "test")}
    groups = {split: {r["group_id"] for r in split_rows} for split, split_rows in rows.items()}
    assert not groups["train"] & groups["val"] and not groups["train"] & groups["test"]
    assert not groups["val"] & groups["test"]
    for place, images in PLACES.items():  # every image of a place in that place's group, in one split
        sources = {r["source_id"] for split_rows in rows.values() for r in split_rows if r["group_id"] == place}
        assert len(sources) == images, (place, sorted(sources))
    assert groups["test"] == TEST_GROUPS
    assert len({r["source_id"] for r in rows["test"]}) == 7
    assert len(groups["val"]) >= 3 and len(rows["train"]) > len(rows["test"]) + len(rows["val"])
