"""Decode once: a data set's decoded uint8 images cached on disk, shared by the jobs of a host.

One cache file holds one uint8 array (``N x C x S x S``) named by its key: the data's digest, the image
size and ``FORMAT`` (bumped whenever decoding changes what it produces), so a file is never served for
other data or another decoder. Its header carries the shape and the payload's sha256, checked on every
read: a missing, truncated or corrupt file is rebuilt, never served. A writer fills a temporary file and
renames it into place (a reader never sees half a file); a lock file makes a second job that wants the
same array wait for the first one's build and then read it.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

FORMAT = 1  # bump when the decoded pixels of the same files would change (resize rule, colour rule)
_MAGIC = b"PRUNEDEC"
_HEAD = struct.Struct("<8sQ")  # magic, header length in bytes (a JSON object follows)
_CHUNK = 1 << 24


def files_digest(entries: Iterable[tuple[str, int, Path]]) -> str:
    """sha256 over ``(name, label, file bytes)`` of every entry, in order: the identity of a file set."""
    digest = hashlib.sha256()
    for name, label, path in entries:
        digest.update(f"{len(name)}:{name}:{label}:".encode())
        data = path.read_bytes()
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def cache_key(digest: str, size: int, fit: int | None) -> str:
    """The file name stem of one decoded array: digest, image size ``S`` (px), resize rule, format."""
    return f"{digest[:40]}-{size}px-{'fit' if fit else 'own'}-v{FORMAT}"


def cached_images(root: Path, key: str, build: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, bool]:
    """The uint8 array stored under ``root/key``, or ``build()`` stored there first (at most one job of
    a host builds it at a time); also whether it was built now (missing or corrupt before)."""
    path = root / f"{key}.u8"
    images = read_array(path)
    if images is not None:
        return images, False
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f"{key}.lock"):
        images = read_array(path)  # another job may have built it while this one waited
        if images is not None:
            return images, False
        images = build()
        write_array(path, images)
    return images, True


def write_array(path: Path, images: torch.Tensor) -> None:
    """Write a uint8 tensor to ``path`` atomically (temporary file in the same folder, then rename)."""
    payload = np.ascontiguousarray(images.cpu().numpy())
    if payload.dtype != np.uint8:
        raise TypeError(f"the decoded cache holds uint8 arrays, not {payload.dtype}")
    header = json.dumps({"shape": list(payload.shape), "sha256": _sha256(payload)}).encode()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_HEAD.pack(_MAGIC, len(header)) + header)
            f.write(memoryview(payload.reshape(-1)))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_array(path: Path) -> torch.Tensor | None:
    """The uint8 tensor at ``path``; None when it is missing or fails any check (magic, header,
    length, checksum)."""
    try:
        with path.open("rb") as f:
            magic, n = _HEAD.unpack(f.read(_HEAD.size))
            if magic != _MAGIC or n > 1 << 16:
                return None
            header = json.loads(f.read(n))
            shape = tuple(int(d) for d in header["shape"])
            payload = np.fromfile(f, dtype=np.uint8)
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return None
    if payload.size != int(np.prod(shape)) or _sha256(payload) != header["sha256"]:
        return None
    return torch.from_numpy(payload.reshape(shape))


def _sha256(array: np.ndarray) -> str:
    digest = hashlib.sha256()
    flat = memoryview(array.reshape(-1))
    for start in range(0, len(flat), _CHUNK):
        digest.update(flat[start : start + _CHUNK])
    return digest.hexdigest()


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` for the block (no lock where ``fcntl`` is missing)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: the rename still keeps readers safe; two builds may race
        yield
        return
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
