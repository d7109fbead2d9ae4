"""Every zoo model builds for any input channels and class count; weights load only from safetensors."""

import threading
import time

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from pruning_core.errors import GraphError, WeightsError
from pruning_core.graph.groups import PruningGraph
from pruning_core.models.zoo import build_model, get_entry
from pruning_core.registry import Registry, UnknownNameError
from pruning_core.spec import CIFAR_MODELS


@pytest.mark.parametrize("name", [*CIFAR_MODELS, "tv:resnet18", "tv:mobilenet_v3_small"])
def test_any_channels_and_classes(name: str) -> None:
    size = max(32, get_entry(name).min_input_size)
    model = build_model(name, num_classes=7, in_channels=1).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, size, size)).shape == (2, 7)


def test_weights_round_trip_and_mismatch(tmp_path) -> None:
    src = build_model("resnet20", 10, 3)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    dst = build_model("resnet20", 10, 3, weights=path)
    assert all(
        torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values(), strict=True)
    )
    with pytest.raises(WeightsError, match="does not match the model"):
        build_model("resnet32", 10, 3, weights=path)
    with pytest.raises(WeightsError, match="does not match the model"):
        build_model("resnet20", 100, 3, weights=path)


def test_versioned_modules_load_from_safetensors(tmp_path) -> None:
    """safetensors keeps no state-dict versions; torchvision's MNASNet refuses a state dict without."""
    src = build_model("tv:mnasnet0_5", 10, 3)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    dst = build_model("tv:mnasnet0_5", 10, 3, weights=path)
    want, got = src.state_dict(), dst.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


@pytest.mark.parametrize(
    ("name", "size"), [("tv:resnet18", 32), ("tv:alexnet", 63), ("tv:inception_v3", 75), ("tv:vit_b_16", 224)]
)
def test_torchvision_min_input_size_is_torchvisions(name: str, size: int) -> None:
    assert get_entry(name).min_input_size == size


def test_unknown_names_list_known() -> None:
    with pytest.raises(UnknownNameError, match="known: mobilenet_v2, resnet110"):
        get_entry("resnet18")
    with pytest.raises(UnknownNameError, match="tv:resnet18"):
        get_entry("tv:not_a_model")


def test_registry_refuses_duplicates() -> None:
    reg: Registry[int] = Registry("thing")
    reg.add("a", 1)
    with pytest.raises(ValueError, match="already registered"):
        reg.add("a", 2)
    assert reg.get("a") == 1 and reg.names() == ["a"]


class Slow(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        time.sleep(1.0)  # stands in for a model on which tracing hangs
        return self.fc(self.conv(x).mean((2, 3)))


def test_graph_build_is_bounded() -> None:
    """The bound ended the build (its error), not the build's end: a traced forward alone takes 1 s,
    and a build that finished would raise nothing (no wall time asserted)."""
    with pytest.raises(GraphError, match="took longer than"):
        PruningGraph(Slow(), torch.randn(1, 3, 8, 8), num_classes=10, timeout_s=0.3)
    # The abandoned tracing thread goes on: let it end here, not during interpreter shutdown (torch
    # work in a daemon thread while the process exits aborts it: "terminate called ...").
    for thread in threading.enumerate():
        if thread.name == "tp-graph":
            thread.join(30)
