"""TAS's search space: width candidates per coupled group, depth candidates per stage of residual blocks,
channel-wise interpolation, the expected cost and the piecewise cost loss (Dong & Yang, NeurIPS 2019,
read in the official code ``D-X-Y/AutoDL-Projects``: ``SoftSelect.py``, ``SearchCifarResNet.py``,
``search_main_v2.py``).

Torch only, no training state: ``methods/tas.py`` builds the search on it. Widths are counted in
channels of a group's root layer; a candidate keeps a group's **first k** channels, as the official
code keeps a conv's first k filters (it searches each conv's width, and pads residual sums with zeros;
here the channels a residual sum couples are one group, searched together).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...graph.blocks import Stage
from ...graph.groups import PruningGraph

WIDTH_RATIOS: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # the official CIFAR list


def width_candidates(
    channels: int, ratios: Sequence[float] = WIDTH_RATIOS, least: int = 1, step: int = 1
) -> list[int]:
    """``int(r * channels)`` for every ratio (floored, as the official code) and then down to a multiple
    of ``step`` (the job's channel step; 1 in groups narrower than it), at least ``least`` (rounded up to
    the step), deduplicated, increasing; always ends with ``channels``."""
    step = step if channels >= step else 1
    least = -(-least // step) * step
    widths = {max(least, min(channels, int(r * channels) // step * step)) for r in ratios} | {channels}
    return sorted(w for w in widths if 1 <= w <= channels)


def depth_candidates(blocks: int) -> list[int]:
    """Blocks a stage of ``blocks`` may keep: 1, 3, 5, ... and ``blocks`` (1..n for n <= 3)."""
    if blocks <= 3:
        return list(range(1, blocks + 1))
    choices = list(range(1, blocks + 1, 2))
    return choices if choices[-1] == blocks else [*choices, blocks]


def tau_at(epoch: int, epochs: int, tau_max: float = 5.0, tau_min: float = 0.1) -> float:
    """Gumbel-softmax temperature of an epoch: cosine from ``tau_max`` (epoch 0) toward ``tau_min``."""
    return tau_min + (tau_max - tau_min) * (1.0 + math.cos(math.pi * epoch / max(1, epochs))) / 2.0


def channel_wise_interpolation(x: torch.Tensor, channels: int) -> torch.Tensor:
    """CWI: resize dimension 1 of ``x`` (N, C, ...) to ``channels`` by average pooling along it (output
    channel j averages input channels ``floor(j*C/c) .. ceil((j+1)*C/c)``); the identity when C matches."""
    if x.shape[1] == channels:
        return x
    n, c = x.shape[:2]
    rest = x.shape[2:]
    flat = x.reshape(n, 1, c, -1)  # pool along C only: spatial positions are a second, untouched axis
    out = F.adaptive_avg_pool2d(flat, (channels, flat.shape[-1]))
    return out.reshape(n, channels, *rest)


def align_channels(x: torch.Tensor, channels: int, mode: str) -> torch.Tensor:
    """A candidate's output (N, C, ...) brought to ``channels`` >= C along dimension 1: ``interpolate``
    (CWI, the paper's) or ``pad`` (channel j stays channel j, zeros beyond: the alignment under which
    trained weights still compute what they were trained to)."""
    if mode == "interpolate":
        return channel_wise_interpolation(x, channels)
    return F.pad(x, [0, 0] * (x.dim() - 2) + [0, channels - x.shape[1]])


def _perturbed(logits: torch.Tensor, tau: float) -> torch.Tensor:
    """Gumbel-perturbed log-probabilities over temperature: ``(log_softmax(u) + g) / tau``."""
    gumbels = -torch.empty_like(logits).exponential_().log()
    return (logits.log_softmax(0) + gumbels) / tau


def sample_pairs(logits: Sequence[torch.Tensor], tau: float) -> list[tuple[list[int], torch.Tensor]]:
    """Per logit vector, two distinct candidates drawn without replacement from the Gumbel-softmax at
    ``tau`` (one host sync for all vectors), weighted by their perturbed probabilities renormalised over
    the pair (the gradient reaches the logits); one candidate (weight 1) where there is only one."""
    if not logits:
        return []
    k = max(len(u) for u in logits)
    perturbed = [_perturbed(u, tau) for u in logits]
    padded = torch.stack([F.pad(p, (0, k - len(p)), value=float("-inf")) for p in perturbed])
    with torch.no_grad():
        picked = torch.multinomial(padded.softmax(1).float() + 1e-7, min(2, k), replacement=False).tolist()
    out = []
    for p, idx in zip(perturbed, picked, strict=True):
        idx = [i for i in idx if i < len(p)][:2] or [0]
        out.append((idx, p[torch.tensor(idx, device=p.device)].softmax(0)))
    return out


def gumbel_pair(logits: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``sample_pairs`` for one logit vector: the candidates' indices (LongTensor) and weights."""
    idx, weights = sample_pairs([logits], tau)[0]
    return torch.tensor(idx, dtype=torch.long, device=logits.device), weights


def gumbel_probs(logits: torch.Tensor, tau: float) -> torch.Tensor:
    """The whole Gumbel-softmax at ``tau`` (TAS's depth aggregation weights)."""
    return _perturbed(logits, tau).softmax(0)


@dataclass
class StageLayers:
    """A stage and, per block, the names of the conv/linear layers inside it."""

    stage: Stage
    depths: list[int]  # candidate depths
    block_layers: list[list[str]]


def stage_layers(graph: PruningGraph, stages: Sequence[Stage]) -> list[StageLayers]:
    names = graph.cost.layer_names
    out = []
    for s in stages:
        per_block = [[n for n in names if n.startswith(f"{s.name}.{b}.")] for b in range(s.blocks)]
        out.append(StageLayers(s, depth_candidates(s.blocks), per_block))
    return out


def layer_weights(
    graph: PruningGraph, stages: Sequence[StageLayers], keep_probs: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Per cost-model layer, the probability that its block is kept: for block b of a stage, the sum of
    the stage's depth probabilities over candidates deeper than b (a reverse cumulative sum); 1
    outside stages. ``keep_probs[s]``: the stage's depth distribution (softmax, or one-hot)."""
    index = {n: i for i, n in enumerate(graph.cost.layer_names)}
    device = keep_probs[0].device if keep_probs else torch.device("cpu")
    dtype = keep_probs[0].dtype if keep_probs else torch.float64
    ones = torch.ones(len(index), device=device, dtype=dtype)
    rows, values = [], []
    for sl, p in zip(stages, keep_probs, strict=True):
        depths = torch.tensor(sl.depths, device=device)
        for b, layers in enumerate(sl.block_layers):
            covered = p[depths > b].sum()
            for n in layers:
                rows.append(index[n])
                values.append(covered)
    if not rows:
        return ones
    return ones.index_put((torch.tensor(rows, device=device),), torch.stack(values).to(dtype))


def cost_loss(expected: torch.Tensor, current: float, target: float, tolerance: float) -> torch.Tensor:
    """The official piecewise cost loss: ``+log E`` while the argmax architecture's MACs ``current``
    exceed ``target``, ``-log E`` while they are below ``target - tolerance``, else 0 (MACs)."""
    if current > target:
        return torch.log(expected)
    if current < target - tolerance:
        return -torch.log(expected)
    return expected.new_zeros(())
