"""The base of every model of the job spec: ``spec``'s and each method's ``options``.

Torch-free and import-free within the engine, so that a method's options can sit beside its method and
``spec`` can import them without a cycle.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """Unknown fields refused, values frozen; NaN and infinities refused (JSON has no such numbers, and
    PostgreSQL refuses them in a JSON column)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
