"""``python -m bench.compare --method s2h --profile cpu``: a paper method beside ``magnitude`` and Torch-Pruning.

Per data set, seed and MAC target, from one dense training (the engine, ``profile.cases``' settings):

- ``magnitude`` with KD from the dense model (``runner.run`` from the dense weights, the case's
  fine-tune epochs and LR);
- Torch-Pruning's own pruner (``bench.peer``: bisected to the target, fine-tuned by the plain loop for
  the same epochs, no KD);
- the method through ``runner.run``, at the same total epochs: a one-stage method (S2H) trains from the
  same initial weights as the dense model for dense + fine-tune epochs at the dense LR, with no dense
  teacher (it never had one), beside ``magnitude`` at the initial weights trained as long; a method that
  prunes a trained network starts from the dense weights (``s2h-dense``: S2H from the dense weights with
  KD from them, beside ``magnitude`` + KD).

Every contender's result lies in ``[target - 0.02, target]`` of the dense MACs (``budget.TARGET_BAND``),
so the rows compare accuracy at (nearly) equal MACs.

Every model is measured the same way (``bench.measure``: top-1, MACs, params). The method's seconds per
epoch stand beside the dense model's, from the same run. Results go to ``bench/results/compare-<method>-
<profile>-<time>.json`` (rewritten after every seed, so a stopped run keeps what it finished) and to
the ``compare-<method>-<profile>`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from pruning_core.artifacts.export import load_pruned
from pruning_core.graph.macs import count_macs
from pruning_core.jobs.runner import run
from pruning_core.spec import DataSpec, JobSpec, KDSpec, Schedule

from . import markdown
from .measure import measure_row
from .profiles import PROFILES, REPO_DIR, Case, Profile, _cifar, with_overrides
from .run import (
    EchoReporter,
    check_device,
    job_spec,
    log,
    peer_stage,
    provenance,
    resolve_data,
    save_weights,
    setup,
    train_dense,
    warm_up,
)

FORMAT = "pruning-core/bench-compare-v2"  # v2: several methods per table ("contenders")


@dataclass(frozen=True)
class Contender:
    """How a paper method is run in the comparison."""

    one_stage: bool  # trains from the initial weights for dense + fine-tune epochs (no teacher)
    targets: dict[str, tuple[float, ...]]  # profile -> remaining MAC ratios
    options: dict[str, Any]
    search_share: float | None = None  # a search phase takes this share of the fine-tune epochs
    models: tuple[str, ...] = ()  # run every case with each of these models too (beside the case's own)
    method: str = ""  # the registered method, where the contender's name is a variant (psap-scratch)
    kd: bool = False  # the job's KD from the dense model (as magnitude's)
    prune_at_init: bool = False  # also `magnitude` at the initial weights, trained all the epochs
    cost: bool = False  # a table of what each contender's training computed (forward MACs, seconds)


# The comparison's own CPU profile: every contender at two targets and three seeds on both data sets.
# The CIFAR-10 subset is smaller and shorter than `bench.run`'s (2,000 train / 1,000 test images, 10 +
# 5 epochs) so that the whole comparison fits about an hour on 2 CPU cores: S2H's 15 epochs cost about
# three dense epochs each.
COMPARE_CPU = Profile(
    name="cpu",
    device="cpu",
    cases=(
        Case("digits", DataSpec(name="digits"), "resnet20", 30, 15, 64, 0.05, 0.01, (0, 1, 2)),
        Case("cifar10-jpeg subset", _cifar(200, 100), "resnet20", 10, 5, 64, 0.05, 0.01, (0, 1, 2)),
    ),
)


def profile_named(name: str) -> Profile:
    return COMPARE_CPU if name == "cpu" else PROFILES[name]


CONTENDERS: dict[str, Contender] = {
    # S2H both ways: from scratch in one stage (the paper), beside magnitude after the dense training
    # and magnitude at the initial weights, all at the same total epochs; and from the dense weights with
    # KD from them (a user with a trained model), beside magnitude + KD.
    "s2h": Contender(
        one_stage=True,
        targets={"smoke": (0.5,), "cpu": (0.35, 0.55), "gpu": (0.47,)},
        options={},
        prune_at_init=True,
    ),
    "s2h-dense": Contender(
        one_stage=False,
        targets={"smoke": (0.5,), "cpu": (0.35, 0.55), "gpu": (0.47,)},
        # Defaults. On Table A's validation split gap_weight 4 closed the hard network's gap to the soft
        # one and gave 78.6 against 77.2 at 0.3, but 84.5 against 86.1 at 0.5 (mean 81.55 against 81.65).
        options={},
        method="s2h",
        kd=True,
    ),
    # At these schedules the search gets 8 (digits) or 2 (CIFAR) epochs of about 11 and 16 architecture
    # steps: the official Adam LR (1e-3, for 600 search epochs) leaves the logits at their random start,
    # and the found network cannot be trained from random initialisation in 7 or 3 epochs; so a faster
    # architecture LR and the found network started from the searched supernet's weights, the paper's
    # `w/ Init` (the search starts from the dense weights, channels sorted: `sort_channels`, candidates
    # padded: `align`). Chosen on Table A's validation split (BENCHMARKS.md): `init: supernet` 86.1 / 83.3
    # at 0.5 / 0.3 against 85.4 / 82.3 from the teacher's channels; a 2-epoch search 86.8 / 81.9, no
    # depth search 85.4 / 80.5.
    "tas": Contender(
        one_stage=False,
        targets={"smoke": (0.47,), "cpu": (0.47,), "gpu": (0.47,)},
        options={"arch_lr": 0.05, "init": "supernet"},
        search_share=0.5,
        models=("resnet56",),
    ),
    # PSAP prunes during training: from the dense weights over the fine-tune epochs, and from scratch
    # (the paper's strongest claim) over the dense + fine-tune epochs.
    "psap": Contender(
        one_stage=False,
        targets={"smoke": (0.5,), "cpu": (0.5, 0.25), "gpu": (0.5, 0.25)},
        options={},
        kd=True,
    ),
    # EPI trains from the initial weights and prunes when its indicator fires: beside magnitude after
    # the whole dense training and magnitude at the initial weights (the same allocator), all with the
    # same total epochs, and what their training cost.
    "epi": Contender(
        one_stage=True,
        targets={"smoke": (0.5,), "cpu": (0.5,), "gpu": (0.5,)},
        options={},
        prune_at_init=True,
        cost=True,
    ),
    # From scratch, beside `magnitude` at the initial weights with the same total epochs (as EPI's).
    "psap-scratch": Contender(
        one_stage=True,
        targets={"smoke": (0.5,), "cpu": (0.5, 0.25), "gpu": (0.5, 0.25)},
        options={},
        method="psap",
        prune_at_init=True,
    ),
}


def method_spec(
    method: str, s: Any, target: float, weights: Path | None, options: dict[str, Any] | None = None
) -> JobSpec:
    """The method's job: one-stage from the initial weights, or from the dense weights. ``options``
    override the contender's."""
    c, case = CONTENDERS[method], s.case
    base = job_spec(case, s.spec.data, s.seed, replace(s.profile, target=target), weights).model_dump(
        mode="json"
    )
    base["method"] = {"name": c.method or method, **c.options, **(options or {})}
    if c.kd:
        base["kd"] = KDSpec(enabled=True).model_dump(mode="json")
    if c.one_stage:
        base["model"]["weights"] = None
        base["schedule"] = whole_schedule(case)
    elif c.search_share is not None:  # search + training of the found network = the fine-tune epochs
        share = max(1, round(case.finetune_epochs * c.search_share))
        search = (options or {}).get("search_epochs", share)  # an option's own share wins
        base["method"]["search_epochs"] = search
        base["schedule"]["epochs"] = max(1, case.finetune_epochs - search)
    if own := base["method"].get("finetune_epochs", 0):  # the method's own fine-tuning is in the budget
        budget = base["schedule"]["epochs"]  # one stage: the dense + fine-tune epochs; else fine-tune
        if own >= budget:
            raise ValueError(f"{method}: finetune_epochs {own} leaves no epoch of the {budget}")
        base["schedule"]["epochs"] = budget - own
    return JobSpec.model_validate(base)


def run_target(
    s: Any,
    weights: Path,
    dense_macs: int,
    methods: list[str],
    target: float,
    options: dict[str, dict[str, Any]],
    dense_cost: dict[str, float],
) -> dict[str, Any]:
    """``magnitude`` + KD, the peer, ``magnitude`` at the initial weights (when a one-stage contender is
    among ``methods``) and each method at one target; their rows."""
    label = f"{s.case.label} seed {s.seed} target {target:g}"
    work = s.work / f"t{target:g}"
    log(f"{label}: magnitude + KD")
    mag_spec = job_spec(s.case, s.spec.data, s.seed, replace(s.profile, target=target), weights)
    mag_spec = mag_spec.model_copy(update={"kd": KDSpec(enabled=True)})
    mag = run(mag_spec, work / "magnitude", EchoReporter())
    log(f"{label}: Torch-Pruning peer")
    peer, _ = peer_stage(replace(s, profile=replace(s.profile, target=target)), weights, dense_macs)
    early = None
    if any(CONTENDERS[m].prune_at_init for m in methods):
        log(f"{label}: magnitude at the initial weights")
        early = run(at_init_spec(s, target), work / "prune-at-init", EchoReporter())
    results = {}
    for method in methods:
        log(f"{label}: {method}")
        spec = method_spec(method, s, target, weights, options.get(method))
        t0 = time.perf_counter()
        results[method] = (run(spec, work / method, EchoReporter()), time.perf_counter() - t0)
    models = {"magnitude": load_pruned(mag.workdir), "peer": peer.model}
    models |= {m: load_pruned(res.workdir) for m, (res, _) in results.items()}
    if early is not None:
        models["prune-at-init"] = load_pruned(early.workdir)
    rows = {
        k: measure_row(m, s.ds.test, s.example, s.device, s.profile, latency=False) for k, m in models.items()
    }
    for row in rows.values():
        row["macs_ratio"] = row["macs"] / dense_macs
    for method, (res, wall) in results.items():
        rows[method].update(_method_figures(res, wall))
    # training cost, forward MACs and seconds of the training steps: magnitude's includes the dense
    # training it starts from; the peer's plain loop is not metered
    rows["magnitude"].update(training_cost(mag.report.history, dense_cost))
    if early is not None:
        rows["prune-at-init"].update(training_cost(early.report.history))
    return {"target": target, "rows": rows}


def _method_figures(res: Any, wall: float) -> dict[str, Any]:
    """A method's run beyond its top-1: its first phase's seconds per epoch, what it found, its cost."""
    trained = [r for r in res.report.history if r.phase != "dense"]
    first = [r for r in trained if r.phase == trained[0].phase] if trained else []
    return {
        "epoch_s": statistics.fmean(r.wall_s for r in first),  # the search (or only) phase
        "epoch_cpu_s": statistics.fmean(r.cpu_s or 0.0 for r in first),
        "phase": trained[0].phase if trained else None,
        "wall_s": wall,
        "soft_top1": trained[-1].views.get("soft") if trained else None,
        "blocks": res.report.blocks,
        "trigger_epoch": res.report.method_details.get("trigger_epoch"),
        "trigger": res.report.method_details.get("trigger"),
        **training_cost(res.report.history),
    }


def training_cost(history: list[Any], before: dict[str, float] | None = None) -> dict[str, float]:
    """Forward MACs and seconds that an engine run's training epochs computed (plus ``before``)."""
    macs = sum(r.train_macs or 0 for r in history) + (before or {}).get("train_macs", 0)
    wall = sum(r.wall_s for r in history) + (before or {}).get("train_wall_s", 0.0)
    return {"train_macs": macs, "train_wall_s": wall}


def at_init_spec(s: Any, target: float) -> JobSpec:
    """``magnitude`` at the initial weights (no dense training, no teacher), then trained for the dense
    + fine-tune epochs at the dense LR: pruning at epoch 0 with the same allocator."""
    case = s.case
    base = job_spec(case, s.spec.data, s.seed, replace(s.profile, target=target), None).model_dump(
        mode="json"
    )
    base["schedule"] = whole_schedule(case)
    return JobSpec.model_validate(base)


def whole_schedule(case: Case) -> dict[str, Any]:
    """Training from the initial weights: the dense + fine-tune epochs at the dense LR (as a spec dict)."""
    epochs = case.dense_epochs + case.finetune_epochs
    return Schedule(epochs=epochs, batch_size=case.batch_size, lr=case.lr).model_dump(mode="json")


def run_seed(
    case: Case,
    seed: int,
    profile: Profile,
    methods: list[str],
    work: Path,
    options: dict[str, dict[str, Any]],
    targets: tuple[float, ...] | None = None,
) -> dict[str, Any]:
    s, model = setup(case, resolve_data(case.data), seed, profile, work)
    log(f"{case.label} seed {seed}: dense training ({case.dense_epochs} epochs)")
    fitted = train_dense(model, s)
    weights = save_weights(fitted.model, work / "dense.safetensors")
    dense = measure_row(fitted.model, s.ds.test, s.example, s.device, profile, latency=False)
    dense_macs = count_macs(fitted.model.cpu(), s.example)
    dense["epoch_s"] = statistics.fmean(r["wall_s"] for r in fitted.history)
    dense["epoch_cpu_s"] = statistics.fmean(r.get("cpu_s") or 0.0 for r in fitted.history)
    dense["train_macs"] = sum(r["train_macs"] for r in fitted.history)
    dense["train_wall_s"] = sum(r["wall_s"] for r in fitted.history)
    targets = [
        run_target(s, weights, dense_macs, methods, t, options, dense)
        for t in targets or CONTENDERS[methods[0]].targets[profile.name]
    ]
    return {"seed": seed, "dense": dense, "targets": targets, "train_images": len(s.ds.train)}


def contenders_of(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Method -> how it ran (one_stage, options, search_share, kd, cost), from a results file of one
    method (``bench-compare-v1`` before several methods shared a table) or of several."""
    if "contenders" in results:
        return results["contenders"]
    keys = ("one_stage", "options", "search_share", "kd", "cost")
    return {results["method"]: {k: results.get(k) for k in keys}}


def _how(method: str, c: dict[str, Any]) -> str:
    if c["one_stage"]:
        return (
            f"`{method}` trains from the initial weights (one stage, no teacher) for as many epochs as dense "
            "training and fine-tuning together"
        )
    return (
        f"`{method}` starts from the dense model's weights and trains as many epochs as `magnitude` fine-tunes"
        + (
            " (a search phase, then the found network, with the dense model as its teacher)"
            if c.get("search_share", 0.5)
            else ""
        )
        + (", with KD from the dense model" if c.get("kd") else "")
    )


def render(results: dict[str, Any], source: Path) -> str:
    contenders, profile = contenders_of(results), results["profile"]
    methods = list(contenders)
    named = ", ".join(f"`{x}`" for x in methods)
    m = results["machine"]
    lines = [
        f"## {named} beside `magnitude` and Torch-Pruning ({profile} profile)",
        "",
        f"`{results['command']}`, run {results['date']}, {results['wall_s'] / 60:.1f} min; results "
        f"`{source.relative_to(REPO_DIR) if source.is_relative_to(REPO_DIR) else source.name}`.  ",
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads); torch {m['torch']}, "
        f"torch-pruning {m['torch_pruning']}; device `{m['device']}`{' (' + m['gpu'] + ')' if m['gpu'] else ''}.",
        "",
        "; ".join(_how(x, c) for x, c in contenders.items())
        + "; `magnitude` fine-tunes the dense weights with KD from the dense model; the peer is fine-tuned by "
        "a plain loop without KD. Top-1: mean ± std over seeds (per seed in brackets).",
        "",
    ]
    if results.get("validation"):
        lines += [
            f"**Validation split**: top-1 is measured on the last {results['validation']} training images of "
            "each class, held out of training (`data.validation`); the test split was not read. For "
            "choosing options, not for comparing with the test figures.",
            "",
        ]
    for x, c in contenders.items():
        if c.get("options"):
            opts = ", ".join(f"`{k}: {json.dumps(v)}`" for k, v in c["options"].items())
            lines += [f"`{x}`'s options (beside the job's target and schedule): {opts}.", ""]
    cost = any(c.get("cost") for c in contenders.values())
    for case in results["cases"]:
        if case["runs"]:
            lines += _case_lines(case, methods, cost)
    return "\n".join(lines)


def _case_lines(case: dict[str, Any], methods: list[str], cost: bool) -> list[str]:
    """One case's table, the methods' trigger epochs and found blocks, and their time per epoch."""
    runs = case["runs"]
    lines = [
        f"### {case['label']} ({case['model']}, {runs[0]['train_images']:,} train images; dense "
        f"{case['dense_epochs']} + fine-tune {case['finetune_epochs']} epochs; seeds "
        f"{', '.join(str(r['seed']) for r in runs)})",
        "",
        "| Target | Method | Top-1 % | MACs ratio | Params |"
        + (" Training MACs (fwd) | x all-dense | Training s |" if cost else ""),
        "|---|---|---|---|---|" + ("---|---|---|" if cost else ""),
        f"| 1.0 | dense | {markdown.fmt_top1([r['dense']['top1'] for r in runs])} | 1.000 | "
        f"{markdown.fmt_count([r['dense']['params'] for r in runs])} |" + (" | | |" if cost else ""),
    ]
    labels = [
        ("magnitude", "`magnitude` + KD" + (", after the dense training" if cost else "")),
        ("prune-at-init", "`magnitude` at the initial weights"),
        ("peer", "Torch-Pruning `BasePruner`"),
    ] + [(x, f"`{x}`") for x in methods]
    notes: list[str] = []
    for i, target in enumerate(t["target"] for t in runs[0]["targets"]):
        done = [r for r in runs if len(r["targets"]) > i]
        for key, label in labels:
            if key not in done[0]["targets"][i]["rows"]:
                continue
            rows = [r["targets"][i]["rows"][key] for r in done]
            line = (
                f"| {target:g} | {label} | {markdown.fmt_top1([x['top1'] for x in rows])} | "
                f"{markdown.fmt_range([x['macs_ratio'] for x in rows])} | "
                f"{markdown.fmt_count([x['params'] for x in rows])} |"
            )
            lines.append(line + (_cost_cells(rows, done, case) if cost else ""))
        for x in methods:
            triggers = [r["targets"][i]["rows"][x].get("trigger_epoch") for r in done]
            if any(t is not None for t in triggers):
                how = [r["targets"][i]["rows"][x].get("trigger") for r in done]
                notes.append(
                    f"`{x}` at {target:g} pruned at the end of epoch "
                    + ", ".join(f"{t} ({h})" for t, h in zip(triggers, how, strict=True))
                    + " (per seed)."
                )
    lines += ["", *notes] if notes else []
    for x in methods:
        blocks = [t["rows"][x].get("blocks") for r in runs for t in r["targets"]]
        if any(b and any(v[0] != v[1] for v in b.values()) for b in blocks):  # some stage lost blocks
            found = "; ".join(", ".join(f"{k} {v[1]}/{v[0]}" for k, v in b.items()) for b in blocks if b)
            lines += ["", f"Blocks `{x}` kept per stage (kept/dense), per seed and target: {found}."]
    if cost:
        lines += [
            "",
            "Training MACs: the forward MACs every training step computed (a backward costs about twice as "
            "much again; `magnitude`'s includes its dense training, not its KD teacher's forwards); "
            "`x all-dense`: against training the dense model for all the epochs (dense + fine-tune), the "
            "report's `training_macs.ratio`; training s: the training steps' seconds.",
        ]
    lines.append("")
    for x in methods:
        lines += _epoch_time_lines(runs, x)
    return lines


def _cost_cells(rows: list[dict[str, Any]], done: list[dict[str, Any]], case: dict[str, Any]) -> str:
    metered = [(x, r) for x, r in zip(rows, done, strict=True) if x.get("train_macs")]
    if not metered:
        return " not metered | | |"
    macs = statistics.fmean(x["train_macs"] for x, _ in metered)
    dense = [x["train_macs"] / _all_dense(r, case) for x, r in metered]
    walls = statistics.fmean(x["train_wall_s"] for x, _ in metered)
    return f" {macs / 1e9:,.0f} G | {markdown.fmt_range(dense)} | {walls:,.0f} |"


def _epoch_time_lines(runs: list[dict[str, Any]], method: str) -> list[str]:
    """The method's seconds per epoch of its first phase against the dense training's, wall and CPU."""
    per_epoch = [t["rows"][method]["epoch_s"] for r in runs for t in r["targets"]]
    dense_epoch = [r["dense"]["epoch_s"] for r in runs]
    phase = runs[0]["targets"][0]["rows"][method].get("phase") or method
    ratio = statistics.fmean(per_epoch) / statistics.fmean(dense_epoch)
    lines = [
        f"Time per epoch of `{method}`'s `{phase}` phase: {statistics.fmean(per_epoch):.2f} s, dense training "
        f"{statistics.fmean(dense_epoch):.2f} s: **{ratio:.2f}x**; "
        f"per seed {', '.join(f'{x:.2f}x' for x in _seed_ratios(runs, method))} "
        "(the training steps of an epoch, as its record's `wall_s` measures them: the evaluation at the epoch's "
        "end is not in it).",
    ]
    if all(r["dense"].get("epoch_cpu_s") for r in runs):  # results from before cpu_s have none
        cpu = _seed_ratios(runs, method, "epoch_cpu_s")
        lines.append(
            f"In CPU time (`cpu_s`: the process's CPU seconds, which do not grow while other work holds the "
            f"core): **{statistics.fmean(cpu):.2f}x**; per seed {', '.join(f'{x:.2f}x' for x in cpu)}."
        )
    return [*lines, ""]


def _cases(profile: Profile, contenders: list[Contender]) -> list[Case]:
    """The profile's cases, then each again with every extra model of the contenders."""
    cases = list(profile.cases)
    models = dict.fromkeys(m for c in contenders for m in c.models)
    return cases + [replace(c, model=m) for m in models for c in cases if c.model != m]


def section_of(results: dict[str, Any]) -> str:
    """BENCHMARKS.md's section of a results file: ``[val-]compare-<method[+method...]>-<profile>``."""
    prefix = "val-" if results.get("validation") else ""
    return f"{prefix}compare-{results['method']}-{results['profile']}"


def _methods(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if bad := [n for n in names if n not in CONTENDERS]:
        raise argparse.ArgumentTypeError(
            f"unknown {', '.join(bad)}; choose from {', '.join(sorted(CONTENDERS))}"
        )
    return names


def _all_dense(run: dict[str, Any], case: dict[str, Any]) -> float:
    """Forward MACs of training the dense model for every epoch of the comparison (dense + fine-tune)."""
    per_epoch = run["dense"]["train_macs"] / case["dense_epochs"]
    return per_epoch * (case["dense_epochs"] + case["finetune_epochs"])


def _seed_ratios(runs: list[dict[str, Any]], method: str, key: str = "epoch_s") -> list[float]:
    """Per seed: the method's mean seconds per epoch over its targets / the dense model's (``key``:
    ``epoch_s`` wall-clock, ``epoch_cpu_s`` CPU)."""
    return [statistics.fmean(t["rows"][method][key] for t in r["targets"]) / r["dense"][key] for r in runs]


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(t) for t in text.split(",") if t.strip())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n")[0])
    p.add_argument(
        "--method",
        type=_methods,
        help=f"the method, or several comma-separated sharing one table, of {', '.join(sorted(CONTENDERS))} "
        "(required unless --render)",
    )
    p.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    p.add_argument("--seeds", type=int, help="run seeds 0..N-1 instead of the profile's")
    p.add_argument(
        "--options",
        type=json.loads,
        default={},
        help="JSON: method options over the contender's own; with several methods, {method: options}",
    )
    p.add_argument("--only", help="just the cases whose label starts with this")
    p.add_argument(
        "--targets", type=_floats, help="comma-separated MAC ratios instead of the contender's (0.25,0.5)"
    )
    p.add_argument(
        "--validation",
        type=int,
        metavar="N",
        help="choose options: hold out the last N training images of each class and measure on them "
        "(data.validation); the test split is never read. Results and section are prefixed val-",
    )
    markdown.add_output_args(p)
    args = p.parse_args(argv)
    if args.render:
        markdown.render_file(args, section_of, render)
        return 0
    if not args.method:
        p.error("--method is required (unless --render)")
    profile = with_overrides(profile_named(args.profile), seeds=args.seeds, only=args.only)
    if args.validation:
        profile = replace(
            profile,
            cases=tuple(
                replace(c, data=c.data.model_copy(update={"validation": args.validation}))
                for c in profile.cases
            ),
        )
    check_device(profile)
    methods = args.method
    options = args.options if len(methods) > 1 else {methods[0]: args.options}
    if unknown := set(options) - set(methods):
        p.error(f"--options names methods not compared: {', '.join(sorted(unknown))}")
    args.out.mkdir(parents=True, exist_ok=True)
    started = dt.datetime.now(dt.UTC)
    results: dict[str, Any] = {
        "format": FORMAT,
        "method": "+".join(methods),
        "contenders": {
            x: {
                "one_stage": CONTENDERS[x].one_stage,
                "options": {**CONTENDERS[x].options, **options.get(x, {})},
                "search_share": CONTENDERS[x].search_share,
                "kd": CONTENDERS[x].kd,
                "cost": CONTENDERS[x].cost,
            }
            for x in methods
        },
        "profile": profile.name,
        "validation": args.validation,
        **provenance("bench.compare", argv, started, torch.device(profile.device)),
        "cases": [],
    }
    section = section_of(results)
    path = markdown.results_path(args.out, section, started)
    warm_up(torch.device(profile.device))
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix=".work-", dir=args.out))
    try:
        for case in _cases(profile, [CONTENDERS[x] for x in methods]):
            entry = {
                "label": case.label,
                "model": case.model,
                "dense_epochs": case.dense_epochs,
                "finetune_epochs": case.finetune_epochs,
                "runs": [],
            }
            results["cases"].append(entry)
            for seed in case.seeds:
                entry["runs"].append(
                    run_seed(
                        case,
                        seed,
                        profile,
                        methods,
                        work / f"{case.label}-{case.model}-s{seed}".replace(" ", "_"),
                        options,
                        args.targets,
                    )
                )
                results["wall_s"] = time.perf_counter() - t0
                path.write_text(json.dumps(results, indent=1) + "\n")
                markdown.write_section(args.markdown, section, render(results, path))
                log(f"results so far: {path}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"done in {(time.perf_counter() - t0) / 60:.1f} min; markdown: {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
