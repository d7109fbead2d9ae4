"""A job's artifacts: the list, and each file with its sha256 as ETag and digest headers, conditional
GETs (If-None-Match -> 304) and byte ranges (Starlette's FileResponse; 416 answered here as a problem).
Files are found only through their database row, resolved under the artifact root.

A file is served only while it still is what its row says: the same size, and, once it has changed on
disk since it was recorded (its ctime is later than the row), the same sha256, re-hashed once per
change and remembered. A file that no longer matches is never served under its stale digest: 410
``artifact-corrupt`` (what was recorded is gone), logged for the operator.
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
from fastapi.responses import FileResponse
from starlette.types import Receive, Scope, Send

from store import files, repo

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
        settings.artifacts_dir,
        RecordedFile(art.name, art.path, art.size, art.sha256, art.media_type, art.created_at),
        range_,
        if_none_match,
        what=f"job {job_id}",
    )


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
    root: Path, rec: RecordedFile, range_: str | None, if_none_match: str | None, *, what: str
) -> Response:
    """The file, checked against its record (404 missing, 410 changed on disk), with ETag, Repr-Digest,
    If-None-Match (304) and single byte ranges (206 / 416): for job artifacts and sweep files alike."""
    name = rec.name
    try:
        path: Path = files.resolve_under(root, rec.path)
        stat = path.stat()
    except (ValueError, OSError):
        raise Problem(404, f"The file of artifact {name!r} is missing.", slug="artifact-not-found") from None
    if not check_unchanged(path, stat, rec.size, rec.sha256, rec.recorded):
        log.error("artifact %s of %s changed on disk (%s); not served", name, what, path)
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
    state = range_state(range_, stat.st_size) if range_ else "ok"
    if state == "unsatisfiable":
        raise Problem(
            416,
            f"The range {range_!r} is outside the file's {stat.st_size} bytes.",
            slug="range-not-satisfiable",
            headers={"Content-Range": f"bytes */{stat.st_size}"},
        )
    cls = _WholeFile if state == "ignore" else FileResponse
    return cls(path, media_type=rec.media_type, filename=Path(name).name, headers=headers, stat_result=stat)
