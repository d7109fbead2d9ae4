"""``magnitude``'s options in a job spec (``method: {name: magnitude, ...}``): torch-free, so that the API and the CLI
validate a job without importing torch; ``spec.MethodSpec`` joins every method's options."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ...schema import Strict


class MagnitudeOptions(Strict):
    """One-shot global group-L2 magnitude pruning, then fine-tuning (the baseline)."""

    name: Literal["magnitude"] = "magnitude"
    p: int = Field(2, ge=1, le=2, description="Norm of the group magnitude (1 or 2).")
    round_to: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="Deprecated alias of `target.round_to` (which wins when both are given).",
    )
