"""``python -m bench.trained``: Table A, "I have a trained model".

Every method that can start from trained weights starts from the same converged dense model
(``bench/dense/resnet20-cifar10.safetensors``, trained once by ``bench/dense/resnet20-cifar10.yaml``; this
benchmark never retrains it) and gets the same fine-tuning budget: ``finetune_epochs`` passes over a
class-balanced part of the training set (``per_class`` images of each class), batch ``batch_size``, at
the fine-tune LR. Per seed and MAC target:

- ``magnitude`` with KD from the dense model (``runner.run`` from the weights);
- Torch-Pruning's own pruner (``bench.peer``: bisected to the target, fine-tuned by the plain loop, no KD);
- each contender of ``CONTENDERS`` through ``runner.run``, as ``bench.compare`` specifies it from dense
  weights (``tas``: search then the found network with KD, the search's share of the epochs included in the
  budget; ``psap``: prune-train with KD; ``s2h-dense``: S2H from the weights with KD).

Top-1 is measured on the whole test split (10,000 images) with ``bench.measure``; every row lies in
``[target - 0.02, target]`` of the dense MACs. ``--validation N`` measures on the last N training images of
each class instead (held out of the fine-tuning part) for choosing options; the test split is not read.
Results go to ``bench/results/[val-]trained-<profile>-<time>.json`` (rewritten after every seed) and the
``[val-]trained-<profile>`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from pruning_core.artifacts.export import load_pruned
from pruning_core.graph.macs import count_macs
from pruning_core.jobs.runner import run
from pruning_core.models.zoo import build_model
from pruning_core.spec import DataSpec, KDSpec

from . import markdown
from .compare import CONTENDERS as COMPARE
from .compare import method_spec, training_cost
from .measure import measure_row
from .profiles import BENCH_DIR, REPO_DIR, Case, Profile, _cifar
from .run import (
    EchoReporter,
    check_device,
    job_spec,
    log,
    peer_stage,
    provenance,
    resolve_data,
    setup,
    warm_up,
)

FORMAT = "pruning-core/bench-trained-v1"
WEIGHTS = BENCH_DIR / "dense" / "resnet20-cifar10.safetensors"
CONTENDERS = ("tas", "psap", "s2h-dense")  # bench.compare's contenders that start from dense weights


@dataclass(frozen=True)
class TrainedProfile:
    """Table A's settings: the case (its fine-tune epochs and LR are the budget), targets and weights."""

    profile: Profile
    targets: tuple[float, ...]
    weights: Path
    contenders: tuple[str, ...] = CONTENDERS
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # contender -> method options
    baselines: bool = True  # magnitude + KD and Torch-Pruning's pruner beside the contenders


# 8 epochs over 500 images per class = 40,000 images (625 steps of 64) of fine-tuning for every contender.
# Sized for 90 minutes on 2 CPU cores, it measured about 60 minutes per seed (2 targets x 5 contenders,
# tas and s2h at 2-3x a fine-tuning epoch): 3 seeds take about 3 hours, so `--seed-list` splits them over
# runs and `--merge` joins the files (options were chosen at this budget, so it was kept).
PROFILES: dict[str, TrainedProfile] = {
    "cpu": TrainedProfile(
        Profile(
            name="cpu",
            device="cpu",
            cases=(Case("cifar10-jpeg", _cifar(500, None), "resnet20", 0, 8, 64, 0.05, 0.01, (0, 1, 2)),),
        ),
        targets=(0.5, 0.3),
        weights=WEIGHTS,
    ),
    # the test's: digits, one epoch, one seed; --weights names a digits model
    "smoke": TrainedProfile(
        Profile(
            name="smoke",
            device="cpu",
            latency_iters=10,
            latency_max_s=2.0,
            cases=(Case("digits", DataSpec(name="digits"), "resnet20", 0, 2, 64, 0.05, 0.01, (0,)),),
        ),
        targets=(0.5,),
        weights=WEIGHTS,
    ),
}


def run_target(s: Any, tp: TrainedProfile, weights: Path, dense_macs: int, target: float) -> dict[str, Any]:
    """Every contender at one target, from ``weights``, with the case's fine-tuning budget; their rows."""
    label = f"{s.case.label} seed {s.seed} target {target:g}"
    work = s.work / f"t{target:g}"
    at = replace(s, profile=replace(s.profile, target=target))
    results, models = {}, {}
    if tp.baselines:
        log(f"{label}: magnitude + KD")
        mag_spec = job_spec(s.case, s.spec.data, s.seed, at.profile, weights)
        results["magnitude"] = run(
            mag_spec.model_copy(update={"kd": KDSpec(enabled=True)}), work / "magnitude"
        )
        log(f"{label}: Torch-Pruning peer")
        peer, peer_times = peer_stage(at, weights, dense_macs)
        models["peer"] = peer.model
    for name in tp.contenders:
        log(f"{label}: {name}")
        spec = method_spec(name, at, target, weights, tp.options.get(name))
        results[name] = run(spec, work / name, EchoReporter())
    models |= {k: load_pruned(r.workdir) for k, r in results.items()}
    rows = {
        k: measure_row(m, s.ds.test, s.example, s.device, s.profile, latency=False) for k, m in models.items()
    }
    for name, row in rows.items():
        row["macs_ratio"] = row["macs"] / dense_macs
        if name in results:
            row.update(training_cost(results[name].report.history))
            row["views"] = results[name].report.history[-1].views if results[name].report.history else {}
    if tp.baselines:
        rows["peer"]["train_wall_s"] = peer_times["peer_finetune_s"]
    return {"target": target, "rows": rows}


def run_seed(case: Case, seed: int, tp: TrainedProfile, weights: Path, work: Path) -> dict[str, Any]:
    s, _ = setup(case, resolve_data(case.data), seed, tp.profile, work)
    dense_model = build_model(s.model_name, s.num_classes, s.in_channels, weights)
    dense = measure_row(dense_model, s.ds.test, s.example, s.device, tp.profile, latency=False)
    dense_macs = count_macs(dense_model.cpu(), s.example)
    targets = [run_target(s, tp, weights, dense_macs, t) for t in tp.targets]
    return {"seed": seed, "dense": dense, "targets": targets, "train_images": len(s.ds.train)}


LABELS = {
    "magnitude": "`magnitude` + KD",
    "peer": "Torch-Pruning `BasePruner` (no KD)",
    "tas": "`tas` (search, then the found network with KD)",
    "psap": "`psap` (prune-train with KD)",
    "s2h-dense": "`s2h` from the weights, with KD",
}


def _machines(machines: list[dict[str, Any]]) -> str:
    """The machine line; a table merged from runs on different machines names each (in the parts' order)."""
    described = list(
        dict.fromkeys(
            f"{m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads); torch {m['torch']}, "
            f"torch-pruning {m['torch_pruning']}; device `{m['device']}`"
            + (f"; commit {m['commit']}" if m.get("commit") else "")
            for m in machines
        )
    )
    return (
        ("Machine: " if len(described) == 1 else "Machines (per merged run): ") + " | ".join(described) + "."
    )


def render(results: dict[str, Any], source: Path) -> str:
    m, case = results["machine"], results["case"]
    runs = case["runs"]
    where = source.relative_to(REPO_DIR) if source.is_relative_to(REPO_DIR) else source.name
    lines = [
        f'## Table A: "I have a trained model" ({results["profile"]} profile)',
        "",
        f"`{results['command']}`, run {results['date']}, {results['wall_s'] / 60:.1f} min; results `{where}`.  ",
        _machines(results.get("machines", [m])),
        "",
        f"Every row starts from the same dense weights (`{results['weights']}`) and gets the same budget: "
        f"{case['finetune_epochs']} epochs over {runs[0]['train_images']:,} training images "
        f"({case['per_class']} per class), batch {case['batch_size']} "
        f"({case['finetune_epochs'] * -(-runs[0]['train_images'] // case['batch_size']):,} steps), peak LR "
        f"{case['finetune_lr']:g} (cosine). `tas` spends half of the epochs searching. Top-1 on "
        + (
            f"the validation split (the last {results['validation']} training images of each class, held out); "
            "the test split was not read."
            if results.get("validation")
            else "the whole test split; mean ± std over seeds (per seed in brackets)."
        )
        + " Training s: the training steps' seconds (evaluation excluded); x magnitude: against "
        "`magnitude` + KD's in the same seed.",
        "",
        "Method options (beside target and schedule): "
        + "; ".join(
            f"`{c}` {json.dumps({**COMPARE[c].options, **results.get('options', {}).get(c, {})})}"
            for c in results.get("contenders", CONTENDERS)
        )
        + ".",
        "",
        "| Target | Method | Top-1 % | MACs ratio | Params | Training s | x magnitude |",
        "|---|---|---|---|---|---|---|",
        f"| 1.0 | dense | {markdown.fmt_top1([r['dense']['top1'] for r in runs])} | 1.000 | "
        f"{markdown.fmt_count([r['dense']['params'] for r in runs])} | | |",
    ]
    for i, target in enumerate(results["targets"]):
        done = [r for r in runs if len(r["targets"]) > i]
        if not done:
            continue
        for key in ("magnitude", "peer", *results.get("contenders", CONTENDERS)):
            if key not in done[0]["targets"][i]["rows"]:
                continue  # --no-baselines
            rows = [r["targets"][i]["rows"][key] for r in done]
            mags = [r["targets"][i]["rows"].get("magnitude", {}).get("train_wall_s") for r in done]
            # rows taken from the jobs' own reports (a run stopped before its results file) have no seconds
            walls = [x.get("train_wall_s") for x in rows]
            timed = all(w is not None for w in walls)
            against = (
                markdown.fmt_range([w / g for w, g in zip(walls, mags, strict=True)], 2)
                if timed and all(mags)
                else ""
            )
            lines.append(
                f"| {target:g} | {LABELS[key]} | {markdown.fmt_top1([x['top1'] for x in rows])} | "
                f"{markdown.fmt_range([x['macs_ratio'] for x in rows])} | "
                f"{markdown.fmt_count([x['params'] for x in rows])} | "
                f"{markdown.fmt_count(walls) if timed else 'not recorded'} | {against} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.trained", description=__doc__.split("\n")[0])
    p.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    p.add_argument("--weights", type=Path, help="dense weights instead of the profile's")
    p.add_argument("--seeds", type=int, help="run seeds 0..N-1 instead of the profile's")
    p.add_argument(
        "--seed-list",
        type=lambda t: tuple(int(x) for x in t.split(",")),
        metavar="S,S",
        help="run only these seeds (a table split over several runs; --merge joins their files)",
    )
    p.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        metavar="JSON",
        help="join results files of the same table run seed by seed into one, then write its section",
    )
    p.add_argument(
        "--replace",
        default=[],
        type=lambda t: t.split(","),
        metavar="C,C",
        help="with --merge: these contenders' rows come from the parts that reran them alone",
    )
    p.add_argument("--targets", type=lambda t: tuple(float(x) for x in t.split(",")), help="MAC ratios")
    p.add_argument(
        "--validation", type=int, metavar="N", help="measure on N held-out training images per class"
    )
    p.add_argument("--methods", help=f"comma-separated, some of {','.join(CONTENDERS)} (default: all)")
    p.add_argument(
        "--no-baselines",
        dest="baselines",
        action="store_false",
        help="run the contenders only (choosing options: the baselines' rows are in an earlier run)",
    )
    p.add_argument(
        "--options",
        type=json.loads,
        default={},
        help='JSON: {"tas": {"init": "supernet"}, ...} per contender',
    )
    markdown.add_output_args(p)
    args = p.parse_args(argv)
    if args.render:
        markdown.render_file(args, _section, render)
        return 0
    if args.merge:
        merged = merge([json.loads(f.read_text()) for f in args.merge], argv, tuple(args.replace))
        args.out.mkdir(parents=True, exist_ok=True)
        seeds = "-".join(str(r["seed"]) for r in merged["case"]["runs"])
        stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H%M%SZ")  # not a part's: it would overwrite it
        path = args.out / f"{_section(merged)}-seeds{seeds}-{stamp}.json"
        path.write_text(json.dumps(merged, indent=1) + "\n")
        markdown.write_section(args.markdown, _section(merged), render(merged, path))
        log(f"merged: {path}")
        return 0
    tp = PROFILES[args.profile]
    case = tp.profile.cases[0]
    if args.seeds:
        case = replace(case, seeds=tuple(range(args.seeds)))
    if args.seed_list:
        case = replace(case, seeds=args.seed_list)
    if args.validation:
        case = replace(case, data=case.data.model_copy(update={"validation": args.validation}))
    contenders = tuple(args.methods.split(",")) if args.methods else CONTENDERS
    if unknown := set(contenders) - set(CONTENDERS) | set(args.options) - set(contenders):
        p.error(f"unknown or unselected contenders: {', '.join(sorted(unknown))}")
    tp = replace(
        tp,
        profile=replace(tp.profile, cases=(case,)),
        targets=args.targets or tp.targets,
        contenders=contenders,
        options=args.options,
        baselines=args.baselines,
    )
    weights = (args.weights or tp.weights).resolve()
    if not weights.is_file():
        raise SystemExit(
            f"bench: dense weights {weights} not found (bench/dense/resnet20-cifar10.yaml makes them)"
        )
    check_device(tp.profile)
    started = dt.datetime.now(dt.UTC)
    results: dict[str, Any] = {
        "format": FORMAT,
        "profile": tp.profile.name,
        "validation": args.validation,
        "weights": str(weights.relative_to(REPO_DIR) if weights.is_relative_to(REPO_DIR) else weights.name),
        "targets": list(tp.targets),
        "contenders": list(tp.contenders),
        "baselines": tp.baselines,
        "options": tp.options,
        **provenance("bench.trained", argv, started, torch.device(tp.profile.device)),
        "case": {
            "label": case.label,
            "model": case.model,
            "per_class": case.data.per_class,
            "finetune_epochs": case.finetune_epochs,
            "batch_size": case.batch_size,
            "finetune_lr": case.finetune_lr,
            "runs": [],
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = markdown.results_path(args.out, _section(results), started)
    warm_up(torch.device(tp.profile.device))
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix=".work-", dir=args.out))
    try:
        for seed in case.seeds:
            results["case"]["runs"].append(run_seed(case, seed, tp, weights, work / f"s{seed}"))
            results["wall_s"] = time.perf_counter() - t0
            path.write_text(json.dumps(results, indent=1) + "\n")
            markdown.write_section(args.markdown, _section(results), render(results, path))
            log(f"results so far: {path}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


# what every part of a merged table must share: the same benchmark, budget, targets and options
SAME = ("format", "profile", "validation", "weights", "targets", "contenders", "baselines", "options")


def merge(
    parts: list[dict[str, Any]], argv: list[str] | None = None, rerun: tuple[str, ...] = ()
) -> dict[str, Any]:
    """One results dict from runs of the same table over different seeds: their runs in seed order.
    Refuses parts that differ in anything but their seeds (``SAME``, the case's budget) or repeat a seed.
    The command lists every part's and the merge's; the date is the first part's, ``wall_s`` the sum.

    ``rerun``: contenders rerun on their own (with ``--methods C --no-baselines``, say at options
    chosen later): the parts that ran exactly these contenders and no baselines give their rows and
    options; every seed of the other parts must be among theirs; the other parts need agree only on the
    other contenders, and their rows of these are dropped."""
    swap = [p for p in parts if rerun and p["contenders"] == list(rerun) and not p["baselines"]]
    if rerun and not swap:
        raise SystemExit(f"bench: no part ran {', '.join(rerun)} alone (--methods ... --no-baselines)")
    base = [_without(p, rerun) for p in parts if not any(p is q for q in swap)]
    runs = _joined(base)
    if swap:
        _check_same(swap, keys=("format", "profile", "validation", "weights", "targets", "options"))
        new = {r["seed"]: r for r in _joined(swap)}
        if missing := sorted({r["seed"] for r in runs} - set(new)):
            raise SystemExit(f"bench: the rerun of {', '.join(rerun)} lacks seeds {missing}")
        for run in runs:
            for t, t_new in zip(run["targets"], new[run["seed"]]["targets"], strict=True):
                t["rows"] = {k: v for k, v in t["rows"].items() if k not in rerun} | t_new["rows"]
    first = base[0]
    merge_cmd = "python -m bench.trained " + shlex.join(sys.argv[1:] if argv is None else argv)
    return first | {
        "options": first["options"] | (swap[0]["options"] if swap else {}),
        "contenders": [*first["contenders"], *rerun],
        "command": " ; ".join([*(p["command"] for p in parts), merge_cmd]),
        "date": min(p["date"] for p in parts),
        "wall_s": sum(p.get("wall_s", 0.0) for p in parts),
        "machines": [p["machine"] for p in parts],
        "case": first["case"] | {"runs": runs},
    }


def _without(part: dict[str, Any], rerun: tuple[str, ...]) -> dict[str, Any]:
    """A part as if it had not run the ``rerun`` contenders (so that parts agree on the others alone)."""
    return part | {
        "contenders": [c for c in part["contenders"] if c not in rerun],
        "options": {c: o for c, o in part.get("options", {}).items() if c not in rerun},
    }


def _check_same(parts: list[dict[str, Any]], keys: tuple[str, ...] = ()) -> None:
    """Refuse parts that differ in ``keys`` (default ``SAME``) or in the case's budget."""
    first = parts[0]
    budget = {k: v for k, v in first["case"].items() if k != "runs"}
    for part in parts[1:]:
        differ = [k for k in keys or SAME if part.get(k) != first.get(k)]
        if {k: v for k, v in part["case"].items() if k != "runs"} != budget:
            differ.append("case")
        if differ:
            raise SystemExit(f"bench: cannot merge runs that differ in {', '.join(differ)}")


def _joined(parts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The parts' runs in seed order (copies), after checking the parts are of one table."""
    _check_same(parts)
    runs = sorted((copy.deepcopy(r) for p in parts for r in p["case"]["runs"]), key=lambda r: r["seed"])
    seeds = [r["seed"] for r in runs]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"bench: a seed is in more than one file ({seeds})")
    return runs


def _section(results: dict[str, Any]) -> str:
    return f"{'val-' if results.get('validation') else ''}trained-{results['profile']}"


if __name__ == "__main__":
    sys.exit(main())
