"""Optimizers per parameter set, one GradScaler, and the LR rules: what ``engine.fit`` steps with.

A method declares named parameter sets (``ParamSet``): the network's weights, and for example mask logits
or architecture parameters, each with its own optimizer (SGD, Adam, AdamW and their hyperparameters) and
its own LR rule (the schedule's warm-up + cosine/constant, or constant). ``Optimizers`` owns them for one
phase: every backward goes through the one ``GradScaler``, each optimizer is unscaled once before the
method's ``after_backward`` sees its gradients, and the scaler is updated once per training step.
With several ranks (``distributed.py``) each set's gradients are averaged over them right before that.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..spec import Schedule
from . import distributed

OptimizerKind = Literal["sgd", "adam", "adamw"]
LRRule = Literal["schedule", "constant"]


@dataclass(frozen=True)
class OptimizerConfig:
    """One optimizer's class and hyperparameters (``lr`` is the peak LR the LR rule scales)."""

    kind: OptimizerKind = "sgd"
    lr: float = 0.05
    momentum: float = 0.9  # SGD only
    nesterov: bool = False  # SGD only; needs momentum > 0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)  # Adam / AdamW only

    @classmethod
    def from_schedule(cls, s: Schedule) -> OptimizerConfig:
        """The schedule's optimizer: what a method's weights train with unless it says otherwise."""
        return cls(s.optimizer, s.lr, s.momentum, s.nesterov, s.weight_decay)

    def build(self, params: Iterable[torch.Tensor]) -> torch.optim.Optimizer:
        """The torch optimizer over ``params``; each param group remembers its peak LR as ``base_lr``."""
        params = list(params)
        if self.kind == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(
                params,
                lr=self.lr,
                momentum=self.momentum,
                weight_decay=self.weight_decay,
                nesterov=self.nesterov,
            )
        else:
            cls = torch.optim.Adam if self.kind == "adam" else torch.optim.AdamW
            opt = cls(params, lr=self.lr, betas=self.betas, weight_decay=self.weight_decay)
        for g in opt.param_groups:
            g["base_lr"] = g["lr"]
        return opt


@dataclass
class ParamSet:
    """A named set of parameters trained by one optimizer under one LR rule.

    ``optimizer=None`` means the schedule's optimizer and hyperparameters. ``lr_rule="schedule"``
    follows the schedule's warm-up then cosine (or constant) rule; ``"constant"`` keeps the peak LR.
    """

    name: str
    params: list[torch.Tensor]
    optimizer: OptimizerConfig | None = None
    lr_rule: LRRule = "schedule"


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """Multiplier of the peak LR at ``step``: linear warm-up, then cosine to zero or constant."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant" or total <= warmup:
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class _Slot:
    spec: ParamSet
    opt: torch.optim.Optimizer
    params: list[torch.Tensor] = field(default_factory=list)

    def has_grad(self) -> bool:
        return any(p.grad is not None for p in self.params)


class Optimizers:
    """The optimizers of one phase (one per ``ParamSet``) sharing one ``GradScaler``.

    Per training step: ``begin()`` zeroes every gradient; the method's step calls ``backward`` (any
    number of times, each optionally restricted to some parameters) and may ``step`` some sets early;
    ``finish()`` steps every set that has gradients and was not stepped yet, then updates the scaler.
    """

    def __init__(self, sets: Sequence[ParamSet], schedule: Schedule, scaler: torch.amp.GradScaler):
        if not sets:
            raise ValueError("a method must declare at least one parameter set")
        names = [s.name for s in sets]
        if len(set(names)) != len(names):
            raise ValueError(f"parameter set names must be unique, got {names}")
        default = OptimizerConfig.from_schedule(schedule)
        self.scaler = scaler
        self.slots: dict[str, _Slot] = {}
        owner: dict[int, str] = {}
        for s in sets:
            params = [p for p in s.params if p.requires_grad]
            if not params:
                raise ValueError(f"parameter set {s.name!r} has no trainable parameter")
            for p in params:
                if owner.setdefault(id(p), s.name) != s.name:
                    raise ValueError(f"a parameter is in both sets {owner[id(p)]!r} and {s.name!r}")
            self.slots[s.name] = _Slot(s, (s.optimizer or default).build(params), params)
        self._stepped: set[str] = set()

    def carry_state(self, old: Optimizers) -> None:
        """Take over ``old``'s optimizer state (momenta, Adam moments) of every parameter that is still
        here, in the set of the same name: after a physical prune, untouched sets (mask or
        architecture logits) keep theirs; the removed tensors' state goes with them."""
        for name, slot in self.slots.items():
            if name in old.slots:
                previous = old.slots[name].opt.state
                for p in slot.params:
                    if p in previous:
                        slot.opt.state[p] = previous[p]

    def lrs(self) -> dict[str, float]:
        """Each set's current learning rate."""
        return {n: s.opt.param_groups[0]["lr"] for n, s in self.slots.items()}

    def params(self, which: str | Iterable[torch.Tensor] | None) -> list[torch.Tensor]:
        """Parameters named by a set name, given directly, or (None) of every set."""
        if which is None:
            return [p for s in self.slots.values() for p in s.params]
        if isinstance(which, str):
            if which not in self.slots:
                raise KeyError(f"no parameter set {which!r}; declared: {', '.join(self.slots)}")
            return self.slots[which].params
        return list(which)

    def set_lr(self, factor: float) -> dict[str, float]:
        """Apply the LR rules at this step's schedule ``factor``; returns each set's LR."""
        for slot in self.slots.values():
            f = factor if slot.spec.lr_rule == "schedule" else 1.0
            for g in slot.opt.param_groups:
                g["lr"] = g["base_lr"] * f
        return self.lrs()

    def begin(self) -> None:
        self._stepped.clear()
        for slot in self.slots.values():
            slot.opt.zero_grad(set_to_none=True)

    def backward(
        self,
        loss: torch.Tensor,
        params: str | Iterable[torch.Tensor] | None = None,
        *,
        retain_graph: bool = False,
    ) -> None:
        """Accumulate d(loss)/d(params) into ``.grad`` through the GradScaler; ``params=None``: every
        parameter the loss reaches (autograd's default)."""
        scaled = self.scaler.scale(loss)
        inputs = None if params is None else self.params(params)
        scaled.backward(inputs=inputs, retain_graph=retain_graph)

    def step(self, names: Iterable[str], after_backward: Callable[[tuple[str, ...]], None]) -> None:
        """Unscale the named sets once, let ``after_backward`` read and edit their true gradients, then
        step them and zero their gradients. Under AMP a step whose gradients overflowed is skipped by
        the scaler, and ``after_backward`` does not see those gradients (they hold inf/NaN)."""
        names = tuple(names)
        unknown = [n for n in names if n not in self.slots]
        if unknown:
            raise KeyError(f"no parameter set {unknown[0]!r}; declared: {', '.join(self.slots)}")
        # several ranks: the mean gradient, before anything reads it; a set then has gradients on every
        # rank or on none, so the ranks step (and update the scaler) alike
        distributed.average_grads([p for n in names if n not in self._stepped for p in self.slots[n].params])
        ready = tuple(n for n in names if self.slots[n].has_grad())
        if not ready:
            return
        again = [n for n in ready if n in self._stepped]
        if again:
            raise RuntimeError(f"parameter set(s) {again} stepped twice in one training step")
        for n in ready:
            self.scaler.unscale_(self.slots[n].opt)
        if not self.scaler.is_enabled() or self._finite(ready):
            after_backward(ready)
        for n in ready:
            self.scaler.step(self.slots[n].opt)
            self.slots[n].opt.zero_grad(set_to_none=True)
        self._stepped.update(ready)

    def _finite(self, names: tuple[str, ...]) -> bool:
        grads = [p.grad for n in names for p in self.slots[n].params if p.grad is not None]
        return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())

    def finish(self, after_backward: Callable[[tuple[str, ...]], None]) -> None:
        """Step the sets not stepped yet (those with gradients), then update the scaler once."""
        # not filtered by this rank's gradients: another rank may hold some (``step`` averages them)
        pending = [n for n in self.slots if n not in self._stepped]
        if pending:
            self.step(pending, after_backward)
        if self._stepped:  # the scaler refuses to update when no optimizer was unscaled this step
            self.scaler.update()

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizers": {n: s.opt.state_dict() for n, s in self.slots.items()},
            "scaler": self.scaler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        differ = set(self.slots) ^ set(state["optimizers"])
        if differ:
            raise ValueError(f"checkpoint parameter sets differ from the method's: {sorted(differ)}")
        for n, s in self.slots.items():
            s.opt.load_state_dict(state["optimizers"][n])
        if state["scaler"]:  # empty from a disabled scaler (float32 or bfloat16): this one starts afresh
            self.scaler.load_state_dict(state["scaler"])
