"""TAS's options in a job spec (``method: {name: tas, ...}``): torch-free, so that the API and the CLI
validate a job without importing torch; ``spec.MethodSpec`` joins every method's options."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from ...schema import Strict


class TASOptions(Strict):
    """TAS (NeurIPS 2019): a differentiable search of width per coupled channel group and depth per stage
    of residual blocks (Gumbel-softmax over two sampled widths joined by channel-wise interpolation, or
    by zero-padding from trained weights; a piecewise expected-MAC loss), weights and architecture
    updated in turn on the two halves of the training data; then the argmax network is built for real (fewer channels and blocks), initialised
    at random, from the teacher or from the searched supernet, and trained `schedule.epochs` with KD
    from the dense teacher (`kd`). Before the search each coupled group's channels are sorted by
    importance (`sort_channels`), so that a width candidate's first k channels are the k most important
    of the weights it starts from. The built network's MACs lie within 0.02 of the dense MACs under the
    target (stepped there in the logits' order of preference where the search ended outside).
    Defaults are the official code's CIFAR settings.
    """

    name: Literal["tas"] = "tas"
    search_epochs: int = Field(10, ge=1, le=10_000, description="Epochs of the architecture search.")
    width_ratios: tuple[Annotated[float, Field(gt=0.0, le=1.0)], ...] = Field(
        (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
        min_length=1,
        max_length=64,
        description="Width candidates of a group: int(ratio * channels) rounded down to the job's channel "
        "step (`target.round_to`), deduplicated (1.0 always added).",
    )
    depth: bool = Field(True, description="Search the depth of every stage of residual blocks (ResNets).")
    tau_max: float = Field(5.0, gt=0.0, le=100.0, description="Gumbel-softmax temperature at the start.")
    tau_min: float = Field(0.1, gt=0.0, le=100.0, description="... and at the end (cosine decay).")
    cost_weight: float = Field(2.0, ge=0.0, le=1000.0, description="lambda of the expected-MAC loss.")
    tolerance: float = Field(
        0.05,
        ge=0.0,
        lt=1.0,
        description="t of the piecewise cost loss: no cost gradient while the argmax MACs lie in "
        "[target - t, target] (of dense). The result itself lies in [target - 0.02, target].",
    )
    arch_lr: float = Field(1e-3, gt=0.0, le=10.0, description="Adam LR (constant) of the architecture.")
    arch_betas: tuple[Annotated[float, Field(ge=0.0, lt=1.0)], Annotated[float, Field(ge=0.0, lt=1.0)]] = (
        Field((0.5, 0.999), description="Adam betas of the architecture.")
    )
    arch_weight_decay: float = Field(1e-3, ge=0.0, le=1.0)
    init: Literal["random", "teacher", "supernet"] = Field(
        "random",
        description="The found network's weights: random (the paper); the teacher's most important "
        "channels and first blocks; or the searched supernet's (the paper's `w/ Init` variant: its "
        "weights after the search, each group's BatchNorm that of its chosen width).",
    )
    kd: bool = Field(
        True,
        description="Train the found network with KD from the teacher (`kd.temperature`, `kd.weight`); "
        "false: cross-entropy only, whatever `init` and `kd.enabled` say.",
    )
    align: Literal["auto", "interpolate", "pad"] = Field(
        "auto",
        description="How the two sampled widths' outputs are brought to one width before their weighted "
        "sum: `interpolate` (the paper's channel-wise interpolation: a narrow candidate's channels are "
        "stretched over the wide one's); `pad` [ours] (each candidate's channels stay where they are, "
        "zeros beyond: channel j keeps its meaning for the next layer, which trained weights need; "
        "measured on a trained digits ResNet-20 with its weights frozen, the search's loss at the start "
        "is 2.26 with interpolation, chance, and 1.17 padded); `auto`: `pad` when the search starts "
        "from trained weights (`model.weights` or `schedule.dense_epochs`), else `interpolate`.",
    )
    sort_channels: bool = Field(
        True,
        description="Before the search, sort each coupled group's channels by importance (group L2 "
        "magnitude, as `magnitude` ranks them; the function is unchanged), so that a width candidate's "
        "first k channels are the k most important. [ours] The official search starts from scratch, "
        "where training puts the important channels first; from trained weights the first k are arbitrary.",
    )

    @model_validator(mode="after")
    def _valid(self) -> TASOptions:
        if self.tau_min > self.tau_max:
            raise ValueError("tau_min cannot exceed tau_max")
        return self
