"""Artifact and upload files on disk. Paths stored in the database are relative to a root and are only
ever resolved under it, so a row can never point a download at an arbitrary file."""

from __future__ import annotations

import hashlib
import mimetypes
import shutil
from pathlib import Path

MEDIA_TYPES = {
    ".safetensors": "application/octet-stream",
    ".json": "application/json",
    ".onnx": "application/onnx",
    ".pt": "application/octet-stream",
    ".pt2": "application/octet-stream",
    ".md": "text/markdown",
    ".png": "image/png",
    ".yaml": "application/yaml",
    ".gz": "application/gzip",
}


def media_type(name: str) -> str:
    suffix = Path(name).suffix.lower()
    return MEDIA_TYPES.get(suffix) or mimetypes.guess_type(name)[0] or "application/octet-stream"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def attempt_dir(root: Path, job_id: str, attempt: int) -> Path:
    """``<root>/<job_id>/attempt-<n>/``: one attempt never overwrites another's files."""
    return root / job_id / f"attempt-{attempt}"


def relative_to_root(root: Path, path: Path) -> str:
    return path.resolve().relative_to(root.resolve()).as_posix()


def resolve_under(root: Path, rel: str) -> Path:
    """The absolute path of a stored relative path under ``root``.

    ValueError for an absolute path, one that leaves ``root`` (``..``, or a symlink pointing out), the
    root itself, or a NUL byte."""
    if not rel or "\x00" in rel or Path(rel).is_absolute() or rel.startswith(("/", "\\")):
        raise ValueError(f"path {rel!r} is not a relative path under its root")
    base = root.resolve()
    path = (base / rel).resolve()
    if path == base or not path.is_relative_to(base):
        raise ValueError(f"path {rel!r} escapes its root")
    return path


def remove_job_dir(root: Path, job_id: str) -> bool:
    """Delete ``<root>/<job_id>/`` and everything under it (a deleted job's files), after its row is
    gone. True if it existed. A symlink there is unlinked, never followed; errors are the caller's."""
    path = root / job_id
    if path.is_symlink():
        path.unlink()
        return True
    if not path.exists():
        return False
    resolve_under(root, job_id)  # the id names a directory directly under the root
    shutil.rmtree(path)
    return True
