"""Errors a user can act on. Each carries a short machine code; the message is one line."""

from __future__ import annotations


class PruningError(Exception):
    """Base of every user-facing engine error (bad input, unreachable target, corrupt files)."""

    code = "pruning_error"


class DataError(PruningError):
    code = "bad_data"


class WeightsError(PruningError):
    code = "bad_weights"


class ModelError(PruningError):
    code = "bad_model"


class TargetError(PruningError):
    code = "unreachable_target"


class GraphError(PruningError):
    code = "graph_build_failed"


class Cancelled(PruningError):
    code = "cancelled"
