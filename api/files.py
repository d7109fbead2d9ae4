"""Uploaded files: streamed to a temp file under the upload root while hashed and size-capped, sniffed
by content (never by name), then moved into place: the upload directory, or the bucket of the object
store (store/objects.py), where the temp file goes up in parts. Nothing half-written survives an error."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
import uuid
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import anyio

from store.objects import ObjectStore

from .problems import Problem

log = logging.getLogger(__name__)

TMP_DIR = ".tmp"
MAX_SAFETENSORS_HEADER = 100 * 1024**2  # the safetensors format's own cap on the JSON header
# Headers up to this size are parsed here (milliseconds); a larger one (a model with many thousands of
# tensors, or a header made to be slow to parse) is only checked for its braces, and the worker's
# safetensors loader parses it (a bad one fails the job as `bad_weights`).
PARSED_SAFETENSORS_HEADER = 1024**2
DATASET_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
PYTORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")  # converted to .safetensors


@dataclass
class Received:
    path: Path  # the temp file
    size: int
    sha256: str


def too_large(limit: int) -> Problem:
    return Problem(413, f"The upload is larger than the limit of {limit} bytes.", slug="upload-too-large")


async def receive(chunks: AsyncIterator[bytes], root: Path, limit: int) -> Received:
    """Write ``chunks`` to ``<root>/.tmp/<random>.part`` while hashing; 413 as soon as it passes
    ``limit`` bytes (the temp file is removed on every error, including a client that goes away)."""
    tmp_dir = root / TMP_DIR
    tmp_dir.mkdir(parents=True, exist_ok=True)
    path = tmp_dir / f"{uuid.uuid4().hex}.part"
    h, size = hashlib.sha256(), 0
    try:
        with path.open("xb") as f:
            async for chunk in chunks:
                size += len(chunk)
                if size > limit:
                    raise too_large(limit)
                h.update(chunk)
                await anyio.to_thread.run_sync(f.write, chunk)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return Received(path, size, h.hexdigest())


def _read_head(path: Path, n: int) -> bytes:
    with path.open("rb") as f:
        return f.read(n)


def check_safetensors(path: Path, size: int) -> dict[str, list[int]] | None:
    """415 unless the file is a safetensors file: an 8-byte little-endian header length, then a JSON
    object header that fits in the file (parsed when at most PARSED_SAFETENSORS_HEADER bytes). Returns
    the tensors' names and shapes from a parsed header, None from one that was not parsed."""
    bad = Problem(
        415,
        "Weights must be a safetensors file (8-byte header length, then a JSON header).",
        slug="unsupported-upload-type",
    )
    head = _read_head(path, 9)
    if len(head) < 9:
        raise bad
    (n,) = struct.unpack("<Q", head[:8])
    if n < 2 or n > MAX_SAFETENSORS_HEADER or 8 + n > size or head[8:9] != b"{":
        raise bad
    with path.open("rb") as f:
        if n > PARSED_SAFETENSORS_HEADER:
            f.seek(8 + n - 1)
            if f.read(1) not in (b"}", b" "):  # the format pads the header with spaces
                raise bad
            return None
        f.seek(8)
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except ValueError:
        raise bad from None
    if not isinstance(header, dict):
        raise bad
    return {
        name: [int(n) for n in entry["shape"]]
        for name, entry in header.items()
        if name != "__metadata__"
        and isinstance(entry, dict)
        and isinstance(entry.get("shape"), list)
        and all(isinstance(n, int) for n in entry["shape"])
    }


def _is_tar(block: bytes) -> bool:
    return len(block) >= 262 and block[257:262] == b"ustar"


def _gunzip_head(path: Path, n: int = 512) -> bytes:
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    out = b""
    with path.open("rb") as f:
        while len(out) < n and (chunk := f.read(64 * 1024)):
            try:
                out += d.decompress(chunk, n - len(out))
            except zlib.error:
                return b""
            if d.eof:
                break
    return out


def dataset_suffix(path: Path) -> str:
    """The archive type by magic bytes (``.zip``, ``.tar.gz``, ``.tar``); 415 for anything else."""
    head = _read_head(path, 512)
    if head[:4] == b"PK\x03\x04":
        return ".zip"
    if head[:2] == b"\x1f\x8b" and _is_tar(_gunzip_head(path)):
        return ".tar.gz"
    if _is_tar(head):
        return ".tar"
    raise Problem(
        415,
        "A dataset must be a .tar.gz/.tgz, .tar or .zip archive (checked by content).",
        slug="unsupported-upload-type",
    )


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(filename: str, suffix: str, default: str) -> str:
    """A file name for disk: the base name, odd characters replaced, ending in ``suffix`` (the type the
    content was sniffed as, which the engine's loaders go by)."""
    base = _UNSAFE.sub("_", os.path.basename(filename.replace("\\", "/"))).strip("._")[:200] or default
    low = base.lower()
    for known in (*DATASET_SUFFIXES, *PYTORCH_SUFFIXES, ".safetensors"):
        if low.endswith(known):
            base = base[: -len(known)] or default
            break
    return base + suffix


def place(tmp: Path, store: ObjectStore, name: str, sha256: str) -> str:
    """Store the checked temp file as ``<random dir>/<name>`` (renamed into an upload directory, or
    sent to the bucket in parts); the temp file is gone afterwards, stored or not. Returns the key."""
    key = f"{uuid.uuid4().hex}/{name}"
    try:
        store.put_file(key, tmp, sha256=sha256, move=True)
    finally:
        tmp.unlink(missing_ok=True)
    return key


def discard(store: ObjectStore, key: str) -> None:
    """Remove a stored upload and its directory (the database insert failed, or it was deleted); an
    error is logged, never raised (a leftover file costs storage, and no row points at it)."""
    parent = PurePosixPath(key).parent.as_posix()
    try:
        store.delete_prefix(f"{parent}/") if parent != "." else store.delete([key])
    except Exception:
        log.warning("could not remove the stored upload %r", key, exc_info=True)
