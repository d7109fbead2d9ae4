"""The one training loop. Methods never bring their own: they plug in through ``TrainHooks``.

``fit`` owns the device, AMP and the memory format (``acceleration``: bfloat16, or float16 with the
scaler, channels_last and cuDNN autotuning on CUDA; ``torch.compile`` where the method allows it), the
optimizers (one per parameter set the method declares, see ``optim.py``), the LR rules, the data order
(``batches.py``), evaluation, BatchNorm re-estimation after physical pruning, checkpoint/resume and
cooperative cancellation.

A training step: ``training_step`` runs the method's forwards and either returns the loss (the engine
backpropagates it into every parameter) or calls ``ctx.backward`` itself, as often as it likes, each call
optionally restricted to some parameters; it may ``ctx.update`` some parameter sets early (TAS updates the
weights, then the architecture, in one step). Then every set with gradients that was not stepped yet is
unscaled once, shown to ``after_backward`` and stepped; the GradScaler is updated once per step.

Data: a training set held in memory (``batches.DeviceBatches``) is copied to the device once and each
step's batch is built there, cropped and flipped by one generator on the device (seeded per epoch); any
other set is read per item through a DataLoader (``ctx.num_workers`` processes).

Several processes (``resources.gpus``, see ``distributed.py``): each trains on its slice of every
step's batch, the gradients of every parameter set are averaged over the ranks before they are read or
stepped, the epoch's record is rank 0's, and rank 0 alone writes the checkpoint (with every rank's RNG
state and running sums, so N processes resume with N).

Determinism: every epoch reseeds torch from (seed, epoch) and draws its data order from a generator
seeded the same way; a checkpoint taken mid-epoch stores the RNG states (the augmentation generator's
included), the step and the epoch's running sums, so on CPU an interrupted and resumed run ends with
exactly the weights and history of an uninterrupted one. Through a DataLoader each item's augmentation
has a seed of its own (``batches.item_seed``), so that holds with loader workers too.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
from torch import nn
from torch.utils.data import Dataset

from ..errors import Cancelled, DivergedError
from ..graph.macs import Cost, measure
from ..spec import Schedule
from . import distributed
from .acceleration import amp_dtype, autotune, compile_model, contiguous, in_format, memory_format, place
from .batches import (
    Batch,
    DeviceBatches,
    ItemLoader,
    Streams,
    device_loader,
    epoch_plan,
    epoch_seed,
    part_of_step,
    steps_per_epoch,
)
from .evaluation import MacMeter, View, evaluate_views, recalibrate_bn
from .optim import Optimizers, ParamSet, lr_factor

T = TypeVar("T")

# A phase's loss "start" is its first step's loss (of the network as the phase got it, before any update:
# later steps of a diverging run are already off). One below LOSS_FLOOR counts as LOSS_FLOOR, so a loss
# that starts near zero (fine-tuning trained weights) may rise a few units (after a physical pruning)
# without being called divergent.
LOSS_FLOOR = 1.0


class EpochAction(Enum):
    CONTINUE = "continue"
    STOP = "stop"  # end the phase now (e.g. a search converged)
    PRUNE = "prune"  # call hooks.prune_now(model), rebuild the optimizers, go on training


@dataclass
class EpochEnd:
    """What a method says at an epoch's end: what happens next, and numbers for the epoch's record
    (scalars, or lists such as per-layer ratios)."""

    action: EpochAction = EpochAction.CONTINUE
    metrics: dict[str, float | list[float]] = field(default_factory=dict)


@dataclass
class StepOutput:
    """``loss``: the step's loss as reported (and backpropagated by the engine unless the step called
    ``ctx.backward``). ``metrics``: scalars averaged over the epoch into its record."""

    loss: torch.Tensor
    metrics: dict[str, float | torch.Tensor] = field(default_factory=dict)


class StepContext:
    """What a training step knows and may do: its position, mixed precision, backward and optimizer
    steps through the engine's GradScaler."""

    def __init__(self, run: _Run, step: int, part: int):
        self.phase, self.epoch, self.step = run.phase, run.epoch, step
        self.total_steps, self.device, self.part = run.total, run.device, part
        self.stepping: tuple[str, ...] = ()  # during after_backward: the parameter sets about to step
        self.backward_calls = 0
        self._run = run

    def autocast(self):
        """Context manager: autocast to the run's AMP type (``acceleration.amp_dtype``: bfloat16 or
        float16 on CUDA when the schedule enables AMP), else a no-op."""
        run = self._run
        return torch.autocast(self.device.type, dtype=run.amp or torch.float16, enabled=run.use_amp)

    def backward(
        self,
        loss: torch.Tensor,
        params: str | Iterable[torch.Tensor] | None = None,
        *,
        retain_graph: bool = False,
    ) -> None:
        """Accumulate d(loss)/d(params) into ``.grad`` (scaled under AMP). ``params``: a parameter set's
        name, some tensors, or None for everything the loss reaches."""
        self.backward_calls += 1
        self._run.opts.backward(loss, params, retain_graph=retain_graph)

    def take_grads(self, params: str | Iterable[torch.Tensor]) -> list[torch.Tensor | None]:
        """The gradients accumulated so far in ``params`` (a set's name or tensors), as true unscaled
        values, and clear them from ``.grad``: separates the gradients of several losses on the same
        parameters (S2H balances its task, gap and resource gradients by their norms). Under AMP they
        may hold inf/NaN; the caller checks, since the engine's overflow check never sees them."""
        scaler = self._run.opts.scaler
        inv = 1.0 / scaler.get_scale() if scaler.is_enabled() else 1.0
        out: list[torch.Tensor | None] = []
        taken = self._run.opts.params(params)
        distributed.average_grads(taken)  # every rank then balances the same gradients
        for p in taken:
            out.append(None if p.grad is None else p.grad * inv)
            p.grad = None
        return out

    def update(self, *names: str) -> None:
        """Step these parameter sets' optimizers now, mid-step (unscale, ``after_backward``, optimizer
        step, zero their grads); e.g. TAS updates the weights, then forwards again for the architecture."""
        self._run.opts.step(names, self._after_backward)

    def _after_backward(self, names: tuple[str, ...]) -> None:
        self.stepping = names
        self._run.hooks.after_backward(self._run.model, self)
        self.stepping = ()


class TrainHooks(Protocol):
    """What a method plugs into ``fit`` (``methods.base.Method`` implements all of it)."""

    def param_sets(self, model: nn.Module) -> list[ParamSet]: ...
    def training_step(
        self, model: nn.Module, batch: Batch | tuple[Batch, ...], ctx: StepContext
    ) -> StepOutput: ...
    def after_backward(self, model: nn.Module, ctx: StepContext) -> None: ...
    def after_step(self, model: nn.Module, ctx: StepContext) -> None: ...
    def on_epoch_end(self, model: nn.Module, epoch: int, metrics: dict[str, float]) -> EpochEnd: ...
    def prune_now(self, model: nn.Module) -> nn.Module: ...
    def eval_views(self, model: nn.Module) -> dict[str, View]: ...
    def current_macs(self, model: nn.Module) -> int: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any], model: nn.Module) -> None: ...


class Reporter(Protocol):
    """Progress sink; also the cooperative cancel check. All methods must be cheap. One more method is
    optional: ``pruned(data)``, the network physically pruned (``report_pruned``)."""

    def phase(self, name: str, epochs: int, steps_per_epoch: int) -> None: ...
    def step(self, phase: str, epoch: int, step: int, loss: float) -> None: ...
    def epoch(self, record: dict[str, Any]) -> None: ...
    def message(self, text: str) -> None: ...
    def cancelled(self) -> bool: ...


class NullReporter:
    def phase(self, name: str, epochs: int, steps_per_epoch: int) -> None: ...
    def step(self, phase: str, epoch: int, step: int, loss: float) -> None: ...
    def epoch(self, record: dict[str, Any]) -> None: ...
    def message(self, text: str) -> None: ...
    def cancelled(self) -> bool:
        return False


@dataclass
class TrainContext:
    """Everything ``fit`` needs besides the model, the hooks and the schedule."""

    device: torch.device
    seed: int
    train: Dataset
    test: Dataset
    reporter: Reporter = field(default_factory=NullReporter)
    checkpoint_dir: Path | None = None
    num_workers: int = 0  # DataLoader processes, for a training set read through the DataLoader only
    # A training set that builds its batches on the device (``batches.DeviceBatches``: images held in
    # memory) is read that way, augmented there from the engine's generator; False: per item through
    # a DataLoader, as any other data set.
    device_data: bool = True
    # Architecture snapshot/restore, so a checkpoint taken after physical pruning can be reloaded.
    describe: Callable[[nn.Module], dict[str, Any]] | None = None
    rebuild: Callable[[dict[str, Any]], nn.Module] | None = None
    bn_batches: int = 20  # batches that re-estimate BatchNorm statistics after pruning; 0 = never
    bn_batch_size: int = 64
    # A step loss above this many times the phase's first (at least LOSS_FLOOR) stops it: DivergedError.
    divergence_factor: float = 100.0
    # One input (a batch of 1): MACs are counted on it before and after a physical prune, for the
    # ``pruned`` event (``report_pruned``); None: no such event.
    example: torch.Tensor | None = None
    # Forced autocast type (float32 = none) and memory format; None: the device's defaults and the
    # schedule's (``acceleration``). Forcing them on CPU is how the CUDA paths are tested there.
    precision: torch.dtype | None = None
    memory_format: torch.memory_format | None = None
    compile_backend: str = "inductor"  # of ``schedule.compile``

    def recalibrate(self, model: nn.Module) -> bool:
        """Re-estimate ``model``'s BatchNorm statistics on the training data; whether it was done."""
        return recalibrate_bn(model, self.train, self.device, self.bn_batches, self.bn_batch_size)


@dataclass
class FitResult:
    model: nn.Module
    history: list[dict[str, Any]]
    wall_s: float
    resumed_from: int | None = None  # epoch the run resumed at, if it did
    meta: dict[str, Any] = field(default_factory=dict)  # what the caller stored with the phase


# --- checkpoints ---


CHECKPOINT_FORMAT = 2  # 2: optimizers per parameter set, the epoch's running sums, the caller's meta


def _ckpt_path(ctx: TrainContext, phase: str) -> Path | None:
    return ctx.checkpoint_dir / f"{phase}.pt" if ctx.checkpoint_dir else None


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a crash leaves the old file or the new one, never half of one
    (a job's decisions that must not move under a resume: the speed target's search, layer times)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def reuse_or_make(
    path: Path,
    decode: Callable[[str], T],
    make: Callable[[], T],
    encode: Callable[[T], str],
    fits: Callable[[T], bool] = lambda _: True,
) -> T:
    """What a previous attempt of the job wrote to ``path`` (when it ``fits`` this attempt), else
    ``make()``, written there (atomically) before it is used: a timed decision must not move under a
    resume."""
    if path.exists():
        done = decode(path.read_text())
        if fits(done):
            return done
    made = make()
    write_text_atomic(path, encode(made))
    return made


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Atomic write: a crash mid-save leaves the previous checkpoint intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path | None) -> dict[str, Any] | None:
    """A checkpoint this engine can resume from, or None (missing, or written by an older format)."""
    if not path or not path.exists():
        return None
    ck = torch.load(path, map_location="cpu", weights_only=True)
    return ck if ck.get("format") == CHECKPOINT_FORMAT else None


def has_checkpoint(ctx: TrainContext, phase: str) -> bool:
    """Whether ``fit`` would resume ``phase`` (then the method's ``start_phase`` must not run)."""
    return load_checkpoint(_ckpt_path(ctx, phase)) is not None


# --- the loop ---


def _new_sums() -> dict[str, Any]:
    """An epoch's running sums; checkpointed mid-epoch so a resumed epoch reports the same numbers."""
    return {"loss": 0.0, "steps": 0, "train_macs": 0, "wall_s": 0.0, "cpu_s": 0.0, "metrics": {}}


def augment_seed(seed: int, epoch: int) -> int:
    """The seed of an epoch's augmentation generator (device batches), apart from the epoch's torch seed."""
    return (epoch_seed(seed, epoch) * 1_000_033 + 7) % 2**63


def _rng_state(device: torch.device, augment: torch.Generator) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state(), f"augment_{device.type}": augment.get_state()}
    if device.type == "cuda":  # Gumbel noise, dropout: reproducible on the GPU too
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device, augment: torch.Generator) -> None:
    """Restore the RNG states of ``_rng_state``; an augmentation state of another device kind (a run
    resumed elsewhere) cannot load here, and the generator keeps the epoch's seed instead."""
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    if f"augment_{device.type}" in state:
        augment.set_state(state[f"augment_{device.type}"])


class _Run:
    """The state of one ``fit`` call: model, optimizers, position, the epoch's sums, history."""

    def __init__(
        self,
        model: nn.Module,
        hooks: TrainHooks,
        s: Schedule,
        ctx: TrainContext,
        phase: str,
        streams: Streams | None,
        meta: dict[str, Any],
    ):
        self.model, self.hooks, self.ctx = model, hooks, ctx
        self.s, self.phase, self.streams = s, phase, streams
        self.device = ctx.device
        self.steps = steps_per_epoch(len(ctx.train), s, streams)
        self.total = self.steps * s.epochs
        self.warmup = round(s.warmup_epochs * self.steps)
        self.amp = amp_dtype(ctx.device, s, ctx.precision)  # None: float32
        self.use_amp = self.amp is not None
        self.format = memory_format(ctx.device, s, ctx.memory_format)
        self.compiled = False  # the model's forward under torch.compile (``schedule.compile``)
        self.device_data = ctx.device_data and isinstance(ctx.train, DeviceBatches)
        self.augment = torch.Generator(device=ctx.device)  # device batches' crops and flips
        self.items: ItemLoader | None = None  # the DataLoader of a set read per item
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=self.amp == torch.float16)
        self.opts: Optimizers = None  # type: ignore[assignment]  # built once the method's state is known
        self.epoch, self.step_in_epoch, self.history = 0, 0, []
        self.sums = _new_sums()
        self.rng_state: dict[str, torch.Tensor] | None = None
        self.first_loss: float | None = None  # the phase's first step's loss: its start
        self.interrupted = threading.Event()
        self.path = _ckpt_path(ctx, phase)
        self.meta = dict(meta)
        self.rank, self.world = distributed.rank(), distributed.world_size()

    def prepare_model(self) -> None:
        """The model in the run's memory format on the device, its forward compiled where asked."""
        place(self.model, self.device, self.format)
        self.compiled = compile_model(self.model, self.hooks, self.s, self.ctx.compile_backend)

    def build_optimizers(self) -> None:
        """Optimizers for the method's current parameter sets (again after any physical pruning: the
        old ones hold removed tensors); the state of parameters that survived carries over, and so
        does the GradScaler."""
        old = self.opts
        self.opts = Optimizers(self.hooks.param_sets(self.model), self.s, self.scaler)
        if old is not None:
            self.opts.carry_state(old)

    def state(self, finished: bool = False) -> dict[str, Any] | None:
        """The checkpoint (None on ranks other than 0); collective: every rank calls it. Mid-epoch,
        each rank's running sums and RNG states go in (``ranks``, in rank order)."""
        ranks = distributed.gather_objects(
            [self.sums, self.rng_state] if self.step_in_epoch else [None, None]
        )
        if self.rank != 0:
            return None
        return {
            "format": CHECKPOINT_FORMAT,
            "phase": self.phase,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "finished": finished,
            "arch": self.ctx.describe(self.model) if self.ctx.describe else None,
            "model": self.model.state_dict(),
            "optim": self.opts.state_dict(),
            "method": self.hooks.state_dict(),
            "history": self.history,
            "sums": self.sums if self.step_in_epoch else None,
            "rng": self.rng_state if self.step_in_epoch else None,
            "meta": self.meta,
            "first_loss": self.first_loss,
            "world": self.world,
            "ranks": ranks if self.world > 1 else None,
        }

    def save(self, finished: bool = False) -> None:
        """Checkpoint the run; collective: every rank calls it, rank 0 writes."""
        if self.path:
            state = self.state(finished)
            if state is not None:
                save_checkpoint(self.path, state)

    def restore(self, ck: dict[str, Any]) -> None:
        """Architecture, then the method's state (it may re-attach what ``start_phase`` attached to the
        model), then the weights, then optimizers over the method's parameter sets."""
        if ck["arch"] is not None and self.ctx.describe and ck["arch"] != self.ctx.describe(self.model):
            self.model = place(self.ctx.rebuild(ck["arch"]), self.device, self.format)
        self.hooks.load_state_dict(ck["method"], self.model)
        self.model.load_state_dict(ck["model"])
        self.build_optimizers()
        self.opts.load_state_dict(ck["optim"])
        self.epoch, self.step_in_epoch, self.history = ck["epoch"], ck["step_in_epoch"], ck["history"]
        sums, rng = ck["sums"], ck["rng"]
        if ck.get("ranks") and ck.get("world", 1) == self.world:
            sums, rng = ck["ranks"][self.rank]
        elif self.world > 1 and self.step_in_epoch:  # written by another number of processes
            sums, rng = (sums, rng) if self.rank == 0 else (None, None)
        self.sums = sums or _new_sums()
        self.rng_state = rng
        self.meta = ck.get("meta") or {}
        self.first_loss = ck.get("first_loss")


def fit(
    model: nn.Module,
    hooks: TrainHooks,
    schedule: Schedule,
    ctx: TrainContext,
    phase: str = "train",
    *,
    streams: Streams | None = None,
    meta: dict[str, Any] | None = None,
) -> FitResult:
    """Train ``model`` for ``schedule.epochs`` epochs with ``hooks``; resume from the phase's checkpoint
    if one exists. ``streams``: read the training set as fixed parts (see ``batches.Streams``). ``meta``:
    JSON-able facts stored with the checkpoint and returned (those of the checkpoint on resume).
    Returns the trained model (a new object if the method pruned it physically)."""
    t0 = time.perf_counter()
    run = _Run(model, hooks, schedule, ctx, phase, streams, meta or {})
    place(model, ctx.device, run.format)
    autotune(ctx.device)
    ck = load_checkpoint(run.path)
    resumed = None
    if ck is not None:
        run.restore(ck)
        resumed = run.epoch
        if ck["finished"]:
            return FitResult(contiguous(run.model), run.history, time.perf_counter() - t0, resumed, run.meta)
        ctx.reporter.message(f"{phase}: resuming at epoch {run.epoch + 1}, step {run.step_in_epoch}")
    else:
        if run.path and run.path.exists():
            ctx.reporter.message(f"{phase}: its checkpoint was written by an older engine; training it again")
        run.build_optimizers()
    # every rank starts from rank 0's values (a method's random parts need not agree before this)
    distributed.broadcast_module(run.model, run.opts.params(None))
    ctx.reporter.phase(phase, schedule.epochs, run.steps)
    run.prepare_model()
    try:
        with _interrupt_guard() as interrupted:
            run.interrupted = interrupted
            while run.epoch < schedule.epochs:
                if _train_epoch(run) is EpochAction.STOP:
                    break
    finally:
        run.items = None  # its worker processes end with the phase
        contiguous(run.model)
    run.save(finished=True)
    return FitResult(run.model, run.history, time.perf_counter() - t0, resumed, run.meta)


def _train_epoch(run: _Run) -> EpochAction:
    ctx, s = run.ctx, run.s
    t0, c0 = time.perf_counter(), time.process_time()
    before = run.sums.get("wall_s", 0.0)  # a resumed epoch's seconds before the interruption
    cpu_before = run.sums.get("cpu_s", 0.0)
    plan = epoch_plan(len(ctx.train), s, ctx.seed, run.epoch, run.streams)
    plan, positions = distributed.shard(plan, run.rank, run.world)
    # the same torch seed on every rank (Gumbel samples, dropout agree); crops and flips of its own
    torch.manual_seed(epoch_seed(ctx.seed, run.epoch))
    run.augment.manual_seed((augment_seed(ctx.seed, run.epoch) + 7_919 * run.rank) % 2**63)
    if run.step_in_epoch and run.rng_state is not None:
        _set_rng_state(run.rng_state, run.device, run.augment)
    run.model.train()
    lrs: dict[str, float] = {}
    meter = MacMeter()
    # a compiled forward is not given the meter's hooks (each attachment would recompile it): the MACs
    # of its one plain forward per step are the network's per sample times the samples
    per_sample = run.hooks.current_macs(run.model) if run.compiled else 0
    with nullcontext() if run.compiled else meter.attached(run.model):
        first = run.step_in_epoch
        for batches in _batches(run, plan[first:], positions[first:]):
            _stop_point(run)
            step = run.epoch * run.steps + run.step_in_epoch
            lrs = run.opts.set_lr(lr_factor(step, run.total, run.warmup, s.lr_schedule))
            sctx = StepContext(run, step, part_of_step(run.step_in_epoch, run.streams))
            meter.total = 0
            loss = _optimise(run, batches[0] if len(batches) == 1 else batches, sctx)
            samples = sum(len(y) for _, y in batches)
            run.sums["train_macs"] += per_sample * samples if run.compiled else meter.total
            run.sums["wall_s"] = before + time.perf_counter() - t0
            run.sums["cpu_s"] = cpu_before + time.process_time() - c0
            run.step_in_epoch += 1
            # before the next batch is drawn: where a resume starts
            run.rng_state = _rng_state(run.device, run.augment)
            ctx.reporter.step(run.phase, run.epoch, run.step_in_epoch, loss)
    _reduce_epoch(run)
    record = _epoch_record(run, lrs, before + time.perf_counter() - t0, cpu_before + time.process_time() - c0)
    # every method decides from rank 0's numbers (a GPU's evaluation may differ in the last bits)
    record = distributed.broadcast_object(record)
    run.step_in_epoch, run.rng_state, run.sums = 0, None, _new_sums()
    action = _epoch_end(run, record)
    record = distributed.broadcast_object(record)
    run.history.append(record)
    ctx.reporter.epoch(record)
    run.epoch += 1
    run.save()
    return action


def _reduce_epoch(run: _Run) -> None:
    """Before the epoch's record, with several ranks: BatchNorm statistics averaged, the MACs trained
    summed and the methods' step numbers averaged over the ranks (the step losses already are)."""
    if run.world == 1:
        return
    distributed.average_buffers(run.model)
    sums, names = run.sums, sorted(run.sums["metrics"])
    total = distributed.sum_over_ranks([sums["train_macs"], *(sums["metrics"][k] for k in names)], run.device)
    sums["train_macs"] = int(total[0])
    sums["metrics"] = {k: v / run.world for k, v in zip(names, total[1:], strict=True)}


def _batches(
    run: _Run, plan: list[list[list[int]]], positions: list[list[int]]
) -> Iterator[tuple[Batch, ...]]:
    """The steps of ``plan`` as batches on the device: built there from the in-memory images
    (``device_loader``), or read through the phase's DataLoader (``ItemLoader``, made at first use);
    ``positions``: per step, the places of its samples in the step's whole batches (all ranks')."""
    if run.device_data:
        steps = device_loader(run.ctx.train, plan, run.device, run.augment)  # type: ignore[arg-type]
    else:
        if run.items is None:
            run.items = ItemLoader(run.ctx.train, run.ctx.num_workers, run.device)
        steps = run.items(plan, epoch_seed(run.ctx.seed, run.epoch), run.step_in_epoch, positions)
    # the network's layout: a batch cropped on the device comes NHWC-strided, which on CPU would
    # silently switch the convolutions to channels_last
    return (tuple((in_format(x, run.format), y) for x, y in step) for step in steps)


def _optimise(run: _Run, batch: Batch | tuple[Batch, ...], sctx: StepContext) -> float:
    run.opts.begin()
    out = run.hooks.training_step(run.model, batch, sctx)
    loss = out.loss.item()
    if run.world > 1:  # the global batch's loss: reported, and judged for divergence on every rank alike
        loss = distributed.sum_over_ranks([loss], run.device)[0] / run.world
    _check_divergence(run, loss)
    if not sctx.backward_calls:
        sctx.backward(out.loss)
    run.opts.finish(sctx._after_backward)
    run.hooks.after_step(run.model, sctx)
    sums = run.sums
    sums["loss"] += loss
    sums["steps"] += 1
    for k, v in out.metrics.items():
        sums["metrics"][k] = sums["metrics"].get(k, 0.0) + _metric(k, v)
    return loss


def _check_divergence(run: _Run, loss: float) -> None:
    """``DivergedError`` when a step's ``loss`` is not finite or above ``divergence_factor`` times the
    phase's start (its first step's loss, at least ``LOSS_FLOOR``), naming the epoch and step."""
    factor = run.ctx.divergence_factor
    if run.first_loss is None and math.isfinite(loss):
        run.first_loss = loss
    start = max(LOSS_FLOOR, run.first_loss or 0.0)
    if math.isfinite(loss) and loss <= factor * start:
        return
    why = (
        f"became {loss}"
        if not math.isfinite(loss)
        else f"rose to {loss:.3g}, over {factor:g}x its start ({start:.3g})"
    )
    lower = f"schedule.lr (now {run.s.lr:g})"
    if run.s.optimizer == "sgd" and run.s.momentum:
        lower += f" or schedule.momentum (now {run.s.momentum:g})"
    raise DivergedError(
        f"training diverged in {run.phase}, epoch {run.epoch + 1}, step {run.step_in_epoch + 1}: the loss "
        f"{why}; lower {lower}"
    )


def _metric(name: str, value: Any) -> float | list[float]:
    """A method's number as plain Python (checkpoints load with ``weights_only=True``, reports and
    events are JSON): a number, a 0-d or 1-d tensor or array, or a flat list of numbers."""
    if hasattr(value, "tolist"):  # torch and numpy
        value = value.tolist()
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, list | tuple) and all(isinstance(v, int | float) for v in value):
        return [float(v) for v in value]
    raise TypeError(f"method metric {name!r} must be a number or a flat list of numbers, got {value!r:.80}")


def _evaluate(run: _Run, record: dict[str, Any]) -> None:
    """Top-1 and test loss of the method's views (the first is the main one) and MACs, into ``record``."""
    views = evaluate_views(
        run.hooks.eval_views(run.model), run.ctx.test, run.device, run.ctx.recalibrate, run.ctx.num_workers
    )
    main = next(iter(views.values()))
    record.update(top1=main["top1"], test_loss=main["test_loss"], macs=run.hooks.current_macs(run.model))
    if len(views) > 1:
        record["views"] = {name: v["top1"] for name, v in views.items()}


def _epoch_record(run: _Run, lrs: dict[str, float], wall_s: float, cpu_s: float) -> dict[str, Any]:
    """The epoch's record before the method's epoch-end hook: losses, top-1 of every view, MACs."""
    sums, n = run.sums, max(1, run.sums["steps"])
    record: dict[str, Any] = {"phase": run.phase, "epoch": run.epoch, "train_loss": sums["loss"] / n}
    _evaluate(run, record)
    lr = next(iter(lrs.values())) if lrs else None
    record.update(train_macs=sums["train_macs"], lr=lr, wall_s=wall_s, cpu_s=cpu_s)
    metrics = {k: v / n for k, v in sums["metrics"].items()}
    if metrics:
        record["metrics"] = metrics
    return record


def _epoch_end(run: _Run, record: dict[str, Any]) -> EpochAction:
    """The method's epoch-end hook and its numbers (then the LRs of several parameter sets); on PRUNE,
    physical removal, new optimizers, BatchNorm statistics re-estimated, and the record shows the
    network before (``top1_before``, ``macs_before``) and after (every other field)."""
    seen = {k: record[k] for k in ("top1", "test_loss", "train_loss", "train_macs", "wall_s")}
    seen.update({f"top1_{k}": v for k, v in record.get("views", {}).items()})
    end = run.hooks.on_epoch_end(run.model, run.epoch, seen)
    metrics = {**record.get("metrics", {}), **{k: _metric(k, v) for k, v in end.metrics.items()}}
    if len(run.opts.slots) > 1:
        metrics.update({f"lr_{name}": lr for name, lr in run.opts.lrs().items()})
    if metrics:
        record["metrics"] = metrics
    if end.action is EpochAction.PRUNE:
        t0, c0 = time.perf_counter(), time.process_time()
        record["top1_before"], record["macs_before"] = record["top1"], record["macs"]
        example = run.ctx.example
        before = cost_of(run.model, example) if example is not None else None
        run.model = run.hooks.prune_now(run.model)
        run.prepare_model()
        if before is not None:
            report_pruned(run.ctx.reporter, before, cost_of(run.model, example))
        run.build_optimizers()
        record["bn_recalibrated"] = run.ctx.recalibrate(run.model)
        distributed.broadcast_module(run.model)  # the re-estimated statistics: rank 0's on every rank
        _evaluate(run, record)
        record["event"] = "pruned"
        record["wall_s"] += time.perf_counter() - t0
        record["cpu_s"] += time.process_time() - c0
    return end.action


def cost_of(model: nn.Module, example: torch.Tensor) -> Cost:
    """MACs (per sample) and params of ``model``, counted on ``example`` moved to the model's device."""
    return measure(model, example.to(next(model.parameters()).device))


def report_pruned(reporter: Reporter, before: Cost, after: Cost) -> None:
    """The ``pruned`` event: MACs and params of the network before and after its physical removal, their
    ratios (after / before) and the line people read. A reporter without the optional ``pruned``
    method gets the line as a message."""
    macs_ratio, params_ratio = after.macs / max(1, before.macs), after.params / max(1, before.params)
    text = (
        f"pruned: MACs {before.macs / 1e6:.2f}M -> {after.macs / 1e6:.2f}M ({macs_ratio:.3f}), "
        f"params {before.params:,} -> {after.params:,} ({params_ratio:.3f})"
    )
    pruned = getattr(reporter, "pruned", None)
    if pruned is None:
        reporter.message(text)
        return
    pruned(
        {
            "macs_before": before.macs,
            "macs_after": after.macs,
            "params_before": before.params,
            "params_after": after.params,
            "macs_ratio": round(macs_ratio, 4),
            "params_ratio": round(params_ratio, 4),
            "text": text,
        }
    )


def _stop_point(run: _Run) -> None:
    """Between steps, the one place a run may stop early: the state is consistent here, so it is
    checkpointed (step, RNG state and the epoch's sums included) before raising."""
    interrupted, cancelled = run.interrupted.is_set(), run.ctx.reporter.cancelled()
    if run.world > 1:  # one rank's signal or rank 0's cancel flag stops every rank at this step
        votes = distributed.sum_over_ranks([float(interrupted), float(cancelled)], run.device)
        interrupted, cancelled = votes[0] > 0, votes[1] > 0
    if interrupted:
        run.save()
        raise KeyboardInterrupt(
            f"interrupted; checkpoint saved at epoch {run.epoch + 1}, step {run.step_in_epoch}"
        )
    if cancelled:
        run.save()
        raise Cancelled("cancelled by request")


@contextmanager
def _interrupt_guard() -> Iterator[threading.Event]:
    """Turn the first Ctrl-C into a request honoured at the next step boundary; a second one
    interrupts at once. Only in the main thread (signals cannot be handled elsewhere)."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        flag.set()
        signal.signal(signal.SIGINT, previous)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)
