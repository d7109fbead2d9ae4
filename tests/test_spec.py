"""JobSpec: defaults, one message per bad field, catalogs equal to the registries, torch-free."""

import subprocess
import sys

import pytest

from pruning_core.spec import CIFAR_MODELS, DATASETS, METHODS, JobSpec, SpecError, parse_spec


def test_defaults_are_a_valid_job() -> None:
    spec = parse_spec({})
    assert spec.method.name == "magnitude"
    assert 0 < spec.target.macs_ratio <= 1
    assert spec.export.formats[0] == "safetensors"


def test_one_message_per_bad_field() -> None:
    with pytest.raises(SpecError) as e:
        parse_spec(
            {
                "target": {"macs_ratio": 1.5},
                "schedule": {"epochs": -1, "optimizer": "rmsprop"},
                "model": {"name": "resnet19"},
                "bogus": 1,
            }
        )
    problems = e.value.problems
    assert len(problems) == 5, problems
    fields = {p.split(":")[0] for p in problems}
    assert fields == {"target.macs_ratio", "schedule.epochs", "schedule.optimizer", "model.name", "bogus"}
    assert any("resnet20" in p for p in problems), "unknown model must list the known ones"


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.0001])
def test_target_outside_unit_interval_refused(ratio: float) -> None:
    with pytest.raises(SpecError, match="target.macs_ratio"):
        parse_spec({"target": {"macs_ratio": ratio}})


def test_unknown_method_and_data_list_known() -> None:
    with pytest.raises(SpecError) as e:
        parse_spec({"method": {"name": "optimal-brain-surgeon"}, "data": {"name": "imagenet"}})
    text = str(e.value)
    assert (
        "method.name: unknown method 'optimal-brain-surgeon'; known: magnitude, s2h, tas, psap, epi" in text
    )
    assert "digits" in text and "imagefolder" in text


def test_imagefolder_needs_root() -> None:
    with pytest.raises(SpecError, match="root"):
        parse_spec({"data": {"name": "imagefolder"}})


def test_catalogs_match_registries() -> None:
    from pruning_core.data.loaders import DATASETS as DATA_REGISTRY
    from pruning_core.methods import METHODS as METHOD_REGISTRY
    from pruning_core.models.zoo import MODELS

    assert sorted(CIFAR_MODELS) == MODELS.names()
    assert sorted(DATASETS) == DATA_REGISTRY.names()
    assert sorted(METHODS) == METHOD_REGISTRY.names()


def test_spec_round_trips_through_json() -> None:
    spec = parse_spec(
        {"model": {"name": "tv:resnet18"}, "kd": {"enabled": True}, "export": {"formats": ["onnx"]}}
    )
    again = JobSpec.model_validate_json(spec.model_dump_json())
    assert again == spec
    assert again.export.formats == ("safetensors", "onnx")


def test_spec_imports_no_torch() -> None:
    code = "import sys, pruning_core, pruning_core.spec; assert 'torch' not in sys.modules, 'torch loaded'"
    subprocess.run([sys.executable, "-c", code], check=True)
