"""Losses as small pure functions."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor,
    temperature: float = 4.0,
    weight: float = 0.9,
) -> torch.Tensor:
    """Hinton distillation: ``(1-a)·CE(z, y) + a·T²·KL(softmax(z_t/T) ‖ softmax(z/T))``.

    student, teacher: logits (N, K); target: class indices (N,). The T² factor keeps the soft term's
    gradient scale independent of T. The teacher is treated as a constant.
    """
    ce = F.cross_entropy(student, target)
    if weight == 0.0:
        return ce
    log_p = F.log_softmax(student / temperature, dim=1)
    q = F.softmax(teacher.detach() / temperature, dim=1)
    kl = F.kl_div(log_p, q, reduction="batchmean")
    return (1.0 - weight) * ce + weight * temperature**2 * kl
