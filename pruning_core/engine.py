"""The one training loop. Methods never bring their own: they plug in through ``TrainHooks``.

``fit`` owns the device, AMP, the optimizers (one per parameter set the method declares, see
``optim.py``), the LR rules, the data order (``batches.py``), evaluation, BatchNorm re-estimation after
physical pruning, checkpoint/resume and cooperative cancellation.

A training step: ``training_step`` runs the method's forwards and either returns the loss (the engine
backpropagates it into every parameter) or calls ``ctx.backward`` itself, as often as it likes, each call
optionally restricted to some parameters; it may ``ctx.update`` some parameter sets early (TAS updates the
weights, then the architecture, in one step). Then every set with gradients that was not stepped yet is
unscaled once, shown to ``after_backward`` and stepped; the GradScaler is updated once per step.

Determinism: every epoch reseeds torch from (seed, epoch) and draws its data order from a generator
seeded the same way; a checkpoint taken mid-epoch stores the RNG state, the step and the epoch's running
sums, so on CPU an interrupted and resumed run ends with exactly the weights and history of an
uninterrupted one.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .batches import Batch, Streams, batch_loader, epoch_plan, epoch_seed, part_of_step, steps_per_epoch
from .errors import Cancelled
from .macs import COUNTED
from .optim import Optimizers, ParamSet, lr_factor
from .spec import Schedule

if TYPE_CHECKING:
    from collections.abc import Callable


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


@dataclass
class View:
    """A network evaluated at each epoch's end. ``recalibrate_bn``: evaluate it with BatchNorm statistics
    re-estimated for it (then restored, so training is unaffected), e.g. a masked sub-network."""

    module: nn.Module
    recalibrate_bn: bool = False


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
        """Context manager: float16 autocast on CUDA when the schedule enables AMP, else a no-op."""
        return torch.autocast("cuda", dtype=torch.float16, enabled=self._run.use_amp)

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
    """Progress sink; also the cooperative cancel check. All methods must be cheap."""

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
    num_workers: int = 0
    # Architecture snapshot/restore, so a checkpoint taken after physical pruning can be reloaded.
    describe: Callable[[nn.Module], dict[str, Any]] | None = None
    rebuild: Callable[[dict[str, Any]], nn.Module] | None = None
    bn_batches: int = 20  # batches that re-estimate BatchNorm statistics after pruning; 0 = never
    bn_batch_size: int = 64


@dataclass
class FitResult:
    model: nn.Module
    history: list[dict[str, Any]]
    wall_s: float
    resumed_from: int | None = None  # epoch the run resumed at, if it did
    meta: dict[str, Any] = field(default_factory=dict)  # what the caller stored with the phase


# --- evaluation and BatchNorm statistics ---


@torch.no_grad()
def evaluate(model: nn.Module, ds: Dataset, device: torch.device, batch_size: int = 256) -> dict[str, float]:
    """Top-1 accuracy (percent) and mean cross-entropy on ``ds``."""
    was = model.training
    model.eval()
    correct, total, loss = 0, 0, 0.0
    for x, y in DataLoader(ds, batch_size=batch_size):
        x, y = x.to(device), y.to(device)
        logits = model(x).float()
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        total += y.numel()
    model.train(was)
    return {"top1": 100.0 * correct / max(1, total), "test_loss": loss / max(1, total)}


def _norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def recalibrate_bn(
    model: nn.Module, ds: Dataset, device: torch.device, batches: int = 20, batch_size: int = 64
) -> bool:
    """Re-estimate BatchNorm running statistics as the cumulative average over ``batches`` training
    batches in train mode (no weight update). Leaves the global RNG as it found it. Returns whether
    the model had BatchNorm layers to re-estimate."""
    norms = [m for m in _norms(model) if m.track_running_stats]
    if not norms or batches <= 0:
        return False
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
    was = model.training
    model.train()
    g = torch.Generator().manual_seed(0)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, generator=g, drop_last=len(ds) > batch_size)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for i, (x, _) in enumerate(loader):
            if i >= batches:
                break
            model(x.to(device))
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    model.train(was)
    return True


@contextmanager
def _bn_state_kept(model: nn.Module) -> Iterator[None]:
    """Restore every BatchNorm buffer on exit (statistics re-estimated for one view only)."""
    saved = [
        {k: v.clone() for k, v in m.state_dict().items() if k.startswith(("running", "num"))}
        for m in _norms(model)
    ]
    try:
        yield
    finally:
        for m, state in zip(_norms(model), saved, strict=True):
            m.load_state_dict(state, strict=False)


def evaluate_views(views: dict[str, View], ctx: TrainContext) -> dict[str, dict[str, float]]:
    """Evaluate each view on the test set, re-estimating BatchNorm statistics first where it asks."""
    out = {}
    for name, view in views.items():
        if view.recalibrate_bn and ctx.bn_batches:
            with _bn_state_kept(view.module):
                recalibrate_bn(view.module, ctx.train, ctx.device, ctx.bn_batches, ctx.bn_batch_size)
                out[name] = evaluate(view.module, ctx.test, ctx.device)
        else:
            out[name] = evaluate(view.module, ctx.test, ctx.device)
    return out


class MacMeter:
    """Forward MACs that a model's conv and linear layers really compute, summed over every call and
    sample while attached (the same per-layer rule as ``macs.count_macs``, times the batch)."""

    def __init__(self) -> None:
        self.total = 0
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _hook(self, m: nn.Module, _inp, out: torch.Tensor) -> None:
        self.total += out.numel() * m.weight[0].numel()

    @contextmanager
    def attached(self, model: nn.Module) -> Iterator[MacMeter]:
        self._handles = [
            m.register_forward_hook(self._hook) for m in model.modules() if isinstance(m, COUNTED)
        ]
        try:
            yield self
        finally:
            for h in self._handles:
                h.remove()
            self._handles.clear()


# --- checkpoints ---


CHECKPOINT_FORMAT = 2  # 2: optimizers per parameter set, the epoch's running sums, the caller's meta


def _ckpt_path(ctx: TrainContext, phase: str) -> Path | None:
    return ctx.checkpoint_dir / f"{phase}.pt" if ctx.checkpoint_dir else None


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
    return {"loss": 0.0, "steps": 0, "train_macs": 0, "metrics": {}}


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
        self.model, self.hooks, self.s, self.ctx, self.phase, self.streams = (
            model,
            hooks,
            s,
            ctx,
            phase,
            streams,
        )
        self.device = ctx.device
        self.steps = steps_per_epoch(len(ctx.train), s, streams)
        self.total = self.steps * s.epochs
        self.warmup = round(s.warmup_epochs * self.steps)
        self.use_amp = s.amp and ctx.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.opts: Optimizers = None  # type: ignore[assignment]  # built once the method's state is known
        self.epoch, self.step_in_epoch, self.history = 0, 0, []
        self.sums = _new_sums()
        self.rng_state: torch.Tensor | None = None
        self.interrupted = threading.Event()
        self.path = _ckpt_path(ctx, phase)
        self.meta = dict(meta)

    def build_optimizers(self) -> None:
        """Optimizers for the method's current parameter sets (again after any physical pruning: the
        old ones hold the removed tensors); the GradScaler carries over."""
        self.opts = Optimizers(self.hooks.param_sets(self.model), self.s, self.scaler)

    def state(self, finished: bool = False) -> dict[str, Any]:
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
        }

    def save(self, finished: bool = False) -> None:
        if self.path:
            save_checkpoint(self.path, self.state(finished))

    def restore(self, ck: dict[str, Any]) -> None:
        """Architecture, weights, then the method's state, then optimizers over its parameter sets."""
        if ck["arch"] is not None and self.ctx.describe and ck["arch"] != self.ctx.describe(self.model):
            self.model = self.ctx.rebuild(ck["arch"]).to(self.device)
        self.model.load_state_dict(ck["model"])
        self.hooks.load_state_dict(ck["method"], self.model)
        self.build_optimizers()
        self.opts.load_state_dict(ck["optim"])
        self.epoch, self.step_in_epoch, self.history = ck["epoch"], ck["step_in_epoch"], ck["history"]
        self.sums = ck["sums"] or _new_sums()
        self.rng_state = ck["rng"]
        self.meta = ck.get("meta") or {}


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
    model.to(ctx.device)
    run = _Run(model, hooks, schedule, ctx, phase, streams, meta or {})
    ck = load_checkpoint(run.path)
    if ck is not None and ck.get("format") != CHECKPOINT_FORMAT:
        ctx.reporter.message(
            f"{phase}: checkpoint from an older version of the engine; training the phase again"
        )
        ck = None
    resumed = None
    if ck is not None:
        run.restore(ck)
        resumed = run.epoch
        if ck["finished"]:
            return FitResult(run.model, run.history, time.perf_counter() - t0, resumed, run.meta)
        ctx.reporter.message(f"{phase}: resuming at epoch {run.epoch + 1}, step {run.step_in_epoch}")
    else:
        run.build_optimizers()
    ctx.reporter.phase(phase, schedule.epochs, run.steps)
    with _interrupt_guard() as interrupted:
        run.interrupted = interrupted
        while run.epoch < schedule.epochs:
            if _train_epoch(run) is EpochAction.STOP:
                break
    run.save(finished=True)
    return FitResult(run.model, run.history, time.perf_counter() - t0, resumed, run.meta)


def _train_epoch(run: _Run) -> EpochAction:
    ctx, s = run.ctx, run.s
    t0 = time.perf_counter()
    plan = epoch_plan(len(ctx.train), s, ctx.seed, run.epoch, run.streams)
    if run.step_in_epoch and run.rng_state is not None:
        torch.set_rng_state(run.rng_state)
    else:
        torch.manual_seed(epoch_seed(ctx.seed, run.epoch))
    run.model.train()
    lrs: dict[str, float] = {}
    meter = MacMeter()
    with meter.attached(run.model):
        for batches in batch_loader(ctx.train, plan[run.step_in_epoch :], ctx.num_workers, run.device):
            _stop_point(run)
            step = run.epoch * run.steps + run.step_in_epoch
            lrs = run.opts.set_lr(lr_factor(step, run.total, run.warmup, s.lr_schedule))
            sctx = StepContext(run, step, part_of_step(run.step_in_epoch, run.streams))
            meter.total = 0
            loss = _optimise(run, batches[0] if len(batches) == 1 else batches, sctx)
            run.sums["train_macs"] += meter.total
            run.step_in_epoch += 1
            run.rng_state = torch.get_rng_state()  # before the next batch is drawn: where a resume starts
            ctx.reporter.step(run.phase, run.epoch, run.step_in_epoch, loss)
    record = _epoch_record(run, lrs, time.perf_counter() - t0)
    run.step_in_epoch, run.rng_state, run.sums = 0, None, _new_sums()
    action = _epoch_end(run, record)
    run.history.append(record)
    ctx.reporter.epoch(record)
    run.epoch += 1
    run.save()
    return action


def _optimise(run: _Run, batch: Batch | tuple[Batch, ...], sctx: StepContext) -> float:
    run.opts.begin()
    out = run.hooks.training_step(run.model, batch, sctx)
    loss = out.loss.item()
    if not torch.isfinite(out.loss):
        raise FloatingPointError(
            f"{run.phase}: loss became {loss} at step {sctx.step}; lower the learning rate"
        )
    if not sctx.backward_calls:
        sctx.backward(out.loss)
    run.opts.finish(sctx._after_backward)
    run.hooks.after_step(run.model, sctx)
    sums = run.sums
    sums["loss"] += loss
    sums["steps"] += 1
    for k, v in out.metrics.items():
        sums["metrics"][k] = sums["metrics"].get(k, 0.0) + float(v)
    return loss


def _epoch_record(run: _Run, lrs: dict[str, float], wall_s: float) -> dict[str, Any]:
    """The epoch's record before the method's epoch-end hook: losses, top-1 of every view, MACs."""
    sums, n = run.sums, max(1, run.sums["steps"])
    views = evaluate_views(run.hooks.eval_views(run.model), run.ctx)
    main = next(iter(views.values()))
    record: dict[str, Any] = {
        "phase": run.phase,
        "epoch": run.epoch,
        "train_loss": sums["loss"] / n,
        "top1": main["top1"],
        "test_loss": main["test_loss"],
        "macs": run.hooks.current_macs(run.model),
        "train_macs": sums["train_macs"],
        "lr": next(iter(lrs.values())) if lrs else None,
        "wall_s": wall_s,
    }
    if len(views) > 1:
        record["views"] = {name: v["top1"] for name, v in views.items()}
    metrics = {k: v / n for k, v in sums["metrics"].items()}
    if len(lrs) > 1:
        metrics.update({f"lr_{name}": lr for name, lr in lrs.items()})
    if metrics:
        record["metrics"] = metrics
    return record


def _epoch_end(run: _Run, record: dict[str, Any]) -> EpochAction:
    """The method's epoch-end hook; on PRUNE, physical removal, new optimizers, BatchNorm statistics
    re-estimated, and the record shows top-1 and MACs before and after."""
    seen = {k: record[k] for k in ("top1", "test_loss", "train_loss")}
    seen.update({f"top1_{k}": v for k, v in record.get("views", {}).items()})
    end = run.hooks.on_epoch_end(run.model, run.epoch, seen)
    if end.metrics:
        record["metrics"] = {**record.get("metrics", {}), **end.metrics}
    if end.action is EpochAction.PRUNE:
        t0 = time.perf_counter()
        record["top1_before"], record["macs_before"] = record["top1"], record["macs"]
        run.model = run.hooks.prune_now(run.model).to(run.device)
        run.build_optimizers()
        record["bn_recalibrated"] = recalibrate_bn(
            run.model, run.ctx.train, run.device, run.ctx.bn_batches, run.ctx.bn_batch_size
        )
        views = evaluate_views(run.hooks.eval_views(run.model), run.ctx)
        record["top1"] = next(iter(views.values()))["top1"]
        record["macs"] = run.hooks.current_macs(run.model)
        record["event"] = "pruned"
        record["wall_s"] += time.perf_counter() - t0
    return end.action


def _stop_point(run: _Run) -> None:
    """Between steps, the one place a run may stop early: the state is consistent here, so it is
    checkpointed (step, RNG state and the epoch's sums included) before raising."""
    if run.interrupted.is_set():
        run.save()
        raise KeyboardInterrupt(
            f"interrupted; checkpoint saved at epoch {run.epoch + 1}, step {run.step_in_epoch}"
        )
    if run.ctx.reporter.cancelled():
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
