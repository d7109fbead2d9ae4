"""A job's artifacts: the list, and each file with its sha256 as ETag and digest headers, conditional
GETs (If-None-Match -> 304) and byte ranges (Starlette's FileResponse; 416 answered here as a problem).
Files are found only through their database row, resolved in the artifact store (store/objects.py):
a local directory, or a bucket whose objects are streamed, or redirected to (S3_PRESIGN).

A file is served only while it still is what its row says: the same size, and, once it has changed on
disk since it was recorded (its ctime is later than the row), the same sha256, re-hashed once per
change and remembered. A file that no longer matches is never served under its stale digest: 410
``artifact-corrupt`` (what was recorded is gone), logged for the operator. An object in a bucket is
checked by its size and the sha256 stored beside it when it was put.
"""

from __future__ import annotations

import base64
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Header, Request, Response
from fastapi.responses import FileResponse, StreamingResponse
from starlette.types import Receive, Scope, Send

from pruning_core.settings import Settings
from store import files, repo
from store.objects import ObjectInfo, ObjectStore, artifact_store

from ..auth import OwnerDep
from ..deps import ReadSessionsDep, SettingsDep
from ..problems import PROBLEM_SCHEMA, Problem
from ..schemas import ARTIFACT_NAME, ArtifactList, artifact_out, echo
from .jobs import owned_job, root_path

log = logging.getLogger("api.artifacts")

router = APIRouter(tags=["artifacts"], responses={"4XX": PROBLEM_SCHEMA})


@router.get("/v1/jobs/{job_id}/artifacts", response_model=ArtifactList, operation_id="list_artifacts")
def list_artifacts(job_id: str, request: Request, sessions: ReadSessionsDep, owner: OwnerDep) -> ArtifactList:
    with sessions() as s:
        owned_job(s, owner, job_id)
        arts = repo.list_artifacts(s, job_id)
    root = root_path(request)
    return ArtifactList(items=[artifact_out(a, root) for a in arts])


def _etag_matches(header: str, etag: str) -> bool:
    """If-None-Match uses the weak comparison: ``W/"x"`` matches ``"x"``; ``*`` matches anything."""
    tags = [t.strip().removeprefix("W/") for t in header.split(",")]
    return "*" in tags or etag in tags


def range_state(header: str, size: int) -> str:
    """``"ok"`` (let FileResponse serve it), ``"ignore"`` (malformed: serve the whole file, as RFC 9110
    allows) or ``"unsatisfiable"`` (416). Mirrors the parsing of Starlette's FileResponse."""
    units, sep, spec = header.partition("=")
    if not sep or units.strip().lower() != "bytes":
        return "ignore"
    ranges = []
    for part in spec.split(","):
        part = part.strip()
        if not part or part == "-" or "-" not in part:
            continue
        first, last = (p.strip() for p in part.split("-", 1))
        try:
            start = int(first) if first else max(size - int(last), 0)
            end = int(last) + 1 if first and last and int(last) < size else size
        except ValueError:
            continue
        ranges.append((start, end))
    if not ranges:
        return "ignore"
    if any(not 0 <= start < size for start, _ in ranges):
        return "unsatisfiable"
    if any(start >= end for start, end in ranges):
        return "ignore"
    return "ok"


class _WholeFile(FileResponse):
    """A FileResponse that ignores the request's Range header (it was malformed)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(k, v) for k, v in scope["headers"] if k != b"range"]
        await super().__call__({**scope, "headers": headers}, receive, send)


ARTIFACT_PATH = "/v1/jobs/{job_id}/artifacts/{name:path}"

# (path, size, mtime, ctime, inode) -> the sha256 the file had then: each changed file is hashed once.
_hashed: OrderedDict[tuple[str, int, int, int, int], str] = OrderedDict()
_hashed_lock = threading.Lock()
HASHED_MAX = 4096


def _digest(path: Path, stat: os.stat_result) -> str:
    key = (str(path), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)
    with _hashed_lock:
        if (known := _hashed.get(key)) is not None:
            _hashed.move_to_end(key)
            return known
    digest = files.sha256_file(path)
    with _hashed_lock:
        _hashed[key] = digest
        while len(_hashed) > HASHED_MAX:
            _hashed.popitem(last=False)
    return digest


def _ns(dt: datetime) -> int:
    return int(dt.timestamp()) * 10**9 + dt.microsecond * 1000


def check_unchanged(
    path: Path, stat: os.stat_result, size: int, sha256: str, recorded: datetime | None
) -> bool:
    """Whether the file still is what its row records: its size, and its sha256 when it changed on disk
    after the row was written (a file untouched since is trusted without reading it)."""
    if stat.st_size != size:
        return False
    return (recorded is not None and stat.st_ctime_ns <= _ns(recorded)) or _digest(path, stat) == sha256


@router.head(ARTIFACT_PATH, operation_id="head_artifact", summary="Head artifact")
@router.get(
    ARTIFACT_PATH,
    operation_id="download_artifact",
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "The file"},
        206: {"description": "A byte range of the file"},
        304: {"description": "Not modified (If-None-Match)"},
        416: PROBLEM_SCHEMA,
    },
)
def download_artifact(
    job_id: str,
    name: str,
    sessions: ReadSessionsDep,
    owner: OwnerDep,
    settings: SettingsDep,
    range_: Annotated[str | None, Header(alias="Range")] = None,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    with sessions() as s:  # closed before the download starts
        owned_job(s, owner, job_id)
        art = repo.get_artifact(s, job_id, name) if ARTIFACT_NAME.fullmatch(name) else None
    if art is None:
        raise Problem(404, f"Job {job_id} has no artifact '{echo(name)}'.", slug="artifact-not-found")
    return serve_recorded_file(
        artifact_store(settings),
        RecordedFile(art.name, art.path, art.size, art.sha256, art.media_type, art.created_at),
        range_,
        if_none_match,
        what=f"job {job_id}",
        presign_s=presign_s(settings),
    )


def presign_s(settings: Settings) -> int | None:
    """Seconds a presigned download URL lives, when downloads redirect to one (S3_PRESIGN)."""
    return settings.s3_presign_expires_s if settings.s3_presign and settings.object_store_url else None


@dataclass(frozen=True)
class RecordedFile:
    """A stored file as its row records it: ``path`` relative to the artifacts root."""

    name: str
    path: str
    size: int
    sha256: str  # hex
    media_type: str
    recorded: datetime | None  # when the row was written; None: always check the digest


def serve_recorded_file(
    store: ObjectStore,
    rec: RecordedFile,
    range_: str | None,
    if_none_match: str | None,
    *,
    what: str,
    presign_s: int | None = None,
) -> Response:
    """The file, checked against its record (404 missing, 410 changed), with ETag, Repr-Digest,
    If-None-Match (304) and single byte ranges (206 / 416): for job artifacts and sweep files alike.
    From a local directory as a FileResponse; from a bucket streamed (or, with ``presign_s``, a 307 to
    a presigned URL valid that many seconds)."""
    name = rec.name
    try:
        path = store.local_path(rec.path)
        info = store.stat(rec.path) if path is None else None
        stat = path.stat() if path is not None else None
    except (ValueError, OSError):
        path = info = stat = None
    if stat is None and info is None:
        raise Problem(404, f"The file of artifact {name!r} is missing.", slug="artifact-not-found") from None
    if not _unchanged(path, stat, info, rec):
        log.error("artifact %s of %s changed in its store (%s); not served", name, what, rec.path)
        raise Problem(
            410,
            f"The file of artifact {name!r} no longer matches its record (its size or sha256 changed on "
            "disk); it is not served. Tell the operator, or run the job again.",
            slug="artifact-corrupt",
        )
    etag = f'"{rec.sha256}"'
    b64 = base64.b64encode(bytes.fromhex(rec.sha256)).decode()
    headers = {
        "ETag": etag,
        "Repr-Digest": f"sha-256=:{b64}:",
        "Digest": f"sha-256={b64}",
        "Accept-Ranges": "bytes",
        "Cache-Control": "private, no-cache",
    }
    if if_none_match and _etag_matches(if_none_match, etag):
        return Response(status_code=304, headers=headers)
    size = stat.st_size if stat is not None else rec.size
    if presign_s and path is None:
        filename = Path(name).name
        url = store.presign(rec.path, presign_s, filename=filename, media_type=rec.media_type)
        if url is not None:
            return Response(status_code=307, headers=headers | {"Location": url})
    state = range_state(range_, size) if range_ else "ok"
    if state == "unsatisfiable":
        raise Problem(
            416,
            f"The range {range_!r} is outside the file's {size} bytes.",
            slug="range-not-satisfiable",
            headers={"Content-Range": f"bytes */{size}"},
        )
    if path is None:
        return _stream(store, rec, range_ if state == "ok" else None, headers)
    cls = _WholeFile if state == "ignore" else FileResponse
    return cls(path, media_type=rec.media_type, filename=Path(name).name, headers=headers, stat_result=stat)


def _unchanged(
    path: Path | None, stat: os.stat_result | None, info: ObjectInfo | None, rec: RecordedFile
) -> bool:
    """A local file: ``check_unchanged``. An object: its size, and the sha256 it was stored with (put
    by the worker or the API beside the bytes; S3 objects are never changed in place)."""
    if path is not None and stat is not None:
        return check_unchanged(path, stat, rec.size, rec.sha256, rec.recorded)
    assert info is not None
    return info.size == rec.size and info.sha256 in (None, rec.sha256)


def _stream(store: ObjectStore, rec: RecordedFile, range_: str | None, headers: dict[str, str]) -> Response:
    """An object streamed from its store: whole (200), or one byte range (206). Several ranges are
    answered with the whole object, which RFC 9110 allows."""
    start, end, status = 0, rec.size, 200
    if range_ and (one := single_range(range_, rec.size)) is not None:
        (start, end), status = one, 206
        headers = headers | {"Content-Range": f"bytes {start}-{end - 1}/{rec.size}"}
    headers = headers | {
        "Content-Length": str(end - start),
        "Content-Disposition": f'attachment; filename="{Path(rec.name).name}"',
    }
    body = store.iter_range(rec.path, start, end)  # a generator: nothing is read until it is iterated
    return _ObjectResponse(body, status_code=status, media_type=rec.media_type, headers=headers)


class _ObjectResponse(StreamingResponse):
    """An object streamed from its store; a HEAD request gets the headers alone (nothing is read)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("method") != "HEAD":
            await super().__call__(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": b""})


def single_range(header: str, size: int) -> tuple[int, int] | None:
    """``[start, end)`` of a satisfiable ``bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` header with one
    range (checked by ``range_state`` first); None for several ranges."""
    spec = header.partition("=")[2]
    parts = [p.strip() for p in spec.split(",") if p.strip() and p.strip() != "-"]
    if len(parts) != 1:
        return None
    first, last = (p.strip() for p in parts[0].split("-", 1))
    if not first:
        return max(size - int(last), 0), size
    return int(first), min(int(last) + 1, size) if last else size
