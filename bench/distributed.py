"""``python -m bench.distributed --out DIR``: one job on 1, 2, ... processes (``resources.gpus``).

The same digits job (``--method``, resnet20, global batch 64) through ``launch.run_job`` with each
process count of ``--gpus``: on CPU (default) gloo between CPU processes, with ``--device cuda`` one
process per GPU over NCCL. Per run:

- **epoch_s**: the training seconds of each epoch (the epoch record's ``wall_s``, rank 0's; the test
  pass apart) and their mean over the epochs after the first (which pays the start-up);
- **images_per_s**: the global batch's images per training second, and **scaling** against one process
  (``images_per_s / (n x images_per_s at 1)``: 1 is perfect scaling);
- **allreduce_bytes_per_step**: the bytes rank 0 gave to all-reduce per training step (the gradients of
  every parameter set, flat, plus the step's loss and stop votes; the epoch's end amortised over its
  steps): the payload, not the wire traffic (a ring all-reduce sends ``2 (n-1)/n`` of it per rank).

Writes ``<out>/distributed-<device>-<time>.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import torch

from pruning_core.jobs.launch import run_job
from pruning_core.spec import JobSpec, parse_spec
from pruning_core.training import distributed
from pruning_core.training.batches import steps_per_epoch

from . import markdown

RESULTS_FORMAT = "pruning-core/distributed-v1"


def job(gpus: int, method: str, epochs: int, device: str, batch_size: int) -> JobSpec:
    """The benchmark's digits job on ``gpus`` processes (no latency timing, safetensors only)."""
    return parse_spec(
        {
            "model": {"name": "resnet20"},
            "data": {"name": "digits"},
            "method": {"name": method},
            "target": {"macs_ratio": 0.5},
            "schedule": {"epochs": epochs, "batch_size": batch_size},
            "export": {"formats": ["safetensors"], "latency": False},
            "device": device,
            "resources": {"gpus": gpus},
        }
    )


def measure(spec: JobSpec, workdir: Path) -> dict[str, Any]:
    """One run of ``spec``: its epochs' seconds, throughput and all-reduce bytes per step."""
    distributed.STATS.update(allreduce_bytes=0, allreduce_calls=0)
    result = run_job(spec, workdir)
    history = [r for r in result.report.history]
    steps = steps_per_epoch(result.report.data_summary.train_images, spec.schedule)
    epoch_s = [r.wall_s for r in history]
    later = epoch_s[1:] or epoch_s
    mean_s = sum(later) / len(later)
    total_steps = steps * len(history)
    return {
        "gpus": spec.resources.gpus,
        "steps_per_epoch": steps,
        "epoch_s": [round(s, 3) for s in epoch_s],
        "epoch_s_mean": round(mean_s, 3),
        "images_per_s": round(steps * spec.schedule.batch_size / mean_s, 1),
        "allreduce_bytes_per_step": round(distributed.STATS["allreduce_bytes"] / total_steps),
        "allreduce_calls_per_step": round(distributed.STATS["allreduce_calls"] / total_steps, 2),
        "train_loss": [round(r.train_loss, 4) for r in history],
        "top1": result.report.pruned.top1,
    }


def table(results: dict[str, Any]) -> str:
    one = results["runs"][0]["images_per_s"]
    lines = [
        "| processes | s / epoch | images / s | scaling | all-reduce bytes / step | calls / step |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["runs"]:
        scaling = r["images_per_s"] / (r["gpus"] * one)
        lines.append(
            f"| {r['gpus']} | {r['epoch_s_mean']:.2f} | {r['images_per_s']:.0f} | {scaling:.2f} | "
            f"{r['allreduce_bytes_per_step']:,} | {r['allreduce_calls_per_step']:g} |"
        )
    return "\n".join(lines)


def render(results: dict[str, Any], source: Path) -> str:
    """The ``distributed-<device>`` section: command, machine, load, the job, then the table."""
    m = results.get("machine") or {}
    job_ = results["job"]
    machine = f"{m['cpu']}, {m['cores']} cores; torch {m['torch']}" if m else f"{results['cpus']} CPUs"
    return (
        f"## One job on several processes ({results['device']})\n\n"
        f"`{results.get('command', 'python -m bench.distributed')}`, run {results['date']}; results "
        f"`{source.name}`. {machine}; OMP_NUM_THREADS={results['omp_num_threads']} per process; load "
        f"average {results['load_1min']:g} at the end. The job: `{job_['method']['name']}` on "
        f"{job_['data']['name']}, {job_['model']['name']}, global batch {job_['schedule']['batch_size']} "
        f"split between the processes, {job_['schedule']['epochs']} epochs; s / epoch is the mean of the "
        "epochs after the first; all-reduce bytes are the payload rank 0 hands to all-reduce per step "
        "(every parameter set's gradients, the loss, the stop vote), not the wire traffic.\n\n"
        f"{table(results)}\n"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.distributed", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="directory of the results JSON")
    p.add_argument("--gpus", default="1,2", help="process counts, comma-separated")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--method", default="magnitude")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args(argv)
    runs = []
    with TemporaryDirectory() as tmp:
        for n in (int(x) for x in args.gpus.split(",")):
            spec = job(n, args.method, args.epochs, args.device, args.batch_size)
            runs.append(measure(spec, Path(tmp) / f"gpus-{n}"))
    from .run import machine_info  # here: it loads bench.run's own dependencies

    results = {
        "format": RESULTS_FORMAT,
        "command": markdown.command("bench.distributed", argv),
        "machine": machine_info(torch.device(args.device)),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S+0000"),
        "device": args.device,
        "cpus": os.cpu_count(),
        "load_1min": round(os.getloadavg()[0], 2),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "job": job(1, args.method, args.epochs, args.device, args.batch_size).model_dump(mode="json"),
        "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = results["date"].replace(":", "").replace("+0000", "Z")
    path = args.out / f"distributed-{args.device}-{stamp}.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
