"""The global allocator meets MAC targets, and unreachable targets are refused before training."""

import pytest
import torch

from pruning_core.budget import check_reachable, min_macs, select_to_budget
from pruning_core.errors import TargetError
from pruning_core.groups import PruningGraph
from pruning_core.importance import magnitude
from pruning_core.macs import count_macs
from pruning_core.surgery import remove_channels
from pruning_core.zoo import build_model


@pytest.mark.parametrize(
    ("name", "size"), [("resnet20", 32), ("mobilenet_v2", 32), ("vgg16_bn", 32), ("tv:resnet18", 64)]
)
@pytest.mark.parametrize("target", [0.3, 0.5, 0.8])
def test_magnitude_selection_hits_target(name: str, size: int, target: float) -> None:
    torch.manual_seed(0)
    model = build_model(name, 10, 3).eval()
    x = torch.zeros(1, 3, size, size)
    graph = PruningGraph(model, x, 10)
    keep = select_to_budget(graph, magnitude(graph), int(target * graph.dense_macs))
    remove_channels(graph, keep)
    achieved = count_macs(model, x) / graph.dense_macs
    assert target - 0.02 <= achieved <= target


def test_selection_prefers_high_scores_and_rounds() -> None:
    model = build_model("resnet20", 10, 3)
    graph = PruningGraph(model, torch.zeros(1, 3, 32, 32), 10)
    scores = [torch.arange(g.size, dtype=torch.float) for g in graph.groups]  # later channels matter more
    keep = select_to_budget(graph, scores, graph.dense_macs // 2, round_to=4)
    for g, k in zip(graph.groups, keep, strict=True):
        assert len(k) % 4 == 0
        assert k.tolist() == list(range(g.size - len(k), g.size)), "must keep the top-scoring channels"


def test_unreachable_target_refused() -> None:
    model = build_model("resnet20", 10, 3)
    graph = PruningGraph(model, torch.zeros(1, 3, 32, 32), 10)
    floor = min_macs(graph, 1) / graph.dense_macs
    assert 0 < floor < 0.05
    with pytest.raises(TargetError, match="unreachable"):
        check_reachable(graph, floor / 2)
    check_reachable(graph, floor * 1.01)
    with pytest.raises(TargetError):
        check_reachable(graph, 0.2, min_channels=16)  # 16 per group = the dense stem width: nothing to cut
