"""pruning_core: the structured-pruning engine (spec, zoo, data, groups, one training loop, methods,
surgery, export, report).

Imports are lazy so that ``pruning_core.spec`` (torch-free) can be used by the API and the CLI without
loading torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_LAZY = {
    "JobSpec": "pruning_core.spec",
    "parse_spec": "pruning_core.spec",
    "run": "pruning_core.runner",
    "prune": "pruning_core.python_api",
    "Pruned": "pruning_core.python_api",
    "plan": "pruning_core.planning",
    "apply": "pruning_core.planning",
    "Plan": "pruning_core.planning",
    "load_pruned": "pruning_core.export",
    "load_exported": "pruning_core.export",
    "read_contract": "pruning_core.export",
    "InputContract": "pruning_core.contract",
    "build_model": "pruning_core.zoo",
    "count_macs": "pruning_core.macs",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pruning_core' has no attribute {name!r}")
