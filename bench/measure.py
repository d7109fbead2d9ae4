"""One row of a benchmark table: top-1, MACs, params and latency of a model, measured the same way for all."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from pruning_core.graph.macs import measure
from pruning_core.speed.latency import measure_latency
from pruning_core.training.evaluation import evaluate

from .profiles import Profile


def latency_key(device: str, batch: int) -> str:
    return f"{device}_b{batch}"


def measure_row(
    model: nn.Module,
    test: Dataset,
    example: torch.Tensor,
    device: torch.device,
    profile: Profile,
    latency: bool = True,
) -> dict[str, Any]:
    """Test top-1 (on ``device``), MACs and params (our counter, per sample) and, with ``latency``,
    p50/p90 latency on every latency device and batch size of the profile (the accuracy tables
    leave it to the speed benchmarks: it costs up to ``latency_max_s`` per device and batch)."""
    model.to(device).eval()
    top1 = evaluate(model, test, device)["top1"]
    model.to("cpu")
    cost = measure(model, example.cpu())
    row: dict[str, Any] = {"top1": top1, "macs": cost.macs, "params": cost.params}
    if latency:
        row["latency"] = {
            latency_key(dev, b): asdict(
                measure_latency(
                    model,
                    (b, *example.shape[1:]),
                    dev,
                    iters=profile.latency_iters,
                    max_seconds=profile.latency_max_s,
                )
            )
            for dev in profile.latency_devices
            for b in profile.latency_batches
        }
    return row
