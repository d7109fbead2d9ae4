"""Warnings a job gives before it spends its time: a one-shot method (magnitude) asked to prune weights
nobody trained picks its channels at random, and the job's events say so."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pruning_core.errors import Cancelled
from pruning_core.jobs.runner import run
from pruning_core.training.engine import NullReporter
from tests.specs import quick_spec


class Recorder(NullReporter):
    """Keeps the job's messages and cancels it once the method's own training starts: every warning
    under test is given before that."""

    def __init__(self) -> None:
        self.messages: list[str] = []
        self.method_started = False

    def phase(self, name: str, epochs: int, steps_per_epoch: int) -> None:
        self.method_started = self.method_started or name != "dense"

    def message(self, text: str) -> None:
        self.messages.append(text)

    def cancelled(self) -> bool:
        return self.method_started


@pytest.mark.parametrize(
    ("method", "schedule", "warned"),
    [
        ({"name": "magnitude"}, {}, True),
        ({"name": "magnitude"}, {"dense_epochs": 1}, False),
        ({"name": "s2h"}, {}, False),  # learns its widths while it trains: from scratch is its design
    ],
    ids=["magnitude-untrained", "magnitude-dense-epochs", "s2h-from-scratch"],
)
def test_pruning_untrained_weights_is_warned(
    tmp_path: Path, method: dict[str, Any], schedule: dict[str, int], warned: bool
) -> None:
    rec = Recorder()
    with pytest.raises(Cancelled):
        run(quick_spec("resnet20", method, size=8, **schedule), tmp_path, rec)
    hits = [m for m in rec.messages if m.startswith("warning:") and "untrained" in m]
    assert len(hits) == int(warned), rec.messages
    if warned:
        assert "set schedule.dense_epochs or give weights" in hits[0] and "\n" not in hits[0]
