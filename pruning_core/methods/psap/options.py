"""PSAP's options in a job spec (``method: {name: psap, ...}``): torch-free, so that the API and the CLI
validate a job without importing torch; ``spec.MethodSpec`` joins every method's options."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ...schema import Strict


class PSAPOptions(Strict):
    """PSAP (arXiv 2303.11881): iterative soft filter pruning within training. Every `interval` epochs
    a prune step zeroes the lowest-norm filters of each coupled group (the conv/linear rows and their
    BatchNorm weight and bias, so the network that trains is the network that would be cut), at
    per-group ratios proportional to the group's weight sparsity (read from the trained weights) and
    scaled so that the step's MAC target is met. Zeroed filters stay trainable (`reconstruct`): one that
    regrew is judged by its norm at the next step, and one the next step keeps gets back its values. A
    filter whose gradient signal (at its output activation, over its group's mean) stands above
    `pulse_factor` is exempt from the step's cut, small norm or zeroed. The step targets tighten from
    the dense MACs to the job's target over the first `ramp` of the steps. The last step is the final
    cut: the zeroed filters are removed physically, BatchNorm is re-estimated, and the pruned network
    trains for the last `settle` of the epochs (then `finetune_epochs`, if any).
    From scratch: give no `model.weights` and `schedule.dense_epochs: 0`; from given weights: the job's
    `model.weights` (or dense epochs first). The paper's text is not public: which rules follow its
    abstract and which are ours is in the method's docstring.
    """

    name: Literal["psap"] = "psap"
    interval: int = Field(1, ge=1, le=1000, description="Epochs between prune steps.")
    schedule: Literal["geometric", "linear"] = Field(
        "geometric",
        description="How step targets tighten: remaining MACs target**(k/K) (geometric) or "
        "1 - (1 - target) * k/K (linear) at step k of the K ramp steps.",
    )
    ramp: float = Field(
        0.25,
        gt=0.0,
        le=1.0,
        description="Share of the prune steps over which the target tightens. 0.25 was chosen on a "
        "validation split over 0.7 (BENCHMARKS.md): later cuts leave the cut network too few epochs.",
    )
    adaptive: bool = Field(
        True, description="Per-group ratios from weight sparsity; false: one ratio for every group."
    )
    sparsity_eps: float = Field(
        0.1,
        gt=0.0,
        lt=1.0,
        description="A filter is sparse when its norm is below this times the median norm of its group's "
        "live filters (those the last step did not zero).",
    )
    max_ratio: float = Field(
        0.8, gt=0.0, lt=1.0, description="The largest share of a group pruned (at any step)."
    )
    reconstruct: bool = Field(
        True,
        description="Zeroed filters stay trainable until the next step (soft pruning); false freezes them "
        "at zero (their gradients masked, re-zeroed after every optimizer step): the ablation.",
    )
    protect: bool = Field(
        True, description="Exempt filters whose gradient signal pulses from a step's cut (live or zeroed)."
    )
    pulse_factor: float = Field(
        1.5,
        gt=0.0,
        le=1000.0,
        description="A pulse: the EMA of a channel's gradient signal above this times its group's mean.",
    )
    grad_ema: float = Field(0.9, ge=0.0, lt=1.0, description="EMA decay of the gradient signal, per step.")
    settle: float = Field(
        0.2,
        ge=0.0,
        lt=1.0,
        description="Share of `schedule.epochs` that the physically pruned network trains after the final "
        "cut (at least one epoch); 0: the last step is at the very end, with no training after it.",
    )
    finetune_epochs: int = Field(
        0, ge=0, le=10_000, description="Epochs of a separate fine-tuning phase after the removal."
    )
