"""A job's checkpoints beyond this host, when the artifact store is a bucket (OBJECT_STORE_URL).

The engine writes its checkpoints to the attempt's local scratch directory, ``checkpoints/<phase>.pt``,
each replaced whole (``os.replace``). ``CheckpointSync`` sends every new or changed one to the store
while the job runs, so an attempt resumed on another host (the reaper requeued it after this one died)
finds them there: ``fetch_checkpoints`` brings the newest earlier attempt's down before the run. With the
local directory store both do nothing: scratch and store are the same directory.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from pathlib import Path
from types import TracebackType

from store.files import attempt_dir, relative_to_root
from store.objects import ObjectStore

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
SUFFIX = ".pt"  # what the engine resumes from; its ``.tmp`` files are half-written


def _key(store_root: Path, path: Path) -> str:
    return relative_to_root(store_root, path)


def fetch_checkpoints(store: ObjectStore, scratch: Path, job_id: str, attempt: int) -> int | None:
    """Download the checkpoints of the newest earlier attempt that has some in the store into this
    host's ``<scratch>/<job>/attempt-<n>/checkpoints/`` (files already here, of the same size, are
    kept). Returns that attempt, None when there is none (or the store is this host's directory)."""
    if not store.remote:
        return None
    for prev in range(attempt - 1, 0, -1):
        folder = attempt_dir(scratch, job_id, prev) / CHECKPOINTS
        prefix = _key(scratch, folder) + "/"
        keys = [k for k in store.list(prefix) if k.endswith(SUFFIX) and "/" not in k[len(prefix) :]]
        if not keys:
            continue
        for key in keys:
            dest = scratch / key
            info = store.stat(key)
            if info is not None and not (dest.is_file() and dest.stat().st_size == info.size):
                store.download(key, dest)
        log.info("job %s: %d checkpoint(s) of attempt %d fetched from the store", job_id, len(keys), prev)
        return prev
    return None


class CheckpointSync:
    """While a job runs, every ``every_s`` seconds, upload the checkpoints in ``folder`` (under the
    store's local mirror ``scratch``) that are new or changed since the last look. A context manager:
    leaving it on an exception uploads once more (the attempt may be resumed elsewhere); leaving it
    normally does not (a finished job's checkpoints are deleted). No-op for a local store."""

    def __init__(self, store: ObjectStore, scratch: Path, folder: Path, every_s: float):
        self.store, self.scratch, self.folder = store, scratch, folder
        self.every_s = max(0.05, every_s)
        self._sent: dict[str, tuple[int, int]] = {}  # file name -> (size, mtime_ns) when uploaded
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one sync at a time (the thread's and the final one)
        self._thread: threading.Thread | None = None

    def __enter__(self) -> CheckpointSync:
        if self.store.remote:
            self._thread = threading.Thread(target=self._loop, name="checkpoint-sync", daemon=True)
            self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
            if kind is not None:
                self.sync()

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self.sync()

    def sync(self) -> int:
        """Upload what changed; returns how many files. Never raises (the next pass tries again)."""
        if not self.folder.is_dir():
            return 0
        sent = 0
        with self._lock:
            for path in sorted(self.folder.glob(f"*{SUFFIX}")):
                try:
                    sent += self._send(path)
                except Exception:
                    log.warning("checkpoint %s: upload failed; tried again later", path, exc_info=True)
        return sent

    def _send(self, path: Path) -> int:
        st = path.stat()
        mark = (st.st_size, st.st_mtime_ns)
        if self._sent.get(path.name) == mark:
            return 0
        # A hard link holds this version while it goes up (in parts, each read by name): the engine's
        # next save replaces the name, never the linked file's bytes.
        snap = path.with_name(f".{path.stem}.sync")
        snap.unlink(missing_ok=True)
        try:
            os.link(path, snap)
        except OSError:
            shutil.copyfile(path, snap)
        try:
            self.store.put_file(_key(self.scratch, path), snap)
        finally:
            snap.unlink(missing_ok=True)
        self._sent[path.name] = mark
        return 1
