"""Folder sources: the real images in imagery/realsat, bad inputs, and the paired HR/LR layout."""

import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from hndsr.config import ConfigError, from_mapping
from pipeline.config import EtlParams, SplitRatios
from pipeline.etl import EtlError, run_etl
from pipeline.sources import SourceError
from tests.compare import assert_same_bytes, digests

REALSAT_GROUPS = r"^(naip_northdakota|oam_kampala)_"


TRAIN_ONLY = SplitRatios(1.0, 0.0, 0.0)  # for folders of fewer images than splits, where splits are not the point


def _params(source, **overrides) -> EtlParams:
    overrides.setdefault("splits", SplitRatios(0.6, 0.2, 0.2))
    return EtlParams(source=source if isinstance(source, list) else str(source), **overrides)


def test_realsat_folder(realsat, tmp_path, dataset_checker):
    params = _params(realsat, group_regex=REALSAT_GROUPS)
    report = run_etl(params, tmp_path / "out")
    manifest = dataset_checker(tmp_path / "out", tile_size=120, scales=params.scales)
    assert manifest["inputs"]["images_read"] == 10
    assert manifest["skipped"] == []
    assert manifest["inputs"]["ignored_files"] == {".md": 1}  # SOURCES.md
    assert {s["id"] for s in manifest["sources"]} == {p.name for p in realsat.glob("*.png")}
    # group_regex: the three NAIP dates of one footprint share a group, hence a split.
    rows = [r for s in ("train", "val", "test") for r in _rows(tmp_path / "out", s)]
    naip_groups = {r["group_id"] for r in rows if r["source_id"].startswith("naip")}
    naip_splits = {r["split"] for r in rows if r["source_id"].startswith("naip")}
    assert naip_groups == {"naip_northdakota"} and len(naip_splits) == 1
    assert report.manifest["splits"]["train"]["rows"] > 0


def _rows(out, split):
    import pyarrow.parquet as pq

    return pq.read_table(out / f"{split}.parquet").to_pylist()


def test_image_grouping_keeps_each_image_in_one_split(realsat, tmp_path):
    run_etl(_params(realsat), tmp_path / "out")
    split_of = {}
    for split in ("train", "val", "test"):
        for row in _rows(tmp_path / "out", split):
            assert split_of.setdefault(row["source_id"], split) == split
            assert row["group_id"] == row["source_id"]


def _png(array) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_bad_inputs_are_skipped_and_reported(realsat, tmp_path, dataset_checker):
    src = tmp_path / "src"
    (src / "nested").mkdir(parents=True)
    shutil.copy(realsat / "landsat8_grenada.png", src / "good.png")
    shutil.copy(realsat / "spacenet6_rotterdam_urban.png", src / "nested" / "good2.PNG")
    whole = (realsat / "korea_snowy_mountain_road.png").read_bytes()
    (src / "truncated.png").write_bytes(whole[: len(whole) // 3])
    (src / "not_an_image.jpg").write_text("this is text pretending to be a JPEG")
    (src / "empty.tif").write_bytes(b"")
    (src / "tiny.png").write_bytes(_png(np.full((50, 60, 3), 128, dtype=np.uint8)))
    (src / "notes.txt").write_text("ignored")
    (src / ".hidden.png").write_bytes(b"ignored: hidden")
    (src / "gif_in_disguise.png").write_bytes(_gif())

    report = run_etl(_params(src, splits=TRAIN_ONLY), tmp_path / "out")
    manifest = dataset_checker(tmp_path / "out", tile_size=120, scales=[2, 2.5, 3, 4])
    reasons = {item["source"]: item["reason"] for item in manifest["skipped"]}
    assert set(reasons) == {"truncated.png", "not_an_image.jpg", "empty.tif", "tiny.png", "gif_in_disguise.png"}
    assert "truncated" in reasons["truncated.png"]
    assert "not a recognised image" in reasons["not_an_image.jpg"]
    assert reasons["empty.tif"] == "empty file"
    assert "smaller than one 120 px tile" in reasons["tiny.png"]
    assert "unsupported format GIF" in reasons["gif_in_disguise.png"]
    assert manifest["inputs"]["images_read"] == 2
    assert {s["id"] for s in manifest["sources"]} == {"good.png", "nested/good2.PNG"}
    assert manifest["inputs"]["ignored_files"] == {".txt": 1}
    assert "(5 skipped)" in report.summary()


def _gif() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (200, 200), "red").save(buffer, format="GIF")
    return buffer.getvalue()


def test_a_failed_run_leaves_the_previous_output_untouched(realsat, tmp_path):
    out = tmp_path / "out"
    run_etl(_params(realsat), out)
    before = digests(out.iterdir())
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(EtlError, match=r"no usable image in folder .*: all 1 candidates were skipped"):
        run_etl(_params(bad), out)
    assert digests(out.iterdir()) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], "staging folder left behind"


def test_missing_or_empty_sources_are_errors(tmp_path):
    with pytest.raises(SourceError, match=r"source folder .*nowhere does not exist"):
        run_etl(_params(tmp_path / "nowhere"), tmp_path / "out")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "README.md").write_text("no images here")
    with pytest.raises(SourceError, match=r"no images \(.*\) found in folder"):
        run_etl(_params(tmp_path / "docs"), tmp_path / "out")
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "grey.png").write_bytes(_png(np.full((240, 240, 3), 90, dtype=np.uint8)))
    with pytest.raises(EtlError, match="no tiles kept"):
        run_etl(_params(flat), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_exact_duplicates_are_dropped(realsat, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(realsat / "landsat8_grenada.png", src / "a.png")
    shutil.copy(realsat / "landsat8_grenada.png", src / "b.png")
    manifest = run_etl(_params(src, splits=TRAIN_ONLY), tmp_path / "out").manifest
    kept_a, kept_b = (s["tiles_kept"] for s in manifest["sources"])
    assert kept_a > 0 and kept_b == 0
    assert manifest["inputs"]["tiles_dropped"]["duplicate"] == kept_a


def test_paired_layout(realsat, tmp_path, dataset_checker):
    hr_dir, lr_dir = tmp_path / "HR", tmp_path / "LR"
    (hr_dir / "sub").mkdir(parents=True)
    (lr_dir / "sub").mkdir(parents=True)
    pairs = {"korea_snowy_mountain_road": 4, "sub/landsat7_bahamas_crop": 2.5}
    for stem, scale in pairs.items():
        name = stem.split("/")[-1]
        with Image.open(realsat / f"{name}.png") as image:
            image.save(hr_dir / f"{stem}.png")
            size = (round(image.width / scale), round(image.height / scale))
            # A different degradation than ours (nearest) so the test can tell the LR came from the file.
            suffix = ".jpg" if scale == 4 else ".png"  # stems match across suffixes
            image.resize(size, Image.Resampling.NEAREST).save(lr_dir / f"{stem}{suffix}", quality=95)
    shutil.copy(realsat / "landsat8_grenada.png", hr_dir / "unpaired.png")
    (lr_dir / "orphan.png").write_bytes(_png(np.zeros((30, 30, 3), dtype=np.uint8)))

    params = _params(hr_dir, lr_source=str(lr_dir), splits=TRAIN_ONLY)
    run_etl(params, tmp_path / "out")
    manifest = dataset_checker(tmp_path / "out", tile_size=120, scales=params.scales)
    rows = [r for s in ("train", "val", "test") for r in _rows(tmp_path / "out", s)]
    assert {r["lr_origin"] for r in rows} == {"paired"}
    assert {(r["source_id"], r["scale"]) for r in rows} == {
        ("korea_snowy_mountain_road.png", 4.0), ("sub/landsat7_bahamas_crop.png", 2.5)}
    reasons = {s["source"]: s["reason"] for s in manifest["skipped"]}
    assert "no LR image with the same stem" in reasons["unpaired.png"]
    assert "no HR image with the same stem" in reasons["lr:orphan.png"]
    # The LR tile is the co-located crop of the supplied LR image.
    row = next(r for r in rows if r["source_id"].startswith("sub/"))
    with Image.open(lr_dir / "sub" / "landsat7_bahamas_crop.png") as lr_image:
        lr = np.asarray(lr_image.convert("RGB"))
    t = 48
    expected = lr[row["y"] * t // 120 : row["y"] * t // 120 + t, row["x"] * t // 120 : row["x"] * t // 120 + t]
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(row["lr_image"]))), expected)


def test_paired_scale_outside_params_is_skipped(realsat, tmp_path):
    hr_dir, lr_dir = tmp_path / "HR", tmp_path / "LR"
    hr_dir.mkdir()
    lr_dir.mkdir()
    shutil.copy(realsat / "korea_snowy_mountain_road.png", hr_dir / "k.png")
    shutil.copy(realsat / "landsat8_grenada.png", hr_dir / "g.png")
    with Image.open(realsat / "korea_snowy_mountain_road.png") as image:
        image.resize((512, 512)).save(lr_dir / "k.png")
    with Image.open(realsat / "landsat8_grenada.png") as image:
        image.resize((146, 100)).save(lr_dir / "g.png")  # 3x wide, 5x tall
    shutil.copy(realsat / "spacenet6_rotterdam_urban.png", hr_dir / "ok.png")
    with Image.open(realsat / "spacenet6_rotterdam_urban.png") as image:
        image.resize((100, 100)).save(lr_dir / "ok.png")  # 3x: a valid pair
    manifest = run_etl(_params(hr_dir, lr_source=str(lr_dir), scales=[2.5, 3.0], splits=TRAIN_ONLY),
                       tmp_path / "out").manifest
    assert [s["id"] for s in manifest["sources"]] == ["ok.png"]
    reasons = {s["source"]: s["reason"] for s in manifest["skipped"]}
    assert "1024x1024 and LR 512x512 do not match any scale" in reasons["k.png"]
    assert "do not match any scale" in reasons["g.png"]


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "hndsr.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_cli_errors_are_one_line_with_a_non_zero_exit(tmp_path):
    (tmp_path / "params.yaml").write_text("etl:\n  source: missing_folder\n")
    result = _cli("etl", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "hndsr etl: error: source folder missing_folder does not exist")
    (tmp_path / "params.yaml").write_text("etl:\n  scales: [2, 1]\n")
    result = _cli("etl", cwd=tmp_path)
    assert result.returncode == 2
    assert "etl.scales[1]: every scale must be greater than 1" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_runs_the_stage_on_a_folder(realsat, tmp_path):
    (tmp_path / "params.yaml").write_text(f"etl:\n  source: {realsat}\n")
    result = _cli("etl", "--out", "processed", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("etl: read 10 images (0 skipped); tiles ")
    assert sorted(p.name for p in (tmp_path / "processed").iterdir()) == [
        "manifest.json", "test.parquet", "train.parquet", "val.parquet"]


def test_cli_help_explains(tmp_path):
    top = _cli("--help", cwd=tmp_path)
    assert top.returncode == 0 and "etl" in top.stdout and "COMMAND --help" in top.stdout
    etl = _cli("etl", "--help", cwd=tmp_path)
    assert etl.returncode == 0 and "--params" in etl.stdout and "--out" in etl.stdout


def test_config_error_type_is_shared():
    assert issubclass(ConfigError, ValueError)


def test_warns_when_a_folder_source_is_not_a_dvc_dependency(tmp_path, caplog, monkeypatch):
    from pipeline.etl import warn_if_untracked

    monkeypatch.chdir(tmp_path)  # DVC runs stages from the folder of dvc.yaml
    dvc_file = tmp_path / "dvc.yaml"
    dvc_file.write_text("stages:\n  etl:\n    cmd: hndsr etl\n    deps: [pipeline, data/raw]\n")
    with caplog.at_level("WARNING"):
        warn_if_untracked("data/raw", dvc_file)
        warn_if_untracked("data/raw/2024", dvc_file)
        warn_if_untracked("bluemarble", dvc_file)
        assert caplog.messages == []
        warn_if_untracked("elsewhere/imagery", dvc_file)
    assert "add `- elsewhere/imagery` under stages.etl.deps" in caplog.messages[0]


def test_three_images_fill_three_splits_and_two_are_a_clear_error(realsat, tmp_path):
    names = ["landsat8_grenada.png", "spacenet6_rotterdam_urban.png", "landsat7_bahamas_crop.png"]
    src = tmp_path / "three"
    src.mkdir()
    for name in names:
        shutil.copy(realsat / name, src / name)
    params = EtlParams(source=str(src))  # the default 0.8 / 0.1 / 0.1: hash thresholds alone leave splits empty
    manifest = run_etl(params, tmp_path / "out").manifest
    assert manifest["split_assignment"] == "ranked"
    assert [manifest["splits"][s]["sources"] for s in ("train", "val", "test")] == [1, 1, 1]

    (src / names[0]).unlink()
    with pytest.raises(EtlError, match=r"split.* empty: 2 source images \(or etl.group_regex groups\) with kept "
                                       r"tiles for 3 splits .* add images \(at least 3 usable\), or set the share"):
        run_etl(params, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == manifest  # the previous output stays


def test_enough_images_keep_the_hash_assignment(realsat, tmp_path):
    manifest = run_etl(_params(realsat), tmp_path / "out").manifest
    assert manifest["split_assignment"] == "hash"  # adding data never moves a group between splits


def test_a_list_of_sources_is_one_folder_of_their_folders(realsat, geotiff, tmp_path):
    """etl.source as a list (folders and single files): keys start with each source's folder name, and the dataset
    is the one a folder holding those folders would give, byte for byte."""
    files = [realsat / "landsat8_grenada.png", realsat / "korea_snowy_mountain_road.png",
             realsat / "naip_northdakota_2010.png"]
    picked = tmp_path / "picked" / "realsat"
    picked.mkdir(parents=True)
    for path in files:
        shutil.copy(path, picked / path.name)
    (tmp_path / "picked" / "geotiff").mkdir()
    shutil.copy(geotiff / "landsat7_rgb_byte_nodata.tif", tmp_path / "picked" / "geotiff")
    listed = run_etl(_params([str(picked), str(geotiff / "landsat7_rgb_byte_nodata.tif")]), tmp_path / "a").manifest
    whole = run_etl(_params(tmp_path / "picked"), tmp_path / "b").manifest
    assert sorted(s["id"] for s in listed["sources"]) == [
        "geotiff/landsat7_rgb_byte_nodata.tif", "realsat/korea_snowy_mountain_road.png",
        "realsat/landsat8_grenada.png", "realsat/naip_northdakota_2010.png"]
    assert listed["dataset_hash"] == whole["dataset_hash"]
    for split in ("train", "val", "test"):
        assert_same_bytes(tmp_path / "a" / f"{split}.parquet", tmp_path / "b" / f"{split}.parquet")


def test_bad_lists_of_sources_say_what_to_fix(realsat, tmp_path):
    with pytest.raises(ConfigError, match=r"etl\.source: expected a string or a list of strings, got 5"):
        from_mapping(EtlParams, {"source": 5}, where="etl")
    with pytest.raises(ConfigError, match="paired LR images need a single etl.source"):
        EtlParams(source=[str(realsat), str(tmp_path)], lr_source=str(tmp_path))
    twin = tmp_path / "other" / "realsat"
    twin.mkdir(parents=True)
    shutil.copy(realsat / "landsat8_grenada.png", twin)
    with pytest.raises(SourceError, match="both hold realsat/landsat8_grenada.png"):
        run_etl(_params([str(realsat), str(twin)]), tmp_path / "out")
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(SourceError, match="is neither a folder nor an image file"):
        run_etl(_params([str(realsat), str(tmp_path / "notes.txt")]), tmp_path / "out")
