"""``model.pretrained``: a tv:/timm: model's published weights from the library's cache, placed there by
the test (nothing is downloaded); a miss with downloads off is one line naming the file and the folder,
from the engine and from the API at submit (a 422)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from pruning_core.errors import ModelError
from pruning_core.jobs.runner import prepare
from pruning_core.models.pretrained import published
from pruning_core.models.zoo import build_model
from pruning_core.spec import SpecError, parse_spec
from tests.test_api import DIGITS, assert_problem, make_api  # noqa: F401 (fixture)

TV = "tv:mobilenet_v3_small"


@pytest.fixture
def caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Empty torch hub and Hugging Face caches under ``tmp_path`` for this test (and its children)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return tmp_path


def _place_torchvision(name: str) -> dict[str, torch.Tensor]:
    """A random state dict of torchvision's ``name`` (its own 1000 classes), saved where torch hub
    keeps the builder's default weights; returns it."""
    torch.manual_seed(1)
    state = torchvision.models.get_model(name[3:]).state_dict()
    path = published(name).places[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


def test_torchvision_weights_load_from_the_torch_hub_cache(caches: Path) -> None:
    state = _place_torchvision(TV)
    assert published(TV).found == caches / "torch" / "hub" / "checkpoints" / "mobilenet_v3_small-047dcff4.pth"

    same = build_model(TV, 1000, 3, pretrained=True).state_dict()
    assert all(torch.equal(same[k], v) for k, v in state.items())
    # the job's classes and channels: a new head, the stem's RGB filters summed into one channel
    other = build_model(TV, 10, 1, pretrained=True).state_dict()
    changed = sorted(k for k, v in state.items() if other[k].shape != v.shape or not torch.equal(other[k], v))
    assert changed == ["classifier.3.bias", "classifier.3.weight", "features.0.0.weight"]
    assert torch.allclose(other["features.0.0.weight"], state["features.0.0.weight"].sum(1, keepdim=True))
    assert other["classifier.3.weight"].shape == (10, 1024)


def test_a_job_starts_from_them(caches: Path) -> None:
    state = _place_torchvision(TV)
    spec = parse_spec(
        {
            "model": {"name": TV, "pretrained": True},
            "data": {"name": "synthetic", "num_classes": 4, "per_class": 2, "image_size": 32},
        }
    )
    _, _, model = prepare(spec, caches / "job")
    got = model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in state.items() if not k.startswith("classifier.3"))


def test_a_cache_miss_with_downloads_off_is_one_line_naming_the_file(caches: Path) -> None:
    with pytest.raises(ModelError) as err:
        build_model(TV, 10, 3, pretrained=True)
    line = str(err.value)
    assert "\n" not in line and "ALLOW_DOWNLOAD" in line
    assert str(caches / "torch" / "hub" / "checkpoints" / "mobilenet_v3_small-047dcff4.pth") in line


def test_timm_weights_load_from_the_hugging_face_cache(caches: Path) -> None:
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    with pytest.raises(ModelError, match="models--timm--resnet18"):
        build_model("timm:resnet18", 10, 3, pretrained=True)
    torch.manual_seed(2)
    state = timm.create_model("resnet18", pretrained=False).state_dict()
    repo = caches / "hf" / "hub" / "models--timm--resnet18.a1_in1k"
    revision = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    (repo / "snapshots" / revision).mkdir(parents=True)
    save_file(state, str(repo / "snapshots" / revision / "model.safetensors"))

    got = build_model("timm:resnet18", 10, 3, pretrained=True).state_dict()
    changed = sorted(k for k, v in state.items() if got[k].shape != v.shape or not torch.equal(got[k], v))
    assert changed == ["fc.bias", "fc.weight"]


@pytest.mark.parametrize(
    ("model", "says"),
    [
        ({"name": "resnet20", "pretrained": True}, "for tv: and timm: models"),
        ({"name": TV, "pretrained": True, "weights": "w.safetensors"}, "not both"),
    ],
)
def test_the_spec_refuses_pretrained_where_it_means_nothing(model: dict, says: str) -> None:
    with pytest.raises(SpecError, match=says):
        parse_spec({"model": model})


def test_submit_refuses_a_cache_miss_with_a_422_naming_the_path(
    caches: Path, request: pytest.FixtureRequest, sqlite_url: str
) -> None:
    make = request.getfixturevalue("make_api")
    api = make(sqlite_url)
    spec = DIGITS | {"model": {"name": TV, "pretrained": True}, "data": {"name": "digits", "image_size": 32}}
    r = api.client.post("/v1/jobs", json=spec, headers=api.a)
    body = assert_problem(r, 422)
    (item,) = body["errors"]
    assert item["field"] == "model.pretrained"
    assert str(published(TV).places[0]) in item["message"] and "\n" not in item["message"]

    _place_torchvision(TV)
    assert api.client.post("/v1/jobs", json=spec, headers=api.a).status_code == 201
    allowed = make(sqlite_url, allow_download=True)  # the operator allows downloads: no check
    spec = spec | {"model": {"name": "tv:resnet18", "pretrained": True}}
    assert allowed.client.post("/v1/jobs", json=spec, headers=allowed.a).status_code == 201
