"""``python -m bench.throughput --profile {smoke,cpu,gpu}``: training throughput, the engine against the
plain loop against the compute bound.

Per case (model, data, batch size), dense training of the same initial weights for the same steps:

- **engine**: ``engine.fit`` as a job trains (a set held in memory is batched and augmented on the
  device; a larger image folder is decoded per image by the default loader workers; the CUDA defaults:
  AMP type, channels_last, cuDNN autotuning); its training seconds (the epoch record's ``wall_s``, the
  test pass apart);
- **plain**: ``bench.plain.plain_train``, a minimal loop reading per item through a DataLoader with the
  same workers;
- **resident**: the same steps on one batch already on the device (no data path at all): what the
  model's own kernels allow;
- **compute bound**: training FLOPs (6 x the forward MACs per image: 2 FLOPs per MAC, the backward twice
  the forward) over the device's measured convolution throughput (a large 3x3 convolution's forward and
  backward, same precision and memory format).

``busy`` is resident seconds / engine seconds: the share of the engine's epoch that the device's compute
needs (an estimate of how busy the GPU is; 1 means the data path costs nothing). Each case trains
``epochs`` epochs and reports the last (the first pays cuDNN autotuning, compilation, decoding).
Writes ``<out>/throughput-<profile>-<time>.json`` and prints a markdown table; ``--markdown`` also writes
the table into a file's ``<!-- bench:throughput-<profile> -->`` section.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pruning_core.data.loaders import Datasets, load_data
from pruning_core.graph.macs import count_macs
from pruning_core.jobs.runner import resolve_device
from pruning_core.methods import DenseTraining, MethodContext
from pruning_core.models.zoo import build_model
from pruning_core.settings import Settings
from pruning_core.spec import DataSpec, JobSpec, Schedule
from pruning_core.training.acceleration import (
    amp_dtype,
    autotune,
    contiguous,
    in_format,
    memory_format,
    place,
)
from pruning_core.training.batches import default_workers, steps_per_epoch
from pruning_core.training.engine import TrainContext, fit
from pruning_core.training.optim import OptimizerConfig

from . import markdown, profiles
from .plain import plain_train
from .profiles import CACHE_DIR, RESULTS_DIR

RESULTS_FORMAT = "pruning-core/throughput-v1"


@dataclass(frozen=True)
class Case:
    """One model on one data set at one batch size."""

    label: str
    model: str
    data: DataSpec
    batch_size: int
    epochs: int = 2  # the last one is reported
    max_steps: int | None = None  # steps per epoch (a few of a large set on CPU); None: the whole set


def _cifar(per_class: int | None, test_per_class: int, image_size: int | None = None) -> DataSpec:
    """bench.profiles' CIFAR-10 JPEG set with the job's default loader workers (None: per device)."""
    return profiles._cifar(per_class, test_per_class, workers=None, image_size=image_size)


# profile -> (device, cases). The 224 px cases upscale the CIFAR-10 JPEG files: decoded they exceed
# DECODE_MAX_BYTES (1 GiB), so they take the large-folder path (loader workers decoding per image).
PROFILES: dict[str, tuple[str, tuple[Case, ...]]] = {
    "smoke": ("cpu", (Case("digits", "resnet20", DataSpec(name="digits", test_per_class=5), 64, 1, 3),)),
    "cpu": (
        "cpu",
        (
            Case("cifar10-jpeg 5,000", "resnet20", _cifar(500, 20), 64),
            Case("cifar10-jpeg 224 px, per image", "tv:resnet50", _cifar(800, 2, 224), 32, 2, 4),
        ),
    ),
    "gpu": (
        "cuda",
        (
            Case("cifar10-jpeg", "resnet56", _cifar(None, 100), 128, 3),
            Case("cifar10-jpeg 224 px, per image", "tv:resnet50", _cifar(1000, 10, 224), 256, 2),
        ),
    ),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def conv_flops_per_s(device: torch.device, schedule: Schedule, repeats: int = 10) -> float:
    """Measured training throughput of a large 3x3 convolution (forward + both backward products), in
    FLOP/s, in the schedule's precision and memory format on ``device``."""
    n, c, side = (64, 256, 32) if device.type == "cuda" else (8, 64, 32)
    fmt, dtype = memory_format(device, schedule), amp_dtype(device, schedule)
    x = in_format(torch.randn(n, c, side, side, device=device), fmt).requires_grad_()
    conv = place(nn.Conv2d(c, c, 3, padding=1, bias=False), device, fmt)
    autotune(device)

    def once() -> None:
        with torch.autocast(device.type, dtype=dtype or torch.float16, enabled=dtype is not None):
            y = conv(x)
        y.float().sum().backward()

    once()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        once()
    _sync(device)
    flops = 3 * 2 * n * c * side * side * c * 9  # forward, grad input, grad weight
    return repeats * flops / (time.perf_counter() - t0)


def resident_step_s(
    model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], schedule: Schedule, steps: int
) -> float:
    """Seconds per training step on one batch already on the device (forward, backward, SGD step),
    after two warm-up steps: the step with no data path."""
    x, y = batch
    device = x.device
    fmt, dtype = memory_format(device, schedule), amp_dtype(device, schedule)
    place(model, device, fmt).train()
    x = in_format(x, fmt)
    opt = OptimizerConfig.from_schedule(schedule).build(p for p in model.parameters() if p.requires_grad)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype or torch.float16, enabled=dtype is not None):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    for _ in range(2):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    contiguous(model)
    return (time.perf_counter() - t0) / steps


def _engine_epoch_s(
    model: nn.Module, ds: Datasets, schedule: Schedule, device: torch.device, workers: int
) -> float:
    """The engine's last epoch's training seconds, dense training as a job does it."""
    spec = JobSpec(schedule=schedule)
    example = torch.zeros(1, ds.in_channels, ds.image_size, ds.image_size)
    mctx = MethodContext(spec, example, ds.num_classes, device, count_macs(model, example))
    ctx = TrainContext(device, 0, ds.train, ds.test, num_workers=workers)
    return fit(model, DenseTraining(spec.method, mctx), schedule, ctx, "dense").history[-1]["wall_s"]


def measure_case(case: Case, device: torch.device, flops_per_s: float, settings: Settings) -> dict[str, Any]:
    """Seconds per epoch and images/s of the engine, the plain loop, the resident bound and the compute
    bound for one case."""
    ds = load_data(case.data, cache_dir=CACHE_DIR, seed=0, settings=settings)
    schedule = Schedule(
        epochs=case.epochs, batch_size=case.batch_size, max_steps_per_epoch=case.max_steps, lr=0.05
    )
    steps = steps_per_epoch(len(ds.train), schedule)
    images = steps * case.batch_size
    torch.manual_seed(0)
    initial = build_model(case.model, ds.num_classes, ds.in_channels)
    example = torch.zeros(1, ds.in_channels, ds.image_size, ds.image_size)
    macs = count_macs(initial, example)
    workers = default_workers(None, device, settings.max_data_workers)
    engine_s = _engine_epoch_s(copy.deepcopy(initial), ds, schedule, device, workers)
    plain_s = plain_train(copy.deepcopy(initial), ds.train, schedule, 0, device, workers)[-1]
    x, y = next(iter(torch.utils.data.DataLoader(ds.train, batch_size=case.batch_size)))
    resident_s = steps * resident_step_s(
        copy.deepcopy(initial), (x.to(device), y.to(device)), schedule, min(steps, 20)
    )
    bound_s = 6 * macs * images / flops_per_s
    return {
        "case": asdict(case) | {"data": case.data.model_dump(mode="json")},
        "train_images": len(ds.train),
        "images_per_epoch": images,
        "steps": steps,
        "workers": workers,
        "held_in_memory": hasattr(ds.train, "batch"),
        "macs_per_image": macs,
        "engine_epoch_s": engine_s,
        "plain_epoch_s": plain_s,
        "resident_epoch_s": resident_s,
        "compute_bound_epoch_s": bound_s,
        "busy": resident_s / engine_s,
    }


def table(results: dict[str, Any]) -> str:
    """The results as a markdown table: seconds per epoch and images/s per case."""
    head = ["Case", "Images/epoch", "Engine s (img/s)", "Plain s (img/s)", "Resident s (img/s)"]
    head += ["Compute bound s (img/s)", "Engine / plain", "Busy"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results["cases"]:
        n = r["images_per_epoch"]

        def cell(key: str, n: int = n, r: dict[str, Any] = r) -> str:
            return f"{r[key]:.2f} ({n / r[key]:,.0f})"

        lines.append(
            f"| {r['case']['label']} ({r['case']['model']}, batch {r['case']['batch_size']}) | {n:,} | "
            f"{cell('engine_epoch_s')} | {cell('plain_epoch_s')} | {cell('resident_epoch_s')} | "
            f"{cell('compute_bound_epoch_s')} | {r['engine_epoch_s'] / r['plain_epoch_s']:.2f} | "
            f"{r['busy']:.0%} |"
        )
    m = results["machine"]
    cpu = f"{m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads; " if m.get("cpu") else ""
    lines.append(
        f"\nDevice {m['device']}{' (' + m['gpu'] + ')' if m.get('gpu') else ''}, {cpu}torch {m['torch']}; "
        f"measured convolution throughput {results['conv_tflops']:.2f} TFLOP/s."
    )
    return "\n".join(lines)


def render(results: dict[str, Any], source: Path) -> str:
    """The ``throughput-<profile>`` section: its command, date and results file, then the table."""
    where = source.relative_to(profiles.REPO_DIR) if source.is_relative_to(profiles.REPO_DIR) else source.name
    command = results.get("command", f"python -m bench.throughput --profile {results['profile']}")
    return (
        f"## Training throughput, {results['profile']} profile\n\n"
        f"`{command}`, run {results['date']}; results `{where}`.\n\n{table(results)}\n"
    )


def run_profile(name: str, settings: Settings, log: Callable[[str], None] = print) -> dict[str, Any]:
    from .run import machine_info  # here: bench.run imports this module

    device_name, cases = PROFILES[name]
    device = resolve_device(device_name)
    flops = conv_flops_per_s(device, Schedule())
    started = dt.datetime.now(dt.UTC)
    out = []
    for case in cases:
        log(f"throughput: {case.label} ({case.model})")
        out.append(measure_case(case, device, flops, settings))
    return {
        "format": RESULTS_FORMAT,
        "profile": name,
        "date": started.isoformat(timespec="seconds"),
        "machine": machine_info(device),
        "conv_tflops": flops / 1e12,
        "cases": out,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__.split("\n")[0])
    p.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    p.add_argument("--markdown", type=Path, help="also write the table into this file's section")
    args = p.parse_args(argv)
    if PROFILES[args.profile][0] == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench.throughput: the gpu profile needs CUDA")
    settings = Settings(decode_cache_dir=CACHE_DIR / "decoded")
    results = run_profile(args.profile, settings)
    results["command"] = "python -m bench.throughput " + shlex.join(sys.argv[1:] if argv is None else argv)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = results["date"].replace(":", "").replace("+0000", "Z")
    path = args.out / f"throughput-{args.profile}-{stamp}.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))
    if args.markdown:
        body = render(results, path)
        markdown.update_markdown(
            args.markdown, f"throughput-{args.profile}", markdown._wrap(f"throughput-{args.profile}", body)
        )
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
