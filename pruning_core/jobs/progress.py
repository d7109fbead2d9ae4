"""A terminal Reporter: one tqdm bar per phase, a line per epoch."""

from __future__ import annotations

from typing import Any

from tqdm import tqdm

from ..artifacts.report import epoch_line


class TqdmReporter:
    def __init__(self, enabled: bool = True, bar: bool = True):
        """``enabled``: print anything at all; ``bar``: draw the per-phase bar (its ``\r`` frames are
        noise in a log file, so ``prune run`` draws it only on a terminal)."""
        self.enabled, self.draw_bar = enabled, bar
        self.bar: tqdm | None = None

    def phase(self, name: str, epochs: int, steps_per_epoch: int) -> None:
        self.close()
        if self.enabled and self.draw_bar and epochs:
            self.bar = tqdm(
                total=epochs * steps_per_epoch, desc=name, unit="step", dynamic_ncols=True, leave=True
            )

    def step(self, phase: str, epoch: int, step: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(epoch=epoch + 1, loss=f"{loss:.3f}", refresh=False)
            if self.bar.n >= self.bar.total:
                self.close()

    def epoch(self, record: dict[str, Any]) -> None:
        self.message(epoch_line(record))

    def message(self, text: str) -> None:
        if self.enabled:
            tqdm.write(text)

    def cancelled(self) -> bool:
        return False

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
