"""Work that needs torch, done in a child process (``python -m pruning_core.weights``): the API never
imports torch and never unpickles. The child gets a minimal environment (no database URL, no keys, no
GPU), a time limit, and at most ``TORCH_CHILDREN`` of them run at once."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pruning_core
from pruning_core.settings import Settings

log = logging.getLogger("api.torch_child")

# The child imports the same pruning_core as this process (the directory that holds the package).
_IMPORT_ROOT = Path(pruning_core.__file__).resolve().parent.parent
_ENV_KEEP = ("PATH", "PYTHONPATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "SYSTEMROOT")
KEYS_CACHED = 128  # (model, classes, channels) answers kept, least recently used dropped
_slots: dict[int, threading.BoundedSemaphore] = {}
_slots_lock = threading.Lock()


class Refused(Exception):
    """The child refused the input; the message is one line for the user, ``code`` the engine's,
    ``needed`` the bytes a conversion would have made (code ``too_large`` only)."""

    def __init__(self, line: str, code: str, needed: int | None = None):
        super().__init__(line)
        self.code, self.needed = code, needed


class ChildFailed(Exception):
    """The child did not answer (crashed, killed, timed out); the message is one line."""


def _slot(n: int) -> threading.BoundedSemaphore:
    with _slots_lock:
        return _slots.setdefault(n, threading.BoundedSemaphore(n))


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in _ENV_KEEP}
    # one thread: a conversion is I/O bound, and the API's cores serve requests
    return env | {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run(args: list[str], settings: Settings) -> dict[str, Any]:
    """Run ``python -m pruning_core.weights *args`` and return its JSON answer (blocking: call it from a
    worker thread). Raises Refused for a refused input, ChildFailed when the child gives no answer."""
    timeout = settings.torch_child_timeout_s
    with _slot(settings.torch_children):
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "pruning_core.weights", *args],
                cwd=_IMPORT_ROOT,
                env=_env(),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:  # run() has killed it
            raise ChildFailed(f"gave no answer within {timeout:g} s (TORCH_CHILD_TIMEOUT_S)") from None
    lines = proc.stdout.decode(errors="replace").strip().splitlines()
    try:
        out = json.loads(lines[-1])
    except (IndexError, ValueError):
        log.error("torch child %s exited %s: %s", args[:1], proc.returncode, proc.stderr[-2000:])
        raise ChildFailed(f"exited with status {proc.returncode} without an answer") from None
    if not isinstance(out, dict):
        raise ChildFailed("answered something other than a JSON object")
    if "error" in out:
        needed = out.get("bytes")
        raise Refused(
            str(out["error"]), str(out.get("code", "")), needed if isinstance(needed, int) else None
        )
    return out


_keys_cache: OrderedDict[tuple[str, int, int], list[dict[str, Any]]] = OrderedDict()
_keys_lock = threading.Lock()


def expected_keys(name: str, num_classes: int, in_channels: int, settings: Settings) -> list[dict[str, Any]]:
    """``[{"key", "shape", "dtype"}]`` of model ``name``'s state dict, from a child that builds it;
    kept, as the answer changes only with the code and a child takes seconds. Raises like ``run``."""
    key = (name, num_classes, in_channels)
    with _keys_lock:
        if (hit := _keys_cache.get(key)) is not None:
            _keys_cache.move_to_end(key)
            return hit
    keys = run(["keys", name, str(num_classes), str(in_channels)], settings)["keys"]
    with _keys_lock:
        _keys_cache[key] = keys
        while len(_keys_cache) > KEYS_CACHED:
            _keys_cache.popitem(last=False)
    return keys
