"""Coupled channel groups from Torch-Pruning's DependencyGraph, and MACs predicted from keep counts.

A *group* is a set of channels that must be kept or removed together: the output channels of its root
layer plus every coupled dimension (the BatchNorm after it, the inputs of the layers that consume it,
the other inputs of a residual add, a depthwise conv, a slice of a concatenation). Every method speaks in
groups; nothing here names layers by hand.

``PruningGraph.cost`` predicts the MACs of any choice of keep counts (ints or float tensors, so the
prediction is differentiable for S2H/TAS-style budget losses); after physical removal the counted MACs
equal that prediction exactly (tests/test_surgery.py).

What is refused, and what is left out (tests/test_torchvision_models.py checks every torchvision
classifier): a model is refused with a one-line ``GraphError`` when it does not run on the example,
when it does work the conv/linear MAC counter cannot see (attention's matrix products, a layer's weight
applied outside its module), when it reshapes the channel dimension (a channel shuffle, which
Torch-Pruning cannot follow), or when no group is left. A group is left out of the prunable set (the
rest of the model still prunes) when its channels pass through something that masking does not model
or the architecture file does not record: a LayerNorm/GroupNorm over those channels, a raw
``nn.Parameter`` (layer scale, class token), attention. ``PruningGraph.excluded`` says which and why.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch_pruning as tp
from torch import nn
from torch.overrides import TorchFunctionMode
from torch_pruning.ops import OPTYPE

from ..errors import GraphError, PruningError, one_line
from .macs import COUNTED, LAYER_FUNCTIONS, MATRIX_PRODUCTS, LayerGeometry, layer_geometry

NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
T = TypeVar("T")

# Node kinds (Torch-Pruning's op types) a prunable group must not pass through, and why. Masks act on
# conv/linear/BatchNorm outputs, and architecture.json records conv/linear/BatchNorm shapes only.
_UNSAFE_NODES: dict[OPTYPE, str] = {
    OPTYPE.LN: "it passes through a LayerNorm over those channels (a masked channel still counts in the "
    "mean and variance, so masking is not removal)",
    OPTYPE.GN: "it passes through a GroupNorm over those channels (masking is not removal)",
    OPTYPE.IN: "it passes through an InstanceNorm (not recorded in architecture.json)",
    OPTYPE.PARAMETER: "it passes through a raw nn.Parameter (layer scale, class token or position "
    "embedding: applied after the mask, and not recorded in architecture.json)",
    OPTYPE.MHA: "it passes through nn.MultiheadAttention (not masked, counted or recorded)",
    OPTYPE.EMBED: "it passes through an nn.Embedding (not recorded in architecture.json)",
    OPTYPE.LSTM: "it passes through an nn.LSTM (not recorded in architecture.json)",
    OPTYPE.PRELU: "it passes through an nn.PReLU (not recorded in architecture.json)",
    OPTYPE.CUSTOMIZED: "it passes through a custom layer",
    OPTYPE.OUTPUT: "it reaches the model's output",
}
# Torch-Pruning treats every op it does not know as element-wise; these mix channels instead.
_MIXING_OPS = ("normbackward", "softmax", "bmm", "matmul", "cumsum")


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
    """MACs of every conv/linear layer as a function of the groups' keep counts (per sample).

    A layer's output (input) width is its dense width less, for each group feeding that dimension,
    ``channels per root channel x (group size - keep)``; its MACs are ``out x in/groups x positions``
    (a depthwise conv keeps one input per output). The whole model is evaluated as a few matrix
    products, ``width = dense - A @ (size - keep)``, so the same expression serves integer keep counts
    (exact) and fractional ones as a differentiable tensor (S2H's and TAS's resource losses, every step).
    """

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
        self._terms = self._matrices()
        self._converted: dict[tuple[torch.device, torch.dtype], dict[str, torch.Tensor]] = {}

    def _matrices(self) -> dict[str, torch.Tensor]:
        """float64 CPU tensors of the expression: A_out, A_in (layers x groups) and per-layer factors."""
        a_out = torch.zeros(len(self.layers), len(self.sizes), dtype=torch.float64)
        a_in = torch.zeros_like(a_out)
        for i, lc in enumerate(self.layers):
            for g, mult in lc.out_terms:
                a_out[i, g] += mult
            for g, mult in lc.in_terms:
                a_in[i, g] += mult

        def column(values) -> torch.Tensor:
            return torch.tensor([float(v) for v in values], dtype=torch.float64)

        return {
            "a_out": a_out,
            "a_in": a_in,
            "out": column(lc.geom.out_channels for lc in self.layers),
            "in": column(lc.geom.in_channels for lc in self.layers),
            # a depthwise conv's MACs do not scale with its input width: its "groups" follow the input
            "in_scale": column(0.0 if lc.depthwise else 1.0 / lc.geom.groups for lc in self.layers),
            "in_const": column(1.0 if lc.depthwise else 0.0 for lc in self.layers),
            "positions": column(lc.geom.positions for lc in self.layers),
            "sizes": column(self.sizes),
        }

    def _on(self, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        key = (device, dtype)
        if key not in self._converted:
            self._converted[key] = {k: v.to(device=device, dtype=dtype) for k, v in self._terms.items()}
        return self._converted[key]

    @property
    def layer_names(self) -> list[str]:
        """The conv/linear layers the cost sums over, in the order of ``macs``' ``layer_weights``."""
        return [lc.geom.name for lc in self.layers]

    def macs(self, keep, layer_weights: torch.Tensor | None = None) -> torch.Tensor | int:
        """Predicted MACs for keep counts ``keep[g]``: an int for integer counts, a differentiable
        scalar tensor when ``keep`` (or ``layer_weights``) is a tensor of fractional values.

        ``layer_weights`` (one per layer, ``layer_names`` order) scales each layer's MACs: e.g. the
        probability that the block holding it is kept (TAS's expected cost over depths), or 0/1 for
        blocks removed or kept."""
        soft = (
            isinstance(keep, torch.Tensor)
            or any(isinstance(k, torch.Tensor) for k in keep)
            or isinstance(layer_weights, torch.Tensor)
        )
        if soft:
            w = keep if isinstance(keep, torch.Tensor) else torch.stack([torch.as_tensor(k) for k in keep])
            w = w if w.is_floating_point() else w.double()
        else:
            w = torch.tensor([float(k) for k in keep], dtype=torch.float64)
        per_layer = self.layer_macs(w)
        if layer_weights is not None:
            per_layer = per_layer * torch.as_tensor(layer_weights, device=w.device, dtype=w.dtype)
        total = per_layer.sum()
        return total if soft else round(total.item())

    def layer_widths(self, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per layer (``layer_names`` order), for float keep counts ``keep`` (G,): output channels, and
        input channels each output reads (in / groups; 1 for a depthwise conv). Differentiable."""
        t = self._on(keep.device, keep.dtype)
        removed = t["sizes"] - keep
        out = t["out"] - t["a_out"] @ removed
        return out, (t["in"] - t["a_in"] @ removed) * t["in_scale"] + t["in_const"]

    def layer_macs(self, keep: torch.Tensor) -> torch.Tensor:
        """Per layer (``layer_names`` order), MACs per sample for float keep counts ``keep`` (G,):
        outputs x inputs per output x kernel volume x output positions. Differentiable."""
        out, per_output = self.layer_widths(keep)
        return out * per_output * self._on(keep.device, keep.dtype)["positions"]

    def _width(self, dense: int, terms, keep) -> int:
        for g, mult in terms:
            dense = dense - mult * (self.sizes[g] - keep[g])
        return dense

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

    def __init__(
        self,
        model: nn.Module,
        example: torch.Tensor,
        num_classes: int,
        timeout_s: float = 120.0,
        ignored: Sequence[nn.Module] = (),
    ):
        """``ignored``: modules of ``model`` whose output channels must stay: every group that would
        prune one is left out (Torch-Pruning's ``ignored_layers``), like the classifier heads."""
        self.model = model
        self.example = example
        self.names = {m: n for n, m in model.named_modules()}
        self.modules = dict(model.named_modules())
        self.dg, self.heads, found = _analyse(model, example, num_classes, timeout_s, list(ignored))
        self.excluded: dict[str, str] = {}  # root layer -> why its group is not prunable
        self.groups = self._collect_groups(found)
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

    def _collect_groups(self, found: list[tp.Group]) -> list[ChannelGroup]:
        groups = []
        for tg in found:
            root = tg[0].dep.target.module
            reason = _unsafe_reason(tg)
            if reason is not None:
                self.excluded[self.names[root]] = reason
                continue
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
        if not groups:
            why = next(iter(self.excluded.values()), "it has no conv/linear layer besides the classifier")
            raise GraphError(
                f"nothing in this model can be pruned safely: every channel group is left out ({why})"
            )
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


def _analyse(
    model: nn.Module, example: torch.Tensor, num_classes: int, timeout_s: float, ignored: list[nn.Module]
) -> tuple[tp.DependencyGraph, list[nn.Module], list[tp.Group]]:
    """Survey the model, trace its dependency graph, find its heads and Torch-Pruning's groups, all
    within ``timeout_s`` (tracing can hang, and grouping can explode on reshapes it does not follow)."""

    def work() -> tuple[tp.DependencyGraph, list[nn.Module], list[tp.Group]]:
        _refuse_unsupported(model, example)
        try:
            with torch.enable_grad():
                dg = tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)
            heads = _classifier_heads(dg, num_classes)
            found = dg.get_all_groups(ignored_layers=heads + ignored, root_module_types=COUNTED)
            return dg, heads, list(found)
        except Exception as err:
            raise GraphError(
                f"could not trace the model's dependency graph: {type(err).__name__}: {one_line(err)}"
            ) from err

    was_training = model.training
    model.eval()
    try:
        # Parameters must require grad while tracing, otherwise Torch-Pruning silently finds nothing.
        with all_trainable(model):
            return _bounded(work, timeout_s)
    finally:
        model.train(was_training)


def _bounded(work: Callable[[], T], timeout_s: float) -> T:
    """``work()`` in a daemon thread; its ``PruningError`` is re-raised here, a timeout is a GraphError."""
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["value"] = work()
        except Exception as err:  # re-raised below, in the caller's thread
            result["error"] = err

    thread = threading.Thread(target=run, daemon=True, name="tp-graph")
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise GraphError(
            f"building the dependency graph took longer than {timeout_s:.0f} s; this model is not supported"
        )
    if "error" in result:
        err = result["error"]
        if isinstance(err, PruningError):
            raise err
        raise GraphError(f"could not analyse the model: {type(err).__name__}: {one_line(err)}") from err
    return result["value"]


def _unsafe_reason(tg: tp.Group) -> str | None:
    """Why masking and removal would disagree on this Torch-Pruning group, or None when they agree."""
    for item in tg:
        node = item.dep.target
        reason = _UNSAFE_NODES.get(tp.ops.module2type(node.module))
        if reason is not None:
            return reason
        op = getattr(node.module, "_grad_fn", None)
        if node.type == OPTYPE.ELEMENTWISE and any(k in str(op).lower() for k in _MIXING_OPS):
            return f"it passes through {op}, which mixes channels"
    return None


# --- what the graph cannot represent, found in one forward pass ---


class _Survey(TorchFunctionMode):
    """Watches one forward pass for work the conv/linear MAC counter cannot see (matrix products, as
    in attention; a layer's weight applied outside its module) and for reshapes of the channel dimension
    (a channel shuffle). ``problems`` holds one description per kind, first occurrence."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.owner = {id(m.weight): n for n, m in model.named_modules() if isinstance(m, COUNTED)}
        self.stack: list[str] = []  # names of the modules running now, innermost last
        self.problems: dict[str, str] = {}
        self.handles = [
            h
            for name, m in model.named_modules()
            for h in (m.register_forward_pre_hook(self._enter(name)), m.register_forward_hook(self._leave))
        ]

    def _enter(self, name: str) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            self.stack.append(name)

        return hook

    def _leave(self, *_: Any) -> None:
        self.stack.pop()  # returns nothing: a forward hook's return value would replace the output

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        where = f"'{self.stack[-1]}'" if self.stack and self.stack[-1] else "the model's forward"
        if name in MATRIX_PRODUCTS:
            self.problems.setdefault(
                "matmul",
                f"computes matrix products outside conv/linear layers "
                f"({name} in {where}, as attention does), whose MACs the conv/linear "
                "MAC counter cannot count; transformer-style models are not supported",
            )
        elif name in LAYER_FUNCTIONS and len(args) > 1 and id(args[1]) in self.owner:
            layer = self.owner[id(args[1])]
            if not self.stack or self.stack[-1] != layer:
                self.problems.setdefault(
                    "functional",
                    f"applies layer '{layer}' outside its module (in "
                    f"{where}), so its MACs cannot be counted nor its channels traced",
                )
        elif args and _splits_channels(args[0], out):
            self.problems.setdefault(
                "shuffle",
                f"reshapes the channel dimension ({tuple(args[0].shape)} -> "
                f"{tuple(out.shape)} in {where}, a channel shuffle), which "
                "Torch-Pruning's graph cannot follow",
            )
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _splits_channels(x: Any, out: Any) -> bool:
    """A 4-D N x C x H x W tensor viewed as N x G x C/G x H x W (the first step of a channel shuffle)."""
    return (
        isinstance(x, torch.Tensor)
        and isinstance(out, torch.Tensor)
        and x.dim() == 4
        and out.dim() == 5
        and out.shape[0] == x.shape[0]
        and out.shape[1] * out.shape[2] == x.shape[1]
        and out.shape[1] > 1
        and out.shape[2] > 1
        and out.shape[3:] == x.shape[2:]
    )


def _refuse_unsupported(model: nn.Module, example: torch.Tensor) -> None:
    """Raise a one-line GraphError if the model fails on ``example`` or does what the graph cannot
    represent (see ``_Survey``)."""
    survey = _Survey(model)
    try:
        with torch.no_grad(), survey:
            model(example[:1])
    except Exception as err:
        shape = "x".join(str(d) for d in example.shape[1:])
        raise GraphError(f"the model does not run on {shape} inputs: {one_line(err)}") from err
    finally:
        survey.remove()
    for kind in ("matmul", "functional", "shuffle"):  # the most telling reason first
        if kind in survey.problems:
            raise GraphError(f"this model is not supported: it {survey.problems[kind]}")


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
