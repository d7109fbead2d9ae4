"""Data parallelism: what the ranks of one job (``resources.gpus`` processes, see ``launch.py``) exchange.

Only ``engine.fit`` and the runner call these; methods never see ranks. Every function is a no-op (or the
identity) when no process group is set up, so a one-process job runs exactly the code it always ran.

The rules that keep N ranks one job:

- each step's global batch is cut into N contiguous slices (``shard``), one per rank;
- every parameter set's gradients are averaged over the ranks before its optimizer steps, and before a
  method reads them (``average_grads``): the weights and a method's extra sets (S2H's mask logits,
  TAS's architecture logits) alike, so every rank applies the same update to the same values;
- BatchNorm's running statistics are averaged at each epoch's end (``average_buffers``) and rank 0's
  state is broadcast where ranks could drift (``broadcast_tensors``);
- an epoch's record (losses, top-1, ...) is rank 0's (``broadcast_object``), so every method's
  epoch-end decision (prune now, which channels) is taken from the same numbers on every rank.

Why not ``DistributedDataParallel``: its reducer expects one forward and one backward of the whole
model per step. S2H runs two forwards and four backward passes per step, some restricted to the mask
logits, with gradients taken out between them (``StepContext.take_grads``); TAS steps its weights in the
middle of a step and then runs the architecture's forward. One explicit, flat all-reduce per parameter
set at the moment it steps serves every method the same way, at the price of not overlapping the
communication with the backward pass (measured: ``bench/distributed.py``).
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")

# Bytes this process has all-reduced, for the benchmark (``bench/distributed.py``).
STATS = {"allreduce_bytes": 0, "allreduce_calls": 0}


def world_size() -> int:
    """Processes in this job (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """Whether this process writes checkpoints, events and artifacts (rank 0)."""
    return rank() == 0


def backend_for(device_type: str) -> str:
    """NCCL between GPUs, gloo between CPU processes."""
    return "nccl" if device_type == "cuda" else "gloo"


def rank_device(device: torch.device) -> torch.device:
    """The device of this rank: GPU ``rank`` of those visible on a CUDA job (one process per GPU)."""
    if world_size() == 1 or device.type != "cuda":
        return device
    local = int(os.environ.get("LOCAL_RANK", rank()))
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def shard(
    plan: list[list[list[int]]], rank_: int, world: int
) -> tuple[list[list[list[int]]], list[list[int]]]:
    """This rank's part of an epoch's ``plan`` (per step, its batches of sample indices): a contiguous
    slice of every batch, the slices of the ranks differing by at most one sample, and per step the
    positions of this rank's samples in the step's whole batches (each item's augmentation seed,
    ``batches.item_seed``, is drawn from its position, so any number of ranks reads the same images)."""
    if world == 1:
        return plan, [list(range(sum(len(b) for b in step))) for step in plan]
    steps, positions = [], []
    for step in plan:
        mine, where, start = [], [], 0
        for batch in step:
            lo, hi = _slice(len(batch), rank_, world)
            mine.append(batch[lo:hi])
            where.extend(range(start + lo, start + hi))
            start += len(batch)
        steps.append(mine)
        positions.append(where)
    return steps, positions


def _slice(n: int, rank_: int, world: int) -> tuple[int, int]:
    """Bounds of rank ``rank_``'s contiguous share of ``n`` items (the first ``n % world`` get one more)."""
    base, extra = divmod(n, world)
    lo = rank_ * base + min(rank_, extra)
    return lo, lo + base + (rank_ < extra)


def _flat(tensors: Sequence[torch.Tensor]) -> dict[tuple[torch.dtype, torch.device], list[int]]:
    """Indices of ``tensors`` by (dtype, device): each kind travels as one flat buffer."""
    kinds: dict[tuple[torch.dtype, torch.device], list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        kinds[(t.dtype, t.device)].append(i)
    return kinds


def _all_reduce(buf: torch.Tensor) -> None:
    STATS["allreduce_bytes"] += buf.numel() * buf.element_size()
    STATS["allreduce_calls"] += 1
    dist.all_reduce(buf)


@torch.no_grad()
def average_grads(params: Iterable[torch.Tensor]) -> None:
    """Replace each parameter's ``.grad`` by its mean over the ranks, in one flat all-reduce per dtype;
    a rank without a gradient for it counts as zero, and a parameter no rank has a gradient for keeps
    ``None`` (its optimizer then skips it, as it would in one process)."""
    world = world_size()
    params = list(params)
    if world == 1 or not params:
        return
    for (dtype, device), idx in _flat(params).items():
        ps = [params[i] for i in idx]
        has = torch.tensor([p.grad is not None for p in ps], dtype=dtype, device=device)
        parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in ps]
        buf = torch.cat([*parts, has])
        _all_reduce(buf)
        buf.div_(world)
        offset = 0
        for p, seen in zip(ps, buf[-len(ps) :].tolist(), strict=True):
            g = buf[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
            if seen > 0:
                p.grad = g
            else:
                p.grad = None


@torch.no_grad()
def average_buffers(model: nn.Module) -> None:
    """Average ``model``'s floating-point buffers (BatchNorm running statistics) over the ranks: each
    rank estimated them from its own slices of the batches."""
    if world_size() == 1:
        return
    bufs = [b for b in model.buffers() if b.is_floating_point()]
    for (_, _), idx in _flat(bufs).items():
        flat = torch.cat([bufs[i].reshape(-1) for i in idx])
        _all_reduce(flat)
        flat.div_(world_size())
        _scatter(flat, [bufs[i] for i in idx])


@torch.no_grad()
def broadcast_tensors(tensors: Iterable[torch.Tensor]) -> None:
    """Overwrite ``tensors`` (the same list, in the same order, on every rank) with rank 0's values."""
    if world_size() == 1:
        return
    tensors = list({id(t): t for t in tensors}.values())
    for (_, _), idx in _flat(tensors).items():
        flat = torch.cat([tensors[i].detach().reshape(-1) for i in idx])
        dist.broadcast(flat, 0)
        _scatter(flat, [tensors[i] for i in idx])


def _scatter(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def broadcast_module(model: nn.Module, extra: Iterable[torch.Tensor] = ()) -> None:
    """Rank 0's weights, buffers and ``extra`` tensors (a method's parameter sets) on every rank."""
    broadcast_tensors([*model.parameters(), *model.buffers(), *extra])


def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` (picklable) on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, 0)
    return box[0]


def gather_objects(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def sum_over_ranks(values: Sequence[float], device: torch.device) -> list[float]:
    """Element-wise sums of ``values`` over the ranks (float64)."""
    if world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    _all_reduce(t)
    return t.tolist()


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. extracts a data archive into the shared cache), then the others
    (which find it done)."""
    if world_size() == 1:
        yield
        return
    if not is_main():
        dist.barrier()
    yield
    if is_main():
        dist.barrier()
