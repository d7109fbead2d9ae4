"""The benchmark profiles: one table of frozen settings, chosen with ``--profile``.

``smoke`` is the test's (seconds); ``gpu`` runs the whole CIFAR-10 JPEG set on CUDA with AMP; ``cpu`` is
sized for about 20 minutes on 2 CPU cores. Its calibration (2-epoch trial, AMD EPYC, 2 cores, torch 2.14.1):
plain ResNet-20 training at 32x32 ~895 images/s (5.6 s per 5,000-image epoch), the engine's epoch 6.6 s
(0.9 s of it the 2,000-image test pass), a fine-tune epoch of the half-MAC model 5.2 s plain / 6.2 s
engine, ~6 s per seed of pruning, measuring and loading. Per CIFAR seed: 20 x (6.6 + 5.6) + 10 x (6.2 +
5.2) + ~6 = ~364 s; three seeds plus digits (~25 s) = ~19 minutes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from pruning_core.spec import DataSpec

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
CACHE_DIR = BENCH_DIR / ".cache"  # extracted archives (gitignored)
RESULTS_DIR = BENCH_DIR / "results"  # results JSON (committed: BENCHMARKS.md cites them)
# The shared CIFAR-10 JPEG archive lies beside the project; BENCH_CIFAR_ARCHIVE points elsewhere.
CIFAR_ARCHIVE = Path(
    os.environ.get("BENCH_CIFAR_ARCHIVE", REPO_DIR.parent / "shared" / "datasets" / "cifar10-jpeg.tar.gz")
)


@dataclass(frozen=True)
class Case:
    """One data set of a profile: data, model and schedule, run once per seed."""

    label: str  # the table's name for it
    data: DataSpec
    model: str
    dense_epochs: int
    finetune_epochs: int
    batch_size: int
    lr: float  # peak LR of dense training (cosine to zero)
    finetune_lr: float  # peak LR of fine-tuning, for magnitude and the peer alike
    seeds: tuple[int, ...]


@dataclass(frozen=True)
class Profile:
    """A whole benchmark run: its cases, the device and how latency is measured."""

    name: str
    device: str
    cases: tuple[Case, ...]
    target: float = 0.5  # remaining MACs / dense MACs
    latency_batches: tuple[int, ...] = (1, 64)
    latency_devices: tuple[str, ...] = ("cpu",)
    latency_iters: int = 30
    latency_max_s: float = 10.0


def _cifar(
    per_class: int | None, test_per_class: int | None, workers: int | None = 0, image_size: int | None = None
) -> DataSpec:
    return DataSpec(
        name="imagefolder",
        root=str(CIFAR_ARCHIVE),
        per_class=per_class,
        test_per_class=test_per_class,
        image_size=image_size,
        augment=True,
        num_workers=workers,
    )


_DIGITS = DataSpec(name="digits")

PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile(
            name="smoke",
            device="cpu",
            latency_iters=10,
            latency_max_s=2.0,
            cases=(Case("digits", _DIGITS, "resnet20", 2, 1, 64, 0.05, 0.01, (0,)),),
        ),
        Profile(
            name="cpu",
            device="cpu",
            cases=(
                Case("digits", _DIGITS, "resnet20", 30, 15, 64, 0.05, 0.01, (0,)),
                Case("cifar10-jpeg subset", _cifar(500, 200), "resnet20", 20, 10, 64, 0.05, 0.01, (0, 1, 2)),
            ),
        ),
        Profile(
            name="gpu",
            device="cuda",
            latency_devices=("cpu", "cuda"),
            cases=(
                Case(
                    "cifar10-jpeg",
                    _cifar(None, None, workers=8),
                    "resnet56",
                    80,
                    40,
                    128,
                    0.1,
                    0.01,
                    (0, 1, 2),
                ),
            ),
        ),
    )
}


def with_overrides(
    profile: Profile,
    *,
    seeds: int | None = None,
    dense_epochs: int | None = None,
    finetune_epochs: int | None = None,
    only: str | None = None,
) -> Profile:
    """The profile with fewer/more seeds (0..N-1), other epoch counts, or only cases whose label
    starts with ``only``; used for calibration trials, whose figures are not the published ones."""
    cases = []
    for c in profile.cases:
        if only and not c.label.startswith(only):
            continue
        cases.append(
            replace(
                c,
                seeds=tuple(range(seeds)) if seeds else c.seeds,
                dense_epochs=c.dense_epochs if dense_epochs is None else dense_epochs,
                finetune_epochs=c.finetune_epochs if finetune_epochs is None else finetune_epochs,
            )
        )
    if not cases:
        raise ValueError(f"no case of profile {profile.name!r} starts with {only!r}")
    return replace(profile, cases=tuple(cases))
