"""The S3 source against a real local S3 server process (moto), through boto3's standard configuration."""

import shutil
import socket

import pytest

from pipeline.config import EtlParams, SplitRatios
from pipeline.etl import run_etl
from pipeline.sources import SourceError, list_source, parse_s3_uri

IMAGES = ["landsat8_grenada.png", "spacenet6_rotterdam_urban.png", "oam_kampala_309606_261636_19.png"]


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return s3_server


@pytest.fixture
def imagery_bucket(s3_env, realsat, request):
    bucket = f"imagery-{request.node.name.replace('_', '-')[:40].lower()}"
    client = s3_env.client()
    client.create_bucket(Bucket=bucket)
    for name in IMAGES:
        client.upload_file(str(realsat / name), bucket, f"scenes/2024/{name}")
    client.put_object(Bucket=bucket, Key="scenes/2024/README.txt", Body=b"not imagery")
    client.put_object(Bucket=bucket, Key="scenes/2024/broken.tif", Body=b"II*\x00 truncated tiff")
    client.put_object(Bucket=bucket, Key="scenes-other/outside_the_prefix.png", Body=b"never listed")
    return bucket


def _params(source: str) -> EtlParams:
    return EtlParams(source=source, splits=SplitRatios(0.6, 0.2, 0.2))


def test_s3_source_matches_the_same_files_in_a_folder(imagery_bucket, realsat, tmp_path, dataset_checker):
    report = run_etl(_params(f"s3://{imagery_bucket}/scenes"), tmp_path / "from_s3")
    manifest = dataset_checker(tmp_path / "from_s3", tile_size=120, scales=[2, 2.5, 3, 4])
    assert manifest["source"] == f"s3://{imagery_bucket}/scenes/"
    assert [s["id"] for s in manifest["sources"]] == [f"2024/{name}" for name in sorted(IMAGES)]
    assert manifest["skipped"] == [{"source": "2024/broken.tif", "reason": manifest["skipped"][0]["reason"]}]
    assert manifest["inputs"]["ignored_files"] == {".txt": 1}

    local = tmp_path / "local" / "2024"
    local.mkdir(parents=True)
    for name in IMAGES:
        shutil.copy(realsat / name, local / name)
    (local / "broken.tif").write_bytes(b"II*\x00 truncated tiff")
    from_folder = run_etl(_params(str(tmp_path / "local")), tmp_path / "from_folder")
    assert from_folder.manifest["dataset_hash"] == report.manifest["dataset_hash"]


def test_trailing_slash_and_prefix_boundaries(imagery_bucket):
    expected = sorted([f"2024/{name}" for name in IMAGES] + ["2024/broken.tif"])
    assert [f.key for f in list_source(f"s3://{imagery_bucket}/scenes/").files] == expected
    assert [f.key for f in list_source(f"s3://{imagery_bucket}/scenes").files] == expected
    everything = [f.key for f in list_source(f"s3://{imagery_bucket}").files]
    assert "scenes-other/outside_the_prefix.png" in everything
    assert parse_s3_uri("s3://b") == ("b", "")
    assert parse_s3_uri("s3://b/a/b/") == ("b", "a/b/")


def test_missing_bucket_is_a_clear_error(s3_env, tmp_path):
    with pytest.raises(SourceError, match=r"S3 bucket 'no-such-bucket' does not exist \(s3://no-such-bucket at http"):
        run_etl(_params("s3://no-such-bucket/x"), tmp_path / "out")


def test_empty_prefix_is_a_clear_error(imagery_bucket, tmp_path):
    with pytest.raises(SourceError, match=r"no images .* found in s3://.*/nothing-here/"):
        run_etl(_params(f"s3://{imagery_bucket}/nothing-here"), tmp_path / "out")


def test_refused_credentials_are_a_clear_error(s3_server_with_auth, monkeypatch, tmp_path):
    for key, value in s3_server_with_auth.env(access_key="AKIAWRONGKEY0000", secret_key="wrong").items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SourceError, match=r"S3 refused the credentials for s3://any-bucket .*InvalidAccessKeyId"):
        run_etl(_params("s3://any-bucket/scenes"), tmp_path / "out")


def test_unreachable_endpoint_is_a_clear_error(s3_server, monkeypatch, tmp_path):
    with socket.socket() as sock:  # a port nothing listens on once the socket is closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    with pytest.raises(SourceError, match=r"cannot reach the S3 endpoint for s3://bucket at http://127.0.0.1"):
        run_etl(_params("s3://bucket/scenes"), tmp_path / "out")


def test_geotiff_sources_on_s3_give_the_same_dataset_as_in_a_folder(s3_env, geotiff, tmp_path, dataset_checker):
    """Rasters on S3 are streamed to a temporary file and read window by window, like local files."""
    names = ["landsat8_rgb_uint16.tif", "landsat7_rgb_byte_nodata.tif"]
    client = s3_env.client()
    client.create_bucket(Bucket="rasters")
    local = tmp_path / "local"
    local.mkdir()
    for name in names:
        client.upload_file(str(geotiff / name), "rasters", f"scenes/{name}")
        shutil.copy(geotiff / name, local / name)
    params = {"tile_size": 60, "scales": [2, 3], "min_tile_std": 1.0, "splits": SplitRatios(1.0, 0.0, 0.0)}
    from_s3 = run_etl(EtlParams(source="s3://rasters/scenes", **params), tmp_path / "from_s3")
    dataset_checker(tmp_path / "from_s3", tile_size=60, scales=[2, 3])
    from_folder = run_etl(EtlParams(source=str(local), **params), tmp_path / "from_folder")
    assert from_s3.manifest["dataset_hash"] == from_folder.manifest["dataset_hash"]
    assert from_s3.manifest["inputs"]["tiles_dropped"]["nodata"] > 0
    for ours, theirs in zip(from_s3.manifest["sources"], from_folder.manifest["sources"], strict=True):
        assert ours == theirs  # id, size, SHA-256, CRS, pixel size, data type, bands
    assert {s["crs"] for s in from_s3.manifest["sources"]} == {"EPSG:32618", "EPSG:32620"}
