"""Uploads: the raw request body streamed to disk under a size cap and hashed, checked by content
(safetensors weights, dataset archives), recorded for the caller and referenced as ``upload:<id>``.
An owner lists its uploads and deletes them (not while a queued or running job of its names one);
their total size is held to the owner's quota (api/quotas.py)."""

from __future__ import annotations

import logging
import threading
from typing import Annotated, Literal

from fastapi import APIRouter, Header, Query, Request, Response, status
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from pruning_core.models.weights import is_pytorch_file
from pruning_core.settings import Settings
from store import repo
from store.files import sha256_file
from store.models import Upload
from store.objects import upload_store

from .. import files, quotas, torch_child
from ..auth import OwnerDep
from ..deps import ReadSessionsDep, SessionsDep, SettingsDep
from ..problems import PROBLEM_SCHEMA, Problem
from ..schemas import UploadOut, UploadPage, echo, is_id, upload_out
from .jobs import check_cursor

router = APIRouter(tags=["uploads"], responses={"4XX": PROBLEM_SCHEMA})
log = logging.getLogger("api.uploads")

SHA256_HEX = r"^[0-9a-fA-F]{64}$"
MEDIA = {
    ".safetensors": "application/octet-stream",
    ".zip": "application/zip",
    ".tar.gz": "application/gzip",
    ".tar": "application/x-tar",
}


def _keep(
    got: files.Received,
    sessions: sessionmaker[Session],
    owner: str,
    kind: str,
    filename: str,
    settings: Settings,
    cancel: threading.Event,
) -> tuple[Upload, bool]:
    """Check the received file's type, convert a PyTorch state dict to safetensors, move it into place
    and record it (the file goes if the row fails). Returns (upload, created): the owner's earlier
    upload of the same bytes and kind is returned instead of storing a second copy, before any quota
    check, and also when a concurrent upload of them committed first (the unique constraint).
    ``cancel``: set when the client hangs up (a conversion then stops)."""
    if got.size == 0:
        raise Problem(422, "The upload is empty.", slug="empty-upload")
    if (earlier := _earlier(sessions, owner, kind, got.sha256)) is not None:
        got.path.unlink(missing_ok=True)
        return earlier, False
    pytorch = kind == "weights" and is_pytorch_file(got.path)  # only its first bytes: a child reads it
    with sessions() as s:  # before any work on the file: an owner at her quota costs no conversion
        # a .pth's stored size is known only once converted: it needs at least one byte of room
        quotas.check_upload_bytes(s, owner, 1 if pytorch else got.size, settings)
        room = quotas.upload_room(s, owner, settings)
    stored, tensors = got, None
    if kind == "weights":
        if pytorch:
            stored = _convert(got, sessions, owner, settings, room, cancel)
        tensors = files.check_safetensors(stored.path, stored.size)
        suffix = ".safetensors"
    else:
        suffix = files.dataset_suffix(got.path)
    name = files.safe_name(filename, suffix, kind)
    store = upload_store(settings)
    rel = files.place(stored.path, store, name, stored.sha256)
    try:
        with sessions() as s:
            quotas.check_upload_bytes(s, owner, stored.size, settings)
            up = repo.add_upload(
                s,
                owner,
                kind,
                name,
                rel,
                stored.size,
                stored.sha256,
                MEDIA[suffix],
                source_sha256=got.sha256,
                tensors=tensors,
            )
            s.commit()
    except IntegrityError:  # the same bytes, sent concurrently, were recorded first: answer with those
        files.discard(store, rel)
        if (winner := _earlier(sessions, owner, kind, got.sha256)) is None:
            raise
        return winner, False
    except BaseException:
        files.discard(store, rel)
        raise
    return up, True


def _earlier(sessions: sessionmaker[Session], owner: str, kind: str, sha256: str) -> Upload | None:
    with sessions() as s:
        return repo.find_upload(s, owner, kind, sha256)


def _convert(
    got: files.Received,
    sessions: sessionmaker[Session],
    owner: str,
    settings: Settings,
    room: int | None,
    cancel: threading.Event,
) -> files.Received:
    """The state dict in a ``torch.save`` file as a safetensors temp file beside it, read by a child
    process with ``torch.load(weights_only=True)``, which never makes more than ``MAX_UPLOAD_BYTES`` nor
    the owner's ``room`` left under her quota (it refuses by the tensors' sizes before making any): 413
    or 429 then, 422 with the child's one line when refused otherwise; 503 or 429 when no child can be
    had (``torch_child.Busy``). The PyTorch file is removed either way."""
    dst = got.path.with_suffix(".safetensors")
    limit = settings.max_upload_bytes
    cap = limit if room is None else min(limit, room)
    try:
        torch_child.run(["convert", str(got.path), str(dst), str(cap)], settings, owner, cancel)
        return files.Received(dst, dst.stat().st_size, sha256_file(dst))
    except (torch_child.Busy, torch_child.Gone) as err:
        dst.unlink(missing_ok=True)
        raise torch_child.problem(err) from None
    except torch_child.Refused as err:
        dst.unlink(missing_ok=True)
        if err.code == "too_large" and err.needed is not None:
            if err.needed > limit:
                raise Problem(
                    413,
                    f"The weights would be {err.needed} bytes as safetensors, over the limit of {limit} bytes.",
                    slug="upload-too-large",
                ) from None
            with sessions() as s:
                quotas.check_upload_bytes(s, owner, err.needed, settings)
        raise Problem(422, f"The weights were refused: {err}.", slug="bad-weights") from None
    except torch_child.ChildFailed as err:
        dst.unlink(missing_ok=True)
        raise Problem(
            422, f"The weights could not be converted: the converter {err}.", slug="bad-weights"
        ) from None
    finally:
        got.path.unlink(missing_ok=True)


@router.post(
    "/v1/uploads",
    operation_id="create_upload",
    status_code=status.HTTP_201_CREATED,
    response_model=UploadOut,
    responses={200: {"model": UploadOut, "description": "Your earlier upload of the same bytes"}},
    openapi_extra={
        "requestBody": {"required": True, "content": {"application/octet-stream": {"schema": {}}}}
    },
)
async def create_upload(
    request: Request,
    response: Response,
    owner: OwnerDep,
    settings: SettingsDep,
    sessions: SessionsDep,
    kind: Annotated[Literal["weights", "dataset"], Query()],
    filename: Annotated[str, Query(min_length=1, max_length=255)] = "upload",
    content_length: Annotated[int | None, Header(ge=0, include_in_schema=False)] = None,
) -> UploadOut:
    """Send the file as the raw body (`curl --data-binary @model.safetensors`). Weights are safetensors,
    or a PyTorch state dict (`torch.save(model.state_dict(), "model.pth")`), which the server reads with
    `torch.load(weights_only=True)` in a separate process and stores as safetensors (anything else in
    it, such as a pickled module or code, is refused with a 422 and never run). Datasets are a
    .tar.gz/.tgz, .tar or .zip archive with train/ and test/ class folders. The same bytes sent again
    by the same owner answer 200 with the earlier upload (its `sha256` is the stored file's,
    `source_sha256` the body's), whatever your quota; `GET /v1/uploads?sha256=` finds it before sending.
    A PyTorch file that would be larger than the upload limit as safetensors (its tensors' declared
    sizes) is a 413, larger than your quota's room a 429; its converter answers 503 with Retry-After
    when none is free within a few seconds, 429 when you already have a few requests waiting for one."""
    limit, root = settings.max_upload_bytes, settings.uploads_dir
    if content_length is not None and content_length > limit:
        raise files.too_large(limit)
    # No quota check before the body is read: the same bytes sent again are answered with the earlier
    # upload whatever the quota, and only their hash tells them apart (the body is capped at `limit`).
    got = await files.receive(request.stream(), root, limit)
    try:
        up, created = await torch_child.run_watched(
            request, lambda cancel: _keep(got, sessions, owner, kind, filename, settings, cancel)
        )
    except BaseException:
        got.path.unlink(missing_ok=True)
        raise
    if not created:
        response.status_code = status.HTTP_200_OK
    return upload_out(up)


@router.get("/v1/uploads/{upload_id}", response_model=UploadOut, operation_id="get_upload")
def get_upload(upload_id: str, owner: OwnerDep, sessions: ReadSessionsDep) -> UploadOut:
    with sessions() as s:
        up = repo.get_upload(s, upload_id, owner=owner) if is_id(upload_id) else None
    if up is None:
        raise Problem(404, f"Upload {echo(upload_id)} not found.", slug="upload-not-found")
    return upload_out(up)


@router.get("/v1/uploads", response_model=UploadPage, operation_id="list_uploads")
def list_uploads(
    owner: OwnerDep,
    sessions: ReadSessionsDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
    sha256: Annotated[str | None, Query(pattern=SHA256_HEX, description="the file's sha256 as sent")] = None,
) -> UploadPage:
    """The caller's uploads, newest first. Pass `next_cursor` back as `cursor` for the next page.
    `sha256` keeps those whose body as sent had that hash: a client asks before sending a file twice."""
    if cursor:
        check_cursor(cursor)
    with sessions() as s:
        ups, next_cursor = repo.list_uploads(s, owner, limit=limit, cursor=cursor or None, sha256=sha256)
    return UploadPage(items=[upload_out(u) for u in ups], next_cursor=next_cursor)


@router.delete(
    "/v1/uploads/{upload_id}",
    operation_id="delete_upload",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses={409: PROBLEM_SCHEMA},
)
def delete_upload(upload_id: str, owner: OwnerDep, sessions: SessionsDep, settings: SettingsDep) -> Response:
    """Delete one of your uploads and its file. Refused (409) while a queued or running job of yours
    names it: cancel those first. Finished jobs keep their artifacts; only a rerun would need the file."""
    with sessions() as s:
        if not is_id(upload_id) or repo.get_upload(s, upload_id, owner=owner) is None:
            raise Problem(404, f"Upload {echo(upload_id)} not found.", slug="upload-not-found")
        if using := repo.unfinished_jobs_using(s, upload_id, owner):
            raise Problem(
                409,
                f"Upload {upload_id} is used by {len(using)} queued or running job(s); cancel them first.",
                slug="upload-in-use",
                jobs=using,
            )
        up = repo.delete_upload(s, upload_id, owner)
        s.commit()
    if up is None:  # deleted by a concurrent request meanwhile
        raise Problem(404, f"Upload {upload_id} not found.", slug="upload-not-found")
    # after the row is gone: a leftover file is only storage, never served
    files.discard(upload_store(settings), up.path)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
