"""Dataset archives (``.tar.gz``, ``.tgz``, ``.tar``, ``.zip``) extracted safely under a cache directory.

Every member is checked before anything is written: its name (no absolute paths, no ``..``, no hidden or
control characters), its kind (files and directories only: no links, devices or FIFOs), the member
count, the unpacked bytes and the compression ratio, against the operator's ``ARCHIVE_MAX_*`` settings.
The files are written to a temporary directory and renamed into place, so a directory under the cache
is either whole or absent.
"""

from __future__ import annotations

import hashlib
import shutil
import stat
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

from ..errors import DataError, one_line
from ..settings import Settings

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
_RATIO_FLOOR = 1 << 20  # the ratio cap only applies once an archive unpacks to more than this
_COPY_CHUNK = 1 << 20
# what tarfile, gzip and zipfile raise on corrupt, truncated or unsupported input (and disk errors)
_ARCHIVE_READ_ERRORS = (
    tarfile.TarError,
    zipfile.BadZipFile,
    zlib.error,
    EOFError,
    OSError,
    NotImplementedError,
    RuntimeError,
    ValueError,
)


@dataclass
class _Budget:
    """Running totals over an archive's members against the settings' caps (checked before writing)."""

    max_members: int
    max_bytes: int
    max_ratio: float
    packed: int
    members: int = 0
    unpacked: int = 0

    def add(self, size: int) -> None:
        self.members += 1
        self.unpacked += size
        if self.members > self.max_members:
            raise DataError(f"refusing archive: more than {self.max_members} members (ARCHIVE_MAX_MEMBERS)")
        if self.unpacked > self.max_bytes:
            raise DataError(
                f"refusing archive: unpacks to more than {self.max_bytes} bytes (ARCHIVE_MAX_BYTES)"
            )
        if self.unpacked > max(_RATIO_FLOOR, self.max_ratio * self.packed):
            raise DataError(
                f"refusing archive: unpacks to more than {self.max_ratio:g} times its packed size "
                "(ARCHIVE_MAX_RATIO; a possible archive bomb)"
            )


class _Archive(Protocol):
    def scan(self, budget: _Budget) -> list[str]:
        """Check every member (refusing the archive on the first bad one); return the file names."""
        ...

    def extract(self, names: list[str], dest: Path) -> None:
        """Write these files (names from scan) under ``dest``, which must be empty; then verify()."""
        ...

    def verify(self) -> None:
        """Refuse an archive whose listing ended early (truncated or garbled)."""
        ...


def extract_archive(
    path: Path, base: Path, selection: str, settings: Settings, choose: Callable[[list[str]], list[str]]
) -> Path:
    """Extract the files ``choose`` picks from the archive's file names into ``base/<sha256>-<selection>``,
    once, and return that directory. Every member is checked before anything is written (names, types,
    count, unpacked bytes, compression ratio; ``settings.archive_max_*``); the directory appears whole
    or not at all. ``choose`` raises ``DataError`` for a listing it cannot use."""
    if not path.is_file():
        raise DataError(f"imagefolder root {path} does not exist")
    if not path.name.lower().endswith(ARCHIVE_SUFFIXES):
        raise DataError(
            f"imagefolder root {path} is not a directory or a {'/'.join(ARCHIVE_SUFFIXES)} archive"
        )
    final = base / f"{_sha256(path)[:16]}-{selection}"
    if final.is_dir():
        return final
    s = settings
    budget = _Budget(s.archive_max_members, s.archive_max_bytes, s.archive_max_ratio, path.stat().st_size)
    with _archive_errors(path), _open_archive(path) as archive:
        names = archive.scan(budget)
        try:
            chosen = choose(names)
        except DataError:  # a truncated archive may look like a bad layout: say which it is
            archive.verify()
            raise
        base.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=base))
        try:
            archive.extract(chosen, tmp)
            _publish(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


@contextmanager
def _open_archive(path: Path) -> Iterator[_Archive]:
    if path.name.lower().endswith(".zip"):
        with zipfile.ZipFile(path) as zf:
            yield _ZipArchive(zf)
    else:
        with tarfile.open(path, "r:" if path.name.lower().endswith(".tar") else "r:gz") as tf:
            yield _TarArchive(tf)


@contextmanager
def _archive_errors(path: Path) -> Iterator[None]:
    """Turn the archive libraries' errors (corrupt, truncated, unsupported) into one-line DataErrors."""
    try:
        yield
    except DataError:
        raise
    except tarfile.FilterError as err:
        raise DataError(f"refusing archive {path.name}: {one_line(err)}") from None
    except _ARCHIVE_READ_ERRORS as err:
        raise DataError(f"cannot read archive {path.name} (corrupt or truncated?): {one_line(err)}") from None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_COPY_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _publish(tmp: Path, final: Path) -> None:
    """Atomically move a finished extraction into place (another job may have won the race)."""
    try:
        tmp.rename(final)
    except OSError:
        if not final.is_dir():
            raise


def _safe_name(name: str) -> str:
    """The member's normalised relative path; refuses absolute paths, drive letters and ``..``."""
    if name.startswith(("/", "\\")) or (name[1:2] == ":" and name[:1].isalpha()):
        raise DataError(f"refusing archive: member {name[:100]!r} has an absolute path")
    parts = name.replace("\\", "/").split("/")
    if ".." in parts:
        raise DataError(f"refusing archive: member {name[:100]!r} points outside the archive ('..')")
    if "\0" in name:
        raise DataError(f"refusing archive: member {name[:100]!r} has a NUL in its name")
    return "/".join(p for p in parts if p not in ("", "."))


def _refuse_kind(name: str, kind: str) -> DataError:
    return DataError(
        f"refusing archive: member {name[:100]!r} is a {kind}; only files and folders are allowed"
    )


def _target(dest: Path, name: str) -> Path:
    """``dest / name``, checked to stay inside ``dest`` (defence in depth after _safe_name)."""
    target = (dest / name).resolve()
    if not target.is_relative_to(dest.resolve()):
        raise DataError(f"refusing archive: member {name[:100]!r} points outside the archive")
    return target


def _write(src: IO[bytes], target: Path, size: int, name: str) -> None:
    """Copy exactly ``size`` bytes into a new file (never overwriting, never more than declared)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with target.open("xb") as dst:
        while chunk := src.read(min(_COPY_CHUNK, size - written + 1)):
            written += len(chunk)
            if written > size:
                raise DataError(f"refusing archive: member {name[:100]!r} is larger than it declares")
            dst.write(chunk)
    if written != size:
        raise DataError(f"cannot read archive: member {name[:100]!r} is truncated")


_TAR_KINDS = {
    tarfile.SYMTYPE: "symlink",
    tarfile.LNKTYPE: "hard link",
    tarfile.CHRTYPE: "device",
    tarfile.BLKTYPE: "device",
    tarfile.FIFOTYPE: "fifo",
}


class _TarArchive:
    """A (compressed) tar read in two passes: list and check everything, then copy the chosen files."""

    def __init__(self, tar: tarfile.TarFile):
        self.tar = tar
        self.files: dict[str, tarfile.TarInfo] = {}

    def scan(self, budget: _Budget) -> list[str]:
        for member in self.tar:  # checked as listed: a huge member is refused before it is skipped over
            name = _safe_name(member.name)
            if not (member.isfile() or member.isdir()):
                raise _refuse_kind(member.name, _TAR_KINDS.get(member.type, "special member"))
            budget.add(member.size if member.isfile() else 0)
            if member.isfile() and name:
                self.files[name] = member
        return list(self.files)

    def extract(self, names: list[str], dest: Path) -> None:
        members = sorted((self.files[n] for n in set(names)), key=lambda m: m.offset_data)
        for member in members:  # the standard "data" filter too, before anything is written
            tarfile.data_filter(member, str(dest))
        for member in members:
            source = self.tar.extractfile(member)
            assert source is not None  # regular files only
            _write(source, _target(dest, _safe_name(member.name)), member.size, member.name)
        self.verify()  # after the copies, so a compressed stream is read once, forwards

    def verify(self) -> None:
        """The listing must have ended at tar's zero end block, not at truncated or garbled data."""
        stream = self.tar.fileobj
        assert stream is not None
        stream.seek(self.tar.offset)
        block = stream.read(tarfile.BLOCKSIZE)
        if len(block) < tarfile.BLOCKSIZE or block.strip(b"\0"):
            raise DataError("cannot read archive: it is truncated or corrupt (no end-of-archive marker)")
        for _ in range(16):  # read on to the end (bounded), so gzip verifies its checksum
            if not stream.read(1 << 16):
                break


_ZIP_KINDS = {
    stat.S_IFLNK: "symlink",
    stat.S_IFCHR: "device",
    stat.S_IFBLK: "device",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
}


class _ZipArchive:
    """A zip: the central directory is checked as a whole, then the chosen members are copied."""

    def __init__(self, zf: zipfile.ZipFile):
        self.zip = zf
        self.files: dict[str, zipfile.ZipInfo] = {}

    def scan(self, budget: _Budget) -> list[str]:
        for info in self.zip.infolist():
            name = _safe_name(info.filename)
            kind = stat.S_IFMT(info.external_attr >> 16)
            if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                raise _refuse_kind(info.filename, _ZIP_KINDS.get(kind, "special file"))
            if info.flag_bits & 0x1:
                raise _refuse_kind(info.filename, "encrypted file")
            is_file = not info.is_dir() and kind != stat.S_IFDIR
            budget.add(info.file_size if is_file else 0)
            if is_file and name:
                self.files[name] = info
        return list(self.files)

    def extract(self, names: list[str], dest: Path) -> None:
        for name in names:
            info = self.files[name]
            with self.zip.open(info) as source:
                _write(source, _target(dest, name), info.file_size, info.filename)

    def verify(self) -> None:
        """Nothing to do: a zip is listed from its central directory, which a truncation destroys."""
