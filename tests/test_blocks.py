"""Depth pruning: stages of residual blocks are found, whole blocks are removed, and a network with fewer
blocks round-trips through the architecture file (export, reload, checkpoints, resume)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from pruning_core.artifacts.export import export_model, load_pruned
from pruning_core.artifacts.report import block_counts
from pruning_core.errors import ModelError
from pruning_core.graph.blocks import depths, keep_blocks
from pruning_core.graph.groups import PruningGraph, top_channels
from pruning_core.graph.importance import magnitude
from pruning_core.graph.macs import count_macs
from pruning_core.graph.surgery import describe, rebuild, remove_channels
from pruning_core.methods.base import Method, MethodContext, Phase
from pruning_core.models.zoo import build_model
from pruning_core.spec import JobSpec, Schedule
from pruning_core.training.engine import TrainContext, fit, load_checkpoint
from tests.test_engine import SIZE, StopAt, _ctx


@pytest.mark.parametrize(
    "name, expected",
    [
        ("resnet20", {"layer1": 3, "layer2": 3, "layer3": 3}),
        ("resnet56", {"layer1": 9, "layer2": 9, "layer3": 9}),
        ("tv:resnet18", {"layer1": 2, "layer2": 2, "layer3": 2, "layer4": 2}),
        ("tv:resnet50", {"layer1": 3, "layer2": 4, "layer3": 6, "layer4": 3}),
        ("vgg16_bn", {}),
        ("mobilenet_v2", {}),
        ("tv:mobilenet_v2", {}),
    ],
)
def test_stages_are_found_for_resnets_only(name: str, expected: dict[str, int]) -> None:
    assert depths(build_model(name, 10, 3)) == expected


def _shallow(name: str = "resnet20", size: int = SIZE) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model(name, 4, 3).eval()
    keep_blocks(model, {"layer1": 1, "layer2": 2})
    return model, torch.randn(3, 3, size, size)


def test_keeping_blocks_removes_them_and_keeps_the_others_names() -> None:
    dense = build_model("resnet20", 4, 3)
    model, x = _shallow()
    assert depths(model) == {"layer1": 1, "layer2": 2, "layer3": 3}
    kept = dict(model.named_parameters())
    assert kept.keys() < dict(dense.named_parameters()).keys() and "layer2.1.conv1.weight" in kept
    assert count_macs(model, x[:1]) < count_macs(dense, x[:1])
    # removing an identity block is removing its residual branch: layer1's output is block 0's output
    full = build_model("resnet20", 4, 3).eval()
    full.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        out = full.layer1[0](torch.relu(full.bn1(full.conv1(x))))
        assert torch.equal(model.layer1(torch.relu(model.bn1(model.conv1(x)))), out)


def test_bad_depths_are_refused() -> None:
    model = build_model("resnet20", 4, 3)
    with pytest.raises(ModelError, match="cannot keep 0"):
        keep_blocks(model, {"layer1": 0})
    with pytest.raises(ModelError, match="not a stage"):
        keep_blocks(model, {"fc": 1})


@pytest.mark.parametrize("name, size", [("resnet20", SIZE), ("tv:resnet18", 32)])
def test_a_shallower_and_narrower_network_exports_and_reloads(name: str, size: int, tmp_path: Path) -> None:
    model, x = _shallow(name, size)
    graph = PruningGraph(model, x[:1], 4)  # width pruning on top of the depth pruning
    scores = magnitude(graph)
    remove_channels(
        graph, [top_channels(g, s, max(1, g.size // 2)) for g, s in zip(graph.groups, scores, strict=True)]
    )
    arch = describe(model, name, 4, 3, size)
    assert arch["blocks"]["layer1"] == 1 and arch["blocks"]["layer2"] == 2
    rebuilt = rebuild(arch)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }
    result = export_model(model, arch, tmp_path, ("safetensors", "torch_export", "torchscript", "onnx"), x)
    assert not result.failed
    with torch.no_grad():
        assert torch.allclose(load_pruned(tmp_path)(x), model(x), atol=1e-5)
    dense_arch = describe(build_model(name, 4, 3), name, 4, 3, size)
    counts = block_counts(dense_arch, arch)
    assert counts["layer1"] == [dense_arch["blocks"]["layer1"], 1]


class DropBlocks(Method):
    """Removes blocks when its phase starts; trains as usual."""

    def __init__(self) -> None:
        spec = JobSpec()
        super().__init__(
            spec.method, MethodContext(spec, torch.zeros(1, 3, SIZE, SIZE), 4, torch.device("cpu"), 1)
        )

    def start_phase(self, phase: Phase, model: nn.Module) -> nn.Module:
        return keep_blocks(model, {"layer2": 1, "layer3": 2})


def _fit(tmp: Path, reporter=None):
    torch.manual_seed(1)
    method = DropBlocks()
    model = method.start_phase(Phase("train", 2), build_model("resnet20", 4, 3))
    ctx: TrainContext = _ctx(tmp, reporter)
    return fit(model, method, Schedule(epochs=2, batch_size=16, lr=0.05), ctx, "train")


def test_a_run_resumes_after_blocks_were_removed(tmp_path: Path) -> None:
    reference = _fit(tmp_path / "whole")
    stop = StopAt(1, 2)
    with pytest.raises(Exception, match="cancel"):
        _fit(tmp_path / "cut", stop)
    ck = load_checkpoint(tmp_path / "cut" / "train.pt")
    assert ck is not None and ck["arch"]["blocks"] == {"layer1": 3, "layer2": 1, "layer3": 2}
    # a fresh process: the dense model again; the engine rebuilds the checkpoint's architecture
    resumed = fit(
        build_model("resnet20", 4, 3),
        DropBlocks(),
        Schedule(epochs=2, batch_size=16, lr=0.05),
        _ctx(tmp_path / "cut"),
        "train",
    )
    assert depths(resumed.model) == {"layer1": 3, "layer2": 1, "layer3": 2}
    a, b = resumed.model.state_dict(), reference.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_cost_model_predicts_a_shallower_network_from_layer_weights() -> None:
    dense = build_model("resnet20", 4, 3)
    x = torch.zeros(1, 3, SIZE, SIZE)
    graph = PruningGraph(dense, x, 4)
    removed = ("layer1.1.", "layer1.2.", "layer3.2.")
    weights = torch.tensor([0.0 if n.startswith(removed) else 1.0 for n in graph.cost.layer_names])
    shallow = keep_blocks(build_model("resnet20", 4, 3), {"layer1": 1, "layer3": 2})
    assert graph.cost.macs(graph.full_keep(), weights.tolist()) == count_macs(shallow, x)
    half = [g.size // 2 for g in graph.groups]  # and with narrower groups, as a differentiable tensor
    soft = graph.cost.macs(torch.tensor(half, dtype=torch.float64), weights.double().requires_grad_())
    keep = [torch.arange(k) for k in half]
    remove_channels(graph, keep)
    keep_blocks(dense, {"layer1": 1, "layer3": 2})
    assert soft.item() == pytest.approx(count_macs(dense, x)) and soft.requires_grad
