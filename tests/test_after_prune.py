"""The top-1 right after pruning, before recovery training: in report.json (``after_prune``), the
headline, report.html and the job's result summary, at the moment each method first prunes physically."""

from __future__ import annotations

from pathlib import Path

import pytest

from pruning_core.artifacts.report import headline
from pruning_core.jobs.runner import _Pruned, after_prune, run
from pruning_core.spec import parse_spec
from tests.specs import quick_spec
from worker.execute import summarize


def _digits(epochs: int) -> dict:
    """resnet20 on digits, one dense epoch so that pruning starts from trained weights, then magnitude."""
    return {
        "model": {"name": "resnet20"},
        "data": {"name": "digits"},
        "method": {"name": "magnitude"},
        "target": {"macs_ratio": 0.5},
        "schedule": {"dense_epochs": 1, "epochs": epochs, "batch_size": 64, "max_steps_per_epoch": 4},
        "export": {"formats": ["safetensors"], "latency": False},
        "device": "cpu",
    }


@pytest.mark.parametrize("epochs", [1, 0])
def test_a_magnitude_job_reports_its_top1_before_recovery(epochs: int, tmp_path: Path) -> None:
    report = run(parse_spec(_digits(epochs)), tmp_path).report
    a = report.after_prune
    assert a is not None and a.at == "finetune:start" and a.epochs_after == epochs
    assert 0.0 <= a.top1 <= 100.0
    if epochs == 0:  # nothing trained after the cut: the final network is the one measured then
        assert a.top1 == report.pruned.top1
    assert f"top-1 right after pruning {a.top1:.1f} %" in headline(report)
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "top-1 right after pruning (finetune:start" in page and f"{a.top1:.2f} %" in page
    assert '"after_prune"' in (tmp_path / "report.json").read_text()
    assert summarize(report)["top1_after_prune"] == a.top1


def test_epi_reports_the_epoch_it_pruned_at(tmp_path: Path) -> None:
    spec = quick_spec("resnet20", {"name": "epi", "window": 1, "deadline": 0.4}, epochs=4)
    report = run(spec, tmp_path).report
    pruned = [(r.epoch, r.top1) for r in report.history if r.event == "pruned"]
    assert len(pruned) == 1
    epoch, top1 = pruned[0]
    a = report.after_prune
    assert a is not None and (a.at, a.top1) == (f"epi:epoch {epoch + 1}", top1)
    assert a.epochs_after == len(report.history) - 1 - epoch


def test_the_first_physical_pruning_is_the_one_reported() -> None:
    history = [
        {"phase": "dense", "epoch": 0, "top1": 50.0},
        {"phase": "psap", "epoch": 0, "top1": 40.0, "event": "pruned"},
        {"phase": "finetune", "epoch": 0, "top1": 70.0},
    ]
    # the epoch's end (index 2) comes before a later phase's start (also after 2 records)
    got = after_prune([_Pruned(2, "finetune:start", 30.0)], history, 70.0)
    assert got is not None and (got.at, got.top1, got.epochs_after) == ("psap:epoch 1", 40.0, 1)
    got = after_prune([_Pruned(1, "finetune:start", 30.0)], history[:1] + history[2:], 70.0)
    assert got is not None and (got.at, got.top1, got.epochs_after) == ("finetune:start", 30.0, 1)
    got = after_prune([], history[:1], 55.0)  # pruned only at the end (S2H): no recovery
    assert got is not None and (got.at, got.top1, got.epochs_after) == ("final", 55.0, 0)


@pytest.mark.parametrize(
    ("method", "at"),
    [
        ({"name": "magnitude"}, "finetune:start"),
        ({"name": "tas", "search_epochs": 1}, "kd:start"),
        ({"name": "psap"}, "psap:epoch"),
        ({"name": "s2h"}, "final"),
        ({"name": "s2h", "finetune_epochs": 1}, "finetune:start"),
    ],
    ids=["magnitude", "tas", "psap", "s2h", "s2h-finetune"],
)
def test_each_method_reports_where_it_first_pruned(method: dict, at: str, tmp_path: Path) -> None:
    report = run(quick_spec("resnet20", method, epochs=3), tmp_path).report
    a = report.after_prune
    assert a is not None and a.at.startswith(at), a
    assert a.epochs_after == _records_after(a.at, [r.phase for r in report.history])
    if a.epochs_after == 0:
        assert a.top1 == report.pruned.top1


def _records_after(at: str, phases: list[str]) -> int:
    """Epoch records after the pruning point ``at`` (``phases``: each record's phase, in order)."""
    if at == "final":
        return 0
    phase, _, when = at.partition(":")
    start = phases.index(phase) if phase in phases else len(phases)
    return len(phases) - start - (0 if when == "start" else int(when.split()[1]))
