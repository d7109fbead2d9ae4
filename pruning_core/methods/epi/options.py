"""EPI's options in a job spec (``method: {name: epi, ...}``): torch-free, so that the API and the CLI
validate a job without importing torch; ``spec.MethodSpec`` joins every method's options."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ...schema import Strict

# tau per criterion: `neuron_l2` and `taylor` are one re-implementation's values (unverified); `magnitude`
# (per-group normalised) keeps the same 0.983: not re-tuned for it (BENCHMARKS.md, "compare-epi-cpu").
EPI_THRESHOLDS = {"magnitude": 0.983, "neuron_l2": 0.983, "taylor": 0.944}


class EPIOptions(Strict):
    """EPI (CVPR 2022): dense training that prunes as soon as the dominant sub-network stabilises. At the
    end of every epoch the sub-network that pruning to the target would keep now (the engine's global
    allocator on `criterion` scores) is found without pruning; the indicator is its mean structural
    similarity to the last `window` ones; the first epoch whose indicator reaches `threshold` and is not
    below the last `window` values (or the `deadline`) prunes physically, and the pruned network trains
    for the rest of `schedule.epochs`. From scratch unless the job gives weights or dense epochs.
    """

    name: Literal["epi"] = "epi"
    criterion: Literal["magnitude", "neuron_l2", "taylor"] = Field(
        "magnitude",
        description="Neuron importance: `magnitude`, group L2 magnitude normalised per group (the scores "
        "the `magnitude` method ranks by); `neuron_l2`, the paper's ||W_n|| / sqrt(P) compared across "
        "layers unnormalised (it collapses late layers after initialisation); `taylor`, first-order "
        "Taylor summed over the epoch, normalised per group.",
    )
    window: int = Field(5, ge=1, le=100, description="r: the indicator averages over the last r epochs.")
    threshold: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="tau: prune once the indicator reaches it; default per criterion "
        f"({EPI_THRESHOLDS['magnitude']} magnitude, {EPI_THRESHOLDS['taylor']} taylor).",
    )
    min_epochs: int | None = Field(
        None,
        ge=1,
        le=10_000,
        description="Never prune before this many epochs (unless the schedule ends first: then at its "
        "second-to-last epoch); default: window + 1, the first epoch with an indicator.",
    )
    deadline: float = Field(
        0.5,
        gt=0.0,
        le=1.0,
        description="Prune at the end of this share of `schedule.epochs` at the latest (not before min_epochs, "
        "not after the second-to-last epoch), so every job prunes.",
    )

    @property
    def tau(self) -> float:
        return self.threshold if self.threshold is not None else EPI_THRESHOLDS[self.criterion]
