"""Work that needs torch, done in a child process (``python -m pruning_core.models.child``): the API never
imports torch and never unpickles. The child gets a minimal environment (no database URL, no keys, no
GPU) and a time limit; at most ``TORCH_CHILDREN`` of them run at once.

No owner stalls the others through them: a request waits at most ``TORCH_CHILD_WAIT_S`` for a child
(then ``Busy``, a 503 with Retry-After), each owner has at most ``TORCH_CHILD_PER_OWNER`` requests
waiting for or running one (``Busy``, a 429, beyond), a client that hangs up ends its wait or kills its
child (``run_watched``), and the model-keys cache keeps each owner's answers apart, so one owner's
flood of distinct models evicts only her own.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import anyio
from starlette.requests import Request

import pruning_core
from pruning_core.settings import Settings

from .problems import Problem

log = logging.getLogger("api.torch_child")

T = TypeVar("T")
# The child imports the same pruning_core as this process (the directory that holds the package).
_IMPORT_ROOT = Path(pruning_core.__file__).resolve().parent.parent
_ENV_KEEP = ("PATH", "PYTHONPATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "SYSTEMROOT")
# where the libraries' caches of published weights are (``model.pretrained``)
_ENV_KEEP += ("TORCH_HOME", "XDG_CACHE_HOME", "HF_HOME", "HF_HUB_CACHE")
KEYS_PER_OWNER = 8  # (model, classes, channels) answers kept per owner, her least recently used dropped
# owners whose answers are kept, the least recently active one's dropped (16 x 8: as many answers as
# the one pool for all owners kept)
KEYS_OWNERS = 16
POLL_S = 0.1  # how often a wait or a running child looks at its cancel flag, in seconds
DISCONNECT_POLL_S = 0.25  # how often a waiting request looks whether its client hung up, in seconds
_slots: dict[int, threading.BoundedSemaphore] = {}
_slots_lock = threading.Lock()
_waiting: dict[str, int] = {}  # owner -> requests of hers waiting for or running a child
_waiting_lock = threading.Lock()


class Refused(Exception):
    """The child refused the input; the message is one line for the user, ``code`` the engine's,
    ``needed`` the bytes a conversion would have made (code ``too_large`` only)."""

    def __init__(self, line: str, code: str, needed: int | None = None):
        super().__init__(line)
        self.code, self.needed = code, needed


class ChildFailed(Exception):
    """The child did not answer (crashed, killed, timed out); the message is one line."""


class Busy(Exception):
    """No child for this request now: ``status`` 429 (the owner's requests at their cap) or 503 (none
    free within the wait); ``retry_after_s`` whole seconds. The message is one line."""

    def __init__(self, line: str, status: int, retry_after_s: int):
        super().__init__(line)
        self.status, self.retry_after_s = status, retry_after_s


class Gone(Exception):
    """The request was cancelled (its client hung up): its wait ended, or its child was killed."""


def _slot(n: int) -> threading.BoundedSemaphore:
    with _slots_lock:
        return _slots.setdefault(n, threading.BoundedSemaphore(n))


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in _ENV_KEEP}
    # one thread: a conversion is I/O bound, and the API's cores serve requests
    return env | {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@contextmanager
def _admitted(owner: str, settings: Settings) -> Iterator[None]:
    """Count one more of ``owner``'s requests waiting for or running a child; Busy (429) at the cap."""
    cap = settings.torch_child_per_owner
    with _waiting_lock:
        if _waiting.get(owner, 0) >= cap:
            raise Busy(
                f"You already have {cap} requests waiting for a model worker (TORCH_CHILD_PER_OWNER); "
                "retry when they have answered.",
                429,
                max(1, round(settings.torch_child_wait_s)),
            )
        _waiting[owner] = _waiting.get(owner, 0) + 1
    try:
        yield
    finally:
        with _waiting_lock:
            if (left := _waiting[owner] - 1) > 0:
                _waiting[owner] = left
            else:
                del _waiting[owner]


def _acquire(slot: threading.BoundedSemaphore, wait_s: float, cancel: threading.Event) -> bool:
    """Take ``slot`` within ``wait_s`` seconds (False when it stayed taken); Gone once ``cancel`` is set."""
    deadline = time.monotonic() + wait_s
    while not cancel.is_set():
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        if slot.acquire(timeout=min(left, POLL_S)):
            return True
    raise Gone("cancelled while waiting for a model worker")


def _communicate(argv: list[str], timeout_s: float, cancel: threading.Event) -> tuple[int, bytes, bytes]:
    """Run ``argv`` to its end: (exit status, stdout, stderr). Killed at ``timeout_s`` (ChildFailed) or
    as soon as ``cancel`` is set (Gone)."""
    proc = subprocess.Popen(
        argv,
        cwd=_IMPORT_ROOT,
        env=_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                out, err = proc.communicate(timeout=POLL_S)  # retried: no output is lost
                return proc.returncode, out, err
            except subprocess.TimeoutExpired:
                if cancel.is_set():
                    raise Gone("cancelled while its model worker ran") from None
                if time.monotonic() > deadline:
                    raise ChildFailed(
                        f"gave no answer within {timeout_s:g} s (TORCH_CHILD_TIMEOUT_S)"
                    ) from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def run(
    args: list[str], settings: Settings, owner: str, cancel: threading.Event | None = None
) -> dict[str, Any]:
    """Run ``python -m pruning_core.models.child *args`` for ``owner`` and return its JSON answer (blocking:
    call it from a worker thread, ``run_watched`` from a route). Raises Busy when no child can be had
    (see the module's docstring), Gone when ``cancel`` is set, Refused for a refused input, ChildFailed
    when the child gives no answer."""
    cancel = cancel or threading.Event()
    wait_s = settings.torch_child_wait_s
    with _admitted(owner, settings):
        slot = _slot(settings.torch_children)
        if not _acquire(slot, wait_s, cancel):
            raise Busy(
                f"Every model worker stayed busy for {wait_s:g} s (TORCH_CHILD_WAIT_S); retry shortly.",
                503,
                max(1, round(wait_s)),
            )
        try:
            argv = [sys.executable, "-m", "pruning_core.models.child", *args]
            code, stdout, stderr = _communicate(argv, settings.torch_child_timeout_s, cancel)
        finally:
            slot.release()
    lines = stdout.decode(errors="replace").strip().splitlines()
    try:
        out = json.loads(lines[-1])
    except (IndexError, ValueError):
        log.error("torch child %s exited %s: %s", args[:1], code, stderr[-2000:])
        raise ChildFailed(f"exited with status {code} without an answer") from None
    if not isinstance(out, dict):
        raise ChildFailed("answered something other than a JSON object")
    if "error" in out:
        needed = out.get("bytes")
        raise Refused(
            str(out["error"]), str(out.get("code", "")), needed if isinstance(needed, int) else None
        )
    return out


def pretrained_refusal(name: str, settings: Settings, owner: str) -> str | None:
    """None when the published weights of ``tv:``/``timm:`` model ``name`` are in this machine's
    cache, else the one line that says what to place where (from a child: ``pruning_core.models.pretrained``).
    Raises like ``run`` (Refused: a model with no published weights)."""
    out = run(["pretrained", name], settings, owner)
    return None if out.get("cached") else str(out.get("refusal"))


async def run_watched(request: Request, work: Callable[[threading.Event], T]) -> T:
    """``work(cancel)`` in a worker thread, ``cancel`` set as soon as ``request``'s client hangs up (its
    wait for a child ends, its child is killed: Gone)."""
    cancel = threading.Event()

    async def watch() -> None:
        while not await request.is_disconnected():
            await anyio.sleep(DISCONNECT_POLL_S)
        cancel.set()

    done: list[T] = []
    failed: list[Exception] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(watch)
        try:
            done.append(await anyio.to_thread.run_sync(work, cancel))
        except Exception as err:  # raised below, as it is: a task group would wrap it in a group
            failed.append(err)
        finally:
            tg.cancel_scope.cancel()
    if failed:
        raise failed[0]
    return done[0]


def problem(err: Busy | Gone) -> Problem:
    """The answer to a request that got no child: Busy's 429 or 503 with Retry-After; a 503 for one
    whose client is gone (no one reads it)."""
    if isinstance(err, Gone):
        return Problem(503, "The request was cancelled: its client went away.", slug="client-gone")
    slug = "model-worker-waits" if err.status == 429 else "model-workers-busy"
    return Problem(err.status, str(err), slug=slug, headers={"Retry-After": str(err.retry_after_s)})


_keys_cache: OrderedDict[str, OrderedDict[tuple[str, int, int], list[dict[str, Any]]]] = OrderedDict()
_keys_lock = threading.Lock()


def _cached_keys(key: tuple[str, int, int], owner: str) -> list[dict[str, Any]] | None:
    """An answer kept for ``key`` (the owner's own first; any owner's will do: it is the code's)."""
    with _keys_lock:
        for who in (owner, *_keys_cache):
            part = _keys_cache.get(who)
            if part is not None and (hit := part.get(key)) is not None:
                part.move_to_end(key)
                return hit
    return None


def _keep_keys(key: tuple[str, int, int], owner: str, keys: list[dict[str, Any]]) -> None:
    """Keep ``keys`` in ``owner``'s part of the cache: she evicts only her own answers (and the least
    recently active owner's part goes when more than KEYS_OWNERS owners have one)."""
    with _keys_lock:
        part = _keys_cache.setdefault(owner, OrderedDict())
        _keys_cache.move_to_end(owner)
        part[key] = keys
        while len(part) > KEYS_PER_OWNER:
            part.popitem(last=False)
        while len(_keys_cache) > KEYS_OWNERS:
            _keys_cache.popitem(last=False)


def expected_keys(
    name: str,
    num_classes: int,
    in_channels: int,
    settings: Settings,
    owner: str,
    cancel: threading.Event | None = None,
) -> list[dict[str, Any]]:
    """``[{"key", "shape", "dtype"}]`` of model ``name``'s state dict, from a child that builds it;
    kept, as the answer changes only with the code and a child takes seconds. Raises like ``run``."""
    key = (name, num_classes, in_channels)
    if (hit := _cached_keys(key, owner)) is not None:
        return hit
    keys = run(["keys", name, str(num_classes), str(in_channels)], settings, owner, cancel)["keys"]
    _keep_keys(key, owner, keys)
    return keys
