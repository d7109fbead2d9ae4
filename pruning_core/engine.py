"""The one training loop. Methods never bring their own: they plug in through ``TrainHooks``.

``fit`` owns the device, AMP, the LR schedule, evaluation, checkpoint/resume and cooperative
cancellation. Determinism: every epoch reseeds torch from (seed, epoch) and draws its data order from
a generator seeded the same way, and a checkpoint taken mid-epoch stores the RNG state and the step, so
on CPU an interrupted and resumed run ends with exactly the weights of an uninterrupted one.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from .errors import Cancelled
from .spec import Schedule


class EpochAction(Enum):
    CONTINUE = "continue"
    STOP = "stop"  # end the phase now (e.g. a search converged)
    PRUNE = "prune"  # call hooks.prune_now(model), rebuild the optimizer, go on training


@dataclass
class StepOutput:
    loss: torch.Tensor
    logits: torch.Tensor | None = None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class StepContext:
    phase: str
    epoch: int
    step: int  # global step within the phase
    total_steps: int
    device: torch.device
    autocast: Callable[[], Any]  # context manager factory: mixed precision where enabled


class TrainHooks(Protocol):
    """What a method plugs into ``fit`` (``methods.base.Method`` implements all of it)."""

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]: ...
    def training_step(
        self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], ctx: StepContext
    ) -> StepOutput: ...
    def after_backward(self, model: nn.Module, ctx: StepContext) -> None: ...
    def after_step(self, model: nn.Module, ctx: StepContext) -> None: ...
    def on_epoch_end(self, model: nn.Module, epoch: int, metrics: dict[str, float]) -> EpochAction: ...
    def prune_now(self, model: nn.Module) -> nn.Module: ...
    def eval_model(self, model: nn.Module) -> nn.Module: ...
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


@dataclass
class FitResult:
    model: nn.Module
    history: list[dict[str, Any]]
    wall_s: float
    resumed_from: int | None = None  # epoch the run resumed at, if it did


# --- data order ---


class _OrderSampler(Sampler[int]):
    def __init__(self, order: list[int]):
        self.order = order

    def __iter__(self) -> Iterator[int]:
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


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


def _loader(ds: Dataset, order: list[int], batch_size: int, workers: int, device: torch.device) -> DataLoader:
    # Its own generator: the loader must not draw from the global RNG, which the resume replays.
    return DataLoader(
        ds,
        batch_size=batch_size,
        sampler=_OrderSampler(order),
        num_workers=workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(len(order)),
    )


def steps_per_epoch(n: int, schedule: Schedule) -> int:
    steps = max(1, len(epoch_order(n, schedule.batch_size, 0, 0)) // schedule.batch_size)
    return min(steps, schedule.max_steps_per_epoch or steps)


# --- learning rate ---


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """Multiplier of the peak LR at ``step``: linear warm-up, then cosine to zero or constant."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant" or total <= warmup:
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(groups: list[dict[str, Any]], s: Schedule) -> torch.optim.Optimizer:
    for g in groups:
        g.setdefault("lr", s.lr)
        g["base_lr"] = g["lr"]
    if s.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay, nesterov=s.momentum > 0
        )
    cls = torch.optim.Adam if s.optimizer == "adam" else torch.optim.AdamW
    return cls(groups, lr=s.lr, weight_decay=s.weight_decay)


def _set_lr(opt: torch.optim.Optimizer, factor: float) -> float:
    for g in opt.param_groups:
        g["lr"] = g["base_lr"] * factor
    return opt.param_groups[0]["lr"]


# --- evaluation ---


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


@torch.no_grad()
def recalibrate_bn(
    model: nn.Module, ds: Dataset, device: torch.device, batches: int = 20, batch_size: int = 64
) -> None:
    """Re-estimate BatchNorm running statistics with forward passes in train mode (no weight update)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
    was = model.training
    model.train()
    g = torch.Generator().manual_seed(0)
    for i, (x, _) in enumerate(
        DataLoader(ds, batch_size=batch_size, shuffle=True, generator=g, drop_last=len(ds) > batch_size)
    ):
        if i >= batches:
            break
        model(x.to(device))
    for m in norms:
        m.momentum = 0.1
    model.train(was)


# --- checkpoints ---


def _ckpt_path(ctx: TrainContext, phase: str) -> Path | None:
    return ctx.checkpoint_dir / f"{phase}.pt" if ctx.checkpoint_dir else None


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Atomic write: a crash mid-save leaves the previous checkpoint intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    if not path or not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


# --- the loop ---


class _Run:
    """The state of one ``fit`` call (kept small: model, optimizer, position, history)."""

    def __init__(self, model: nn.Module, hooks: TrainHooks, s: Schedule, ctx: TrainContext, phase: str):
        self.model, self.hooks, self.s, self.ctx, self.phase = model, hooks, s, ctx, phase
        self.device = ctx.device
        self.steps = steps_per_epoch(len(ctx.train), s)
        self.total = self.steps * s.epochs
        self.warmup = round(s.warmup_epochs * self.steps)
        self.use_amp = s.amp and ctx.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.epoch, self.step_in_epoch, self.history = 0, 0, []
        self.rng_state: torch.Tensor | None = None
        self.interrupted = threading.Event()
        self.path = _ckpt_path(ctx, phase)
        self.opt = make_optimizer(hooks.param_groups(model), s)

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.float16, enabled=self.use_amp)

    def state(self, finished: bool = False) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "finished": finished,
            "arch": self.ctx.describe(self.model) if self.ctx.describe else None,
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scaler": self.scaler.state_dict(),
            "method": self.hooks.state_dict(),
            "history": self.history,
            "rng": self.rng_state if self.step_in_epoch else None,
        }

    def save(self, finished: bool = False) -> None:
        if self.path:
            save_checkpoint(self.path, self.state(finished))

    def restore(self, ck: dict[str, Any]) -> None:
        if ck["arch"] is not None and self.ctx.describe and ck["arch"] != self.ctx.describe(self.model):
            self.model = self.ctx.rebuild(ck["arch"]).to(self.device)
        self.model.load_state_dict(ck["model"])
        self.hooks.load_state_dict(ck["method"], self.model)
        self.opt = make_optimizer(self.hooks.param_groups(self.model), self.s)
        self.opt.load_state_dict(ck["optimizer"])
        self.scaler.load_state_dict(ck["scaler"])
        self.epoch, self.step_in_epoch, self.history = ck["epoch"], ck["step_in_epoch"], ck["history"]
        self.rng_state = ck["rng"]


def fit(
    model: nn.Module, hooks: TrainHooks, schedule: Schedule, ctx: TrainContext, phase: str = "train"
) -> FitResult:
    """Train ``model`` for ``schedule.epochs`` epochs with ``hooks``; resume from the phase's checkpoint
    if one exists. Returns the trained model (a new object if the method pruned it physically)."""
    t0 = time.perf_counter()
    model.to(ctx.device)
    run = _Run(model, hooks, schedule, ctx, phase)
    ck = load_checkpoint(run.path) if run.path else None
    resumed = None
    if ck is not None:
        run.restore(ck)
        resumed = run.epoch
        if ck["finished"]:
            return FitResult(run.model, run.history, time.perf_counter() - t0, resumed)
        ctx.reporter.message(f"{phase}: resuming at epoch {run.epoch + 1}, step {run.step_in_epoch}")
    ctx.reporter.phase(phase, schedule.epochs, run.steps)
    with _interrupt_guard() as interrupted:
        run.interrupted = interrupted
        while run.epoch < schedule.epochs:
            if _train_epoch(run) is EpochAction.STOP:
                break
    run.save(finished=True)
    return FitResult(run.model, run.history, time.perf_counter() - t0, resumed)


def _train_epoch(run: _Run) -> EpochAction:
    ctx, s, model = run.ctx, run.s, run.model
    t0 = time.perf_counter()
    order = epoch_order(len(ctx.train), s.batch_size, ctx.seed, run.epoch)[: run.steps * s.batch_size]
    if run.step_in_epoch and run.rng_state is not None:
        torch.set_rng_state(run.rng_state)
    else:
        torch.manual_seed(epoch_seed(ctx.seed, run.epoch))
    start = run.step_in_epoch
    loader = _loader(ctx.train, order[start * s.batch_size :], s.batch_size, ctx.num_workers, run.device)
    model.train()
    loss_sum, n = 0.0, 0
    for x, y in loader:
        _stop_point(run)
        step = run.epoch * run.steps + run.step_in_epoch
        sctx = StepContext(run.phase, run.epoch, step, run.total, run.device, run.autocast)
        lr = _set_lr(run.opt, lr_factor(step, run.total, run.warmup, s.lr_schedule))
        loss = _optimise(
            run, model, (x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)), sctx
        )
        loss_sum, n = loss_sum + loss, n + 1
        run.step_in_epoch += 1
        run.rng_state = torch.get_rng_state()  # before the next batch is drawn: where a resume starts
        ctx.reporter.step(run.phase, run.epoch, run.step_in_epoch, loss)
    run.step_in_epoch, run.rng_state = 0, None
    metrics = evaluate(run.hooks.eval_model(model), ctx.test, run.device)
    record = {
        "phase": run.phase,
        "epoch": run.epoch,
        "train_loss": loss_sum / max(1, n),
        "top1": metrics["top1"],
        "macs": run.hooks.current_macs(model),
        "lr": lr if n else None,
        "wall_s": time.perf_counter() - t0,
    }
    action = run.hooks.on_epoch_end(model, run.epoch, {**metrics, "train_loss": record["train_loss"]})
    if action is EpochAction.PRUNE:
        run.model = model = run.hooks.prune_now(model).to(run.device)
        run.opt = make_optimizer(run.hooks.param_groups(model), s)  # old one holds the removed tensors
        record["macs"] = run.hooks.current_macs(model)
        record["event"] = "pruned"
    run.history.append(record)
    ctx.reporter.epoch(record)
    run.epoch += 1
    run.save()
    return action


def _stop_point(run: _Run) -> None:
    """Between steps, the one place a run may stop early: the state is consistent here, so it is
    checkpointed (step and RNG state included) before raising."""
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


def _optimise(
    run: _Run, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], sctx: StepContext
) -> float:
    run.opt.zero_grad(set_to_none=True)
    out = run.hooks.training_step(model, batch, sctx)
    if not torch.isfinite(out.loss):
        raise FloatingPointError(
            f"{run.phase}: loss became {out.loss.item()} at step {sctx.step}; lower the learning rate"
        )
    run.scaler.scale(out.loss).backward()
    run.scaler.unscale_(run.opt)
    run.hooks.after_backward(model, sctx)
    run.scaler.step(run.opt)
    run.scaler.update()
    run.hooks.after_step(model, sctx)
    return out.loss.item()
