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
    kl = kl_divergence(teacher.detach() / temperature, student / temperature)
    return (1.0 - weight) * ce + weight * temperature**2 * kl


def kl_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(p) || softmax(q))`` of logits (N, K), batch mean; gradients reach both unless a
    caller detaches one (S2H's decoupled gap loss detaches either side in turn)."""
    return F.kl_div(
        F.log_softmax(q_logits, dim=1), F.log_softmax(p_logits, dim=1), reduction="batchmean", log_target=True
    )
