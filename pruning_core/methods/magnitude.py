"""The baseline: one-shot global group-L2 magnitude pruning to the MAC target, then fine-tuning.

Scores come from Torch-Pruning's ``GroupMagnitudeImportance`` (the L_p norm of every coupled tensor
slice of a channel, mean-normalised per group so channels compare across groups); the keep set is the
global top that fits the budget (``budget.select_to_budget``). Fine-tuning uses KD when the job asks.
"""

from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn

from ..budget import select_to_budget
from ..groups import PruningGraph
from ..spec import MagnitudeOptions
from ..surgery import remove_channels
from .base import METHODS, Method, Phase


def group_magnitude_scores(graph: PruningGraph, p: int = 2) -> list[torch.Tensor]:
    """Per group: a (size,) tensor of mean-normalised group L_p magnitudes."""
    imp = tp.importance.GroupMagnitudeImportance(p=p, group_reduction="mean", normalizer="mean")
    with torch.no_grad():
        return [imp(graph.tp_group(g, list(range(g.size)))).detach().cpu().float() for g in graph.groups]


@METHODS.register("magnitude")
class Magnitude(Method):
    options: MagnitudeOptions

    def start_phase(self, phase: Phase, model: nn.Module) -> nn.Module:
        graph = self.ctx.graph(model)
        scores = group_magnitude_scores(graph, self.options.p)
        keep = select_to_budget(
            graph,
            scores,
            self.ctx.target_macs,
            min_channels=self.ctx.spec.target.min_channels,
            round_to=self.options.round_to,
        )
        self.ctx.details["predicted_macs"] = int(graph.cost.macs([len(k) for k in keep]))
        return remove_channels(graph, keep)
