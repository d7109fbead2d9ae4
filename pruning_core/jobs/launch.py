"""``run_job``: one job as ``resources.gpus`` processes on this host, one per GPU (torch.distributed).

The calling process is rank 0: it keeps the job's reporter (events, progress, cancel flag) and writes
the checkpoints and artifacts. Ranks 1..N-1 are fresh interpreters (``python -m pruning_core.jobs.launch``,
so a daemonic Celery child may start them), given the spec on stdin; they train and exit. Rendezvous
through a TCPStore that rank 0 opens on a free port of 127.0.0.1; NCCL between GPUs, gloo between CPU
processes (a host without CUDA, the tests).

Failures: a rank that dies breaks the next collective of the others. A rank that raised first leaves
its error in the store (``error/<rank>``: type, code, one line), and rank 0 raises it in its stead: a
``PruningError`` keeps its class and code (a bad file is not retried), running out of memory stays
an out-of-memory error (the worker says what to lower). A rank killed without a word (or an error of
no known kind) is ``RankLost``: the worker gives the attempt back to the queue and the next one resumes
from the last checkpoint. An error every rank raises alike (a diverged loss, a cancel) keeps its own
type. Whatever happens, rank 0 ends the other ranks before it returns.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from ..errors import Cancelled, ModelError, PruningError, RankLost, one_line
from ..spec import PYTHON_PREFIX, JobSpec, parse_spec
from ..training.distributed import backend_for
from ..training.engine import Reporter
from . import runner

HOST = "127.0.0.1"
START_TIMEOUT_S = 300.0  # for every rank to import torch and join
COLLECTIVE_TIMEOUT = timedelta(minutes=30)  # one collective's wait (rank 0 alone evaluates, saves)
STOP_GRACE_S = 10.0  # a rank asked to stop (SIGTERM) gets this long before SIGKILL


def run_job(
    spec: JobSpec, workdir: str | Path, reporter: Reporter | None = None, *, job_id: str | None = None
) -> runner.Result:
    """``runner.run`` of ``spec``, as ``spec.resources.gpus`` processes when that is above 1."""
    world = spec.resources.gpus
    if world == 1:
        return runner.run(spec, workdir, reporter, job_id=job_id)
    device = runner.resolve_device(spec.device)
    _check_host(spec, device, world)
    store = dist.TCPStore(HOST, 0, world, is_master=True, timeout=COLLECTIVE_TIMEOUT, wait_for_workers=False)
    ranks = [_start_rank(r, world, store.port, spec, Path(workdir), job_id) for r in range(1, world)]
    try:
        _wait_ready(store, ranks)
        _join(store, 0, world, device.type)
        try:
            return runner.run(spec, workdir, reporter, job_id=job_id)
        except (PruningError, KeyboardInterrupt, Cancelled):
            raise
        except Exception as err:
            failure = _stored_failure(store, world)  # written before the rank let go of its peers
            if failure is not None:
                raise failure from err
            lost = _ended(ranks)
            if lost:
                raise RankLost(f"{lost} of the job's {world} processes; {err}".strip()) from err
            raise
    finally:
        _stop(ranks)
        if dist.is_initialized():
            dist.destroy_process_group()


def _check_host(spec: JobSpec, device: torch.device, world: int) -> None:
    """ModelError when this host cannot run the job's ``world`` processes."""
    if spec.model.name.startswith(PYTHON_PREFIX) or spec.data.name.startswith(PYTHON_PREFIX):
        raise ModelError("resources.gpus: a model or data set given in Python cannot reach other processes")
    if device.type == "cuda" and torch.cuda.device_count() < world:
        raise ModelError(f"resources.gpus is {world} but this worker sees {torch.cuda.device_count()} GPU(s)")


def _start_rank(
    rank: int, world: int, port: int, spec: JobSpec, workdir: Path, job_id: str | None
) -> subprocess.Popen:
    """Rank ``rank`` as a fresh interpreter importing this same ``pruning_core``; the spec on stdin
    (never on disk: it may name the job's uploads)."""
    root = str(Path(__file__).resolve().parent.parent)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p),
        "LOCAL_RANK": str(rank),
    }
    cmd = [sys.executable, "-m", "pruning_core.jobs.launch", "--rank", str(rank), "--world", str(world)]
    cmd += ["--port", str(port), "--workdir", str(workdir), "--job-id", job_id or ""]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, env=env)
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(spec.model_dump(mode="json", exclude={"notify"})).encode())
    proc.stdin.close()
    return proc


def _wait_ready(store: dist.TCPStore, ranks: list[subprocess.Popen]) -> None:
    """Until every rank says it is about to join; RankLost if one ends first (a broken interpreter)."""
    keys = [f"ready/{r}" for r in range(1, len(ranks) + 1)]
    deadline = time.monotonic() + START_TIMEOUT_S
    while not store.check(keys):
        lost = _ended(ranks, wait_s=0.0)
        if lost:
            raise RankLost(f"{lost} before the job started")
        if time.monotonic() > deadline:
            raise RankLost(f"the job's processes did not start within {START_TIMEOUT_S:g} s")
        time.sleep(0.05)


def _join(store: dist.Store, rank: int, world: int, device_type: str) -> None:
    dist.init_process_group(
        backend_for(device_type), store=store, rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT
    )


def _ended(ranks: list[subprocess.Popen], wait_s: float = 2.0) -> str:
    """Which ranks have ended, with their exit codes ('' if none), waiting up to ``wait_s`` for one: a
    killed rank's peers see its sockets close a moment before its parent can reap it."""
    deadline = time.monotonic() + wait_s
    while True:
        ended = [(r, p.poll()) for r, p in enumerate(ranks, 1) if p.poll() is not None]
        if ended or time.monotonic() >= deadline:
            return ", ".join(f"rank {r} ended (exit code {code})" for r, code in ended)
        time.sleep(0.05)


def _stop(ranks: list[subprocess.Popen]) -> None:
    """End the other ranks: those still running get SIGTERM, then SIGKILL after ``STOP_GRACE_S``."""
    for p in ranks:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for p in ranks:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _failure(err: BaseException) -> dict[str, str | None]:
    """What rank 0 needs to raise ``err`` in a rank's stead (JSON: the store holds bytes)."""
    code = err.code if isinstance(err, PruningError) else None
    return {"type": type(err).__name__, "code": code, "message": one_line(err, 500)}


def _pruning_errors() -> dict[str, type[PruningError]]:
    """Every ``PruningError`` class by its code (a subclass's code wins over its base's)."""
    found: dict[str, type[PruningError]] = {}
    todo: list[type[PruningError]] = [PruningError]
    while todo:
        cls = todo.pop()
        found[cls.code] = cls
        todo.extend(cls.__subclasses__())
    return found


def _stored_failure(store: dist.Store, world: int) -> BaseException | None:
    """The error rank 0 raises in the stead of the first rank that left one (``error/<rank>``): a
    ``PruningError`` of its class and code, an out-of-memory error as one, anything else ``RankLost``
    with its message; None when no rank left one (killed without a word)."""
    for rank in range(1, world):
        key = f"error/{rank}"
        if not store.check([key]):
            continue
        failure = json.loads(store.get(key))
        message = f"rank {rank}: {failure['message']}"
        if failure["code"] in _pruning_errors():
            return _pruning_errors()[failure["code"]](message)
        if failure["type"] == "MemoryError":
            return MemoryError(message)
        if failure["type"] == "OutOfMemoryError":
            return torch.OutOfMemoryError(message)
        return RankLost(f"{message} ({failure['type']})")
    return None


def _rank_main(argv: list[str] | None = None) -> int:
    """A rank other than 0: join the job's process group, train, exit (0: done)."""
    ap = argparse.ArgumentParser(prog="python -m pruning_core.jobs.launch")
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world", type=int, required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--job-id", default="")
    args = ap.parse_args(argv)
    spec = parse_spec(json.loads(sys.stdin.read()))
    device = runner.resolve_device(spec.device)
    store = dist.TCPStore(HOST, args.port, args.world, is_master=False, timeout=COLLECTIVE_TIMEOUT)
    store.set(f"ready/{args.rank}", "1")
    _join(store, args.rank, args.world, device.type)
    try:
        runner.run(spec, args.workdir, None, job_id=args.job_id or None)
    except (KeyboardInterrupt, Cancelled):
        return 130  # stopped with every rank, rank 0 says why
    except Exception as err:  # rank 0 sees only a lost peer: leave it the reason
        store.set(f"error/{args.rank}", json.dumps(_failure(err)))
        raise
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(_rank_main())
