"""The Method interface: what every pruning method plugs into the runner and the training loop.

A method declares its phases (each trained by the one ``engine.fit`` loop), may change the model when a
phase starts (one-shot pruning), declares its parameter sets and their optimizers, steers each training
step (forwards, losses, backward passes, masks, extra parameters), adds numbers to each epoch's record,
may ask for pruning at an epoch's end, and hands back a physically pruned model at the end. Defaults
give plain supervised training with optional knowledge distillation, so a method overrides only what
it changes.

The order in which the hooks run, per phase (``runner._run_phases`` and ``engine.fit``):

- fresh phase: ``start_phase`` -> [BatchNorm re-estimated if the architecture changed] ->
  ``param_sets`` -> per step ``training_step`` -> ``after_backward`` (true, unscaled gradients of the
  sets about to step) -> ``after_step``; per epoch ``eval_views`` -> ``current_macs`` ->
  ``on_epoch_end`` -> on PRUNE ``prune_now`` -> ``param_sets`` -> [BatchNorm re-estimated] ->
  ``eval_views``; then checkpoint (``state_dict``).
- resumed phase (a checkpoint exists, finished or not): ``start_phase`` does NOT run. The model is
  rebuilt to the checkpoint's architecture (``surgery.describe``/``rebuild``: conv, linear and
  BatchNorm shapes), then ``load_state_dict(state, model)`` restores everything ``start_phase`` and
  training built (extra parameters, masks, hooks or parametrizations it attaches to the model,
  ``ctx.details``), then the model's weights are loaded, and only then ``param_sets`` -> optimizer
  states loaded -> training goes on at the saved step. A finished phase stops after the weights.
- after the last phase: ``finalize`` -> [BatchNorm re-estimated if the architecture changed].

Keep what a method adds beside the model (its own tensors and modules, forward hooks): the model
itself stays a zoo architecture that ``describe``/``rebuild`` can express, or it cannot be resumed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel
from torch import nn

from ..graph.budget import select_by_rates
from ..graph.groups import PruningGraph
from ..graph.importance import Scores
from ..graph.macs import count_macs
from ..registry import Registry
from ..spec import JobSpec
from ..training.batches import Batch, Streams
from ..training.engine import EpochEnd, StepContext, StepOutput
from ..training.evaluation import View
from ..training.losses import kd_loss
from ..training.optim import ParamSet


@dataclass(frozen=True)
class Phase:
    """One training phase; ``fit`` checkpoints each under its name. ``streams``: read the training set
    as fixed parts (e.g. TAS's split for weights and architecture); None: one stream."""

    name: str
    epochs: int
    streams: Streams | None = None


@dataclass
class MethodContext:
    """What a method may use besides the model: the job, the data's shape, the teacher."""

    spec: JobSpec
    example: torch.Tensor  # (1, C, H, W) on CPU: for graph tracing and MAC counting
    num_classes: int
    device: torch.device
    dense_macs: int
    teacher: nn.Module | None = None
    graph_timeout_s: float = 120.0
    details: dict[str, Any] = field(default_factory=dict)  # method-specific facts for report.json
    # ``target.allocation: latency``: per group of the dense graph, the MACs its channels cost per second
    # they take, relative to the network (``layer_times.latency_rates``); None allocates by MACs alone.
    latency_rates: list[float] | None = None

    @property
    def target_macs(self) -> int:
        return int(self.spec.target.macs_ratio * self.dense_macs)

    @property
    def round_to(self) -> int:
        """The job's channel step (channels) on its device: every method's widths are multiples of it
        in groups at least that wide (``JobSpec.channel_step``)."""
        return self.spec.channel_step(self.device.type)

    def select(self, graph: PruningGraph, scores: Scores) -> list[torch.Tensor]:
        """Keep indices per group: the global allocator (``budget.select_to_budget``) on ``scores`` at
        the job's MAC target, channel step and minimum width; when the job allocates by latency, its
        per-group pruned shares reshaped by ``latency_rates`` (``budget.select_by_rates``)."""
        return select_by_rates(
            graph,
            scores,
            self.latency_rates,
            self.target_macs,
            min_channels=self.spec.target.min_channels,
            round_to=self.round_to,
            min_share=self.spec.target.min_width,
        )

    def graph(self, model: nn.Module) -> PruningGraph:
        """A fresh dependency graph of ``model`` (build again after any physical change)."""
        return PruningGraph(
            model, self.example.to(next(model.parameters()).device), self.num_classes, self.graph_timeout_s
        )


class Method:
    """Base class: supervised training (+ KD from ``ctx.teacher``), no pruning of its own."""

    name: ClassVar[str]
    # True for a method that picks its channels from the weights it is given before training them
    # (one-shot): from untrained weights that pick is random, and the runner warns the job.
    ranks_given_weights: ClassVar[bool] = False
    # True for a method whose training step is one plain forward of the model as it is (no masks, hooks
    # or second forward): ``schedule.compile`` may then compile that forward (``acceleration``).
    compiles: ClassVar[bool] = False

    def __init__(self, options: BaseModel, ctx: MethodContext):
        self.options = options
        self.ctx = ctx

    def wants_teacher(self) -> bool:
        """Whether the runner should give this method a teacher (``ctx.teacher``, from ``spec.kd``)."""
        return self.ctx.spec.kd.enabled

    # --- phases ---
    def phases(self) -> list[Phase]:
        return [Phase("finetune", self.ctx.spec.schedule.epochs)]

    def start_phase(self, phase: Phase, model: nn.Module) -> nn.Module:
        """Called when a phase starts fresh (not when it resumes from a checkpoint)."""
        return model

    def finalize(self, model: nn.Module) -> nn.Module:
        """The physically pruned model, after the last phase."""
        return model

    # --- the training loop's hooks (engine.TrainHooks) ---
    def param_sets(self, model: nn.Module) -> list[ParamSet]:
        """Named parameter sets, each with its optimizer and LR rule; the first is the main one (its LR
        is the epoch record's ``lr``). Default: every trainable weight, the schedule's optimizer."""
        return [ParamSet("weights", [p for p in model.parameters() if p.requires_grad])]

    def training_step(
        self, model: nn.Module, batch: Batch | tuple[Batch, ...], ctx: StepContext
    ) -> StepOutput:
        """One step's forwards and losses. Return the loss for the engine to backpropagate into every
        parameter, or call ``ctx.backward`` (and ``ctx.update``) yourself and return it for reporting."""
        x, y = batch
        with ctx.autocast():
            loss = self.supervised_loss(model(x), x, y)
        return StepOutput(loss)

    def supervised_loss(self, logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Cross-entropy, or the KD loss when a teacher is set."""
        teacher = self.ctx.teacher
        if teacher is None:
            return F.cross_entropy(logits, y)
        with torch.no_grad():
            t = teacher(x)
        kd = self.ctx.spec.kd
        return kd_loss(logits, t, y, kd.temperature, kd.weight)

    def after_backward(self, model: nn.Module, ctx: StepContext) -> None:
        """Gradients are unscaled here (``ctx.stepping`` names the sets about to step): read or edit them.
        Not called for a step whose gradients overflowed under AMP (the scaler skips that step)."""

    def after_step(self, model: nn.Module, ctx: StepContext) -> None: ...

    def on_epoch_end(self, model: nn.Module, epoch: int, metrics: dict[str, float]) -> EpochEnd:
        """``metrics``: the epoch's top1, test_loss, train_loss, top1_<view>, train_macs (the forward
        MACs its training computed) and wall_s (its training steps' seconds). Return what happens next
        and the method's own numbers for the epoch's record."""
        return EpochEnd()

    def prune_now(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError(f"{self.name} does not prune during training")

    def eval_views(self, model: nn.Module) -> dict[str, View]:
        """The networks evaluated at each epoch's end; the first gives the record's ``top1`` (a method
        with masks returns its masked network first, and may add others, e.g. S2H's soft network)."""
        return {"model": View(model)}

    def current_macs(self, model: nn.Module) -> int:
        """MACs per sample of the network the method stands for now (masked channels excluded)."""
        return count_macs(model, self.ctx.example.to(next(model.parameters()).device))

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume (extends: ``{**super().state_dict(), ...}``): tensors and plain
        Python numbers, strings, lists and dicts only, no numpy (checkpoints load with
        ``weights_only=True``); the same holds for ``ctx.details``."""
        return {"details": dict(self.ctx.details)}

    def load_state_dict(self, state: dict[str, Any], model: nn.Module) -> None:
        """Restore ``state_dict()`` for ``model`` (rebuilt to the checkpoint's architecture; its weights
        are loaded right after this); runs before ``param_sets`` on resume."""
        self.ctx.details.clear()
        self.ctx.details.update(state.get("details", {}))


METHODS: Registry[type[Method]] = Registry("method")


class DenseTraining(Method):
    """Training the dense model before pruning (the ``dense`` phase); never registered as a method."""

    name = "dense"
    compiles = True

    def phases(self) -> list[Phase]:
        return [Phase("dense", self.ctx.spec.schedule.dense_epochs)]
