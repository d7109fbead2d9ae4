"""``python -m bench.scratch``: does a one-stage method lose to ``magnitude`` by the widths it finds or by
how it trains them?

Table B (``bench.compare``) runs a one-stage method from the initial weights beside ``magnitude`` at the
initial weights, both for the same epochs: the two rows differ in the widths each ends at *and* in how
the weights were trained. This benchmark separates the two, as Liu et al. ("Rethinking the value of
network pruning", ICLR 2019) do: per seed and target it runs the method's job and the ``magnitude``
job exactly as Table B does, reads the per-group widths of each pruned network, cuts the same initial
weights to those widths (each group's channels of largest magnitude, as ``magnitude`` picks them) and
trains both cuts in one training loop for the same epochs at the same LR. The retrained rows differ in
the widths alone; the method's retrained row against its job's row is what its own training gained or
cost on those widths.

Writes ``<out>/<section>-<time>.json`` (section ``scratch-<method>-<profile>``) and regenerates that
section of ``--markdown``.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pruning_core.artifacts.export import load_pruned
from pruning_core.graph.groups import PruningGraph, top_channels
from pruning_core.graph.importance import magnitude
from pruning_core.graph.macs import count_macs
from pruning_core.graph.surgery import remove_channels
from pruning_core.jobs.runner import run
from pruning_core.spec import Schedule

from . import markdown
from .compare import COMPARE_CPU, CONTENDERS, at_init_spec, method_spec, whole_schedule
from .measure import measure_row
from .profiles import REPO_DIR, RESULTS_DIR
from .run import EchoReporter, Setup, log, provenance, resolve_data, setup, train_dense, warm_up

FORMAT = "pruning-core/bench-scratch-v1"


def widths(model: nn.Module, s: Setup) -> list[int]:
    """Channels per coupled group of a network, in the dependency graph's group order."""
    return [g.size for g in PruningGraph(model.cpu(), s.example, s.num_classes).groups]


def cut(initial: nn.Module, counts: list[int], s: Setup) -> nn.Module:
    """A copy of ``initial`` with ``counts[i]`` channels left in group i, those of largest magnitude."""
    graph = PruningGraph(copy.deepcopy(initial), s.example, s.num_classes)
    if len(counts) != len(graph.groups):
        raise ValueError(f"{len(counts)} widths for {len(graph.groups)} groups")
    scores = magnitude(graph)
    keep = [top_channels(g, sc, n) for g, sc, n in zip(graph.groups, scores, counts, strict=True)]
    return remove_channels(graph, keep)


def retrain(net: nn.Module, s: Setup, name: str) -> nn.Module:
    """``net`` trained for Table B's epochs (dense + fine-tune) at the dense LR, by the engine's loop
    (its checkpoints under ``s.work/retrain-<name>``)."""
    sched = Schedule.model_validate(whole_schedule(s.case))
    log(f"seed {s.seed}: {name}, retrained from the initial weights ({sched.epochs} epochs)")
    return train_dense(net, s, sched, f"retrain-{name}").model


def run_target(s: Setup, initial: nn.Module, method: str, target: float) -> dict[str, Any]:
    """The two jobs and the two retrained cuts at one target; their rows."""
    work = s.work / f"t{target:g}"
    log(f"seed {s.seed} target {target:g}: magnitude at the initial weights")
    jobs = {"magnitude": run(at_init_spec(s, target), work / "magnitude", EchoReporter())}
    log(f"seed {s.seed} target {target:g}: {method}")
    jobs[method] = run(method_spec(method, s, target, None), work / method, EchoReporter())
    rows: dict[str, Any] = {}
    for name, res in jobs.items():
        pruned = load_pruned(res.workdir)
        counts = widths(pruned, s)
        net = cut(initial, counts, s)
        if (got := count_macs(net, s.example)) != (want := count_macs(pruned.cpu(), s.example)):
            raise AssertionError(f"{name}: the cut has {got} MACs, the job's network {want}")
        rows[name] = {
            **measure_row(pruned, s.ds.test, s.example, s.device, s.profile, latency=False),
            "widths": counts,
        }
        again = retrain(net, s, f"{name}-t{target:g}")
        rows[f"{name} widths, retrained"] = measure_row(
            again, s.ds.test, s.example, s.device, s.profile, latency=False
        )
    return {"target": target, "rows": rows}


def render(results: dict[str, Any], source: Path) -> str:
    """One table per target: per seed, each job's top-1 and its widths retrained, then the means."""
    method = results["method"]
    lines = [
        f"## One-stage `{method}`: its widths or its training? (`python -m bench.scratch`)",
        "",
        f"`{results['command']}`, run {results['date']}, {results['wall_s'] / 60:.1f} min; results "
        f"`{source.name}`.  ",
        f"Machine: {results['machine']['cpu']} ({results['machine'].get('cpu_capability', 'kernels not recorded')}). {results['case']}: each job as in Table B (from "
        "the initial weights, the same epochs); *retrained*: the same initial weights cut to that job's "
        "per-group widths (channels of largest magnitude) and trained by one loop for the same epochs at "
        "the same LR. Top-1 % on the test split; parameters in thousands.",
        "",
    ]
    names = [method, f"{method} widths, retrained", "magnitude", "magnitude widths, retrained"]
    titles = [
        f"`{method}` (job)",
        f"`{method}`'s widths, retrained",
        "`magnitude` (job)",
        "`magnitude`'s widths, retrained",
    ]
    targets = sorted({t["target"] for r in results["runs"] for t in r["targets"]}, reverse=True)
    for target in targets:
        cells = [
            (r["seed"], t["rows"]) for r in results["runs"] for t in r["targets"] if t["target"] == target
        ]
        lines += [f"Target {target:g} of the dense MACs:", ""]
        lines += [
            "| Seed | " + " | ".join(titles) + f" | params `{method}` / `magnitude` |",
            "|---" * 6 + "|",
        ]
        for seed, rows in cells:
            tops = " | ".join(f"{rows[n]['top1']:.2f}" for n in names)
            params = f"{rows[method]['params'] / 1e3:.0f}k / {rows['magnitude']['params'] / 1e3:.0f}k"
            lines.append(f"| {seed} | {tops} | {params} |")
        means = " | ".join(markdown.fmt_top1([rows[n]["top1"] for _, rows in cells]) for n in names)
        lines += [f"| mean | {means} | |", ""]
    return "\n".join(lines)


def section_of(results: dict[str, Any]) -> str:
    return f"scratch-{results['method']}-{results['profile']}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.scratch", description=__doc__.split("\n")[0])
    one_stage = sorted(n for n, c in CONTENDERS.items() if c.one_stage)
    p.add_argument("--method", choices=one_stage, default="s2h")
    p.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.3])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--case", default="cifar10-jpeg subset", help="a case of bench.compare's cpu profile")
    p.add_argument("--dense-epochs", type=int, default=None, help="the case's own unless given (tests)")
    p.add_argument("--finetune-epochs", type=int, default=None, help="the case's own unless given (tests)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    p.add_argument("--markdown", type=Path, default=REPO_DIR / "BENCHMARKS.md")
    args = p.parse_args(argv)
    (case,) = [c for c in COMPARE_CPU.cases if c.label == args.case] or [None]
    if case is None:
        p.error(f"no case {args.case!r}; choose from {[c.label for c in COMPARE_CPU.cases]}")
    for key in ("dense_epochs", "finetune_epochs"):  # the schedule is their sum (``whole_schedule``)
        if getattr(args, key) is not None:
            case = replace(case, **{key: getattr(args, key)})
    started = dt.datetime.now(dt.UTC)
    results: dict[str, Any] = {
        "format": FORMAT,
        "method": args.method,
        "profile": COMPARE_CPU.name,
        "case": case.label,
        **provenance("bench.scratch", argv, started, torch.device(COMPARE_CPU.device)),
        "runs": [],
        "wall_s": 0.0,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = markdown.results_path(args.out, section_of(results), started)
    warm_up(torch.device(COMPARE_CPU.device))
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix=".work-", dir=args.out))
    try:
        for seed in args.seeds:
            s, model = setup(case, resolve_data(case.data), seed, COMPARE_CPU, work / f"seed{seed}")
            initial = copy.deepcopy(model).cpu()
            targets = [run_target(s, initial, args.method, t) for t in args.targets]
            dense_macs = count_macs(initial, s.example)
            results["runs"].append({"seed": seed, "dense_macs": dense_macs, "targets": targets})
            results["wall_s"] = time.perf_counter() - t0
            markdown.publish_results(results, path, args.markdown, section_of(results), render)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"wrote {path} and {args.markdown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
