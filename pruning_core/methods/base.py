"""The Method interface: what every pruning method plugs into the runner and the training loop.

A method declares its phases (each trained by the one ``engine.fit`` loop), may change the model when a
phase starts (one-shot pruning), steers each training step (losses, masks, extra parameters), may ask
for pruning at an epoch's end, and hands back a physically pruned model at the end. Defaults give plain
supervised training with optional knowledge distillation, so a method overrides only what it changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel
from torch import nn

from ..engine import EpochAction, StepContext, StepOutput
from ..groups import PruningGraph
from ..losses import kd_loss
from ..macs import count_macs
from ..registry import Registry
from ..spec import JobSpec


@dataclass(frozen=True)
class Phase:
    """One training phase; ``fit`` checkpoints each under its name."""

    name: str
    epochs: int


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

    @property
    def target_macs(self) -> int:
        return int(self.spec.target.macs_ratio * self.dense_macs)

    def graph(self, model: nn.Module) -> PruningGraph:
        """A fresh dependency graph of ``model`` (build again after any physical change)."""
        return PruningGraph(
            model, self.example.to(next(model.parameters()).device), self.num_classes, self.graph_timeout_s
        )


class Method:
    """Base class: supervised training (+ KD from ``ctx.teacher``), no pruning of its own."""

    name: ClassVar[str]

    def __init__(self, options: BaseModel, ctx: MethodContext):
        self.options = options
        self.ctx = ctx

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
    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]

    def training_step(
        self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], ctx: StepContext
    ) -> StepOutput:
        x, y = batch
        with ctx.autocast():
            logits = model(x)
            loss = self.supervised_loss(logits, x, y)
        return StepOutput(loss, logits)

    def supervised_loss(self, logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Cross-entropy, or the KD loss when a teacher is set."""
        teacher = self.ctx.teacher
        if teacher is None:
            return F.cross_entropy(logits, y)
        with torch.no_grad():
            t = teacher(x)
        kd = self.ctx.spec.kd
        return kd_loss(logits, t, y, kd.temperature, kd.weight)

    def after_backward(self, model: nn.Module, ctx: StepContext) -> None: ...

    def after_step(self, model: nn.Module, ctx: StepContext) -> None: ...

    def on_epoch_end(self, model: nn.Module, epoch: int, metrics: dict[str, float]) -> EpochAction:
        return EpochAction.CONTINUE

    def prune_now(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError(f"{self.name} does not prune during training")

    def eval_model(self, model: nn.Module) -> nn.Module:
        """The network to evaluate each epoch (a method with masks may return a masked view)."""
        return model

    def current_macs(self, model: nn.Module) -> int:
        return count_macs(model, self.ctx.example.to(next(model.parameters()).device))

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any], model: nn.Module) -> None: ...


METHODS: Registry[type[Method]] = Registry("method")


class DenseTraining(Method):
    """Training the dense model before pruning (the ``dense`` phase); never registered as a method."""

    name = "dense"

    def phases(self) -> list[Phase]:
        return [Phase("dense", self.ctx.spec.schedule.dense_epochs)]
