"""S2H's options in a job spec (``method: {name: s2h, ...}``): torch-free, so that the API and the CLI
validate a job without importing torch; ``spec.MethodSpec`` joins every method's options."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ...schema import Strict


class S2HOptions(Strict):
    """S2HPruner (NeurIPS 2024): soft and hard networks trained together in one stage, the hard one
    distilled from the soft one with a decoupled gap loss; the result is the hard network, no fine-tuning.

    Per coupled channel group: width candidates d, 2d, ..., C with one learnable logit each; the soft mask
    is their softmax's reverse cumulative sum, the hard mask keeps the expected width's most important
    (L1) channels; the hard forward keeps those channels and applies no mask (the official demo). The
    hard network's MACs end within 0.02 of the dense MACs under the target (its widths stepped there,
    least soft keep-probability x importance per MAC first, where the search's expected widths missed). Defaults
    marked [ours] are our choices where the official configuration was not released. The performance
    loss is cross-entropy, or KD from the dense teacher when `kd.enabled` (give `model.weights` or
    `schedule.dense_epochs` so that the teacher is trained).
    """

    name: Literal["s2h"] = "s2h"
    temperature: float = Field(1.0, gt=0.0, le=100.0, description="T in softmax(u / T) over width logits.")
    gap_weight: float = Field(
        1.0, ge=0.0, le=100.0, description="Weight of the soft-hard gap (KL) losses; 0 turns them off."
    )
    resource_weight: float = Field(
        1.0, gt=0.0, le=1e6, description="c in the MAC loss c * (MACs / dense MACs - target)^2."
    )
    flops_relax: float = Field(
        0.02,
        ge=0.0,
        lt=1.0,
        description="Within this distance of the target MAC ratio the MAC gradient fades out.",
    )
    mask_lr_scale: float = Field(
        1.0,
        gt=0.0,
        le=1e4,
        description="Mask logits train with SGD at the weights' current LR times this [ours: 1].",
    )
    balance: Literal["norms", "sum"] = Field(
        "norms",
        description="`norms` (the official code): per group, the task gradient is scaled to the gap "
        "gradient's norm and the MAC gradient balanced against both; `sum`: gap_weight and "
        "resource_weight alone weigh a plain sum.",
    )
    width_divisor: int | None = Field(
        None,
        ge=1,
        le=65_536,
        description="d, the width step of each group's candidates (channels; rounded to a divisor of "
        "the group's width, in units of the job's channel step `target.round_to`); default: about 8-16 "
        "candidates per group.",
    )
    max_init: bool = Field(
        True, description="Start near full width: the full-width candidate's probability is (C - d) / C."
    )
    finetune_epochs: int = Field(
        0, ge=0, le=10_000, description="Optional fine-tuning of the pruned network afterwards (off)."
    )
    fit_epochs: int = Field(
        1,
        ge=0,
        le=10_000,
        description="[ours] The last this many epochs train the hard network at its widths fixed in "
        "[target - 0.02, target] (stepped there, least soft keep-probability x L1 importance per MAC first, "
        "where the search's widths missed), the mask logits frozen (as the official code freezes its masks "
        "for its last hard epochs); 0: fixed after the last epoch, untrained at them. At least one epoch "
        "searches.",
    )
    rank_order: Literal["step", "fixed"] = Field(
        "step",
        description="The L1 order in which each group keeps its channels: `step` re-ranked every step "
        "[ours]; `fixed` ranked once, from the weights the search starts from, and kept (the official "
        "code with `max_init` fixes it at the first masked forward, `fix_l1_order`).",
    )
    hard_grad: Literal["none", "ste"] = Field(
        "none",
        description="`none` (the official demo): the hard forward keeps the chosen channels and applies no "
        "mask, so the gap loss toward the soft network reaches the mask logits only through KL(s || sg(h)); "
        "`ste`: the hard forward multiplies by a straight-through mask, (m - w).detach() + w, through which "
        "KL(sg(s) || h) reaches the mask logits too.",
    )
