"""pruning_core: the structured-pruning engine, grouped by concept (each subpackage's docstring says what
it owns and may import; ``lint-imports`` checks it): ``jobs`` (a job end to end), ``methods``, ``speed``,
``training`` (the one loop), ``artifacts`` (export, report), ``graph`` (channel groups, MACs, removal),
``data``, ``models`` (the zoo), and at the top ``spec``, ``settings``, ``errors``, ``registry``.

Imports are lazy so that ``pruning_core.spec`` (torch-free) can be used by the API and the CLI without
loading torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_LAZY = {
    "JobSpec": "pruning_core.spec",
    "parse_spec": "pruning_core.spec",
    "run": "pruning_core.jobs.runner",
    "prune": "pruning_core.jobs.python_api",
    "Pruned": "pruning_core.jobs.python_api",
    "plan": "pruning_core.jobs.planning",
    "apply": "pruning_core.jobs.planning",
    "Plan": "pruning_core.jobs.planning",
    "load_pruned": "pruning_core.artifacts.export",
    "load_exported": "pruning_core.artifacts.export",
    "read_contract": "pruning_core.artifacts.export",
    "InputContract": "pruning_core.artifacts.contract",
    "build_model": "pruning_core.models.zoo",
    "count_macs": "pruning_core.graph.macs",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pruning_core' has no attribute {name!r}")
