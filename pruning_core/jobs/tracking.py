"""Experiment tracking: a job's per-epoch records as TensorBoard event files and, when the operator sets
``MLFLOW_TRACKING_URI``, as one MLflow run.

``Tracker`` is the engine's Reporter around the job's own one (the CLI's bars, the worker's
``StoreReporter``): everything passes through, and each epoch record, as scalars ``<phase>/<name>``
(``epoch_scalars``), also goes to every sink at the job's global epoch: its 1-based position in the
report's ``history``, the x position of ``training.png``. ``runner.run`` wraps every job in one, so
``prune run``, ``pruning_core.prune`` and the worker all track alike.

A job that resumes from checkpoints logs nothing live (its restored epochs never reach a reporter, so
the live epochs' positions are not known): at its end every record of the history is logged at once.
Tracking never fails a job: a sink that raises is dropped with a warning message (an event of the job).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tarfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from ..artifacts.report import Report
from ..errors import one_line
from ..settings import Settings
from ..spec import JobSpec
from ..training.engine import Reporter

TENSORBOARD_DIR = "tensorboard"
TENSORBOARD_ARCHIVE = "tensorboard.tar.gz"
# The record's own numbers that become scalars (``views`` and ``metrics`` are added by name).
RECORD_SCALARS = ("train_loss", "top1", "test_loss", "macs", "lr", "top1_before", "macs_before")
PRUNED_SCALARS = ("macs_after", "params_after", "macs_ratio", "params_ratio")
PARAM_MAX_CHARS = 500  # what every MLflow server accepts for a param value
MLFLOW_BATCH = 100  # params per log_batch call, MLflow's limit


class Sink(Protocol):
    """Where the scalars go. ``finish`` returns files to add to the job's artifacts."""

    name: str

    def scalars(self, values: dict[str, float], step: int) -> None: ...
    def finish(self, report: Report, artifacts: dict[str, Path]) -> dict[str, Path]: ...
    def abort(self, status: str) -> None: ...


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _tag(name: str) -> str:
    """A metric name every backend accepts: letters, digits and ``_-. /`` kept, anything else ``_``."""
    return re.sub(r"[^\w\-. /]", "_", str(name))


def epoch_scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """An epoch record's numbers as ``{"<phase>/<name>": value}``: train loss, top-1, test loss, MACs,
    LR, ``top1_<view>`` of every evaluated network, each scalar method metric, and for a pruning epoch
    ``top1_before`` / ``macs_before``. Lists, missing values and non-finite numbers are left out."""
    values = {name: record.get(name) for name in RECORD_SCALARS}
    values |= {f"top1_{k}": v for k, v in (record.get("views") or {}).items()}
    values |= dict(record.get("metrics") or {})
    phase = _tag(record.get("phase", "train"))
    return {f"{phase}/{_tag(k)}": float(v) for k, v in values.items() if _number(v)}


def pruned_scalars(data: Mapping[str, Any]) -> dict[str, float]:
    """A ``pruned`` event (``engine.report_pruned``) as ``pruned/macs_after``, ``pruned/params_after``
    and their ratios to the network before."""
    return {f"pruned/{k}": float(data[k]) for k in PRUNED_SCALARS if _number(data.get(k))}


def result_scalars(report: Report) -> dict[str, float]:
    """The job's outcome, to compare runs by: ``result/macs_ratio`` and ``result/params_ratio`` (pruned /
    dense), ``result/dense_top1``, ``result/pruned_top1`` and ``result/latency_speedup`` (when timed)."""
    values = {
        "macs_ratio": report.achieved_macs_ratio,
        "params_ratio": report.params_ratio,
        "dense_top1": report.dense.top1,
        "pruned_top1": report.pruned.top1,
        "latency_speedup": report.latency_speedup,
    }
    return {f"result/{k}": float(v) for k, v in values.items() if _number(v)}


def flat_params(spec: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """A spec (``model_dump(mode="json")``) as ``{"schedule.lr": "0.05", ...}``: nested keys joined by
    dots, lists as JSON, values cut to ``PARAM_MAX_CHARS``."""
    out: dict[str, str] = {}
    for key, value in spec.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out |= flat_params(value, f"{name}.")
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            out[name] = text if len(text) <= PARAM_MAX_CHARS else text[: PARAM_MAX_CHARS - 3] + "..."
    return out


class TensorBoardSink:
    """Event files under ``workdir/tensorboard/`` (emptied first: a resumed job logs all again),
    packed at the end into ``tensorboard.tar.gz`` (``tensorboard --logdir`` reads it unpacked)."""

    name = "TensorBoard"

    def __init__(self, workdir: Path):
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only for a job

        self.dir = workdir / TENSORBOARD_DIR
        shutil.rmtree(self.dir, ignore_errors=True)
        self.archive = workdir / TENSORBOARD_ARCHIVE
        self.writer = SummaryWriter(log_dir=str(self.dir))

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def finish(self, report: Report, artifacts: dict[str, Path]) -> dict[str, Path]:
        self.writer.close()
        with tarfile.open(self.archive, "w:gz") as tar:
            tar.add(self.dir, arcname=TENSORBOARD_DIR)
        return {self.archive.name: self.archive}

    def abort(self, status: str) -> None:
        self.writer.close()


class MlflowSink:
    """One MLflow run per job (per attempt) in ``experiment`` at ``uri``: the flattened spec as params,
    the scalars as metrics, at the end every artifact (report, model files, plots) and the status."""

    name = "MLflow"

    def __init__(self, uri: str, experiment: str, run_name: str, tags: dict[str, str], spec: JobSpec):
        try:
            from mlflow.entities import Param
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise RuntimeError(
                "MLFLOW_TRACKING_URI is set but mlflow is not installed (pip install 'pruning-service[mlflow]')"
            ) from None
        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        exp_id = found.experiment_id if found is not None else self.client.create_experiment(experiment)
        self.run_id = self.client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
        params = [Param(k, v) for k, v in flat_params(spec.model_dump(mode="json")).items()]
        for i in range(0, len(params), MLFLOW_BATCH):
            self.client.log_batch(self.run_id, params=params[i : i + MLFLOW_BATCH])

    def scalars(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in values.items()]
        for i in range(0, len(metrics), MLFLOW_BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + MLFLOW_BATCH])

    def finish(self, report: Report, artifacts: dict[str, Path]) -> dict[str, Path]:
        self.scalars(result_scalars(report), len(report.history))
        for name, path in sorted(artifacts.items()):
            if name != TENSORBOARD_ARCHIVE:  # the metrics are MLflow's own
                self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, "FINISHED")
        return {}

    def abort(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)


class Tracker:
    """The engine's Reporter around ``inner``, feeding each epoch record to the ``sinks`` (see the
    module's docstring). ``live``: log as the epochs end (False for a resumed job: all at the end)."""

    def __init__(self, inner: Reporter, sinks: list[Sink], live: bool = True):
        self.inner, self.sinks, self.live = inner, list(sinks), live
        self.logged = 0  # epoch records logged: the global epoch of the last one
        self._pruned: dict[str, float] = {}  # a pruned event waiting for its epoch's record

    # --- the Reporter protocol, passed through ---

    def phase(self, name: str, epochs: int, steps_per_epoch: int) -> None:
        self.inner.phase(name, epochs, steps_per_epoch)

    def step(self, phase: str, epoch: int, step: int, loss: float) -> None:
        self.inner.step(phase, epoch, step, loss)

    def message(self, text: str) -> None:
        self.inner.message(text)

    def cancelled(self) -> bool:
        return self.inner.cancelled()

    def epoch(self, record: dict[str, Any]) -> None:
        self.inner.epoch(record)
        if self.live:
            self._log(epoch_scalars(record) | self._pruned, self.logged + 1)
            self.logged, self._pruned = self.logged + 1, {}

    def pruned(self, data: dict[str, Any]) -> None:
        """Passed on (a reporter without ``pruned`` gets the line); logged with the next epoch record:
        the epoch it ended (an epoch-end prune) or the first on the pruned network (a phase's start)."""
        forward = getattr(self.inner, "pruned", None)
        if forward is None:
            self.inner.message(data["text"])
        else:
            forward(data)
        if self.live:
            self._pruned = pruned_scalars(data)

    # --- the job's end ---

    def finish(self, report: Report, artifacts: dict[str, Path]) -> dict[str, Path]:
        """Log the history's records not logged live (a resumed job: all), a prune after the last
        epoch; close every sink. Returns the files the sinks add to the job's artifacts."""
        for step, record in enumerate(report.history[self.logged :], start=self.logged + 1):
            self._log(epoch_scalars(record.model_dump()), step)
        if self._pruned:
            self._log(self._pruned, max(1, len(report.history)))
        extra: dict[str, Path] = {}
        for sink in list(self.sinks):
            files = {**artifacts, **extra}
            extra |= self._guard(sink, lambda s=sink, f=files: s.finish(report, f)) or {}
        return extra

    def abort(self, status: str) -> None:
        """The job stopped (``FAILED``, ``KILLED``): close every sink with that status."""
        for sink in list(self.sinks):
            self._guard(sink, lambda s=sink: s.abort(status))

    def _log(self, values: dict[str, float], step: int) -> None:
        for sink in list(self.sinks):
            self._guard(sink, lambda s=sink: s.scalars(values, step))

    def _guard(self, sink: Sink, call: Any) -> Any:
        """``call()``; if it raises, ``sink`` is dropped and the job told, never failed."""
        try:
            return call()
        except Exception as err:
            self.sinks.remove(sink)
            self.inner.message(f"warning: {sink.name} tracking stopped: {one_line(err)}")
            return None


def open_tracker(
    spec: JobSpec, workdir: Path, inner: Reporter, settings: Settings, job_id: str | None = None
) -> Tracker:
    """The job's tracker: TensorBoard unless ``export.tensorboard`` is off, MLflow when
    ``settings.mlflow_tracking_uri`` is set (a run named ``job_id``, else ``<method>-<model>``, tagged
    with the job id, method, model and data). A sink that cannot start is left out with a warning."""
    tracker = Tracker(inner, [], live=not any((workdir / "checkpoints").glob("*.pt")))
    starts: list[tuple[str, Any]] = []
    if spec.export.tensorboard:
        starts.append((TensorBoardSink.name, lambda: TensorBoardSink(workdir)))
    if settings.mlflow_tracking_uri:
        tags = {"method": spec.method.name, "model": spec.model.name, "data": spec.data.name}
        tags |= {"job_id": job_id} if job_id else {"workdir": str(workdir.resolve())}
        run_name = job_id or f"{spec.method.name}-{spec.model.name}"
        uri, experiment = settings.mlflow_tracking_uri, settings.mlflow_experiment_name
        starts.append((MlflowSink.name, lambda: MlflowSink(uri, experiment, run_name, tags, spec)))
    for name, start in starts:
        try:
            tracker.sinks.append(start())
        except Exception as err:
            inner.message(f"warning: {name} tracking off: {one_line(err)}")
    return tracker
