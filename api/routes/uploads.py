"""Uploads: the raw request body streamed to disk under a size cap and hashed, checked by content
(safetensors weights, dataset archives), recorded for the caller and referenced as ``upload:<id>``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import anyio
from fastapi import APIRouter, Header, Query, Request, status
from sqlalchemy.orm import Session, sessionmaker

from store import repo
from store.models import Upload

from .. import files
from ..auth import OwnerDep
from ..deps import ReadSessionsDep, SessionsDep, SettingsDep
from ..problems import PROBLEM_SCHEMA, Problem
from ..schemas import UploadOut, echo, is_id, upload_out

router = APIRouter(tags=["uploads"], responses={"4XX": PROBLEM_SCHEMA})

MEDIA = {
    ".safetensors": "application/octet-stream",
    ".zip": "application/zip",
    ".tar.gz": "application/gzip",
    ".tar": "application/x-tar",
}


def _keep(
    got: files.Received, sessions: sessionmaker[Session], owner: str, kind: str, filename: str, root: Path
) -> Upload:
    """Check the received file's type, move it into place and record it (the file goes if the row fails)."""
    if got.size == 0:
        raise Problem(422, "The upload is empty.", slug="empty-upload")
    if kind == "weights":
        files.check_safetensors(got.path, got.size)
        suffix = ".safetensors"
    else:
        suffix = files.dataset_suffix(got.path)
    name = files.safe_name(filename, suffix, kind)
    placed, rel = files.place(got.path, root, name)
    try:
        with sessions() as s:
            up = repo.add_upload(s, owner, kind, name, rel, got.size, got.sha256, MEDIA[suffix])
            s.commit()
    except BaseException:
        files.discard(placed)
        raise
    return up


@router.post(
    "/v1/uploads",
    operation_id="create_upload",
    status_code=status.HTTP_201_CREATED,
    response_model=UploadOut,
    openapi_extra={
        "requestBody": {"required": True, "content": {"application/octet-stream": {"schema": {}}}}
    },
)
async def create_upload(
    request: Request,
    owner: OwnerDep,
    settings: SettingsDep,
    sessions: SessionsDep,
    kind: Annotated[Literal["weights", "dataset"], Query()],
    filename: Annotated[str, Query(min_length=1, max_length=255)] = "upload",
    content_length: Annotated[int | None, Header(ge=0, include_in_schema=False)] = None,
) -> UploadOut:
    """Send the file as the raw body (`curl --data-binary @model.safetensors`). Weights must be
    safetensors; datasets a .tar.gz/.tgz, .tar or .zip archive with train/ and test/ class folders."""
    limit, root = settings.max_upload_bytes, settings.uploads_dir
    if content_length is not None and content_length > limit:
        raise files.too_large(limit)
    got = await files.receive(request.stream(), root, limit)
    try:
        up = await anyio.to_thread.run_sync(_keep, got, sessions, owner, kind, filename, root)
    except BaseException:
        got.path.unlink(missing_ok=True)
        raise
    return upload_out(up)


@router.get("/v1/uploads/{upload_id}", response_model=UploadOut, operation_id="get_upload")
def get_upload(upload_id: str, owner: OwnerDep, sessions: ReadSessionsDep) -> UploadOut:
    with sessions() as s:
        up = repo.get_upload(s, upload_id, owner=owner) if is_id(upload_id) else None
    if up is None:
        raise Problem(404, f"Upload {echo(upload_id)} not found.", slug="upload-not-found")
    return upload_out(up)
