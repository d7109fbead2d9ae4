"""Where artifact and upload files live: one interface, ``ObjectStore``, with two backends.

- ``LocalStore``: a directory on this host (``ARTIFACT_ROOT``, ``UPLOAD_ROOT``), the embedded default;
  its objects are plain files, and the API serves them as before.
- ``S3Store``: a bucket of any S3-compatible server (``OBJECT_STORE_URL=s3://bucket/prefix``,
  ``S3_ENDPOINT_URL`` for MinIO and the like), through boto3; API and workers on different hosts then
  see the same files. Credentials come from boto3's usual sources (``AWS_ACCESS_KEY_ID``, ...).

Keys are the relative paths the database rows keep (``<job>/attempt-<n>/<name>``, ``<dir>/<name>``),
the same in both backends, so a row never names a host path. boto3 is imported only when an S3 store is
made: the local default never loads it.
"""

from __future__ import annotations

import functools
import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

from pruning_core.settings import Settings

from .files import remove_job_dir, resolve_under, sha256_file

T = TypeVar("T")

CHUNK = 1 << 20  # bytes per read when streaming an object
MULTIPART_BYTES = 16 * 1024**2  # files larger than this go up in parts of this size (S3 multipart upload)


@dataclass(frozen=True)
class ObjectInfo:
    """An object's size in bytes, and the sha256 (hex) recorded with it when it was put, if any."""

    size: int
    sha256: str | None = None


class ObjectStore(Protocol):
    """The operations the service needs of a store; keys are relative POSIX paths."""

    remote: bool  # False: a directory on this host, whose files are the objects

    def local_path(self, key: str) -> Path | None:
        """The object's own file when the store is a directory on this host (ValueError for a key that
        leaves it); None for a remote store."""

    def stat(self, key: str) -> ObjectInfo | None:
        """Size (and recorded sha256) of the object, None if there is none."""

    def put_file(self, key: str, src: Path, *, sha256: str | None = None, move: bool = False) -> None:
        """Store the file ``src`` as ``key`` (streamed; never read whole into memory). ``move``: the
        source may be consumed (renamed into place, or removed once uploaded)."""

    def put_bytes(self, key: str, data: bytes) -> None:
        """Store a small object (a leaderboard, a report) whole."""

    def read_bytes(self, key: str) -> bytes:
        """A small object's content; FileNotFoundError when missing."""

    def iter_range(self, key: str, start: int, end: int) -> Iterator[bytes]:
        """The bytes ``[start, end)`` of the object, in chunks of at most CHUNK bytes."""

    def download(self, key: str, dest: Path) -> None:
        """Copy the object to the local file ``dest`` (written whole, then renamed)."""

    def list(self, prefix: str = "") -> list[str]:
        """Every key that starts with ``prefix``, sorted."""

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object whose key starts with ``prefix`` (a directory: end it with ``/``);
        returns how many."""

    def delete(self, keys: list[str]) -> int:
        """Delete these objects (missing ones are skipped); returns how many were asked for."""

    def presign(self, key: str, expires_s: int, *, filename: str, media_type: str) -> str | None:
        """A URL that downloads the object without credentials for ``expires_s`` seconds; None when the
        store cannot make one (a local directory)."""

    def ping(self) -> None:
        """Raise (``StoreUnavailable``, ``OSError``) unless the store can be written now; quick (a
        readiness probe calls it)."""


def check_key(key: str) -> str:
    """``key`` if it is a relative path without ``..``, NUL or empty parts (the rule ``resolve_under``
    applies to a directory, applied to a bucket's keys too); ValueError otherwise."""
    parts = key.split("/")
    if not key or "\x00" in key or "\\" in key or key.startswith("/") or ".." in parts or "" in parts[:-1]:
        raise ValueError(f"key {key!r} is not a relative path")
    return key


def _tmp_beside(dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    return dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.part")


# --- a directory on this host ---


class StoreUnavailable(RuntimeError):
    """The bucket could not be reached or refused the service (down, a timeout, a 5xx, a missing bucket,
    rejected credentials): the caller's request may succeed later (the API answers 503)."""


# S3 error codes that say the store, not the request, is wrong: the bucket is gone or the keys are refused.
_UNAVAILABLE_CODES = frozenset(
    {"NoSuchBucket", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "SlowDown"}
)


def _unavailable(fn: Callable[..., T]) -> Callable[..., T]:
    """Turn boto's connection errors, timeouts and 5xx answers into ``StoreUnavailable``; a missing key
    and every other answer stay what they were."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(*args, **kwargs)
        except (BotoCoreError, S3UploadFailedError) as err:  # the latter wraps the upload's ClientError
            raise StoreUnavailable(f"the object store is unreachable: {type(err).__name__}") from err
        except ClientError as err:
            status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            code = err.response.get("Error", {}).get("Code", "")
            if status >= 500 or code in _UNAVAILABLE_CODES:
                raise StoreUnavailable(f"the object store refused the service: {code or status}") from err
            raise

    return wrapper


class LocalStore:
    """Objects as files under ``root`` (the behaviour the service always had)."""

    remote = False

    def __init__(self, root: Path):
        self.root = root

    def local_path(self, key: str) -> Path:
        return resolve_under(self.root, key)

    def stat(self, key: str) -> ObjectInfo | None:
        try:
            return ObjectInfo(self.local_path(key).stat().st_size)
        except (OSError, ValueError):
            return None

    def put_file(self, key: str, src: Path, *, sha256: str | None = None, move: bool = False) -> None:
        dest = self.local_path(key)
        if src.resolve() == dest:  # the worker wrote it in place (its scratch is the store)
            return
        dest.parent.mkdir(parents=True, exist_ok=True)
        if move:
            os.replace(src, dest)
            return
        tmp = _tmp_beside(dest)
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)

    def put_bytes(self, key: str, data: bytes) -> None:
        dest = self.local_path(key)
        tmp = _tmp_beside(dest)
        tmp.write_bytes(data)
        os.replace(tmp, dest)

    def read_bytes(self, key: str) -> bytes:
        return self.local_path(key).read_bytes()

    def iter_range(self, key: str, start: int, end: int) -> Iterator[bytes]:
        with self.local_path(key).open("rb") as f:
            f.seek(start)
            while start < end and (block := f.read(min(CHUNK, end - start))):
                start += len(block)
                yield block

    def download(self, key: str, dest: Path) -> None:
        tmp = _tmp_beside(dest)
        shutil.copyfile(self.local_path(key), tmp)
        os.replace(tmp, dest)

    def list(self, prefix: str = "") -> list[str]:
        if not self.root.is_dir():
            return []
        keys = (p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file())
        return sorted(k for k in keys if k.startswith(prefix))

    def delete_prefix(self, prefix: str) -> int:
        """A directory prefix (``<dir>/``) is removed whole; a symlink there is unlinked, never followed."""
        check_key(prefix.rstrip("/"))
        if not prefix.endswith("/"):
            return self.delete(self.list(prefix))
        path = self.root / prefix.rstrip("/")
        n = sum(1 for p in path.rglob("*") if p.is_file()) if path.is_dir() and not path.is_symlink() else 0
        return n if remove_job_dir(self.root, prefix.rstrip("/")) else 0

    def delete(self, keys: list[str]) -> int:
        for key in keys:
            self.local_path(key).unlink(missing_ok=True)
        return len(keys)

    def presign(self, key: str, expires_s: int, *, filename: str, media_type: str) -> str | None:
        return None

    # --- an S3-compatible bucket ---

    def ping(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise PermissionError(f"{self.root} is not writable")


class S3Store:
    """Objects under ``prefix`` in ``bucket``; ``client`` is a boto3 S3 client (thread-safe, shared).
    ``presigner``: the client that signs download URLs, made for the address clients reach (a presigned
    URL's signature covers its host); default ``client``."""

    remote = True

    def __init__(
        self, client: Any, bucket: str, prefix: str = "", presigner: Any = None, endpoint: str | None = None
    ):
        self.client, self.bucket, self.endpoint = client, bucket, endpoint
        self.presigner = presigner or client
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""

    def _k(self, key: str) -> str:
        return self.prefix + check_key(key)

    def local_path(self, key: str) -> None:
        check_key(key)
        return None

    @_unavailable
    def stat(self, key: str) -> ObjectInfo | None:
        from botocore.exceptions import ClientError

        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._k(key))
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        return ObjectInfo(int(head["ContentLength"]), (head.get("Metadata") or {}).get("sha256"))

    @_unavailable
    def put_file(self, key: str, src: Path, *, sha256: str | None = None, move: bool = False) -> None:
        from boto3.s3.transfer import TransferConfig

        extra: dict[str, Any] = {"Metadata": {"sha256": sha256}} if sha256 else {}
        config = TransferConfig(multipart_threshold=MULTIPART_BYTES, multipart_chunksize=MULTIPART_BYTES)
        self.client.upload_file(str(src), self.bucket, self._k(key), ExtraArgs=extra, Config=config)
        if move:
            src.unlink(missing_ok=True)

    @_unavailable
    def put_bytes(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._k(key), Body=data)

    @_unavailable
    def read_bytes(self, key: str) -> bytes:
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._k(key))["Body"].read()
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
                raise FileNotFoundError(key) from None
            raise

    def iter_range(self, key: str, start: int, end: int) -> Iterator[bytes]:
        if end <= start:
            return
        obj = self.client.get_object(Bucket=self.bucket, Key=self._k(key), Range=f"bytes={start}-{end - 1}")
        body = obj["Body"]
        try:
            yield from body.iter_chunks(CHUNK)
        finally:
            body.close()

    @_unavailable
    def download(self, key: str, dest: Path) -> None:
        tmp = _tmp_beside(dest)
        try:
            self.client.download_file(self.bucket, self._k(key), str(tmp))
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)

    @_unavailable
    def list(self, prefix: str = "") -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix + prefix
        )
        n = len(self.prefix)
        return sorted(o["Key"][n:] for page in pages for o in page.get("Contents", ()))

    def delete_prefix(self, prefix: str) -> int:
        return self.delete(self.list(prefix))

    @_unavailable
    def delete(self, keys: list[str]) -> int:
        for i in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": self._k(k)} for k in keys[i : i + 1000]]
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
        return len(keys)

    def presign(self, key: str, expires_s: int, *, filename: str, media_type: str) -> str:
        params = {
            "Bucket": self.bucket,
            "Key": self._k(key),
            "ResponseContentType": media_type,
            "ResponseContentDisposition": f'attachment; filename="{filename}"',
        }
        return self.presigner.generate_presigned_url("get_object", Params=params, ExpiresIn=expires_s)

    @_unavailable
    def ping(self) -> None:
        s3_client(self.endpoint, quick=True).head_bucket(Bucket=self.bucket)


@lru_cache(maxsize=8)
def s3_client(endpoint_url: str | None, *, quick: bool = False) -> Any:
    """One boto3 client per endpoint (clients are thread-safe; making one costs ~50 ms). Path-style
    addressing: MinIO and most S3-compatible servers serve buckets under the path, not a subdomain.
    ``quick``: for probes, one attempt with 2 s timeouts instead of 5 attempts at boto's 60 s."""
    import boto3
    from botocore.config import Config

    config = Config(
        signature_version="s3v4",
        s3={"addressing_style": "path"},
        retries={"max_attempts": 1 if quick else 5, "mode": "standard"},
        connect_timeout=2 if quick else 60,
        read_timeout=2 if quick else 60,
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)


def parse_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ``("bucket", "some/prefix")``; ValueError for anything else."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise ValueError(f"OBJECT_STORE_URL must look like s3://bucket/prefix, not {url!r}")
    return parts.netloc, parts.path.strip("/")


def _store(settings: Settings, kind: str, local_root: Path) -> ObjectStore:
    if not settings.object_store_url:
        return LocalStore(local_root)
    bucket, prefix = parse_url(settings.object_store_url)
    public = settings.s3_public_url or settings.s3_endpoint_url
    return S3Store(
        s3_client(settings.s3_endpoint_url),
        bucket,
        str(PurePosixPath(prefix, kind)),
        s3_client(public),
        endpoint=settings.s3_endpoint_url,
    )


def artifact_store(settings: Settings) -> ObjectStore:
    """Job and sweep artifacts: ``ARTIFACT_ROOT``, or ``<OBJECT_STORE_URL>/artifacts/``."""
    return _store(settings, "artifacts", settings.artifacts_dir)


def upload_store(settings: Settings) -> ObjectStore:
    """Uploaded weights and data sets: ``UPLOAD_ROOT``, or ``<OBJECT_STORE_URL>/uploads/``."""
    return _store(settings, "uploads", settings.uploads_dir)


def local_copy(
    store: ObjectStore,
    key: str,
    cache: Path,
    sha256: str | None = None,
    *,
    cache_max_bytes: int | None = None,
) -> Path:
    """The object as a file on this host: a local store's own file (FileNotFoundError if missing), or
    a remote object downloaded once into ``cache/<key>`` (keys never change content: an upload's key
    has a random directory) and checked against ``sha256`` (ValueError when it differs). Each use marks
    the copy as recent (its mtime); ``cache_max_bytes``: the least recently used copies go until the
    cache holds at most that many bytes, never the one returned."""
    path = store.local_path(key)
    if path is not None:
        if not path.is_file():
            raise FileNotFoundError(key)
        return path
    dest = resolve_under(cache, key)
    if dest.is_file():
        os.utime(dest)
        return dest
    if store.stat(key) is None:
        raise FileNotFoundError(key)
    tmp = _tmp_beside(dest)
    try:
        store.download(key, tmp)
        if sha256 is not None and sha256_file(tmp) != sha256:
            raise ValueError(f"object {key!r} does not match its recorded sha256")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    if cache_max_bytes is not None:
        evict_lru(cache, cache_max_bytes, keep=dest)
    return dest


def evict_lru(cache: Path, max_bytes: int, *, keep: Path) -> int:
    """Delete the least recently used files under ``cache`` (oldest mtime first; temp files left alone)
    until the rest hold at most ``max_bytes``, never ``keep``; then their emptied directories. Returns
    the number of files deleted. A file another process deletes meanwhile is skipped."""
    files = []
    for path in cache.rglob("*"):
        try:
            st = path.lstat()
        except FileNotFoundError:
            continue
        if stat.S_ISREG(st.st_mode) and not path.name.endswith(".part") and path != keep:
            files.append((st.st_mtime, st.st_size, path))
    total = sum(size for _, size, _ in files) + (keep.stat().st_size if keep.is_file() else 0)
    deleted = 0
    for _, size, path in sorted(files):
        if total <= max_bytes:
            break
        path.unlink(missing_ok=True)
        total -= size
        deleted += 1
        for parent in path.parents:
            if parent == cache or not parent.is_relative_to(cache):
                break
            try:
                parent.rmdir()
            except OSError:  # not empty
                break
    return deleted


def copy_object(src: ObjectStore, src_key: str, dst: ObjectStore, dst_key: str, sha256: str | None) -> None:
    """Copy one object between stores: from a local file, server-side within one bucket, else through
    a temp file on this host (never whole in memory)."""
    path = src.local_path(src_key)
    if path is not None:
        dst.put_file(dst_key, path, sha256=sha256)
        return
    if isinstance(src, S3Store) and isinstance(dst, S3Store) and src.client is dst.client:
        extra = {"Metadata": {"sha256": sha256}, "MetadataDirective": "REPLACE"} if sha256 else {}
        source = {"Bucket": src.bucket, "Key": src._k(src_key)}
        dst.client.copy(source, dst.bucket, dst._k(dst_key), ExtraArgs=extra)
        return
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "object"
        src.download(src_key, local)
        dst.put_file(dst_key, local, sha256=sha256, move=True)
