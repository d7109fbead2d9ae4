"""Experiment tracking (pruning_core/jobs/tracking.py): a job's TensorBoard event files, read back, and its
MLflow run (a local file store) hold the report's per-epoch numbers; a sink that fails never fails the
job."""

from __future__ import annotations

import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pruning_core.jobs.runner import Result, run
from pruning_core.jobs.tracking import TENSORBOARD_ARCHIVE, Tracker, epoch_scalars, pruned_scalars
from pruning_core.settings import get_settings
from pruning_core.spec import parse_spec
from pruning_core.training.engine import NullReporter

# Two phases of a short digits job: a dense epoch, then magnitude's fine-tuning for two.
SPEC = {
    "model": {"name": "resnet20"},
    "data": {"name": "digits"},
    "target": {"macs_ratio": 0.5},
    "schedule": {"dense_epochs": 1, "epochs": 2, "batch_size": 64, "max_steps_per_epoch": 3},
    "export": {"formats": ["safetensors"], "latency": False},
    "device": "cpu",
}


class Messages(NullReporter):
    def __init__(self) -> None:
        self.lines: list[str] = []

    def message(self, text: str) -> None:
        self.lines.append(text)


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Result:
    return run(parse_spec(SPEC), tmp_path_factory.mktemp("job"))


def _events(result: Result, tmp_path: Path) -> EventAccumulator:
    """The job's tensorboard.tar.gz unpacked into ``tmp_path`` and loaded."""
    with tarfile.open(result.artifacts[TENSORBOARD_ARCHIVE]) as tar:
        tar.extractall(tmp_path, filter="data")
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    return acc


def test_the_job_writes_one_top1_per_epoch_with_the_reports_values(job: Result, tmp_path: Path) -> None:
    acc = _events(job, tmp_path)
    history = job.report.history
    assert [r.phase for r in history] == ["dense", "finetune", "finetune"]
    for phase in ("dense", "finetune"):
        points = acc.Scalars(f"{phase}/top1")
        want = [(i, r.top1) for i, r in enumerate(history, start=1) if r.phase == phase]
        assert [(p.step, pytest.approx(p.value, abs=1e-4)) for p in points] == want
    macs = acc.Scalars("finetune/macs")
    assert [p.value for p in macs] == [float(r.macs) for r in history[1:]]
    assert macs[0].value < acc.Scalars("dense/macs")[0].value, "the fine-tuned network is the pruned one"


def test_the_physical_pruning_is_logged_at_the_first_epoch_after_it(job: Result, tmp_path: Path) -> None:
    acc = _events(job, tmp_path)
    (after,) = acc.Scalars("pruned/macs_after")
    assert after.step == 2, "magnitude prunes as fine-tuning starts: logged with its first epoch"
    assert after.value == job.report.pruned.macs
    assert {"dense/train_loss", "dense/test_loss", "dense/lr", "finetune/lr"} <= set(acc.Tags()["scalars"])


def test_a_resumed_job_logs_every_epoch_once(job: Result, tmp_path: Path) -> None:
    """Its restored epochs never reach a reporter: the whole history is logged at the end."""
    for part in ("checkpoints", "tensorboard"):  # the first attempt's events too: not logged twice
        shutil.copytree(job.workdir / part, tmp_path / "job" / part)
    resumed = run(parse_spec(SPEC), tmp_path / "job")
    acc = _events(resumed, tmp_path / "unpacked")
    assert [(p.step, p.value) for p in acc.Scalars("finetune/top1")] == [
        (i, pytest.approx(r.top1, abs=1e-4)) for i, r in enumerate(job.report.history, 1) if i > 1
    ]
    assert len(acc.Scalars("dense/top1")) == 1


def test_export_tensorboard_false_writes_none(tmp_path: Path) -> None:
    spec = {**SPEC, "schedule": {**SPEC["schedule"], "dense_epochs": 0, "epochs": 1}}
    spec["export"] = {**SPEC["export"], "tensorboard": False}
    result = run(parse_spec(spec), tmp_path)
    assert TENSORBOARD_ARCHIVE not in result.artifacts
    assert not (tmp_path / "tensorboard").exists()


def test_epoch_scalars_take_numbers_and_leave_lists_out() -> None:
    record: dict[str, Any] = {
        "phase": "s2h",
        "epoch": 0,
        "train_loss": 1.5,
        "top1": 50.0,
        "test_loss": None,
        "macs": 1000,
        "lr": 0.1,
        "views": {"soft": 60.0},
        "metrics": {"indicator": 0.9, "widths": [1.0, 2.0], "bad name!": 2.0, "nan": float("nan")},
        "wall_s": 3.0,
    }
    assert epoch_scalars(record) == {
        "s2h/train_loss": 1.5,
        "s2h/top1": 50.0,
        "s2h/macs": 1000.0,
        "s2h/lr": 0.1,
        "s2h/top1_soft": 60.0,
        "s2h/indicator": 0.9,
        "s2h/bad name_": 2.0,
    }
    assert pruned_scalars({"macs_after": 10, "params_after": 5, "macs_ratio": 0.5, "text": "x"}) == {
        "pruned/macs_after": 10.0,
        "pruned/params_after": 5.0,
        "pruned/macs_ratio": 0.5,
    }


class Broken:
    name = "Broken"

    def __init__(self) -> None:
        self.calls = 0

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.calls += 1
        raise ConnectionError("tracking server down")

    def finish(self, report: Any, artifacts: dict[str, Path]) -> dict[str, Path]:
        raise AssertionError("a dropped sink is not finished")

    def abort(self, status: str) -> None:
        raise AssertionError("a dropped sink is not aborted")


def test_a_failing_sink_is_dropped_with_a_warning_not_raised(job: Result) -> None:
    inner, broken = Messages(), Broken()
    tracker = Tracker(inner, [broken])
    tracker.epoch({"phase": "finetune", "epoch": 0, "top1": 10.0, "macs": 5})
    tracker.epoch({"phase": "finetune", "epoch": 1, "top1": 11.0, "macs": 5})
    assert broken.calls == 1 and tracker.sinks == []
    assert inner.lines == ["warning: Broken tracking stopped: tracking server down"]
    assert tracker.finish(job.report, {}) == {}
    tracker.abort("FAILED")


# --- MLflow, against a local file store ---


@pytest.fixture
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """MLFLOW_TRACKING_URI set to a file store under ``tmp_path`` (the settings read afresh)."""
    pytest.importorskip("mlflow")
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "tests")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for a database otherwise
    get_settings.cache_clear()
    yield uri
    get_settings.cache_clear()


def _runs(uri: str) -> list[Any]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    return client.search_runs([client.get_experiment_by_name("tests").experiment_id])


def test_a_job_is_one_mlflow_run_with_params_metrics_and_artifacts(mlflow_store: str, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    spec = {**SPEC, "schedule": {**SPEC["schedule"], "dense_epochs": 0, "epochs": 2}}
    result = run(parse_spec(spec), tmp_path / "job", job_id="job-123")

    (found,) = _runs(mlflow_store)
    assert found.info.status == "FINISHED" and found.info.run_name == "job-123"
    assert found.data.tags["job_id"] == "job-123" and found.data.tags["method"] == "magnitude"
    params = found.data.params
    assert (params["model.name"], params["schedule.epochs"], params["target.macs_ratio"]) == (
        "resnet20",
        "2",
        "0.5",
    )
    assert params["export.formats"] == '["safetensors"]'
    client = MlflowClient(tracking_uri=mlflow_store)
    top1 = client.get_metric_history(found.info.run_id, "finetune/top1")
    assert [(m.step, m.value) for m in top1] == [
        (i, pytest.approx(r.top1)) for i, r in enumerate(result.report.history, start=1)
    ]
    assert found.data.metrics["result/macs_ratio"] == pytest.approx(result.report.achieved_macs_ratio)
    listed = {a.path for a in client.list_artifacts(found.info.run_id)}
    assert {"report.json", "report.html", "model.safetensors", "architecture.json"} <= listed
    assert TENSORBOARD_ARCHIVE not in listed


def test_a_failed_job_ends_its_mlflow_run_failed(mlflow_store: str, tmp_path: Path) -> None:
    from pruning_core.errors import PruningError

    with pytest.raises(PruningError):  # unreachable: fails before any training
        run(parse_spec({**SPEC, "target": {"macs_ratio": 0.001}}), tmp_path / "job")
    (found,) = _runs(mlflow_store)
    assert found.info.status == "FAILED" and found.info.run_name == "magnitude-resnet20"


def test_an_unusable_tracking_uri_warns_and_the_job_succeeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("mlflow")
    (tmp_path / "not-a-dir").write_text("")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "not-a-dir").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    get_settings.cache_clear()
    try:
        messages = Messages()
        spec = {**SPEC, "schedule": {**SPEC["schedule"], "dense_epochs": 0, "epochs": 1}}
        result = run(parse_spec(spec), tmp_path / "job", messages)
    finally:
        get_settings.cache_clear()
    assert [m for m in messages.lines if m.startswith("warning: MLflow tracking off: ")], messages.lines
    assert result.report.pruned.macs < result.report.dense.macs
    assert TENSORBOARD_ARCHIVE in result.artifacts, "TensorBoard goes on without MLflow"
