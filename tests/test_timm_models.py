"""timm models (the optional `timm` extra) as `timm:<name>`: every model a server allows by default
(one or two small members of the ResNet, EfficientNet, MobileNetV3, RegNet and ConvNeXt families) prunes
with the checks of the torchvision sweep (masked logits equal the physically pruned ones, counted MACs
equal the predicted ones, the export reloads to the same logits), at 32 px with random weights."""

from __future__ import annotations

import pytest
import torch
from test_torchvision_models import _assert_prunes, _randomise

from pruning_core.graph.groups import PruningGraph
from pruning_core.models.zoo import build_model
from pruning_core.settings import DEFAULT_TIMM_MODELS

pytest.importorskip("timm")

# The slowest three (4-5.5 s each on 2 shared CPU cores, measured) run in `make test-slow`, keeping
# this file's share of `make test` near 20 s.
SLOW = {"resnet50", "mobilenetv3_large_100", "regnety_002"}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in DEFAULT_TIMM_MODELS]
)
def test_default_timm_models_prune(name: str, tmp_path) -> None:
    torch.manual_seed(0)
    model = build_model(f"timm:{name}", num_classes=10, in_channels=3).eval()
    _randomise(model)
    with torch.no_grad():  # timm's ConvNeXt layer scale (`gamma`) starts at 1e-6: masks would not show
        for n, p in model.named_parameters():
            if n.endswith(".gamma"):
                p.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 32, 32)
    graph = PruningGraph(model, x, num_classes=10)
    _assert_prunes(f"timm:{name}", model, graph, x, tmp_path)


def test_timm_model_adapts_to_one_channel() -> None:
    model = build_model("timm:resnet18", num_classes=4, in_channels=1).eval()
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 4)
