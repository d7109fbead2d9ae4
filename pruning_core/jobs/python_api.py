"""``prune(model, example_input, train_data, test_data, ...)``: prune an in-memory module from Python.

The same engine as a service job, not a second one: for the duration of the call the module and the
data sets are registered under ``python:<name>`` in the zoo and data registries, a ``JobSpec`` names
them, and ``runner.run`` does the rest (the one training loop, BatchNorm re-estimation, the export
check, the report). The caller's module is never modified: the registered builder hands the engine a
deep copy of it, which is also what checkpoints and the architecture description rebuild from.
"""

from __future__ import annotations

import copy
import re
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn
from torch.utils.data import Dataset

from ..artifacts.export import load_pruned
from ..data.loaders import DATASETS, Datasets
from ..errors import ModelError
from ..models.zoo import MODELS, ZooEntry
from ..spec import PYTHON_PREFIX, ExportSpec, JobSpec, SpecError, describe_errors, method_options, parse_spec
from ..training.engine import Reporter
from .progress import TqdmReporter
from .runner import run

_LOCK = threading.Lock()  # picking a free python:<name> and registering it is one step


@dataclass
class Pruned:
    """What ``prune`` returns."""

    model: nn.Module  # the physically pruned network, eval mode, on the CPU
    report: dict[str, Any]  # report.json as a dict (MACs, params, top-1, latency, widths, history)
    artifacts: dict[str, Path] = field(default_factory=dict)  # file name -> path; empty without workdir


def prune(
    model: nn.Module,
    example_input: torch.Tensor,
    train_data: Dataset,
    test_data: Dataset,
    *,
    method: str = "magnitude",
    target: float | Mapping[str, Any] = 0.5,
    epochs: int = 3,
    lr: float = 0.05,
    batch_size: int = 64,
    dense_epochs: int = 0,
    schedule: Mapping[str, Any] | None = None,
    kd: Mapping[str, Any] | None = None,
    seed: int = 0,
    device: str = "auto",
    workdir: str | Path | None = None,
    export: Sequence[str] = ("safetensors",),
    latency: bool | float | None = None,
    reporter: Reporter | None = None,
    cancel: threading.Event | Callable[[], bool] | None = None,
    **options: Any,
) -> Pruned:
    """Prune ``model`` to ``target`` (remaining MACs / dense MACs, or a ``TargetSpec`` mapping such as
    ``{"speedup": 2.0}``: a measured speed-up on ``device``) with a registered ``method``.

    ``example_input``: one batch (N, C, S, S) of what the model eats; ``train_data`` / ``test_data``:
    datasets of ``(image C x S x S float tensor, int label)``, already normalised. ``epochs``, ``lr``,
    ``batch_size``, ``dense_epochs``: the schedule (``schedule`` gives any other ``Schedule`` field,
    ``kd`` the ``KDSpec``). Further keywords are the method's options (``p=1`` for magnitude, ...).
    ``workdir``: keep checkpoints, exports (``export`` formats) and report.json there, and resume from
    it when called again; default: a temporary directory, removed afterwards. ``latency``: the dense vs
    pruned timing in the report: False skips it, a number is its budget in seconds, True the job's default
    (20 s); default None: ``ONE_SHOT_LATENCY_S`` when the call trains nothing (``epochs=0`` and
    ``dense_epochs=0``: a one-shot prune takes seconds), else the job's default. ``reporter``: progress
    (the engine's Reporter protocol; default tqdm bars); ``cancel``: an Event or a callable, checked
    between steps, that stops the run with ``errors.Cancelled``.
    """
    spec = _spec(
        method, target, epochs, lr, batch_size, dense_epochs, schedule, kd, seed, device, export, options
    )
    spec = spec.model_copy(update={"export": _latency(spec, latency)})
    datasets = _datasets(model, example_input, train_data, test_data)
    progress = _WithCancel(reporter or TqdmReporter(), _cancel_check(cancel))
    with _registered(model, datasets) as (model_name, data_name):
        spec = spec.model_copy(
            update={
                "model": spec.model.model_copy(update={"name": model_name}),
                "data": spec.data.model_copy(update={"name": data_name}),
            }
        )
        parse_spec(spec.model_dump(mode="json"))  # the names are valid JobSpec names
        if workdir is not None:
            return _run(spec, Path(workdir), progress)
        with tempfile.TemporaryDirectory(prefix="prune-") as tmp:
            pruned = _run(spec, Path(tmp), progress)
            pruned.artifacts = {}
            return pruned


def _run(spec: JobSpec, workdir: Path, reporter: Reporter) -> Pruned:
    result = run(spec, workdir, reporter)
    # Read back what was exported: the returned module is exactly the one the files rebuild.
    return Pruned(load_pruned(workdir), result.report.model_dump(mode="json"), dict(result.artifacts))


ONE_SHOT_LATENCY_S = 2.0  # the timing budget of a prune() call that trains nothing


def _latency(spec: JobSpec, latency: bool | float | None) -> ExportSpec:
    """The spec's export settings with ``prune``'s ``latency`` argument applied."""
    if latency is None:
        one_shot = spec.schedule.epochs == 0 and spec.schedule.dense_epochs == 0
        latency = ONE_SHOT_LATENCY_S if one_shot else True
    if latency is False and spec.target.speedup is not None:
        raise ValueError(
            "prune(): a speedup target is judged by its measured latency; latency=False cannot be"
        )
    fields = (
        {"latency": latency} if isinstance(latency, bool) else {"latency": True, "latency_max_s": latency}
    )
    try:
        return ExportSpec.model_validate(spec.export.model_dump() | fields)
    except ValidationError as err:
        raise ValueError(f"prune(): latency={latency!r}: {describe_errors(err)[0]}") from None


def _spec(
    method: str,
    target: float | Mapping[str, Any],
    epochs: int,
    lr: float,
    batch_size: int,
    dense_epochs: int,
    schedule: Mapping[str, Any] | None,
    kd: Mapping[str, Any] | None,
    seed: int,
    device: str,
    export: Sequence[str],
    options: dict[str, Any],
) -> JobSpec:
    """The JobSpec of a ``prune`` call (placeholder model and data names); one-line errors."""
    known = method_options()
    if method not in known:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(known)}")
    allowed = sorted(set(known[method].model_fields) - {"name"})
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(
            f"prune() got unknown option(s) {', '.join(unknown)} for method {method!r}; "
            f"its options: {', '.join(allowed)}"
        )
    sched = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "dense_epochs": dense_epochs}
    if twice := sorted(set(schedule or {}) & set(sched)):
        raise TypeError(f"prune(): give {', '.join(twice)} as keyword(s), not in schedule")
    body = {
        "method": {"name": method, **options},
        "target": dict(target) if isinstance(target, Mapping) else {"macs_ratio": target},
        "schedule": {**(schedule or {}), **sched},
        "kd": dict(kd or {}),
        "data": {"augment": False},  # the caller's datasets are used as given
        "export": {"formats": list(export)},
        "seed": seed,
        "device": device,
    }
    try:
        return parse_spec(body)
    except SpecError as err:
        # `method.magnitude.p: ...` names the keyword `p`: say so in the caller's terms
        lines = [p.replace(f"method.{method}.", f"{method} option ", 1) for p in err.problems]
        raise ValueError(f"prune(): {'; '.join(lines)}") from None


def _datasets(model: nn.Module, example: torch.Tensor, train: Dataset, test: Dataset) -> Datasets:
    """The engine's view of the caller's data: classes from the model's output, shape from the input."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"prune() needs a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(example, torch.Tensor) or example.dim() != 4 or example.shape[2] != example.shape[3]:
        got = tuple(example.shape) if isinstance(example, torch.Tensor) else type(example).__name__
        raise ValueError(f"example_input must be a square image batch (N, C, S, S); got {got}")
    _, channels, side, _ = example.shape
    probe = copy.deepcopy(model).cpu().eval()
    with torch.no_grad():
        out = probe(example[:1].detach().float().cpu())
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(f"the model must return logits of shape (N, classes); got {got}")
    for name, ds in (("train_data", train), ("test_data", test)):
        if len(ds) == 0:
            raise ValueError(f"{name} is empty")
        image = ds[0][0]
        if tuple(image.shape) != tuple(example.shape[1:]):
            raise ValueError(
                f"{name}'s images are {tuple(image.shape)} but example_input's are {tuple(example.shape[1:])}"
            )
    classes = int(out.shape[1])
    return Datasets(train, test, classes, int(channels), int(side), _class_names(train, classes))


def _class_names(train: Dataset, k: int) -> list[str]:
    """The data set's own names when it has ``k`` of them (torchvision's ImageFolder, CIFAR: ``.classes``);
    else the indices. They go into every exported file's input contract."""
    names = getattr(train, "classes", None)
    if isinstance(names, Sequence) and not isinstance(names, str) and len(names) == k:
        return [str(n) for n in names]
    return [str(i) for i in range(k)]


@contextmanager
def _registered(model: nn.Module, data: Datasets) -> Iterator[tuple[str, str]]:
    """Register a deep copy of ``model`` and ``data`` under free ``python:`` names for the block."""
    dense = copy.deepcopy(model).cpu()

    def build(num_classes: int, in_channels: int) -> nn.Module:
        if (num_classes, in_channels) != (data.num_classes, data.in_channels):
            raise ModelError(
                f"the given module has {data.num_classes} classes and {data.in_channels} input channels, "
                f"not {num_classes} and {in_channels}"
            )
        return copy.deepcopy(dense)

    base = PYTHON_PREFIX + (re.sub(r"[^A-Za-z0-9_]", "_", type(model).__name__)[:40] or "Module")
    with _LOCK:
        name = next(n for i in range(1, 10**6) if (n := base if i == 1 else f"{base}-{i}") not in MODELS)
        MODELS.add(name, ZooEntry(build, min_input_size=1))
        DATASETS.add(name, lambda _spec, _ctx: data)
    try:
        yield name, name
    finally:
        MODELS.remove(name)
        DATASETS.remove(name)


def _cancel_check(cancel: threading.Event | Callable[[], bool] | None) -> Callable[[], bool]:
    if cancel is None:
        return lambda: False
    if isinstance(cancel, threading.Event):
        return cancel.is_set
    return cancel


class _WithCancel:
    """A Reporter that also answers ``cancelled()`` from the caller's cancel check."""

    def __init__(self, inner: Reporter, cancel: Callable[[], bool]):
        self.inner, self.cancel = inner, cancel

    def phase(self, name: str, epochs: int, steps_per_epoch: int) -> None:
        self.inner.phase(name, epochs, steps_per_epoch)

    def step(self, phase: str, epoch: int, step: int, loss: float) -> None:
        self.inner.step(phase, epoch, step, loss)

    def epoch(self, record: dict[str, Any]) -> None:
        self.inner.epoch(record)

    def message(self, text: str) -> None:
        self.inner.message(text)

    def pruned(self, data: dict[str, Any]) -> None:
        """Pass the ``pruned`` event on (``engine.report_pruned``); a reporter without it gets the line."""
        pruned = getattr(self.inner, "pruned", None)
        if pruned is None:
            self.inner.message(data["text"])
        else:
            pruned(data)

    def cancelled(self) -> bool:
        return bool(self.cancel()) or self.inner.cancelled()
