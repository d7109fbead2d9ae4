"""Export of physically pruned models (safetensors + architecture JSON, torch.export, TorchScript, ONNX),
the input contract in every format, reload, latency."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pruning_core.artifacts.contract import InputContract
from pruning_core.artifacts.export import (
    ExportError,
    ExportResult,
    export_model,
    load_exported,
    load_pruned,
    load_torchscript,
    read_contract,
)
from pruning_core.errors import PruningError, WeightsError
from pruning_core.graph.groups import PruningGraph, top_channels
from pruning_core.graph.macs import count_macs
from pruning_core.graph.surgery import describe, remove_channels
from pruning_core.models.zoo import build_model
from pruning_core.speed.latency import LatencyStats, measure_latency

CASES = {  # model name -> input size (pixels)
    "resnet20": 32,
    "tv:resnet18": 64,
    "mobilenet_v2": 16,  # depthwise convs: the architecture must record their new groups
}


ALL_FORMATS = ["safetensors", "torch_export", "torchscript", "onnx"]


def _contract(channels: int = 3, size: int = 32) -> InputContract:
    """A contract with values no default would produce, so a lost or swapped field shows."""
    return InputContract(
        channels=channels,
        size=size,
        classes=tuple(f'cls-{i}, "quoted" é' for i in range(10)),  # commas, quotes, non-ASCII survive
        mean=tuple(0.1 + 0.2 * c for c in range(channels)),
        std=tuple(0.3 - 0.05 * c for c in range(channels)),
        value_range=(0.0, 1.0),
    )


def _randomize_norms(model: nn.Module) -> None:
    """Non-default BatchNorm statistics, so a lost buffer would change the logits."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def _pruned(name: str, size: int) -> tuple[nn.Module, dict, torch.Tensor, int]:
    """A physically pruned model (about half of every group), its architecture, an example, dense MACs."""
    torch.manual_seed(0)
    model = build_model(name, 10, 3).eval()
    _randomize_norms(model)
    x = torch.randn(2, 3, size, size)
    dense_macs = count_macs(model, x)
    graph = PruningGraph(model, x, num_classes=10)
    keep = [top_channels(g, torch.rand(g.size), max(1, g.size // 2)) for g in graph.groups]
    remove_channels(graph, keep)
    return model, describe(model, name, 10, 3, size), x, dense_macs


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, tmp_path_factory):
    name = request.param
    model, arch, x, dense_macs = _pruned(name, CASES[name])
    out = tmp_path_factory.mktemp(name.replace(":", "_"))
    result = export_model(model, arch, out, ALL_FORMATS, x, contract=_contract(3, CASES[name]))
    assert result.failed == {}
    return model, x, out, result.paths, dense_macs


@pytest.fixture(scope="module")
def resnet20():
    model, arch, x, _ = _pruned("resnet20", 32)
    return model, arch, x


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


# --- export + reload ---


def test_export_writes_the_requested_files_only(exported):
    _, _, out, paths, _ = exported
    assert set(paths) == {"safetensors", "architecture", "torch_export", "torchscript", "onnx"}
    names = {"model.safetensors", "architecture.json", "model.pt2", "model.torchscript.pt", "model.onnx"}
    assert {p.name for p in paths.values()} == names
    assert all(p.parent == out and p.stat().st_size > 0 for p in paths.values())
    assert set(os.listdir(out)) == names  # no temporary files left behind


def test_round_trip_gives_identical_logits_shapes_and_macs(exported):
    model, x, out, paths, dense_macs = exported
    pruned_macs = count_macs(model, x)
    assert pruned_macs < 0.8 * dense_macs  # the model really was made smaller
    for where in (out, paths["safetensors"], str(out)):
        loaded = load_pruned(where)
        assert not loaded.training
        assert {k: v.shape for k, v in loaded.state_dict().items()} == {
            k: v.shape for k, v in model.state_dict().items()
        }
        ref = _logits(model, x)
        assert ref.std() > 0
        assert (_logits(loaded, x) - ref).abs().max().item() < 1e-5
        assert count_macs(loaded, x) == pruned_macs


def test_safetensors_holds_the_state_dict_and_the_architecture_is_json(exported):
    model, _, _, paths, _ = exported
    state = load_file(str(paths["safetensors"]))
    assert state.keys() == model.state_dict().keys()
    assert all(t.is_contiguous() and t.device.type == "cpu" for t in state.values())
    arch = json.loads(paths["architecture"].read_text())
    assert arch["format"] == "pruning-core/architecture-v1"


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_loads_and_matches(exported):
    model, x, _, paths, _ = exported
    scripted = torch.jit.load(str(paths["torchscript"]))
    assert (_logits(scripted, x) - _logits(model, x)).abs().max().item() < 1e-5


def test_onnx_is_valid_and_has_a_dynamic_batch_axis(exported):
    model, x, _, paths, _ = exported
    proto = onnx.load(str(paths["onnx"]))
    onnx.checker.check_model(proto)
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert [i.name for i in proto.graph.input] == ["input"]
    assert [o.name for o in proto.graph.output] == ["logits"]
    session = ort.InferenceSession(str(paths["onnx"]), providers=["CPUExecutionProvider"])
    batch = torch.randn(5, *x.shape[1:])  # not the traced batch size
    (got,) = session.run(["logits"], {"input": batch.numpy()})
    assert got.shape == (5, 10)
    assert np.abs(got - _logits(model, batch).numpy()).max() < 1e-4


def test_export_restores_mode_and_writes_nowhere_else(resnet20, tmp_path, monkeypatch):
    model, arch, x = resnet20
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    model.train()
    try:
        paths = export_model(model, arch, tmp_path / "out", ["onnx"], x).paths
        assert model.training
    finally:
        model.eval()
    assert set(paths) == {"safetensors", "architecture", "onnx"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd", "out"]
    assert list(cwd.iterdir()) == []


def _ort_offset(monkeypatch, offset) -> None:
    """Make ONNX Runtime's logits differ from torch's by ``offset(logits)``."""
    run = ort.InferenceSession.run

    def shifted(self, *args, **kwargs):
        (out,) = run(self, *args, **kwargs)
        return [out + offset(out)]

    monkeypatch.setattr(ort.InferenceSession, "run", shifted)


def test_a_format_failing_its_check_is_reported_and_the_others_written(resnet20, tmp_path, monkeypatch):
    model, arch, x = resnet20
    _ort_offset(monkeypatch, lambda out: np.float32(0.01) * np.abs(out).max())  # 1% of the logits' scale
    result = export_model(model, arch, tmp_path, ["torchscript", "onnx"], x)
    assert isinstance(result, ExportResult)
    assert set(result.paths) == {"safetensors", "architecture", "torchscript"}
    assert set(result.failed) == {"onnx"}
    reason = result.failed["onnx"]
    assert "ONNX Runtime logits differ" in reason and "\n" not in reason
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "architecture.json",
        "model.safetensors",
        "model.torchscript.pt",
    ]  # the failing file and its temporary are not left behind
    assert (_logits(load_pruned(tmp_path), x) - _logits(model, x)).abs().max().item() < 1e-5


def test_the_check_is_relative_to_the_logits_scale(resnet20, tmp_path, monkeypatch):
    """1e-6 of the logits' scale passes however large the logits are (1e12 here); 1e-3 of it fails."""
    model, arch, x = resnet20
    for gain in (1.0, 1e12):
        handle = model.fc.register_forward_hook(lambda _m, _i, out, g=gain: out * g)
        try:
            _ort_offset(monkeypatch, lambda out: np.float32(1e-6) * np.abs(out).max())
            assert export_model(model, arch, tmp_path / f"ok{gain:g}", ["onnx"], x).failed == {}
            _ort_offset(monkeypatch, lambda out: np.float32(1e-3) * np.abs(out).max())
            failed = export_model(model, arch, tmp_path / f"bad{gain:g}", ["onnx"], x).failed
        finally:
            handle.remove()
            monkeypatch.undo()
        assert "logits differ" in failed["onnx"]


def test_a_format_that_cannot_be_written_is_reported(resnet20, tmp_path, monkeypatch):
    model, arch, x = resnet20

    def broken(*_args, **_kwargs):
        raise RuntimeError("tracer exploded\non two lines")

    monkeypatch.setattr(torch.jit, "trace", broken)
    result = export_model(model, arch, tmp_path, ["torchscript", "onnx"], x)
    assert set(result.paths) == {"safetensors", "architecture", "onnx"}
    assert result.failed == {"torchscript": "TorchScript export failed: tracer exploded on two lines"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".") or "torchscript" in p.name]


def test_export_refuses_unknown_formats_and_a_wrong_architecture(resnet20, tmp_path):
    model, arch, x = resnet20
    with pytest.raises(ExportError, match="unknown export format"):
        export_model(model, arch, tmp_path / "a", ["tflite"], x)
    dense_arch = describe(build_model("resnet20", 10, 3), "resnet20", 10, 3, 32)
    with pytest.raises(ExportError, match="does not match the model"):
        export_model(model, dense_arch, tmp_path / "b", [], x)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# --- broken exports give one-line errors of the right class ---


@pytest.fixture
def export_dir(resnet20, tmp_path) -> Path:
    model, arch, x = resnet20
    export_model(model, arch, tmp_path, [], x)
    return tmp_path


def _one_line_error(path, cls: type[PruningError]) -> PruningError:
    with pytest.raises(cls) as info:
        load_pruned(path)
    assert type(info.value) is cls
    assert str(info.value) and "\n" not in str(info.value)
    return info.value


def test_corrupt_safetensors(export_dir):
    (export_dir / "model.safetensors").write_bytes(os.urandom(4096))
    err = _one_line_error(export_dir, WeightsError)
    assert "not a valid safetensors" in str(err)


def test_safetensors_missing_a_tensor(export_dir):
    path = export_dir / "model.safetensors"
    state = load_file(str(path))
    del state["layer1.0.conv1.weight"]
    save_file(state, str(path))
    err = _one_line_error(path, WeightsError)
    assert "layer1.0.conv1.weight" in str(err)


def test_missing_safetensors(export_dir):
    (export_dir / "model.safetensors").unlink()
    _one_line_error(export_dir, WeightsError)


@pytest.mark.parametrize(
    "text",
    [
        '{"format": "pruning-core/architecture-v1", "model": {',  # truncated
        "[1, 2, 3]",  # not an object
        '{"format": "something-else"}',  # unknown format
        '{"format": "pruning-core/architecture-v1"}',  # keys missing
        '{"format": "pruning-core/architecture-v1", "model": {"name": "resnet20", "num_classes": 10, '
        '"in_channels": 3}, "layers": {"no.such.layer": {"type": "Linear"}}}',
    ],
)
def test_broken_architecture_json(export_dir, text):
    (export_dir / "architecture.json").write_text(text)
    _one_line_error(export_dir, ExportError)


def test_missing_export_directory(tmp_path):
    _one_line_error(tmp_path / "nowhere", ExportError)


# --- latency ---


def test_latency_stats_and_mode_restored(resnet20):
    model, _, _ = resnet20
    for training in (True, False):
        model.train(training)
        stats = measure_latency(model, (3, 3, 32, 32), "cpu", warmup=1, iters=8)
        assert model.training is training
        assert isinstance(stats, LatencyStats)
        assert stats.iters == 8 and stats.batch_size == 3 and stats.device == "cpu"
        assert 0 < stats.p50_ms <= stats.p90_ms
        assert stats.mean_ms > 0
    model.eval()


def test_latency_stops_at_the_time_limit_after_three_iterations(resnet20):
    model, _, _ = resnet20
    stats = measure_latency(model, (1, 3, 32, 32), torch.device("cpu"), warmup=2, iters=1000, max_seconds=0.0)
    assert stats.iters == 3


def test_latency_refuses_bad_shapes(resnet20):
    with pytest.raises(ValueError):
        measure_latency(resnet20[0], (0, 3, 32, 32), "cpu")


def test_deployment_formats_hold_batchnorm_folded_into_convolutions(exported):
    """TorchScript and ONNX run the folded network (no BatchNorm operator left) and still match the
    model's logits; the safetensors weights keep every BatchNorm, so the trainable network reloads."""
    model, x, _out, paths, _ = exported
    norms = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms  # otherwise there is nothing to fold and the test proves nothing
    scripted = torch.jit.load(str(paths["torchscript"]))
    assert "batch_norm" not in str(scripted.inlined_graph)
    ops = {node.op_type for node in onnx.load(str(paths["onnx"])).graph.node}
    assert "BatchNormalization" not in ops and "Conv" in ops
    with torch.no_grad():
        ref = model.eval()(x)
        scale = 1e-5 + 1e-4 * ref.abs().max().item()
        assert (scripted(x) - ref).abs().max().item() <= scale
    out = ort.InferenceSession(str(paths["onnx"]), providers=["CPUExecutionProvider"]).run(
        ["logits"], {"input": x.numpy()}
    )[0]
    assert np.abs(out - ref.numpy()).max() <= scale
    saved = load_file(str(paths["safetensors"]))
    assert all(f"{n}.running_var" in saved for n in norms)


def test_inference_preparation_folds_and_picks_the_memory_format_by_device() -> None:
    """CPU and CUDA: channels_last (both measured, BENCHMARKS.md), other devices contiguous; BatchNorm
    folded, same logits, and the CPU copy's 4-D weights really in channels_last."""
    from pruning_core.artifacts.inference import (
        count_batchnorms,
        memory_format,
        prepare_for_inference,
        to_inference_input,
    )

    assert memory_format("cuda") == torch.channels_last and memory_format("cuda:1") == torch.channels_last
    assert memory_format("cpu") == torch.channels_last  # max pooling is 10x faster in it (BENCHMARKS.md)
    assert memory_format("mps") == torch.contiguous_format
    model, _, x, _ = _pruned("resnet20", 32)
    ready = prepare_for_inference(model, "cpu")
    assert count_batchnorms(model) > 0 and count_batchnorms(ready) == 0
    convs = [m for m in ready.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    with torch.no_grad():
        ref = model.eval()(x)
        assert (
            ready(to_inference_input(x, "cpu")) - ref
        ).abs().max().item() <= 1e-5 + 1e-4 * ref.abs().max().item()


# --- torch.export (.pt2), the TorchScript deprecation, the input contract in every format ---


def test_pt2_holds_the_folded_network_and_matches_the_pruned_model(exported):
    """model.pt2 reloads (dynamic batch) to the BatchNorm-folded network with the pruned model's logits."""
    model, x, out, paths, _ = exported
    assert paths["torch_export"] == out / "model.pt2"
    program = torch.export.load(str(paths["torch_export"]))
    targets = {str(node.target) for node in program.graph.nodes}
    assert not [t for t in targets if "batch_norm" in t] and any("conv2d" in t for t in targets)
    loaded = load_exported(out)
    for batch in (x, torch.randn(5, *x.shape[1:]), torch.randn(1, *x.shape[1:])):  # not only the traced N
        with torch.no_grad():
            ref = model.eval()(batch)
            got = loaded(batch)
        assert got.shape == ref.shape
        assert (got - ref).abs().max().item() <= 1e-5 + 1e-4 * ref.abs().max().item()


def test_the_torchscript_loader_warns_that_torchscript_is_deprecated(exported):
    model, x, out, _, _ = exported
    with pytest.warns(DeprecationWarning, match="TorchScript is deprecated.*model.pt2"):
        scripted = load_torchscript(out)
    with torch.no_grad():
        ref = model.eval()(x)
        assert (scripted(x) - ref).abs().max().item() <= 1e-5 + 1e-4 * ref.abs().max().item()


def test_every_format_carries_the_same_input_contract(exported):
    """architecture.json, ONNX metadata (as onnxruntime shows it), TorchScript and .pt2 extra files."""
    _, x, out, paths, _ = exported
    want = _contract(3, x.shape[-1])
    files = [out, *(paths[k] for k in ("architecture", "torch_export", "torchscript", "onnx"))]
    assert [read_contract(f) for f in files] == [want] * len(files)
    meta = ort.InferenceSession(str(paths["onnx"]), providers=["CPUExecutionProvider"]).get_modelmeta()
    props = {k: json.loads(v) for k, v in meta.custom_metadata_map.items()}
    assert props["classes"] == list(want.classes) and props["mean"] == list(want.mean)
    assert (props["size"], props["channels"], props["color"]) == (x.shape[-1], 3, "RGB")
    arch = json.loads(paths["architecture"].read_text())
    assert (arch["input"]["channels"], arch["input"]["size"]) == (3, x.shape[-1])  # what describe() wrote


def test_an_export_without_a_contract_says_so(resnet20, tmp_path):
    model, arch, x = resnet20
    paths = export_model(model, arch, tmp_path, ["onnx"], x).paths
    for path in (tmp_path, paths["onnx"]):
        with pytest.raises(ExportError, match="no input contract"):
            read_contract(path)
    with pytest.raises(ExportError, match="no input contract is stored in .safetensors"):
        read_contract(paths["safetensors"])


def test_the_contract_reproduces_the_data_pipeline(tmp_path):
    """Preprocessing by the contract (pixels / 255, minus mean, over std) gives the tensors the pipeline
    trained on, for the digits (grayscale, the split's statistics) and synthetic (RGB) data sets."""
    from pruning_core.data.loaders import _digits_arrays, digits_split, load_data
    from pruning_core.spec import DataSpec

    digits = load_data(DataSpec(name="digits", test_per_class=1), cache_dir=tmp_path)
    c = InputContract.from_datasets(digits)
    assert (c.channels, c.size, c.color, c.classes) == (1, 8, "L", tuple(str(d) for d in range(10)))
    raw = _digits_arrays()[0][digits_split()[1][0]].float() / 255  # the first test image, 1 x 8 x 8
    mean, std = torch.tensor(c.mean).view(-1, 1, 1), torch.tensor(c.std).view(-1, 1, 1)
    assert torch.allclose((raw - mean) / std, digits.test[0][0], atol=1e-6)
    assert c.std is not None and all(s != 1.0 for s in c.std)  # a real normalisation, not the identity

    synthetic = load_data(DataSpec(name="synthetic", num_classes=3), cache_dir=tmp_path)
    s = InputContract.from_datasets(synthetic)
    assert (s.channels, s.color, s.classes) == (3, "RGB", ("class0", "class1", "class2"))
    assert s.mean == synthetic.mean and len(s.mean) == 3
    assert InputContract.from_text(s.to_text()) == s and InputContract.from_metadata(s.metadata()) == s


def test_a_pt2_that_cannot_be_exported_is_reported_and_leaves_no_file(resnet20, tmp_path, monkeypatch):
    model, arch, x = resnet20

    def broken(*_args, **_kwargs):
        raise RuntimeError("data-dependent guard\non the batch size")

    monkeypatch.setattr(torch.export, "export", broken)
    result = export_model(model, arch, tmp_path, ["torch_export", "onnx"], x, contract=_contract())
    assert set(result.paths) == {"safetensors", "architecture", "onnx"}
    assert result.failed == {"torch_export": "torch.export failed: data-dependent guard on the batch size"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "architecture.json",
        "model.onnx",
        "model.safetensors",
    ]
