import torch
import torch.nn.functional as F

from pruning_core.training.losses import kd_loss


def test_kd_weight_zero_is_cross_entropy() -> None:
    s, t, y = torch.randn(8, 5), torch.randn(8, 5), torch.randint(0, 5, (8,))
    assert torch.allclose(kd_loss(s, t, y, 4.0, 0.0), F.cross_entropy(s, y))


def test_kd_soft_term_vanishes_when_student_equals_teacher() -> None:
    s, y = torch.randn(8, 5), torch.randint(0, 5, (8,))
    ce = F.cross_entropy(s, y)
    assert torch.allclose(kd_loss(s, s.clone(), y, 4.0, 0.9), 0.1 * ce, atol=1e-6)


def test_kd_matches_definition_and_teacher_gets_no_gradient() -> None:
    s = torch.randn(6, 4, requires_grad=True)
    t = torch.randn(6, 4, requires_grad=True)
    y = torch.randint(0, 4, (6,))
    T, a = 3.0, 0.7
    p_t = F.softmax(t / T, 1)
    kl = (p_t * (p_t.log() - F.log_softmax(s / T, 1))).sum(1).mean()
    expected = (1 - a) * F.cross_entropy(s, y) + a * T * T * kl
    loss = kd_loss(s, t, y, T, a)
    assert torch.allclose(loss, expected, atol=1e-6)
    loss.backward()
    assert t.grad is None and s.grad is not None
