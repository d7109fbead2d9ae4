"""Coupled channel groups from Torch-Pruning's DependencyGraph, and MACs predicted from keep counts.

A *group* is a set of channels that must be kept or removed together: the output channels of its root
layer plus every coupled dimension (the BatchNorm after it, the inputs of the layers that consume it,
the other inputs of a residual add, a depthwise conv, a slice of a concatenation). Every method speaks in
groups; nothing here names layers by hand.

``PruningGraph.cost`` predicts the MACs of any choice of keep counts (ints or float tensors, so the
prediction is differentiable for S2H/TAS-style budget losses); after physical removal the counted MACs
equal that prediction exactly (tests/test_surgery.py).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn

from .errors import GraphError
from .macs import COUNTED, LayerGeometry, layer_geometry

NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass(frozen=True)
class Slot:
    """Where a group's channels land in one module's dimension: ``module_idx[i]`` carries root channel
    ``root_idx[i]`` (several module indices per root channel after a flatten)."""

    module: str
    module_idx: torch.Tensor  # LongTensor (n,)
    root_idx: torch.Tensor  # LongTensor (n,)


@dataclass
class ChannelGroup:
    """One coupled group: ``size`` channels, addressed by the root layer's output channel index."""

    index: int
    root: str
    size: int
    ch_groups: int = 1  # grouped convs: keep the same positions in each of ch_groups blocks
    outputs: list[Slot] = field(default_factory=list)  # modules whose outputs carry these channels
    inputs: list[Slot] = field(default_factory=list)  # modules that consume them as inputs

    @property
    def block(self) -> int:
        """Channels per channel-group block (= size when ch_groups is 1)."""
        return self.size // self.ch_groups


@dataclass(frozen=True)
class _LayerCost:
    geom: LayerGeometry
    out_terms: tuple[tuple[int, int], ...]  # (group index, channels per root channel)
    in_terms: tuple[tuple[int, int], ...]
    depthwise: bool


class CostModel:
    """MACs of every conv/linear layer as a function of the groups' keep counts (per sample)."""

    def __init__(self, geometry: dict[str, LayerGeometry], groups: list[ChannelGroup]):
        out_terms: dict[str, list[tuple[int, int]]] = {}
        in_terms: dict[str, list[tuple[int, int]]] = {}
        for g in groups:
            for slots, terms in ((g.outputs, out_terms), (g.inputs, in_terms)):
                for s in slots:
                    terms.setdefault(s.module, []).append((g.index, len(s.module_idx) // g.size))
        self.sizes = [g.size for g in groups]
        self.layers = [
            _LayerCost(
                geom,
                tuple(out_terms.get(geom.name, ())),
                tuple(in_terms.get(geom.name, ())),
                depthwise=geom.groups > 1 and geom.groups == geom.in_channels == geom.out_channels,
            )
            for geom in geometry.values()
        ]
        self.dense_macs = sum(lc.geom.macs for lc in self.layers)

    def _width(self, dense: int, terms, keep) -> torch.Tensor | int:
        for g, mult in terms:
            dense = dense - mult * (self.sizes[g] - keep[g])
        return dense

    def macs(self, keep) -> torch.Tensor | int:
        """Predicted MACs for keep counts ``keep[g]`` (ints, or a float tensor for a soft estimate)."""
        total = 0
        for lc in self.layers:
            out = self._width(lc.geom.out_channels, lc.out_terms, keep)
            # A depthwise conv keeps one input channel per output; other grouped convs keep their groups.
            per_group = (
                1 if lc.depthwise else self._width(lc.geom.in_channels, lc.in_terms, keep) / lc.geom.groups
            )
            total = total + out * per_group * lc.geom.positions
        return total if isinstance(total, torch.Tensor) else round(total)

    def per_layer(self, keep) -> dict[str, tuple[int, int]]:
        """(in, out) channels of each layer for integer keep counts."""
        return {
            lc.geom.name: (
                int(self._width(lc.geom.in_channels, lc.in_terms, keep)),
                int(self._width(lc.geom.out_channels, lc.out_terms, keep)),
            )
            for lc in self.layers
        }


class PruningGraph:
    """A model's dependency graph, its prunable groups and its cost model.

    Build once per model; after physical removal build a new one for the smaller model.
    """

    def __init__(self, model: nn.Module, example: torch.Tensor, num_classes: int, timeout_s: float = 120.0):
        self.model = model
        self.example = example
        self.names = {m: n for n, m in model.named_modules()}
        self.modules = dict(model.named_modules())
        self.dg = _build_graph(model, example, timeout_s)
        self.heads = _classifier_heads(self.dg, num_classes)
        self.groups = self._collect_groups()
        self.geometry = layer_geometry(model, example)
        self.cost = CostModel(self.geometry, self.groups)

    @property
    def dense_macs(self) -> int:
        return self.cost.dense_macs

    def full_keep(self) -> list[int]:
        return [g.size for g in self.groups]

    def min_keep(self, min_channels: int = 1) -> list[int]:
        """The smallest keep counts allowed: ``min_channels`` per group, at least one per block."""
        return [max(g.ch_groups, -(-min_channels // g.ch_groups) * g.ch_groups) for g in self.groups]

    def tp_group(self, g: ChannelGroup, idxs: list[int]) -> tp.Group:
        """The Torch-Pruning group of ``g`` for root channels ``idxs``, in the model's current state."""
        root = self.modules[g.root]
        return self.dg.get_pruning_group(root, self.dg.get_pruner_of_module(root).prune_out_channels, idxs)

    def _collect_groups(self) -> list[ChannelGroup]:
        groups = []
        for tg in self.dg.get_all_groups(ignored_layers=self.heads, root_module_types=COUNTED):
            root = tg[0].dep.target.module
            g = ChannelGroup(index=len(groups), root=self.names[root], size=len(tg[0].idxs))
            for item in tg:
                self._add_slot(g, item)
            g.ch_groups = _channel_groups(tg, self.dg)
            groups.append(g)
        # Model order (stem first) rather than Torch-Pruning's discovery order: stable and readable.
        order = {name: i for i, name in enumerate(self.modules)}
        groups.sort(key=lambda g: order[g.root])
        for i, g in enumerate(groups):
            g.index = i
        return groups

    def _add_slot(self, g: ChannelGroup, item) -> None:
        module = item.dep.target.module
        if not isinstance(module, nn.Module) or module not in self.names:
            return
        slot = Slot(
            self.names[module],
            torch.as_tensor(list(item.idxs), dtype=torch.long),
            torch.as_tensor(list(item.root_idxs), dtype=torch.long),
        )
        if self.dg.is_out_channel_pruning_fn(item.dep.handler):
            g.outputs.append(slot)
        elif self.dg.is_in_channel_pruning_fn(item.dep.handler):
            g.inputs.append(slot)


@contextmanager
def all_trainable(model: nn.Module) -> Iterator[None]:
    """Let every parameter require grad for the duration (Torch-Pruning traces through autograd and
    silently skips frozen ones), then freeze again by name: pruning replaces the Parameter objects."""
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    for p in model.parameters():
        p.requires_grad_(True)
    try:
        yield
    finally:
        for n, p in model.named_parameters():
            if n in frozen:
                p.requires_grad_(False)


def _build_graph(model: nn.Module, example: torch.Tensor, timeout_s: float) -> tp.DependencyGraph:
    """Trace the model, bounded in time. Parameters must require grad while tracing, otherwise
    Torch-Pruning silently finds no dependencies and prunes nothing."""
    result: dict[str, object] = {}

    def work() -> None:
        try:
            with torch.enable_grad():
                result["dg"] = tp.DependencyGraph().build_dependency(
                    model, example_inputs=example, verbose=False
                )
        except Exception as err:  # reported below, in the caller's thread
            result["error"] = err

    thread = threading.Thread(target=work, daemon=True, name="tp-graph")
    was_training = model.training
    model.eval()
    with all_trainable(model):
        thread.start()
        thread.join(timeout_s)
    model.train(was_training)
    if thread.is_alive():
        raise GraphError(
            f"building the dependency graph took longer than {timeout_s:.0f} s; this model is not supported"
        )
    if "error" in result:
        err = result["error"]
        raise GraphError(
            f"could not trace the model's dependency graph: {type(err).__name__}: {err}"
        ) from err
    return result["dg"]  # type: ignore[return-value]


def _classifier_heads(dg: tp.DependencyGraph, num_classes: int) -> list[nn.Module]:
    """Conv/linear layers whose output is the network's output: width == num_classes and no other
    conv/linear downstream. Excluded by role, not by type (a head may be a 1x1 conv)."""
    heads = []
    for module, node in dg.module2node.items():
        if not isinstance(module, COUNTED):
            continue
        width = module.out_features if isinstance(module, nn.Linear) else module.out_channels
        if width == num_classes and not _reaches_layer(node):
            heads.append(module)
    return heads


def _reaches_layer(node) -> bool:
    seen, stack = set(), list(node.outputs)
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        if isinstance(n.module, COUNTED):
            return True
        stack.extend(n.outputs)
    return False


def _channel_groups(tg: tp.Group, dg: tp.DependencyGraph) -> int:
    """Channel grouping a (non-depthwise) grouped conv imposes on the group, else 1."""
    ch = 1
    for item in tg:
        m = item.dep.target.module
        if (
            isinstance(m, nn.modules.conv._ConvNd)
            and m.groups > 1
            and not (m.groups == m.in_channels == m.out_channels)
        ):
            ch = max(ch, m.groups)
    return ch


def top_channels(g: ChannelGroup, scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Root indices of the ``keep`` highest-scoring channels of ``g`` (sorted, LongTensor).

    In a channel-grouped group the same positions are kept in every block (scores averaged over
    blocks), so ``keep`` is rounded down to a multiple of ``g.ch_groups``.
    """
    per_block = max(1, keep // g.ch_groups)
    block_scores = scores.detach().reshape(g.ch_groups, g.block).mean(0)
    pos = torch.topk(block_scores, per_block).indices
    idx = (torch.arange(g.ch_groups).unsqueeze(1) * g.block + pos.unsqueeze(0)).flatten()
    return idx.sort().values
