"""``pruning_core.plan`` / ``apply``: a pruning plan and a physically pruned module for your own loop.

The result lands in the jobs' band ``[target - TARGET_BAND, target]`` (counted), on the zoo's ResNet-20
and on torchvision's MobileNetV2 (depthwise convolutions, residual sums); the pruned module computes
what the dense one computes with the dropped channels masked; ignored layers keep their channels; the
pruned module trains in a plain loop; plans are deterministic; the given module is never modified.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pruning_core
from pruning_core.graph.budget import TARGET_BAND
from pruning_core.graph.groups import PruningGraph
from pruning_core.graph.macs import count_macs, count_params
from pruning_core.graph.masks import ChannelMasks
from pruning_core.models.zoo import build_model
from tests.test_surgery import _randomise_norms

TARGET = 0.5


class SmallNet(nn.Module):
    """A user's own network: a stem, a residual pair (its output channels coupled to the stem's), a
    widening conv and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16))
        self.wide = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.neck = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = F.relu(x + self.body(x))
        return self.head(self.neck(self.wide(x)).mean((2, 3)))


def _randomised(model: nn.Module) -> nn.Module:
    """``model`` in eval mode with non-trivial BatchNorm statistics and scales, so that a channel kept
    or dropped by mistake changes the logits."""
    torch.manual_seed(0)
    _randomise_norms(model)
    return model.eval()


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _masked_logits(model: nn.Module, x: torch.Tensor, plan: pruning_core.Plan) -> torch.Tensor:
    """The dense model's logits with every channel the plan drops masked to zero (after BatchNorm)."""
    ignored = [dict(model.named_modules())[n] for n in plan.ignored]
    graph = PruningGraph(model, x, num_classes=int(model(x).shape[1]), ignored=ignored)
    keep = [torch.tensor(g.keep) for g in plan.groups]
    with torch.no_grad(), ChannelMasks.from_keep(graph, keep).applied():
        return model(x)


@pytest.mark.parametrize(("name", "size"), [("resnet20", 32), ("tv:mobilenet_v2", 32)])
def test_apply_lands_in_the_band_and_equals_the_masked_network(name: str, size: int) -> None:
    model = _randomised(build_model(name, num_classes=10, in_channels=3))
    x = torch.randn(2, 3, size, size)
    before = _snapshot(model)

    plan = pruning_core.plan(model, x, target=TARGET)
    pruned = plan.apply(model)

    dense_macs = count_macs(model, x)
    assert plan.macs_before == dense_macs
    assert count_macs(pruned, x) == plan.macs_after, "the plan's numbers are the counted ones"
    assert count_params(pruned) == plan.params_after < plan.params_before
    assert TARGET - TARGET_BAND <= count_macs(pruned, x) / dense_macs <= TARGET
    assert [m.out_channels for m in pruned.modules() if isinstance(m, nn.Conv2d)] != [
        m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)
    ]
    with torch.no_grad():
        got = pruned(x)
    assert (got - model(x)).abs().max() > 1e-3, "pruning changed nothing"
    assert (got - _masked_logits(model, x, plan)).abs().max().item() < 1e-4
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "model untouched"
    assert got.shape == (2, 10), "the classifier keeps one output per class"


def test_a_user_module_keeps_its_ignored_layers_and_trains_in_a_plain_loop() -> None:
    model = _randomised(SmallNet())
    x, y = torch.randn(8, 3, 12, 12), torch.randint(0, 5, (8,))
    free = pruning_core.plan(model, x, target=TARGET, ignored_layers=[model.neck[0]])
    assert free.ignored == ("neck.0",)
    layers = [set(g.layers) for g in free.groups]
    assert {"stem.0", "body.0"} <= next(s for s in layers if "stem.0" in s), "the residual sum couples them"
    assert not any("neck.0" in s for s in layers)
    # By name, and a layer coupled to others: the stem's channels are the residual sum's, so the whole
    # coupled group (stem, body) is kept.
    plan = pruning_core.plan(model, x, target=0.7, ignored_layers=["body.0", model.neck[0]])
    pruned = pruning_core.apply(model, plan)

    assert pruned.body[0].out_channels == pruned.stem[0].out_channels == 16
    assert pruned.neck[0].out_channels == 32
    assert pruned.wide[0].out_channels < 32
    assert 0.7 - TARGET_BAND <= count_macs(pruned, x) / count_macs(model, x) <= 0.7
    assert (pruned(x) - _masked_logits(model, x, plan)).abs().max().item() < 1e-4

    pruned.train()
    opt = torch.optim.SGD(pruned.parameters(), lr=0.1)
    w = pruned.wide[0].weight.detach().clone()
    loss = F.cross_entropy(pruned(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and not torch.equal(w, pruned.wide[0].weight.detach())
    assert model.wide[0].out_channels == 32, "the given module is not the pruned one"


def test_plans_are_deterministic_and_readable() -> None:
    model = _randomised(build_model("resnet20", num_classes=10, in_channels=3))
    x = torch.randn(2, 3, 32, 32)
    a = pruning_core.plan(model, x, target={"macs_ratio": 0.4, "round_to": 1, "min_width": 0.25})
    b = pruning_core.plan(model, x, target={"macs_ratio": 0.4, "round_to": 1, "min_width": 0.25})
    assert a == b
    assert all(g.kept >= 0.25 * g.channels for g in a.groups), "the width floor is honoured"
    assert any(g.kept % 8 for g in a.groups), "round_to 1: any width"
    text = str(a)
    assert "layer3.0.conv1" in text and f"{a.macs_ratio:.3f}" in text
    assert [g.kept for g in a.groups] == [len(g.keep) for g in a.groups]


@pytest.mark.parametrize(
    ("method", "says"),
    [("s2h", "pruning_core.prune"), ("epi", "pruning_core.prune"), ("nope", "one-shot criteria")],
)
def test_a_training_or_unknown_method_is_one_line(method: str, says: str) -> None:
    with pytest.raises(ValueError, match=says) as err:
        pruning_core.plan(SmallNet(), torch.randn(1, 3, 8, 8), method=method)
    assert "\n" not in str(err.value)


def test_other_one_shot_criteria_and_refusals() -> None:
    model, x = _randomised(SmallNet()), torch.randn(2, 3, 8, 8)
    plan = pruning_core.plan(model, x, target=0.6, method="bn_scale")
    assert plan.method == "bn_scale" and plan.macs_ratio <= 0.6
    with pytest.raises(ValueError, match="not a submodule"):
        pruning_core.plan(model, x, ignored_layers=["no.such.layer"])
    with pytest.raises(ValueError, match="MAC ratio"):
        pruning_core.plan(model, x, target={"speedup": 2.0})
    with pytest.raises(ValueError, match="another network"):
        pruning_core.apply(build_model("resnet20", 10, 3), plan)


def test_the_readme_snippet_runs() -> None:
    """The Python block of the docs' "Your own training loop" section, as a user pastes it."""
    page = (Path(__file__).resolve().parents[1] / "docs" / "python-api.md").read_text(encoding="utf-8")
    section = page.split("## Your own training loop", 1)[1].split("\n## ", 1)[0]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    scope: dict[str, object] = {}
    exec(compile(code, "docs/python-api.md", "exec"), scope)
    small, model = scope["small"], scope["model"]
    assert isinstance(small, nn.Module) and isinstance(model, nn.Module)
    assert count_macs(small, scope["example"]) <= 0.5 * count_macs(model, scope["example"])
    assert small.conv1.out_channels == model.conv1.out_channels == 64, "the ignored layer is kept"
