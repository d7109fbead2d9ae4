"""The plain PyTorch training loop the engine is measured against."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pruning_core.spec import Schedule
from pruning_core.training.acceleration import (
    amp_dtype,
    autotune,
    contiguous,
    in_format,
    memory_format,
    place,
)
from pruning_core.training.batches import epoch_order, epoch_seed, steps_per_epoch
from pruning_core.training.optim import OptimizerConfig, lr_factor


def plain_train(
    model: nn.Module, train: Dataset, schedule: Schedule, seed: int, device: torch.device, workers: int = 0
) -> list[float]:
    """Train ``model`` in place with a deliberately minimal loop; return each epoch's seconds.

    This is the point of comparison for the engine's cost, so it does the same arithmetic and nothing
    more: the engine's data order (``batches.epoch_order``) and per-epoch seeding, its optimizer
    (``optim.OptimizerConfig.from_schedule``) and LR schedule (``optim.lr_factor``), cross-entropy, and its
    CUDA defaults (``acceleration``: the AMP type, channels_last, cuDNN autotuning). No hooks, no per-epoch
    evaluation or MAC count, no checkpoints, no progress reports, no loss syncs. Its data is read per item
    through a DataLoader (``workers`` processes), as a plain loop would.
    """
    steps = steps_per_epoch(len(train), schedule)
    total, warmup = steps * schedule.epochs, round(schedule.warmup_epochs * steps)
    opt = OptimizerConfig.from_schedule(schedule).build(p for p in model.parameters() if p.requires_grad)
    dtype = amp_dtype(device, schedule)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    fmt = memory_format(device, schedule)
    place(model, device, fmt).train()
    autotune(device)
    seconds = []
    for epoch in range(schedule.epochs):
        t0 = time.perf_counter()
        order = epoch_order(len(train), schedule.batch_size, seed, epoch)[: steps * schedule.batch_size]
        torch.manual_seed(epoch_seed(seed, epoch))
        loader = DataLoader(
            train,
            batch_size=schedule.batch_size,
            sampler=order,
            num_workers=workers,
            pin_memory=device.type == "cuda",
            generator=torch.Generator().manual_seed(len(order)),
        )
        for i, (x, y) in enumerate(loader):
            factor = lr_factor(epoch * steps + i, total, warmup, schedule.lr_schedule)
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * factor
            x, y = in_format(x.to(device, non_blocking=True), fmt), y.to(device, non_blocking=True)
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=dtype or torch.float16, enabled=dtype is not None):
                loss = F.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - t0)
    contiguous(model)
    return seconds
