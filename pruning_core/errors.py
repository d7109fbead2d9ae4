"""Errors a user can act on. Each carries a short machine code; the message is one line."""

from __future__ import annotations


def one_line(err: BaseException, limit: int = 300) -> str:
    """``err``'s message on one line (whitespace runs collapsed), at most ``limit`` characters; its
    type's name when it has no message."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


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


class DivergedError(PruningError):
    """Training's loss turned non-finite or grew past ``divergence_factor`` times its start: the same
    schedule would diverge again, so it is not retried; the message names what to lower."""

    code = "diverged"


class NonFiniteModelError(PruningError):
    """A network (the final pruned one, or the dense one) gives non-finite logits on the test set."""

    code = "non_finite_model"


class TargetMissedError(PruningError):
    """The pruned network's MAC ratio is outside the band the method promises for the target."""

    code = "target_missed"


class RankLost(RuntimeError):
    """A process of a job trained on several GPUs (``resources.gpus``) ended while the others trained:
    the attempt is lost as if its worker had died, and the job resumes from its last checkpoint."""

    code = "rank_lost"
