"""Models from installed packages (entry-point group ``pruning_service.models``): a tiny plugin package
is "installed" as a dist-info on sys.path; the API lists and accepts its models without importing them,
and a worker runs a job on one; a builder that raises, a model that cannot be traced and a plugin that
does not load each fail the job, not retryable, with one line."""

from __future__ import annotations

import importlib
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from pruning_core import spec as spec_module
from pruning_core.models.zoo import MODELS
from pruning_core.settings import Settings
from store import db, repo
from worker.execute import execute

PLUGIN = """
import torch
from torch import nn


class PlugNet(nn.Module):
    def __init__(self, num_classes, in_channels):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


class Untraceable(PlugNet):
    def forward(self, x):
        return self.fc(self.conv(x).view(x.shape[0], 999))  # wrong on any input


def build(num_classes, in_channels):
    return PlugNet(num_classes, in_channels)


def build_raises(num_classes, in_channels):
    raise RuntimeError("no GPU kernels for this layer")


def build_untraceable(num_classes, in_channels):
    return Untraceable(num_classes, in_channels)
"""
ENTRY_POINTS = """
[pruning_service.models]
plugnet = tinyplug:build
plugnet_raises = tinyplug:build_raises
plugnet_untraceable = tinyplug:build_untraceable
plugnet_missing = tinyplug_not_there:build
"""
NAMES = ("plugnet", "plugnet_raises", "plugnet_untraceable", "plugnet_missing")
JOB = {
    "data": {"name": "digits"},
    "target": {"macs_ratio": 0.5},
    "schedule": {"epochs": 1, "batch_size": 64, "max_steps_per_epoch": 3},
    "export": {"formats": ["safetensors"]},
    "device": "cpu",
}


@pytest.fixture
def plugin(tmp_path: Path) -> Iterator[None]:
    """The package ``tinyplug`` with its dist-info (entry points) on sys.path; removed afterwards."""
    site = tmp_path / "site"
    (site / "tinyplug").mkdir(parents=True)
    (site / "tinyplug" / "__init__.py").write_text(textwrap.dedent(PLUGIN))
    info = site / "tinyplug-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tinyplug\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    spec_module.plugin_models.cache_clear()
    yield
    sys.path.remove(str(site))
    sys.modules.pop("tinyplug", None)
    spec_module.plugin_models.cache_clear()
    for name in NAMES:
        MODELS.remove(name)


@pytest.fixture
def service(tmp_path: Path, plugin: None) -> Iterator[tuple[TestClient, Settings]]:
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    db.migrate(url)
    settings = Settings(state_dir=tmp_path / "state", database_url=url, redis_url=None, auth_disabled=False)
    with db.session_scope(db.make_engine(url)) as s:
        _, key = repo.create_api_key(s, "alice")
    with TestClient(create_app(settings)) as client:
        client.headers["Authorization"] = f"Bearer {key}"
        yield client, settings


def _run(client: TestClient, settings: Settings, model: str) -> dict:
    r = client.post("/v1/jobs", json={**JOB, "model": {"name": model}})
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    assert "tinyplug" not in sys.modules, "the API reads plugin names without importing the plugin"
    execute(job_id, worker_name="test-worker", settings=settings)
    return client.get(f"/v1/jobs/{job_id}").json()


def test_plugin_models_are_listed_accepted_and_run(service) -> None:
    client, settings = service
    items = {m["name"]: m for m in client.get("/v1/models").json()["items"]}
    assert items["plugnet"] == {"name": "plugnet", "family": "plugin", "entry_point": "tinyplug:build"}
    assert "resnet20" in items

    job = _run(client, settings, "plugnet")
    assert job["status"] == "succeeded", job
    report = client.get(f"/v1/jobs/{job['id']}/artifacts/report.json").json()
    assert report["model"] == "plugnet" and report["pruned"]["macs"] <= 0.5 * report["dense"]["macs"]


def test_unknown_model_is_refused_at_submit_listing_plugins(service) -> None:
    client, _ = service
    r = client.post("/v1/jobs", json={**JOB, "model": {"name": "plugnot"}})
    assert r.status_code == 422
    assert "unknown model 'plugnot'" in r.text and "plugnet" in r.text


@pytest.mark.parametrize(
    ("model", "words"),
    [
        ("plugnet_raises", "model plugin 'plugnet_raises': its builder raised RuntimeError: no GPU kernels"),
        ("plugnet_untraceable", "does not run on"),
        ("plugnet_missing", "model plugin 'plugnet_missing' (tinyplug_not_there:build) does not load: "),
    ],
)
def test_broken_plugins_fail_the_job_with_one_line(service, model: str, words: str) -> None:
    client, settings = service
    job = _run(client, settings, model)
    assert job["status"] == "failed", job
    error = job["error"]
    assert words in error["message"] and "\n" not in error["message"], error
    assert error["retryable"] is False


def test_a_client_lets_plugin_names_through_for_the_server_to_check() -> None:
    spec_module.plugin_models.cache_clear()
    with pytest.raises(spec_module.SpecError):
        spec_module.parse_spec({"model": {"name": "someone_elses_net"}})
    spec = spec_module.parse_spec({"model": {"name": "someone_elses_net"}}, remote_models=True)
    assert spec.model.name == "someone_elses_net"
