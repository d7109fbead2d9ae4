"""How training uses the device: mixed precision, memory format, cuDNN autotuning and ``torch.compile``.

The CUDA defaults: autocast in bfloat16 where the GPU has it (no loss scaling needed), else float16 with
the GradScaler; 4-D weights and inputs in channels_last (tensor cores read NHWC); cuDNN autotuning (each
phase's shapes are fixed). On CPU nothing changes: float32, contiguous. ``engine.TrainContext`` may force
the precision and the memory format, which is how these CUDA paths are tested on CPU.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..spec import Schedule


def amp_dtype(
    device: torch.device, schedule: Schedule, forced: torch.dtype | None = None
) -> torch.dtype | None:
    """The autocast type of training steps, or None for float32: ``forced`` when given (float32 = off),
    else on CUDA with ``schedule.amp``: bfloat16 where supported, else float16 (``schedule.amp_dtype``)."""
    if forced is not None:
        return None if forced == torch.float32 else forced
    if not schedule.amp or device.type != "cuda":
        return None
    if schedule.amp_dtype != "auto":
        return getattr(torch, schedule.amp_dtype)
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def memory_format(
    device: torch.device, schedule: Schedule, forced: torch.memory_format | None = None
) -> torch.memory_format:
    """channels_last on CUDA (or as ``schedule.channels_last`` / ``forced`` say), else contiguous."""
    if forced is not None:
        return forced
    on = schedule.channels_last if schedule.channels_last is not None else device.type == "cuda"
    return torch.channels_last if on else torch.contiguous_format


def place(model: nn.Module, device: torch.device, fmt: torch.memory_format) -> nn.Module:
    """``model`` on ``device``, its 4-D weights in ``fmt`` (in place: parameters keep their identity)."""
    model.to(device)
    if fmt == torch.channels_last:
        model.to(memory_format=fmt)
    return model


def contiguous(model: nn.Module) -> nn.Module:
    """``model`` with its 4-D weights contiguous again (export, safetensors and ``view`` need it), in
    place; a compiled forward is dropped (the runner traces, times and exports the module itself)."""
    model._compiled_call_impl = None  # what nn.Module.compile set, if it did
    return model.to(memory_format=torch.contiguous_format)


def in_format(x: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """A 4-D input batch in ``fmt`` (others as they are; a copy only where the layout differs)."""
    return x.contiguous(memory_format=fmt) if x.dim() == 4 else x


def autotune(device: torch.device) -> None:
    """cuDNN picks the fastest convolution algorithms for the shapes it sees (CUDA only)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def compile_model(model: nn.Module, hooks: Any, schedule: Schedule, backend: str = "inductor") -> bool:
    """``torch.compile`` ``model``'s forward in place (its state-dict keys unchanged) when the schedule
    asks and the method allows it (``compiles``); whether it did."""
    if not (schedule.compile and getattr(hooks, "compiles", False)):
        return False
    model.compile(backend=backend)
    return True
