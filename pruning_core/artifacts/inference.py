"""A trained network made ready for inference: BatchNorm folded into the convolutions before it, and the
channels_last memory format on CUDA and CPU.

Used by ``export.py`` (TorchScript and ONNX hold the folded network; the safetensors weights stay
unfolded so that ``load_pruned`` rebuilds the trainable zoo architecture) and available to whoever times
inference (``prepare_for_inference``), so that measured and deployed networks are the same.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.fx.experimental.optimization import fuse

BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def count_batchnorms(model: nn.Module) -> int:
    """BatchNorm modules in ``model``."""
    return sum(isinstance(m, BATCHNORMS) for m in model.modules())


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with every BatchNorm that directly follows a convolution (or linear
    layer) whose output nothing else reads folded into its weights and bias (``torch.fx`` fusion).

    A model that ``torch.fx`` cannot trace (data-dependent control flow) comes back as an unfolded eval
    copy: folding is an optimisation, never a reason to fail. ``model`` itself is not changed.
    """
    plain = copy.deepcopy(model).eval()
    try:
        fused = fuse(plain, inplace=False)
    except Exception:  # symbolic tracing fails in many ways (control flow, unsupported ops)
        return plain
    return fused.eval()


def channels_last_helps(device: torch.device | str) -> bool:
    """Whether 4-D convolutions should run in channels_last on ``device``.

    CUDA: yes. cuDNN's tensor-core convolution kernels (fp16/bf16 under AMP) read NHWC natively. Measured
    (BENCHMARKS.md "speed-cuda", H200, fp16, batch 256, BatchNorm folded): dense 224 px networks took
    23-33 % less time in channels_last, and so did networks pruned in the CUDA channel step (ResNet-50 at 0.3
    of the MACs: 13.8 to 10.2 ms); only widths off any step gained nothing (16.6 to 16.0 ms), which the
    step prevents.

    CPU: yes. oneDNN's convolutions run either way, but the ops between them do not: max pooling of a
    contiguous (NCHW) 8 x 64 x 112 x 112 batch took 40 ms, in channels_last 3.9 ms (1 thread), a quarter
    of a dense ResNet-18's time (BENCHMARKS.md "speed-cpu-cl").
    """
    return torch.device(device).type in ("cuda", "cpu")


def memory_format(device: torch.device | str) -> torch.memory_format:
    """The memory format of inference inputs and weights on ``device``."""
    return torch.channels_last if channels_last_helps(device) else torch.contiguous_format


def prepare_for_inference(model: nn.Module, device: torch.device | str, *, fold: bool = True) -> nn.Module:
    """An eval copy of ``model`` on ``device``: BatchNorm folded (``fold``) and in ``memory_format``.
    Feed it inputs converted with ``to_inference_input``."""
    ready = fold_batchnorm(model) if fold else copy.deepcopy(model).eval()
    return ready.to(device=device, memory_format=memory_format(device))


def to_inference_input(x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``x`` (N, C, H, W) on ``device`` in its inference memory format (other ranks only moved)."""
    x = x.to(device)
    return x.contiguous(memory_format=memory_format(device)) if x.dim() == 4 else x
