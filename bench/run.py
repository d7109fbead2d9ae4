"""``python -m bench.run --profile {smoke,cpu,gpu}``: dense vs ``magnitude`` vs Torch-Pruning run directly.

Per data set and seed: train the dense model with the engine (timing each epoch) and, from the same
initial weights, with a plain PyTorch loop (``bench.plain``); prune the engine's dense weights to the
MAC target with ``magnitude`` through ``runner.run`` and with Torch-Pruning's own pruner (``bench.peer``,
fine-tuned by the plain loop for the same epochs and LR schedule); measure all three the same way
(``bench.measure``). Writes ``<out>/<profile>-<time>.json`` and regenerates the profile's section of
BENCHMARKS.md from that file.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from pruning_core.artifacts.export import load_pruned
from pruning_core.data.loaders import Datasets, LoadContext, extract_imagefolder
from pruning_core.graph.macs import count_macs
from pruning_core.graph.surgery import rebuild
from pruning_core.jobs.runner import prepare, resolve_device, run
from pruning_core.methods import DenseTraining, MethodContext
from pruning_core.models.zoo import build_model
from pruning_core.settings import get_settings
from pruning_core.spec import DataSpec, ExportSpec, JobSpec, ModelSpec, Schedule, TargetSpec
from pruning_core.training.batches import steps_per_epoch
from pruning_core.training.engine import FitResult, NullReporter, TrainContext, fit
from pruning_core.training.evaluation import evaluate

from . import markdown
from .measure import measure_row
from .peer import PeerResult, prune_to_macs
from .plain import plain_train
from .profiles import CACHE_DIR, PROFILES, REPO_DIR, RESULTS_DIR, Case, Profile, with_overrides
from .stack import cpu_model
from .throughput import conv_flops_per_s

RESULTS_FORMAT = "pruning-core/bench-v1"


def log(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


class EchoReporter(NullReporter):
    """One stderr line per epoch, so a 20-minute run shows where it is."""

    def epoch(self, record: dict[str, Any]) -> None:
        log(
            f"  {record['phase']} epoch {record['epoch'] + 1}: top-1 {record['top1']:.2f}% ({record['wall_s']:.1f} s)"
        )

    def message(self, text: str) -> None:
        log(f"  {text}")


# --- specs ---


def resolve_data(data: DataSpec) -> DataSpec:
    """An archive-backed imagefolder, extracted once into bench/.cache, as a folder root."""
    root = Path(data.root) if data.root else None
    if data.name != "imagefolder" or root is None or root.is_dir():
        return data
    if not root.is_file():
        raise SystemExit(f"bench: data archive {root} not found (set BENCH_CIFAR_ARCHIVE)")
    folder = extract_imagefolder(root, data, LoadContext(CACHE_DIR, 0, get_settings()))
    return data.model_copy(update={"root": str(folder)})


def schedule(case: Case, finetune: bool) -> Schedule:
    if finetune:
        return Schedule(epochs=case.finetune_epochs, batch_size=case.batch_size, lr=case.finetune_lr)
    return Schedule(epochs=case.dense_epochs, batch_size=case.batch_size, lr=case.lr)


def job_spec(case: Case, data: DataSpec, seed: int, profile: Profile, weights: Path | None = None) -> JobSpec:
    """The magnitude job (weights given: dense_epochs=0, fine-tune, KD off); without weights, the
    spec ``prepare`` builds the dense model from."""
    return JobSpec(
        model=ModelSpec(name=case.model, weights=str(weights) if weights else None),
        data=data,
        # any width, as the peer (Torch-Pruning) prunes: the two rows compare the same decisions
        target=TargetSpec(macs_ratio=profile.target, round_to=1),
        schedule=schedule(case, finetune=True),
        export=ExportSpec(formats=("safetensors",), latency=False),  # bench.measure times what it reports
        seed=seed,
        device=profile.device,
    )


# --- the three contenders ---


@dataclass(frozen=True)
class Setup:
    """What every stage of one (case, seed) shares."""

    case: Case
    profile: Profile
    spec: JobSpec  # the magnitude job's spec without weights: model, data, seed, device
    ds: Datasets
    model_name: str
    num_classes: int
    in_channels: int
    describe: Callable[[nn.Module], dict[str, Any]]
    example: torch.Tensor  # (1, C, S, S) on the CPU
    device: torch.device
    work: Path

    @property
    def seed(self) -> int:
        return self.spec.seed


def train_dense(model: nn.Module, s: Setup, sched: Schedule | None = None, name: str = "dense") -> FitResult:
    """Training through the engine, as ``runner.run`` does it (checkpoints under ``s.work/<name>``, a test
    pass per epoch): the case's dense schedule unless ``sched`` is given."""
    ctx = TrainContext(
        device=s.device,
        seed=s.seed,
        train=s.ds.train,
        test=s.ds.test,
        reporter=EchoReporter(),
        checkpoint_dir=s.work / name / "checkpoints",
        num_workers=s.spec.data.num_workers or 0,
        describe=s.describe,
        rebuild=rebuild,
    )
    mctx = MethodContext(
        spec=s.spec,
        example=s.example,
        num_classes=s.num_classes,
        device=s.device,
        dense_macs=count_macs(model, s.example),
    )
    return fit(
        model, DenseTraining(s.spec.method, mctx), sched or schedule(s.case, finetune=False), ctx, name
    )


def save_weights(model: nn.Module, path: Path) -> Path:
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def weight_gap(a: nn.Module, b: nn.Module) -> float | None:
    """Largest absolute difference between two models' parameters (not buffers: ``magnitude``
    re-estimates BatchNorm statistics after pruning, the peer does not, so their running statistics and
    batch counters differ by design); None when their shapes differ."""
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    if pa.keys() != pb.keys() or any(pa[k].shape != pb[k].shape for k in pa):
        return None
    return max((pa[k].detach().double().cpu() - pb[k].detach().double().cpu()).abs().max().item() for k in pa)


def setup(case: Case, data: DataSpec, seed: int, profile: Profile, work: Path) -> tuple[Setup, nn.Module]:
    """The seed's data and freshly initialised dense model, built as ``runner.prepare`` builds them."""
    spec = job_spec(case, data, seed, profile)
    ds, shape, model = prepare(spec, work / "dense")
    example = torch.zeros(1, shape.in_channels, shape.image_size, shape.image_size)
    s = Setup(
        case=case,
        profile=profile,
        spec=spec,
        ds=ds,
        model_name=shape.name,
        num_classes=shape.num_classes,
        in_channels=shape.in_channels,
        describe=shape.describe,
        example=example,
        device=resolve_device(profile.device),
        work=work,
    )
    return s, model


def dense_stage(s: Setup, model: nn.Module) -> tuple[nn.Module, Path, dict[str, Any]]:
    """Engine-trained dense model, its saved weights, and engine vs plain timings from the same init."""
    initial = copy.deepcopy(model)
    macs = count_macs(initial, s.example)
    log(f"{s.case.label} seed {s.seed}: dense training, engine ({s.case.dense_epochs} epochs)")
    fitted = train_dense(model, s)
    weights = save_weights(fitted.model, s.work / "dense.safetensors")
    log(f"{s.case.label} seed {s.seed}: dense training, plain loop")
    plain_s = plain_train(
        initial, s.ds.train, schedule(s.case, False), s.seed, s.device, s.spec.data.num_workers or 0
    )
    timing = {
        "engine_epoch_s": [r["wall_s"] for r in fitted.history],
        "engine_total_s": fitted.wall_s,
        "plain_epoch_s": plain_s,
        "test_pass_s": timed(evaluate, fitted.model, s.ds.test, s.device)[1],
        "plain_top1": evaluate(initial, s.ds.test, s.device)["top1"],
    }
    dense = schedule(s.case, False)
    images = steps_per_epoch(len(s.ds.train), dense) * dense.batch_size
    timing["images_per_epoch"] = images  # the training images one epoch reads (last partial batch dropped)
    timing["compute_bound_epoch_s"] = 6 * macs * images / conv_flops_per_s(s.device, dense)
    return fitted.model, weights, timing


def magnitude_stage(s: Setup, weights: Path) -> tuple[nn.Module, dict[str, Any]]:
    """``magnitude`` through ``runner.run`` from the dense weights (dense_epochs=0, KD off)."""
    log(f"{s.case.label} seed {s.seed}: magnitude via runner.run ({s.case.finetune_epochs} fine-tune epochs)")
    spec = job_spec(s.case, s.spec.data, s.seed, s.profile, weights)
    result, wall_s = timed(run, spec, s.work / "magnitude", EchoReporter())
    stages = {"magnitude_s": wall_s, "magnitude_finetune_epoch_s": [h.wall_s for h in result.report.history]}
    return load_pruned(result.workdir), stages


def peer_stage(s: Setup, weights: Path, dense_macs: int) -> tuple[PeerResult, dict[str, Any]]:
    """Torch-Pruning bisected to the target from the dense weights, then fine-tuned by the plain loop."""
    log(f"{s.case.label} seed {s.seed}: Torch-Pruning peer, bisecting its pruning ratio")

    def build() -> nn.Module:
        return build_model(s.model_name, s.num_classes, s.in_channels, weights)

    peer, prune_s = timed(prune_to_macs, build, s.example, s.num_classes, int(s.profile.target * dense_macs))
    ft_s = plain_train(
        peer.model, s.ds.train, schedule(s.case, True), s.seed, s.device, s.spec.data.num_workers or 0
    )
    return peer, {"peer_prune_s": prune_s, "peer_finetune_s": sum(ft_s), "peer_finetune_epoch_s": ft_s}


def run_seed(case: Case, data: DataSpec, seed: int, profile: Profile, work: Path) -> dict[str, Any]:
    """Dense (engine and plain), magnitude and the peer for one seed; their rows and timings."""
    s, model = setup(case, data, seed, profile, work)
    dense, weights, timing = dense_stage(s, model)
    magnitude, mag_stages = magnitude_stage(s, weights)
    peer, peer_stages = peer_stage(s, weights, count_macs(dense.cpu(), s.example))
    log(f"{case.label} seed {seed}: measuring")
    models = {"dense": dense, "magnitude": magnitude, "peer": peer.model}
    rows = {name: measure_row(m, s.ds.test, s.example, s.device, profile) for name, m in models.items()}
    for row in rows.values():
        row["macs_ratio"] = row["macs"] / rows["dense"]["macs"]
    rows["peer"].update(
        pruning_ratio=peer.pruning_ratio,
        bisect_tries=peer.tries,
        weight_gap_to_magnitude=weight_gap(peer.model, magnitude),
    )
    sizes = {
        "train_images": len(s.ds.train),
        "test_images": len(s.ds.test),
        "image_size": s.ds.image_size,
        "in_channels": s.in_channels,
    }
    stages = {"dense_engine_s": timing["engine_total_s"], "dense_plain_s": sum(timing["plain_epoch_s"])}
    return {
        "seed": seed,
        "rows": rows,
        "timing": timing,
        "stages": {**stages, **mag_stages, **peer_stages},
        "sizes": sizes,
    }


def run_case(case: Case, profile: Profile, work: Path) -> dict[str, Any]:
    data = resolve_data(case.data)
    runs = [
        run_seed(case, data, seed, profile, work / f"{case.label}-s{seed}".replace(" ", "_"))
        for seed in case.seeds
    ]
    return {
        "label": case.label,
        "model": case.model,
        "data": case.data.model_dump(mode="json"),
        "dense_epochs": case.dense_epochs,
        "finetune_epochs": case.finetune_epochs,
        "batch_size": case.batch_size,
        "lr": case.lr,
        "finetune_lr": case.finetune_lr,
        "seeds": list(case.seeds),
        **runs[0]["sizes"],
        "runs": runs,
    }


# --- the whole run ---


def code_commit() -> str | None:
    """The repository's commit the benchmark runs (``+changes`` when the engine or the benchmarks differ
    from it), so that results merged from several runs show which code made each; None outside git."""
    git = ["git", "-C", str(REPO_DIR)]
    try:
        head = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--", "pruning_core", "bench"], capture_output=True, text=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def provenance(
    module: str, argv: list[str] | None, started: dt.datetime, device: torch.device
) -> dict[str, Any]:
    """What a results file records of its run: the command line, when it started, the machine."""
    return {
        "command": markdown.command(module, argv),
        "date": started.isoformat(timespec="seconds"),
        "machine": machine_info(device),
    }


def machine_info(device: torch.device) -> dict[str, Any]:
    cpu = cpu_model()
    return {
        "commit": code_commit(),
        "cpu": cpu,
        # The kernels torch picked (AVX2, AVX512, ...): they round differently, so training on another
        # CPU gives other weights and a top-1 up to a few points apart; compare rows of one run.
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torch_pruning": version("torch-pruning"),
        "python": platform.python_version(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }


def warm_up(device: torch.device) -> None:
    """Pay one-off costs before anything is timed, so they do not land in the engine's first epoch: the
    first optimizer imports torch._dynamo (about a second); the first CUDA op creates the context."""
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    if device.type == "cuda":
        x = torch.zeros(1, 3, 8, 8, device=device, requires_grad=True)
        torch.nn.functional.conv2d(x, torch.zeros(4, 3, 3, 3, device=device)).sum().backward()
        torch.cuda.synchronize(device)


def run_profile(profile: Profile, out: Path, command: str, keep_work: bool = False) -> dict[str, Any]:
    """Every case of ``profile``; intermediate files (dense weights, the magnitude job folders) live in a
    scratch folder under ``out``, removed afterwards unless ``keep_work``."""
    device = resolve_device(profile.device)
    warm_up(device)
    started, t0 = dt.datetime.now(dt.UTC), time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix=".work-", dir=out))
    try:
        cases = [run_case(case, profile, work) for case in profile.cases]
    finally:
        if keep_work:
            log(f"scratch files kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return {
        "format": RESULTS_FORMAT,
        "command": command,
        "profile": profile.name,
        "date": started.isoformat(timespec="seconds"),
        "wall_s": time.perf_counter() - t0,
        "machine": machine_info(device),
        "target": profile.target,
        "latency": {
            "devices": list(profile.latency_devices),
            "batches": list(profile.latency_batches),
            "iters": profile.latency_iters,
            "max_s": profile.latency_max_s,
        },
        "cases": cases,
    }


def check_device(profile: Profile) -> None:
    """Refuse a CUDA profile on a machine without CUDA, before anything runs."""
    if profile.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(
            f"bench: profile {profile.name!r} needs a CUDA device and torch.cuda.is_available() is False here "
            f"(torch {torch.__version__}); run `make bench` for the CPU profile"
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    p.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    p.add_argument("--seeds", type=int, help="run seeds 0..N-1 instead of the profile's")
    p.add_argument(
        "--out", type=Path, default=RESULTS_DIR, help="folder for the results JSON (default bench/results)"
    )
    p.add_argument(
        "--markdown", type=Path, help="file whose profile section is regenerated (default: see below)"
    )
    p.add_argument(
        "--keep-work", action="store_true", help="keep the dense weights and job folders under --out"
    )
    p.add_argument("--dense-epochs", type=int, help="calibration only: override the dense epochs")
    p.add_argument("--finetune-epochs", type=int, help="calibration only: override the fine-tune epochs")
    p.add_argument("--only", help="calibration only: run just the cases whose label starts with this")
    p.add_argument(
        "--render", type=Path, metavar="JSON", help="only regenerate the markdown from a results file"
    )
    p.epilog = (
        "BENCHMARKS.md at the repository root is regenerated by the cpu and gpu profiles as published; "
        "smoke runs and runs with overrides write <out>/BENCHMARKS-<profile>.md instead unless --markdown is given."
    )
    return p.parse_args(argv)


def markdown_path(args: argparse.Namespace) -> Path:
    if args.markdown:
        return args.markdown
    overridden = any(v is not None for v in (args.seeds, args.dense_epochs, args.finetune_epochs, args.only))
    if args.profile == "smoke" or overridden:
        return args.out / f"BENCHMARKS-{args.profile}.md"
    return REPO_DIR / "BENCHMARKS.md"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        results = json.loads(args.render.read_text())
        args.profile = results["profile"]
        markdown.update_markdown(
            markdown_path(args), results["profile"], markdown.render_section(results, args.render)
        )
        return 0
    profile = with_overrides(
        PROFILES[args.profile],
        seeds=args.seeds,
        dense_epochs=args.dense_epochs,
        finetune_epochs=args.finetune_epochs,
        only=args.only,
    )
    check_device(profile)
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python -m bench.run " + " ".join(sys.argv[1:] if argv is None else argv)
    results = run_profile(profile, args.out, command, args.keep_work)
    path = args.out / f"{profile.name}-{results['date'].replace(':', '').replace('+0000', 'Z')}.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    md = markdown_path(args)
    markdown.update_markdown(md, profile.name, markdown.render_section(json.loads(path.read_text()), path))
    log(f"results: {path}; markdown: {md} ({results['wall_s'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
