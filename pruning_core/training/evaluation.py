"""Evaluating networks at an epoch's end, BatchNorm statistics re-estimated after pruning, and the MACs
training really computes. Used by ``engine.fit`` and the runner; torch only, no training state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..graph.macs import COUNTED
from .batches import DeviceBatches


@dataclass
class View:
    """A network evaluated at each epoch's end. ``recalibrate_bn``: evaluate it with BatchNorm statistics
    re-estimated for it (then restored, so training is unaffected), e.g. a masked sub-network."""

    module: nn.Module
    recalibrate_bn: bool = False


@torch.no_grad()
def evaluate(
    model: nn.Module, ds: Dataset, device: torch.device, batch_size: int = 256, workers: int = 0
) -> dict[str, float]:
    """Top-1 accuracy (percent), mean cross-entropy and ``non_finite`` (the images whose logits hold a
    NaN or inf: a broken network, whatever its top-1) on ``ds``. ``workers``: DataLoader processes for a
    set read per item."""
    was = model.training
    model.eval()
    correct, total, loss, bad = 0, 0, 0.0, 0
    for x, y in _in_order(ds, device, batch_size, workers):
        logits = model(x).float()
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        bad += (~torch.isfinite(logits).all(1)).sum().item()
        total += y.numel()
    model.train(was)
    n = max(1, total)
    return {"top1": 100.0 * correct / n, "test_loss": loss / n, "non_finite": float(bad)}


def _in_order(
    ds: Dataset, device: torch.device, batch_size: int, workers: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``ds`` in order as ``(x, y)`` batches on ``device``: built there when the set can (``DeviceBatches``,
    images held in memory), else read per item through a DataLoader."""
    if isinstance(ds, DeviceBatches):
        n = len(ds)  # type: ignore[arg-type]
        for start in range(0, n, batch_size):
            yield ds.batch(torch.arange(start, min(start + batch_size, n)), device)
        return
    for x, y in DataLoader(ds, batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda"):
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def _norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def recalibrate_bn(
    model: nn.Module, ds: Dataset, device: torch.device, batches: int = 20, batch_size: int = 64
) -> bool:
    """Re-estimate BatchNorm running statistics as the cumulative average over ``batches`` training
    batches in train mode (no weight update). Leaves the global RNG as it found it. Returns whether
    the model had BatchNorm layers to re-estimate."""
    norms = [m for m in _norms(model) if m.track_running_stats]
    if not norms or batches <= 0:
        return False
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
    was = model.training
    model.train()
    g = torch.Generator().manual_seed(0)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, generator=g, drop_last=len(ds) > batch_size)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for i, (x, _) in enumerate(loader):
            if i >= batches:
                break
            model(x.to(device))
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    model.train(was)
    return True


@contextmanager
def _bn_state_kept(model: nn.Module) -> Iterator[None]:
    """Restore every BatchNorm buffer on exit (statistics re-estimated for one view only)."""
    saved = [
        {k: v.clone() for k, v in m.state_dict().items() if k.startswith(("running", "num"))}
        for m in _norms(model)
    ]
    try:
        yield
    finally:
        for m, state in zip(_norms(model), saved, strict=True):
            m.load_state_dict(state, strict=False)


def evaluate_views(
    views: dict[str, View],
    test: Dataset,
    device: torch.device,
    recalibrate: Callable[[nn.Module], object],
    workers: int = 0,
) -> dict[str, dict[str, float]]:
    """Evaluate each view on ``test``; a view that asks has its BatchNorm statistics re-estimated first
    by ``recalibrate`` (and restored afterwards, so training never sees them)."""
    out = {}
    for name, view in views.items():
        if view.recalibrate_bn:
            with _bn_state_kept(view.module):
                recalibrate(view.module)
                out[name] = evaluate(view.module, test, device, workers=workers)
        else:
            out[name] = evaluate(view.module, test, device, workers=workers)
    return out


@torch.no_grad()
def logits(model: nn.Module, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``model``'s eval-mode float logits for ``x`` on ``device``, returned on the CPU."""
    was = model.training
    model.eval()
    out = model(x.to(device)).float().cpu()
    model.train(was)
    return out


class MacMeter:
    """Forward MACs that a model's conv and linear layers really compute, summed over every call and
    sample while attached: ``macs.count_macs``'s rule (output elements x weight elements per output)
    times the batch. Only the model it is attached to counts: a KD teacher's forwards do not."""

    def __init__(self) -> None:
        self.total = 0
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _hook(self, m: nn.Module, _inp, out: torch.Tensor) -> None:
        self.total += out.numel() * m.weight[0].numel()

    @contextmanager
    def attached(self, model: nn.Module) -> Iterator[MacMeter]:
        self._handles = [
            m.register_forward_hook(self._hook) for m in model.modules() if isinstance(m, COUNTED)
        ]
        try:
            yield self
        finally:
            for h in self._handles:
                h.remove()
            self._handles.clear()
