"""Pruning methods, registered by name in ``METHODS``; importing this package registers them all."""

from . import epi, magnitude, psap, s2h, tas  # noqa: F401  (registers)
from .base import METHODS, DenseTraining, Method, MethodContext, Phase

__all__ = ["METHODS", "DenseTraining", "Method", "MethodContext", "Phase"]
