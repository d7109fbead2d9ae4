"""``python -m bench.allocation``: top-1 and measured speed-up of ``target.allocation: macs`` against
``latency`` on one trained network.

Per seed, one ``magnitude`` + KD job with ``allocation: macs`` trains the dense network
(``schedule.dense_epochs``), prunes it to ``--ratio`` of its MACs and fine-tunes it. The
``allocation: latency`` job of the same seed starts in a work directory holding the first job's finished
dense checkpoint (``checkpoints/dense.pt``). The engine resumes a finished phase instead of training it
again, so both allocations prune the same dense weights and differ only in the allocation. Each job runs
end to end through ``runner.run``, with the same layer timing, speed target code and report as a service
job.

Top-1 is the report's (the test split). The speed-up is the report's latency comparison: dense and pruned
timed alternately in one process, BatchNorm folded, in the device's inference layout, at batch 1 and
``--batch``, with a 95% interval.

Writes ``<out>/<section>-<time>.json`` and the ``<!-- bench:allocation -->`` (or ``--section``) section
of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from pruning_core.jobs.runner import run
from pruning_core.spec import DataSpec, JobSpec

from .markdown import command, mean_std, publish_results, results_path
from .profiles import CIFAR_ARCHIVE, REPO_DIR, RESULTS_DIR
from .speed import machine

FORMAT = "pruning-core/bench-allocation-v1"
SECTION = "allocation"
ALLOCATIONS = ("macs", "latency")


def log(text: str) -> None:
    print(f"[allocation {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def job_spec(args: argparse.Namespace, allocation: str, seed: int) -> JobSpec:
    """The job of one allocation and seed; every other setting is the same for both allocations."""
    data = DataSpec(
        name="imagefolder",
        root=str(args.data),
        image_size=args.size,
        per_class=args.per_class,
        test_per_class=args.test_per_class,
        num_workers=args.workers,
    )
    return JobSpec.model_validate(
        {
            "model": {"name": args.model},
            "data": data.model_dump(),
            "method": {"name": "magnitude"},
            "target": {"macs_ratio": args.ratio, "allocation": allocation},
            "schedule": {
                "dense_epochs": args.dense_epochs,
                "epochs": args.epochs,
                "batch_size": args.batch_size,
                "lr": args.lr,
                "warmup_epochs": min(1.0, args.epochs / 2),
                "max_steps_per_epoch": args.max_steps,
            },
            "kd": {"enabled": True},
            "export": {
                "formats": ["safetensors"],
                "latency_batch_size": args.batch,
                "latency_max_s": args.latency_s,
            },
            "seed": seed,
            "device": args.device,
        }
    )


def summarise(report: Any, allocation: str, seed: int) -> dict[str, Any]:
    """The figures of one finished job that the table shows (and the group widths, for the JSON)."""
    lat = {
        f"b{b.batch_size}": {
            "speedup": b.speedup.median,
            "lo": b.speedup.low,
            "hi": b.speedup.high,
            "dense_ms": b.dense_ms.median,
            "pruned_ms": b.pruned_ms.median,
            "verdict": b.verdict,
        }
        for b in (report.latency.batches if report.latency else [])
    }
    kept = [g.pruned / g.dense for g in report.groups]
    return {
        "allocation": allocation,
        "seed": seed,
        "dense_top1": report.dense.top1,
        "top1": report.pruned.top1,
        "macs_ratio": report.achieved_macs_ratio,
        "params": report.pruned.params,
        "dense_params": report.dense.params,
        "implied_speedup": report.dense.macs / report.pruned.macs,
        "latency": lat,
        "latency_device": report.latency.device if report.latency else None,
        "kept_share_min": min(kept, default=1.0),
        "kept_share_max": max(kept, default=1.0),
        "groups": [[g.root, g.dense, g.pruned] for g in report.groups],
        # the latency job's check (``speed_target.check_allocation``): which allocation it kept, and
        # the MAC-allocated time / the latency-allocated time it measured
        "kept_allocation": report.method_details.get("allocation", "macs"),
        "check": report.method_details.get("allocation_check"),
        "train_images": report.data_summary.train_images if report.data_summary else None,
        "test_images": report.data_summary.test_images if report.data_summary else None,
        "wall_s": report.total_wall_s,
    }


def run_seed(args: argparse.Namespace, seed: int, root: Path) -> list[dict[str, Any]]:
    """Both allocations of one seed; the second resumes the first's finished dense phase."""
    rows = []
    first = root / f"seed{seed}-{ALLOCATIONS[0]}"
    for allocation in ALLOCATIONS:
        workdir = root / f"seed{seed}-{allocation}"
        if workdir != first and args.dense_epochs:
            (workdir / "checkpoints").mkdir(parents=True, exist_ok=True)
            shutil.copy2(first / "checkpoints" / "dense.pt", workdir / "checkpoints" / "dense.pt")
        log(f"seed {seed}, allocation {allocation}")
        result = run(job_spec(args, allocation, seed), workdir)
        rows.append(summarise(result.report, allocation, seed))
        log(f"  top-1 {rows[-1]['top1']:.2f} % at {rows[-1]['macs_ratio']:.3f} of the MACs")
    return rows


# --- BENCHMARKS.md ---


def _speed(rows: list[dict[str, Any]], key: str) -> str:
    cells = [r["latency"].get(key) for r in rows]
    if not all(cells):
        return "—"
    return "; ".join(f"{c['speedup']:.2f}× [{c['lo']:.2f}, {c['hi']:.2f}]" for c in cells)


def _epochs(n: int, kind: str) -> str:
    return f"{n} {kind} epoch{'' if n == 1 else 's'}"


def _check(check: dict[str, Any] | None) -> str:
    if not check:
        return ""
    return f" ({check['speedup']:.2f}× [{check['speedup_low']:.2f}, {check['speedup_high']:.2f}])"


def render(results: dict[str, Any], source: Path) -> str:
    m = results["machine"]
    runs = results["runs"]
    batch = results["batch"]
    dense = [r["dense_top1"] for r in runs if r["allocation"] == ALLOCATIONS[0]]
    lines = [
        "## Allocation: `macs` against `latency`, one network trained and pruned both ways (`python -m bench.allocation`)",
        "",
        f"`{results['command']}` on {m['device']} ({m['cpu']}, {m['cores']} cores), torch {m['torch']}, "
        f"{results['started'][:16]} UTC; 1-minute load average {results['load_avg_start']:.2f} at the start "
        f"and {results.get('load_avg_end', float('nan')):.2f} at the end. Results: `{source.name}`.",
        "",
        f"`{results['model']}` at {results['size']} px on CIFAR-10 (JPEG), {runs[0]['train_images']} training "
        f"and {runs[0]['test_images']} test images; {_epochs(results['dense_epochs'], 'dense')}, then `magnitude` "
        f"+ KD to {results['ratio']:g} of the MACs and {_epochs(results['epochs'], 'fine-tuning')}; both allocations of a "
        "seed prune the same dense weights. Speed-ups: the job report's dense / pruned time, both folded in "
        "the device's inference layout, timed alternately, [95% interval], one per seed. Kept share: the "
        "narrowest and widest group, pruned / dense channels. A `latency` job keeps that allocation only where "
        "it measured faster than the MAC allocation of the same weights (`speed_target.check_allocation`).",
        "",
        f"| allocation | top-1 % per seed (dense {', '.join(f'{t:.1f}' for t in dense)}) | mean | MACs kept "
        f"| params | speed-up, batch {batch} | batch 1 | kept share, narrowest – widest group "
        "| allocation the job kept (its check: MAC-allocated / latency-allocated time) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for allocation in ALLOCATIONS:
        rows = [r for r in runs if r["allocation"] == allocation]
        if not rows:
            continue
        top1 = [r["top1"] for r in rows]
        mean, std = mean_std(top1)
        macs = " / ".join(f"{r['macs_ratio']:.3f}" for r in rows)
        params = " / ".join(f"{r['params'] / 1e6:.2f} M" for r in rows)
        kept = " / ".join(f"{r['kept_share_min']:.2f} – {r['kept_share_max']:.2f}" for r in rows)
        chosen = " / ".join(f"`{r['kept_allocation']}`{_check(r['check'])}" for r in rows)
        lines.append(
            f"| `{allocation}` | {' / '.join(f'{t:.2f}' for t in top1)} | "
            f"{mean:.2f}{'' if std is None else f' ± {std:.2f}'} | {macs} | {params} | "
            f"{_speed(rows, f'b{batch}')} | {_speed(rows, 'b1')} | {kept} | {chosen} |"
        )
    return "\n".join(lines) + "\n"


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.allocation", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tv:resnet18")
    p.add_argument("--size", type=int, default=224, help="image side the network sees (pixels)")
    p.add_argument("--data", type=Path, default=CIFAR_ARCHIVE, help="the CIFAR-10 JPEG archive")
    p.add_argument("--per-class", type=int, default=1000, help="training images per class")
    p.add_argument("--test-per-class", type=int, default=300)
    p.add_argument("--ratio", type=float, default=0.3, help="remaining MACs / dense MACs")
    p.add_argument("--dense-epochs", type=int, default=6)
    p.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs after pruning")
    p.add_argument("--batch-size", type=int, default=128, help="training batch")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--max-steps", type=int, default=None, help="cap on steps per epoch (smoke runs)")
    p.add_argument("--batch", type=int, default=8, help="throughput batch of the latency comparison")
    p.add_argument("--latency-s", type=float, default=20.0, help="seconds each job's timing may take")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument(
        "--workdir", type=Path, default=None, help="job directories (default: a new .work-* one under --out)"
    )
    p.add_argument("--section", default=SECTION, help="the BENCHMARKS.md section (marker name) to write")
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    p.add_argument("--markdown", type=Path, default=REPO_DIR / "BENCHMARKS.md")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    path = results_path(args.out, args.section)
    root = args.workdir or args.out / f".work-{path.stem}"  # job directories, ignored by git
    device = "cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu"
    results: dict[str, Any] = {
        "format": FORMAT,
        "command": command("bench.allocation", argv),
        "machine": machine(torch.get_num_threads(), device),
        "started": dt.datetime.now(dt.UTC).isoformat(),
        "load_avg_start": os.getloadavg()[0],
        **{k: getattr(args, k) for k in ("model", "size", "ratio", "dense_epochs", "epochs", "batch")},
        "runs": [],
    }
    for seed in args.seeds:
        results["runs"].extend(run_seed(args, seed, root))
        publish_results(results, path, args.markdown, args.section, render)  # after every seed
    log(f"wrote {path} and {args.markdown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
