"""Pruning methods: the ``Method`` interface (``base``) and one subpackage per method, each holding its
``method`` (torch: the phases, hooks and final cut) and its ``options`` (the job spec's model of its
options, torch-free).

``METHODS`` and the interface's names load lazily: the first read imports ``base`` and every method,
which registers them. Importing this package alone, or any ``options`` module, imports no torch, so the
API validates a job's method options without it.

May import: ``training``, ``graph``, ``models``, ``spec``, ``schema``, ``settings``, ``errors``,
``registry``. Never ``jobs``, ``speed``, ``artifacts`` or ``data``: a method sees the model, the training
loop's hooks and the channel groups, not how a job is run or exported.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

# Every method's subpackage, in the order the documentation lists them.
NAMES: tuple[str, ...] = ("magnitude", "s2h", "tas", "psap", "epi")
__all__ = ["METHODS", "DenseTraining", "Method", "MethodContext", "Phase"]

if TYPE_CHECKING:
    from .base import METHODS, DenseTraining, Method, MethodContext, Phase


def __getattr__(name: str) -> Any:
    if name in __all__:
        for method in NAMES:
            import_module(f"{__name__}.{method}.method")  # registers it in METHODS
        value = getattr(import_module(f"{__name__}.base"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
