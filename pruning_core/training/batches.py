"""Which training samples each step sees: a pure function of (seed, epoch), so a run resumes exactly.

By default every step gets one batch of the whole training set in a per-epoch random order. A phase may
instead ask for ``Streams``: the training set split once into fixed, seeded parts (e.g. TAS's 50/50
split for weights and architecture), and per step either one batch of each part (``zip``) or a batch
of one part in turn (``alternate``). The epoch's plan is computed up front; a resumed epoch skips the
steps it already trained.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import torch
from torch.utils.data import DataLoader, Dataset

from ..spec import Schedule

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Streams:
    """A split of the training set into fixed parts, read together (``zip``) or in turn (``alternate``).

    ``fractions`` are shares of the training set (summing to at most 1); the split is drawn once from the
    job's seed and never changes between epochs or on resume. An epoch lasts as many steps as the
    smallest part has batches (times the parts in ``alternate``): with unequal shares the larger parts
    are only partly read each epoch (in a new order every epoch).
    """

    fractions: tuple[float, ...] = (0.5, 0.5)
    mode: Literal["zip", "alternate"] = "zip"

    def __post_init__(self) -> None:
        if len(self.fractions) < 2 or any(f <= 0 for f in self.fractions) or sum(self.fractions) > 1 + 1e-9:
            raise ValueError(f"streams need >= 2 positive fractions summing to <= 1, got {self.fractions}")


def epoch_seed(seed: int, epoch: int) -> int:
    """The torch seed of an epoch's start (data order, augmentation and any other random draws)."""
    return seed * 1_000_003 + epoch


def epoch_order(n: int, batch_size: int, seed: int, epoch: int) -> list[int]:
    """The epoch's sample order, a pure function of (seed, epoch); the last partial batch is dropped
    when there is more than one batch (a size-1 batch breaks BatchNorm)."""
    g = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    order = torch.randperm(n, generator=g).tolist()
    if n > batch_size:
        order = order[: n - n % batch_size]
    return order


def split_parts(n: int, fractions: Sequence[float], seed: int) -> list[list[int]]:
    """Sample indices of each part: a fixed seeded permutation of ``range(n)`` cut by ``fractions``."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + 999_979)  # apart from every epoch's seed
    perm = torch.randperm(n, generator=g).tolist()
    parts, start = [], 0
    for f in fractions:
        size = max(1, int(f * n))
        parts.append(perm[start : start + size])
        start += size
    if start > n:
        raise ValueError(f"a training set of {n} samples is too small to split into {len(fractions)} parts")
    return parts


def _batches(indices: list[int], batch_size: int, seed: int) -> list[list[int]]:
    """``indices`` in an order drawn from ``seed``, cut into batches (last partial one dropped)."""
    g = torch.Generator().manual_seed(seed % 2**63)
    order = [indices[i] for i in torch.randperm(len(indices), generator=g).tolist()]
    if len(order) > batch_size:
        order = order[: len(order) - len(order) % batch_size]
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def epoch_plan(
    n: int, schedule: Schedule, seed: int, epoch: int, streams: Streams | None = None
) -> list[list[list[int]]]:
    """Per step, the sample indices of each batch it receives (one batch, or one per part in ``zip``
    mode), capped at ``schedule.max_steps_per_epoch``."""
    bs = schedule.batch_size
    if streams is None:
        order = epoch_order(n, bs, seed, epoch)
        plan = [[order[i : i + bs]] for i in range(0, len(order), bs)]
    else:
        parts = split_parts(n, streams.fractions, seed)
        per_part = [_batches(p, bs, epoch_seed(seed, epoch) * 31 + k + 1) for k, p in enumerate(parts)]
        steps = min(len(b) for b in per_part)
        if streams.mode == "zip":
            plan = [[b[i] for b in per_part] for i in range(steps)]
        else:
            plan = [[per_part[k][i]] for i in range(steps) for k in range(len(parts))]
    cap = schedule.max_steps_per_epoch
    return plan[:cap] if cap else plan


def steps_per_epoch(n: int, schedule: Schedule, streams: Streams | None = None) -> int:
    """Training steps in every epoch (the same for all epochs of a phase)."""
    return len(epoch_plan(n, schedule, 0, 0, streams))


def part_of_step(step_in_epoch: int, streams: Streams | None) -> int:
    """Which part an ``alternate`` step reads (0 otherwise)."""
    if streams is None or streams.mode == "zip":
        return 0
    return step_in_epoch % len(streams.fractions)


@runtime_checkable
class DeviceBatches(Protocol):
    """A training set held in memory that builds whole batches on a device (``data.ImageTensorDataset``):
    the engine reads it without a DataLoader, augmenting on the device from its own generator."""

    def batch(
        self, indices: torch.Tensor, device: torch.device, generator: torch.Generator | None = None
    ) -> Batch: ...


def device_loader(
    ds: DeviceBatches, plan: list[list[list[int]]], device: torch.device, generator: torch.Generator
) -> Iterator[tuple[Batch, ...]]:
    """Yield, per step of ``plan``, its batches as ``((x, y), ...)``, built on ``device`` by
    ``ds.batch``: one call per step (its batches together), random augmentation drawn from ``generator``
    in step order, so the generator's state between steps is all a resume needs."""
    for step in plan:
        sizes = [len(batch) for batch in step]
        x, y = ds.batch(torch.tensor([i for batch in step for i in batch]), device, generator)
        yield tuple(zip(x.split(sizes), y.split(sizes), strict=True)) if len(sizes) > 1 else ((x, y),)


PREFETCH_BATCHES = 4  # batches each loader worker prepares ahead (CUDA hosts: workers stay ahead of the GPU)


def default_workers(asked: int | None, device: torch.device, cap: int) -> int:
    """DataLoader processes for a set read per item: as asked, else none on CPU (they would take the
    training threads' cores) and, on CUDA, the cores this process may use, at most ``cap``."""
    if asked is not None:
        return asked
    if device.type != "cuda":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(cap, cores))


def item_seed(epoch_seed_: int, step: int, position: int) -> int:
    """The seed of one item's random augmentation: a pure function of the epoch's seed, the step in
    the epoch and the item's position in that step."""
    return (epoch_seed_ * 1_000_081 + step * 65_537 + position) % 2**63


class _SeededItems(Dataset):
    """``ds`` read by ``(index, seed)`` keys: each item's random draws come from its own seed (the
    global CPU generator forked around the read), so any worker process draws what any other would."""

    def __init__(self, ds: Dataset):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> object:
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return self.ds[index]


class _PlanSampler:
    """A DataLoader's batch sampler whose steps are set before each epoch (its workers persist)."""

    def __init__(self) -> None:
        self.steps: list[list[tuple[int, int]]] = []

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return iter(self.steps)

    def __len__(self) -> int:
        return len(self.steps)


class ItemLoader:
    """Reads steps of plans per item through one DataLoader kept for a phase: ``workers`` processes
    that persist across epochs, each ``PREFETCH_BATCHES`` batches ahead, into pinned memory on CUDA.

    Each item's augmentation draws from a seed of its own (``item_seed``), so the batches are the
    same with any number of workers and a resumed epoch reads exactly what the interrupted one would
    have; the global RNG is never drawn from."""

    def __init__(self, ds: Dataset, workers: int, device: torch.device):
        self.sampler, self.device = _PlanSampler(), device
        self.loader = DataLoader(
            _SeededItems(ds),
            batch_sampler=self.sampler,
            num_workers=workers,
            pin_memory=device.type == "cuda",
            persistent_workers=workers > 0,
            prefetch_factor=PREFETCH_BATCHES if workers > 0 else None,
            generator=torch.Generator().manual_seed(0),  # not the global RNG, which a resume replays
        )

    def __call__(
        self,
        plan: list[list[list[int]]],
        seed: int,
        first_step: int = 0,
        positions: list[list[int]] | None = None,
    ) -> Iterator[tuple[Batch, ...]]:
        """Yield, per step of ``plan`` (the epoch's from ``first_step`` on; ``seed``: the epoch's), its
        batches as ``((x, y), ...)`` on the device: each step's batches are read together (one
        collate, one worker round-trip) and split afterwards. ``positions``: per step, each item's
        place in the step's whole batches, when ``plan`` holds one rank's slices of them
        (``distributed.shard``); default: the items' order in ``plan``."""
        items = [[i for batch in step for i in batch] for step in plan]
        where = positions if positions is not None else [range(len(step)) for step in items]
        self.sampler.steps = [
            [(i, item_seed(seed, first_step + k, j)) for i, j in zip(step, at, strict=True)]
            for k, (step, at) in enumerate(zip(items, where, strict=True))
        ]
        sizes = [[len(batch) for batch in step] for step in plan]
        for (x, y), sz in zip(self.loader, sizes, strict=True):
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            yield tuple(zip(x.split(sz), y.split(sz), strict=True)) if len(sz) > 1 else ((x, y),)
