"""Small job specs the method tests share: a few steps on synthetic images, on the CPU."""

from __future__ import annotations

import functools
from typing import Any

from pruning_core.spec import JobSpec, parse_spec


def quick_spec(
    model: str,
    method: dict[str, Any],
    *,
    size: int = 16,
    target: float = 0.6,
    per_class: int = 8,
    device: str = "cpu",
    round_to: int | None = 1,
    **schedule: Any,
) -> JobSpec:
    """``model`` pruned by ``method`` on 4 classes of synthetic ``size``-pixel images: one epoch of at
    most 3 steps (``schedule`` overrides), BatchNorm re-estimated on one batch, safetensors only,
    latency timed for at most a second. Any width (``round_to`` 1), so the method's own precision is
    tested; None: the device's channel step (tests/test_widths.py and the method contract test it)."""
    return parse_spec(
        {
            "model": {"name": model},
            "data": {
                "name": "synthetic",
                "num_classes": 4,
                "per_class": per_class,
                "test_per_class": max(2, per_class // 4),
                "image_size": size,
            },
            "method": method,
            "target": {"macs_ratio": target, "round_to": round_to},
            "schedule": {
                "epochs": 1,
                "batch_size": 8,
                "max_steps_per_epoch": 3,
                "bn_recalibration_batches": 1,
                **schedule,
            },
            "export": {"formats": ["safetensors"], "latency_max_s": 1.0},  # the timing is not under test
            "device": device,
        }
    )


# A job that runs in a few seconds (one short epoch on digits): for tests of the service around it.
TINY_SPEC = {
    "model": {"name": "resnet20"},
    "data": {"name": "digits"},
    "target": {"macs_ratio": 0.5},
    "schedule": {"epochs": 1, "batch_size": 64, "max_steps_per_epoch": 5},
}


@functools.cache
def tiny_spec_weights() -> bytes:
    """safetensors bytes of TINY_SPEC's dense model (resnet20 for digits: 10 classes, 1 channel): a
    weights upload the API's check at submit accepts for it."""
    from safetensors.torch import save

    from pruning_core.models.zoo import build_model

    return save({k: v.contiguous() for k, v in build_model("resnet20", 10, 1).state_dict().items()})
