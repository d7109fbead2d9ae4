"""``pruning_core.prune`` on a module defined here (not in the zoo), with 8x8 digits as plain datasets."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import pruning_core
from pruning_core.data.loaders import digits_split
from pruning_core.errors import Cancelled
from pruning_core.graph.macs import count_macs
from pruning_core.models.zoo import MODELS
from pruning_core.training.engine import NullReporter


class TinyNet(nn.Module):
    """A user's own CNN: two conv blocks with BatchNorm, global pooling, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
        )
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


def _digits() -> tuple[TensorDataset, TensorDataset]:
    """sklearn's 8x8 digits as (1 x 8 x 8 float tensor in [0, 1], int label) datasets."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.long)
    train_idx, test_idx = digits_split()
    return TensorDataset(x[train_idx], y[train_idx]), TensorDataset(x[test_idx], y[test_idx])


FAST = {"epochs": 1, "schedule": {"max_steps_per_epoch": 6}, "device": "cpu", "reporter": NullReporter()}


def test_prune_shrinks_a_user_module_within_the_target() -> None:
    train, test = _digits()
    model, example = TinyNet(), torch.zeros(1, 1, 8, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dense_macs = count_macs(model, example)

    out = pruning_core.prune(model, example, train, test, target=0.5, **FAST)

    assert isinstance(out.model, TinyNet), "the user's own class, physically smaller"
    macs = count_macs(out.model, example)
    assert macs <= 0.5 * dense_macs
    assert out.report["pruned"]["macs"] == macs and out.report["dense"]["macs"] == dense_macs
    assert out.report["model"].startswith("python:TinyNet")
    assert out.model(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), (
        "the caller's module untouched"
    )
    assert not any(n.startswith("python:") for n in MODELS), "the call's registration is removed"


def test_prune_passes_method_options_and_reports_progress(tmp_path) -> None:
    train, test = _digits()
    phases: list[str] = []

    class Recorder(NullReporter):
        def phase(self, name: str, epochs: int, steps_per_epoch: int) -> None:
            phases.append(name)

    fast = {**FAST, "reporter": Recorder()}
    out = pruning_core.prune(
        TinyNet(), torch.zeros(1, 1, 8, 8), train, test, target=0.6, p=1, workdir=tmp_path, **fast
    )
    assert out.report["spec"]["method"]["p"] == 1
    assert phases, "the reporter saw the engine's phases"
    assert {"model.safetensors", "architecture.json", "report.json"} <= set(out.artifacts)
    assert (tmp_path / "report.json").is_file()


def test_prune_cancels_with_the_engines_cancelled() -> None:
    train, test = _digits()
    stop = threading.Event()
    stop.set()
    with pytest.raises(Cancelled):
        pruning_core.prune(TinyNet(), torch.zeros(1, 1, 8, 8), train, test, cancel=stop, **FAST)
    assert not any(n.startswith("python:") for n in MODELS)


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"sharpness": 3}, TypeError, "sharpness for method 'magnitude'; its options: p, round_to"),
        ({"method": "nope"}, ValueError, "unknown method 'nope'"),
        ({"p": 7}, ValueError, "magnitude option p: Input should be less than or equal to 2"),
        ({"target": 1.5}, ValueError, "target.macs_ratio"),
    ],
)
def test_bad_keywords_are_one_line_errors(kwargs: dict, error: type, words: str) -> None:
    train, test = _digits()
    with pytest.raises(error) as info:
        pruning_core.prune(TinyNet(), torch.zeros(1, 1, 8, 8), train, test, **{**FAST, **kwargs})
    assert words in str(info.value) and "\n" not in str(info.value)


def test_mismatched_example_input_is_one_line_error() -> None:
    train, test = _digits()
    with pytest.raises(ValueError, match=r"train_data's images are \(1, 8, 8\)"):
        pruning_core.prune(TinyNet(), torch.zeros(1, 1, 16, 16), train, test, **FAST)


def test_a_server_refuses_python_names_at_submit() -> None:
    from pruning_core.settings import Settings
    from pruning_core.spec import parse_spec, submit_problems

    spec = parse_spec({"model": {"name": "python:TinyNet"}, "data": {"name": "python:TinyNet"}})
    fields = dict(submit_problems(spec, Settings()))
    assert "pruning_core.prune()" in fields["model.name"] and "data.name" in fields


@pytest.mark.parametrize("method", ["psap", "epi"])  # tas and s2h run too (each slower: searches)
def test_prune_runs_the_paper_methods_on_a_user_module(method: str) -> None:
    train, test = _digits()
    example = torch.zeros(1, 1, 8, 8)
    out = pruning_core.prune(TinyNet(), example, train, test, method=method, **{**FAST, "epochs": 2})
    assert out.report["method"] == method
    assert count_macs(out.model, example) == out.report["pruned"]["macs"] <= 0.5 * out.report["dense"]["macs"]


class _NamedDigits(TensorDataset):
    """A data set with its own class names, as torchvision's ImageFolder and CIFAR have."""

    classes = [f"digit-{i}" for i in range(10)]


def test_the_exports_name_the_datasets_classes_and_leave_the_normalisation_unrecorded(tmp_path) -> None:
    from pruning_core.artifacts.export import read_contract

    train, test = _digits()
    named = _NamedDigits(*train.tensors)
    pruning_core.prune(
        TinyNet(),
        torch.zeros(1, 1, 8, 8),
        named,
        test,
        target=0.6,
        workdir=tmp_path,
        export=("onnx",),
        **FAST,
    )
    contract = read_contract(tmp_path / "model.onnx")
    assert contract.classes == tuple(named.classes) and (contract.channels, contract.size) == (1, 8)
    assert contract.mean is None and contract.std is None  # the caller normalised: nothing to claim
    assert "not recorded" in (tmp_path / "MODEL_CARD.md").read_text()
    assert read_contract(tmp_path) == contract


def test_latency_is_the_callers_choice_and_a_one_shot_prune_takes_seconds() -> None:
    """``latency=False`` skips the timing (no latency in the report); an ``epochs=0`` call times within
    ``ONE_SHOT_LATENCY_S``; the threads the timing used are in the report, measured when not given."""
    from pruning_core.jobs.python_api import ONE_SHOT_LATENCY_S

    train, test = _digits()
    example = torch.zeros(1, 1, 8, 8)
    torch.manual_seed(0)  # TinyNet's channels each exceed the target band: not every init reaches it
    off = pruning_core.prune(TinyNet(), example, train, test, target=0.5, latency=False, **FAST)
    assert off.report["latency"] is None and off.report["latency_speedup"] is None
    one_shot = {**FAST, "epochs": 0}
    timed = pruning_core.prune(TinyNet(), example, train, test, target=0.5, **one_shot)
    lat = timed.report["latency"]
    assert lat["budget_s"] == ONE_SHOT_LATENCY_S and lat["threads_picked"] and lat["threads"] >= 1
    with pytest.raises(ValueError, match="latency=-1"):
        pruning_core.prune(TinyNet(), example, train, test, latency=-1, **FAST)
