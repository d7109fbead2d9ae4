"""EPI (Shen et al., CVPR 2022, "When to Prune? A Policy towards Early Structural Pruning"): train dense
and prune as soon as the dominant sub-network stabilises; then train the pruned network for the rest
of the same epoch budget. No official code; the formulas below are the paper's as four
re-implementations agree (``../shared/docs/METHODS.md`` section 4).

- At the end of every epoch, the **dominant architecture** ``A_t``: the keep counts per coupled group
  that pruning to the target would give now, from the engine's global allocator
  (``ctx.select``: ``budget.select_to_budget`` with the job's width floor, reshaped by the latency
  rates under ``target.allocation: latency``) on the importance module's scores. ``criterion``:
  ``magnitude`` (default) is ``importance.magnitude``, group L2 magnitude mean-normalised per group,
  the scores the ``magnitude`` method ranks by; ``neuron_l2`` is the paper's ``||W_n||_2 / sqrt(P_l)``
  compared across layers unnormalised; ``taylor`` is first-order Taylor ``(sum g*w)^2`` summed over
  the epoch's steps, mean-normalised per group. Nothing is pruned. Why not the paper's default:
  after initialisation (std ~ 1/sqrt(fan-in)) ``||W||/sqrt(P)`` is smallest in the wide late layers,
  so the global cut left ResNet-20's last groups 1 channel wide at 0.5 of the MACs, the architecture
  barely moved from its initial one and the indicator fired at the first epoch it could: it measured
  the initialisation's scale, not a learned structure (``../shared/docs/METHODS.md`` section 4).
- Structural similarity ``psi(A, B) = 1 - mean_l |a_l - b_l| / (a_l + b_l)``; the indicator
  ``EPI_t = mean_{j=1..r} psi(A_t, A_{t-j})``.
- Trigger: the first epoch (not before ``min_epochs``) with ``EPI_t >= tau`` and ``EPI_t >= EPI_{t-j}``
  for every earlier value in the window (this second condition can only bite where ``min_epochs``
  held back an earlier value above tau; earlier epochs without a value do not count); at the latest
  the ``deadline`` [ours: so every job prunes], which never falls before ``min_epochs`` nor after
  the second-to-last epoch, so the pruned network always trains at least one epoch.
  Then the dominant sub-network is removed physically (the engine's PRUNE: new optimizers, BatchNorm
  re-estimated) and training goes on with it to ``schedule.epochs``.
- The cost claim as a number per job: ``method_details.training_macs`` sums the forward MACs every
  epoch really trained (the engine's ``train_macs``: dense before the trigger, pruned after) against
  dense-then-prune with the same epochs (every epoch at a dense epoch's cost), and
  ``training_wall_s`` the training steps' seconds (plus EPI's own scoring at each epoch's end) against
  the same estimate from the dense epochs. ``architecture`` records the pruned keep counts per group.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ...graph.groups import PruningGraph
from ...graph.importance import Scores, TaylorAccumulator, magnitude, neuron_l2
from ...graph.surgery import remove_channels
from ...training.engine import EpochAction, EpochEnd, StepContext
from ..base import METHODS, Method, Phase
from .options import EPIOptions


def similarity(a: Sequence[int], b: Sequence[int]) -> float:
    """psi(A, B) = 1 - mean over groups of |a - b| / (a + b); 1 for equal architectures, in [0, 1]."""
    if len(a) != len(b) or not a:
        raise ValueError("architectures must have the same, non-zero number of groups")
    return 1.0 - statistics.fmean(abs(x - y) / (x + y) if x + y else 0.0 for x, y in zip(a, b, strict=True))


def indicator(archs: Sequence[Sequence[int]], window: int) -> float | None:
    """EPI_t for the last architecture: its mean similarity to the ``window`` before it (None while
    fewer than ``window`` + 1 architectures are known)."""
    if len(archs) <= window:
        return None
    last = archs[-1]
    return statistics.fmean(similarity(last, archs[-1 - j]) for j in range(1, window + 1))


def fires(values: Sequence[float | None], tau: float, window: int) -> bool:
    """Whether the last indicator value triggers: at least ``tau`` and not below any of the (known)
    ``window`` values before it."""
    if not values or values[-1] is None:
        return False
    now = values[-1]
    earlier = [v for v in values[-1 - window : -1] if v is not None]
    return now >= tau and all(now >= v for v in earlier)


def deadline_epoch(epochs: int, share: float, min_epochs: int = 1) -> int:
    """The (0-based) epoch at whose end EPI prunes at the latest: the end of ``share`` of the epochs,
    not before ``min_epochs``, and never the last epoch (the pruned network trains at least one)."""
    return max(0, min(epochs - 2, max(math.ceil(share * epochs), min_epochs) - 1))


@METHODS.register("epi")
class EPI(Method):
    options: EPIOptions

    def __init__(self, options: EPIOptions, ctx) -> None:
        super().__init__(options, ctx)
        self.graph: PruningGraph | None = None
        self.taylor: TaylorAccumulator | None = None
        self.archs: list[list[int]] = []  # the dominant architecture of every epoch so far
        self.values: list[float | None] = []  # the indicator of every epoch so far
        self.pruned_at: int | None = None
        self._keep: list[torch.Tensor] | None = None
        self.spent = {"macs": 0, "wall_s": 0.0}  # training so far
        self.dense_epochs: list[dict[str, float]] = []  # train_macs and wall_s of every dense epoch

    @property
    def min_epochs(self) -> int:
        return self.options.min_epochs or self.options.window + 1

    def phases(self) -> list[Phase]:
        return [Phase("epi", self.ctx.spec.schedule.epochs)]

    def start_phase(self, phase: Phase, model: nn.Module) -> nn.Module:
        self._setup(model)
        return model

    def _setup(self, model: nn.Module) -> None:
        self.graph = self.ctx.graph(model)
        self.taylor = TaylorAccumulator(self.graph) if self.options.criterion == "taylor" else None
        o = self.options
        d = self.ctx.details
        d.setdefault("criterion", o.criterion)
        d.setdefault("threshold", o.tau)
        d.setdefault("window", o.window)
        d.setdefault("deadline_epoch", self._deadline + 1)
        if self._deadline + 1 < self.min_epochs:
            d.setdefault(
                "note", "the schedule is too short for the indicator (window + 1 epochs): the deadline prunes"
            )

    @property
    def _deadline(self) -> int:
        return deadline_epoch(self.ctx.spec.schedule.epochs, self.options.deadline, self.min_epochs)

    # --- every step ---
    def after_backward(self, model: nn.Module, ctx: StepContext) -> None:
        if self.taylor is not None:
            self.taylor.accumulate()

    # --- per epoch ---
    def _scores(self) -> Scores:
        assert self.graph is not None
        if self.taylor is not None:
            return self.taylor.scores()
        return neuron_l2(self.graph) if self.options.criterion == "neuron_l2" else magnitude(self.graph)

    def on_epoch_end(self, model: nn.Module, epoch: int, metrics: dict[str, float]) -> EpochEnd:
        if self.graph is None:  # pruned: the rest of the budget trains the pruned network
            self._account(metrics)
            return EpochEnd()
        t0 = time.perf_counter()
        o, graph = self.options, self.graph
        keep = self.ctx.select(graph, self._scores())
        self._account({**metrics, "wall_s": metrics.get("wall_s", 0.0) + time.perf_counter() - t0})
        if self.taylor is not None:
            self.taylor.reset()
        self.archs.append([len(k) for k in keep])
        self.values.append(indicator(self.archs, o.window))
        numbers: dict[str, Any] = {"epi_threshold": o.tau, **self._similarities()}
        if self.values[-1] is not None:
            numbers["epi"] = self.values[-1]
        by_indicator = epoch + 1 >= self.min_epochs and fires(self.values, o.tau, o.window)
        if not by_indicator and epoch < self._deadline:
            return EpochEnd(metrics=numbers)
        self.pruned_at, self._keep = epoch, keep
        self.ctx.details.update(
            trigger_epoch=epoch + 1,
            trigger="indicator" if by_indicator else "deadline",
            architecture=self.archs[-1],
        )
        return EpochEnd(EpochAction.PRUNE, numbers)

    def _similarities(self) -> dict[str, Any]:
        """The last dominant architecture's similarity to the first one and to each of the ``window``
        before it (latest first), into the report's ``similarity`` list and the epoch's record."""
        last = self.archs[-1]
        before = [similarity(last, a) for a in reversed(self.archs[-1 - self.options.window : -1])]
        sims = {"similarity_initial": similarity(last, self.archs[0]), "similarity_previous": before}
        self.ctx.details.setdefault("similarity", []).append({"epoch": len(self.archs), **sims})
        return sims

    def _account(self, metrics: dict[str, float]) -> None:
        """Training cost so far, and dense-then-prune's for the same epochs, into the report."""
        macs, wall = int(metrics.get("train_macs", 0)), float(metrics.get("wall_s", 0.0))
        self.spent["macs"] += macs
        self.spent["wall_s"] += wall
        if self.graph is not None:  # this epoch trained the dense network
            self.dense_epochs.append({"train_macs": macs, "wall_s": wall})
        epochs = self.ctx.spec.schedule.epochs
        dense_macs = statistics.fmean(e["train_macs"] for e in self.dense_epochs) * epochs
        dense_wall = statistics.fmean(e["wall_s"] for e in self.dense_epochs) * epochs
        self.ctx.details["training_macs"] = {
            "epi": self.spent["macs"],
            "dense_then_prune": round(dense_macs),
            "ratio": self.spent["macs"] / dense_macs if dense_macs else None,
        }
        self.ctx.details["training_wall_s"] = {
            "epi": self.spent["wall_s"],
            "dense_then_prune_estimate": dense_wall,
            "ratio": self.spent["wall_s"] / dense_wall if dense_wall else None,
        }

    def prune_now(self, model: nn.Module) -> nn.Module:
        """Remove everything but the trigger epoch's dominant sub-network."""
        assert self.graph is not None and self._keep is not None
        graph, keep = self.graph, self._keep
        self.graph, self.taylor, self._keep = None, None, None
        self.ctx.details["predicted_macs"] = int(graph.cost.macs([len(k) for k in keep]))
        return remove_channels(graph, keep)

    # --- resume ---
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["epi"] = {
            "archs": [list(a) for a in self.archs],
            "values": list(self.values),
            "pruned_at": self.pruned_at,
            "spent": dict(self.spent),
            "dense_epochs": [dict(e) for e in self.dense_epochs],
            "taylor": self.taylor.state_dict() if self.taylor is not None else None,
        }
        return state

    def load_state_dict(self, state: dict[str, Any], model: nn.Module) -> None:
        super().load_state_dict(state, model)
        s = state.get("epi")
        if s is None:
            return
        self.archs = [list(a) for a in s["archs"]]
        self.values = list(s["values"])
        self.pruned_at = s["pruned_at"]
        self.spent = dict(s["spent"])
        self.dense_epochs = [dict(e) for e in s["dense_epochs"]]
        self.graph, self.taylor = None, None
        if self.pruned_at is None:  # still dense: the search goes on
            self._setup(model)
            if self.taylor is not None and s["taylor"] is not None:
                self.taylor.load_state_dict(s["taylor"])
