"""The baseline: one-shot global group-L2 magnitude pruning to the MAC target, then fine-tuning.

Scores come from ``importance.magnitude`` (Torch-Pruning's ``GroupMagnitudeImportance``: the L_p norm
of every coupled tensor slice of a channel, mean-normalised per group so channels compare across
groups); the keep set is the global top that fits the budget (``budget.select_to_budget``; under
``target.allocation: latency`` each group's pruned share then reshaped by its latency rate,
``budget.select_by_rates``).
Fine-tuning uses KD when the job asks.
"""

from __future__ import annotations

from torch import nn

from ...graph.importance import magnitude
from ...graph.surgery import remove_channels
from ..base import METHODS, Method, Phase
from .options import MagnitudeOptions


@METHODS.register("magnitude")
class Magnitude(Method):
    options: MagnitudeOptions
    ranks_given_weights = True
    compiles = True  # pruned physically before training: its fine-tuning is plain training

    def start_phase(self, phase: Phase, model: nn.Module) -> nn.Module:
        graph = self.ctx.graph(model)
        keep = self.ctx.select(graph, magnitude(graph, self.options.p))
        self.ctx.details["predicted_macs"] = int(graph.cost.macs([len(k) for k in keep]))
        return remove_channels(graph, keep)
