"""The plain PyTorch training loop the engine is measured against."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pruning_core.batches import epoch_order, epoch_seed, steps_per_epoch
from pruning_core.optim import OptimizerConfig, lr_factor
from pruning_core.spec import Schedule


def plain_train(
    model: nn.Module, train: Dataset, schedule: Schedule, seed: int, device: torch.device, workers: int = 0
) -> list[float]:
    """Train ``model`` in place with a deliberately minimal loop; return each epoch's seconds.

    This is the point of comparison for the engine's cost, so it does the same arithmetic and nothing
    more: the engine's data order (``batches.epoch_order``) and per-epoch seeding, its optimizer
    (``optim.OptimizerConfig.from_schedule``) and LR schedule (``optim.lr_factor``), cross-entropy, AMP on CUDA. No
    hooks, no per-epoch evaluation or MAC count, no checkpoints, no progress reports, no loss syncs.
    """
    steps = steps_per_epoch(len(train), schedule)
    total, warmup = steps * schedule.epochs, round(schedule.warmup_epochs * steps)
    opt = OptimizerConfig.from_schedule(schedule).build(p for p in model.parameters() if p.requires_grad)
    use_amp = schedule.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    model.to(device).train()
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
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                loss = F.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - t0)
    return seconds
