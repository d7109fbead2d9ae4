"""``python -m bench.document``: BENCHMARKS.md regenerated from the committed results JSON.

Which results file feeds which section is declared in ``MANIFEST`` (no "newest file wins"); each section
is rendered by its benchmark's own ``render`` (``bench.trained``, ``bench.compare``), between the same
``<!-- bench:<name> -->`` markers that benchmark's ``--markdown`` writes, and followed by its hand-written
reading, ``bench/notes/<name>.md``, where there is one. The summary at the top is computed from Table A's
and Table B's files. Sections whose results were never committed are listed under "Not yet rerun" with
their command and the commit where their last figures can be read.

``--check`` writes nothing and exits 1 when BENCHMARKS.md differs from what the manifest regenerates.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import compare, markdown, trained
from .profiles import BENCH_DIR, REPO_DIR, RESULTS_DIR

NOTES_DIR = BENCH_DIR / "notes"
COMPARE_FORMAT = "pruning-core/bench-compare-"  # v1 and v2
JOB_REPORTS = "trained-seed-from-job-reports-v1"
READS = "<!-- reads:"  # a note's first line: the results files its reading describes  # a seed assembled by hand from the jobs' report.json

# The commit whose BENCHMARKS.md holds the last figures of the sections listed as "Not yet rerun".
LAST_FIGURES_AT = "9d3b34c"


@dataclass(frozen=True)
class Section:
    """One generated section: its marker name, how it is rendered and the results files it shows."""

    name: str  # the marker name, as the benchmark's own --markdown writes it
    kind: str  # a key of RENDERERS
    results: tuple[str, ...]  # files under bench/results, in the order shown
    title: str = ""  # a heading above the rendered tables, where the renderer gives none


# Table A: 3 seeds with the options chosen on the validation split, run one seed at a time (`--seed-list`),
# `s2h` rerun alone on every seed at the options chosen after seeds 0 and 1 ran, all joined by
# `bench.trained --merge ... --replace s2h-dense` (the parts are committed beside the merged file).
TABLE_A = Section("trained-cpu", "table-a", ("trained-cpu-seeds0-1-2-2026-12-07T063243Z.json",))
# Table B: one `bench.compare --method s2h,psap-scratch,epi` run, every method against the same dense
# models and `magnitude` rows at the same targets (it replaced three separate runs, in git history).
TABLE_B = Section(
    "table-b-cpu",
    "table-b",
    ("compare-s2h+psap-scratch+epi-cpu-2026-12-07T144450Z.json",),
    title='## Table B: "train a small network from scratch" (cpu profile, CIFAR-10 subset)',
)
MANIFEST: tuple[Section, ...] = (
    TABLE_A,
    TABLE_B,
    # Table B's s2h row taken apart: its widths against its training (``bench.scratch``).
    Section("scratch-s2h-cpu", "scratch", ("scratch-s2h-cpu-2026-12-07T180721Z.json",)),
    Section(
        "val-trained-cpu",
        "val-trained",
        (
            "val-trained-cpu-2026-12-06T220821Z.json",
            "val-trained-cpu-2026-12-06T233832Z.json",
            "val-trained-cpu-2026-12-06T235632Z.json",
            "val-trained-cpu-2026-12-07T001222Z.json",
            "val-trained-cpu-2026-12-07T001223Z.json",
            "val-trained-cpu-2026-12-07T002532Z.json",
            "val-trained-cpu-2026-12-07T015233Z.json",
            "val-trained-cpu-2026-12-07T022849Z.json",
            "val-trained-cpu-2026-12-07T022850Z.json",
            "val-trained-cpu-2026-12-07T052316Z-fe2.json",
            "val-trained-cpu-2026-12-07T052316Z-fe3.json",
            "val-trained-cpu-2026-12-07T054632Z-fe4.json",
            "val-trained-cpu-2026-12-07T054632Z-fe5.json",
            "val-trained-cpu-2026-12-07T053420Z-ht1.json",
            "val-trained-cpu-2026-12-07T053420Z-ht1fe3.json",
            "val-trained-cpu-2026-12-07T154716Z-fixed.json",
            "val-trained-cpu-2026-12-07T155347Z-step.json",
        ),
        title="## Options chosen on the validation split: Table A's methods",
    ),
    Section(
        "val-compare-psap-cpu",
        "val-compare",
        (
            "val-compare-psap-scratch-cpu-2026-12-06T182002Z.json",
            "val-compare-psap-scratch-cpu-2026-12-06T182519Z.json",
            "val-compare-psap-scratch-cpu-2026-12-06T183107Z.json",
            "val-compare-psap-scratch-cpu-2026-12-06T195028Z.json",
            "val-compare-psap-scratch-cpu-2026-12-06T195516Z.json",
            "val-compare-psap-scratch-cpu-2026-12-06T200104Z.json",
            "val-psap-cifar-seed0-2026-12-06.json",
        ),
        title="## Options chosen on the validation split: `psap`'s `ramp` (CIFAR-10 subset)",
    ),
    Section(
        "val-compare-s2h-cpu",
        "val-compare",
        ("val-compare-s2h-cpu-2026-12-07T191803Z.json", "val-compare-s2h-cpu-2026-12-07T193214Z.json"),
        title="## Options chosen on the validation split: `s2h` from scratch (CIFAR-10 subset)",
    ),
    Section("compare-tas-cpu", "compare", ("compare-tas-cpu-2026-12-07T120652Z.json",)),
    Section("compare-psap-cpu", "compare", ("compare-psap-cpu-2026-12-06T200428Z.json",)),
    Section("compare-s2h-dense-cpu", "compare", ("compare-s2h-dense-cpu-2026-12-06T185951Z.json",)),
    Section("cpu", "run", ("cpu-2026-12-07T160045Z.json",)),
    Section("throughput-cpu", "throughput", ("throughput-cpu-2026-12-07T063639Z.json",)),
    Section("service", "service", ("service-2026-12-07T064154Z.json",)),
    Section("speed-cpu", "speed", ("speed-cpu-2026-12-07T175300Z.json",)),
    Section("speed-cpu-1thread", "speed", ("speed-cpu-1thread-2026-12-07T175933Z.json",)),
    Section("speed-cpu-cifar", "speed", ("speed-cpu-cifar-2026-12-07T064701Z.json",)),
    Section("allocation-cpu-check", "allocation", ("allocation-cpu-check-2026-12-07T180547Z.json",)),
    Section(
        "distributed-cpu",
        "distributed",
        ("distributed-cpu-2026-12-07T064129Z.json", "distributed-cpu-2026-12-07T064142Z.json"),
    ),
)

# (marker name, what it measured, its command as its section's header gave it, when it ran)
NOT_RERUN: tuple[tuple[str, str, str, str], ...] = (
    (
        "gpu",
        "the same on a GPU (a short check)",
        "python -m bench.run --profile gpu --seeds 1 --dense-epochs 2 --finetune-epochs 1",
        "2026-11-27",
    ),
    (
        "speed-cuda",
        "the same on CUDA",
        "python -m bench.speed --device cuda --batches 256 --extra-steps 16 --repeats 9 --min-sample-ms 25 "
        "--section speed-cuda",
        "2026-11-28",
    ),
    (
        "speed-cuda-latency",
        "latency allocation on CUDA",
        "python -m bench.speed --device cuda --models tv:resnet50 tv:mobilenet_v2 tv:efficientnet_b0 tv:resnet18 "
        "--batches 256 --repeats 5 --min-sample-ms 25 --section speed-cuda-latency",
        "2026-11-28",
    ),
    (
        "speed-cuda-latency-b",
        "the same, EfficientNet-B0 at 0.3",
        "python -m bench.speed --device cuda --models tv:efficientnet_b0 --ratios 0.3 --batches 256 --repeats 5 "
        "--min-sample-ms 25 --section speed-cuda-latency-b",
        "2026-11-28",
    ),
    (
        "speed-cuda-latency-c",
        "the same, ResNet-18",
        "python -m bench.speed --device cuda --models tv:resnet18 --batches 256 --repeats 5 --min-sample-ms 25 "
        "--section speed-cuda-latency-c",
        "2026-11-28",
    ),
    (
        "speed-cuda-shares",
        "proportional latency allocation on CUDA",
        "python -m bench.speed --device cuda --models tv:mobilenet_v2 tv:efficientnet_b0 tv:resnet18 tv:resnet50 "
        "--forms folded-cl --no-any-width --batches 256 --repeats 5 --min-sample-ms 25 --section speed-cuda-shares",
        "2026-11-28",
    ),
    (
        "allocation-cuda",
        "`macs` against `latency` allocation, trained and pruned both ways, CUDA",
        "python -m bench.allocation --device cuda --threads 8 --workers 12 --batch 256 --latency-s 10 --seeds 0 1 "
        "--section allocation-cuda",
        "2026-11-28",
    ),
)

INTRO = """\
# Benchmarks

Generated by `python -m bench.document` (`make benchmarks-md`) from the results files under
`bench/results/` that `bench/document.py`'s manifest names: do not edit it by hand (the readings are
`bench/notes/<section>.md`). Each section shows the current figures of one benchmark with the one-line
command that produced them, the machine and the date; a reader can rerun any table with that command.
Earlier runs are in git history.

- **Table A, "I have a trained model"** (`python -m bench.trained`): every method that can start from
  weights starts from one converged dense ResNet-20 (`bench/dense/resnet20-cifar10.safetensors`, 87.17 %
  on the 10,000 test images, trained by `bench/dense/resnet20-cifar10.yaml`) with one fine-tuning budget;
  top-1 on the whole CIFAR-10 test set.
- **Table B, "train a small network from scratch"** (`python -m bench.compare`): the one-stage methods
  (`s2h`, `psap-scratch`, `epi`) beside `magnitude` at the initial weights and dense-then-prune, at equal
  total epochs on a class-balanced CIFAR-10 subset, with each method's training cost.
- **Options chosen on the validation split**: the runs that fixed each method's options before the test
  runs, measured on training images held out of training (the test split not read).
- **The paper methods from the subset's dense weights** (`python -m bench.compare --method tas|psap|s2h-dense`).

How to read the tables:

- **Top-1**: percent; mean ± sample standard deviation over seeds, per-seed values in brackets; `(n=1)`
  is one seed, with no spread yet.
- **MACs** for every row, the Torch-Pruning peer's included, come from the one counter
  (`pruning_core.graph.macs.count_macs`: conv and linear multiply-accumulates per sample); every pruned row lies
  in `[target - 0.02, target]` of the dense MACs, so rows compare accuracy at (nearly) equal MACs.
- **Torch-Pruning `BasePruner`** (the peer; `GroupMagnitudeImportance(p=2)`, global pruning) takes a
  channel ratio, bisected until our counter gives the largest MACs <= the target; it is fine-tuned by a
  plain PyTorch loop without KD. `magnitude` scores channels with the same importance: the peer is a
  check that the engine reproduces the reference implementation, not an independent second method.
- **Training s / training MACs**: the training steps' seconds (evaluation excluded) and forward MACs
  (a backward costs about twice as much again).

Caveats: the CIFAR-10 data is the JPEG re-encoding (lossy); Table B and the paper-method tables train on a
small class-balanced subset for few epochs, so their absolute accuracies sit far below published CIFAR-10
figures: compare rows within a table, not with papers. The CPU is shared and noisy: seconds vary from run
to run; compare them within one table.
"""


# --- loading ---


def load(name: str) -> dict[str, Any]:
    return json.loads((RESULTS_DIR / name).read_text())


def shown(name: str) -> str:
    """A results file as the sections cite it (relative to the repository)."""
    return str((RESULTS_DIR / name).relative_to(REPO_DIR))


def table_a_results(section: Section) -> dict[str, Any]:
    """Table A's results: the ``bench.trained`` file, with any seed assembled from job reports added."""
    results = load(section.results[0])
    for name in section.results[1:]:
        results = with_job_reports(results, load(name))
    return results


def with_job_reports(results: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``results`` with a target that a stopped run left only in its jobs' reports (``extra``) added to
    its seed. The renderers index targets by position, so this holds for a one-seed file only."""
    if extra.get("format") != JOB_REPORTS:
        raise ValueError(f"not a {JOB_REPORTS} file: {extra.get('format')}")
    merged = copy.deepcopy(results)
    runs = merged["case"]["runs"]
    if [r["seed"] for r in runs] != [extra["seed"]]:
        raise ValueError("a job-report seed joins a one-seed Table A of the same seed only")
    runs[0]["targets"].append({"target": extra["target"], "rows": extra["rows"]})
    runs[0]["targets"].sort(key=lambda t: -t["target"])
    merged["targets"] = sorted({*merged["targets"], extra["target"]}, reverse=True)
    return merged


def cifar_only(results: dict[str, Any]) -> dict[str, Any]:
    """A ``bench.compare`` results dict with the CIFAR case(s) only, its training-cost columns shown where
    the rows hold them (runs before the ``cost`` flag recorded them without showing them)."""
    out = copy.deepcopy(results)
    out["cases"] = [c for c in out["cases"] if c["label"].startswith("cifar")]
    metered = any(
        row.get("train_macs")
        for c in out["cases"]
        for r in c["runs"]
        for t in r["targets"]
        for row in t["rows"].values()
    )
    if metered and "contenders" in out:
        for c in out["contenders"].values():
            c["cost"] = True
    elif metered:
        out["cost"] = True  # bench-compare-v1: the one method's flags at the top level
    return out


# --- the summary ---

SHORT_A = {
    "magnitude": "`magnitude` + KD",
    "peer": "Torch-Pruning (no KD)",
    "tas": "`tas`",
    "psap": "`psap`",
    "s2h-dense": "`s2h` from the weights",
}
SHORT_B = {
    "magnitude": "dense-then-prune (`magnitude` + KD)",
    "peer": "dense-then-prune (Torch-Pruning)",
    "prune-at-init": "`magnitude` at the initial weights",
}

Cell = dict[str, dict[int, dict[str, Any]]]  # method -> seed -> its row at one target


def cells(runs: list[dict[str, Any]], targets: list[float]) -> list[tuple[float, Cell]]:
    """Per target: every method's row per seed (``runs`` as both benchmarks write them)."""
    out = []
    for i, target in enumerate(targets):
        cell: Cell = {}
        for run in runs:
            if len(run["targets"]) > i:
                for key, row in run["targets"][i]["rows"].items():
                    cell.setdefault(key, {})[run["seed"]] = row
        if cell:
            out.append((target, cell))
    return out


def _mean_top1(per_seed: dict[int, dict[str, Any]]) -> float:
    return statistics.fmean(r["top1"] for r in per_seed.values())


def ranking(cell: Cell) -> list[str]:
    """The methods of one target, best mean top-1 first."""
    return sorted(cell, key=lambda k: -_mean_top1(cell[k]))


def lead(cell: Cell, first: str, second: str) -> str:
    """How far ``first`` is ahead of ``second``: the mean difference, and per seed where seeds pair."""
    gap = _mean_top1(cell[first]) - _mean_top1(cell[second])
    seeds = sorted(set(cell[first]) & set(cell[second]))
    diffs = [cell[first][s]["top1"] - cell[second][s]["top1"] for s in seeds]
    text = f"+{gap:.2f}"
    if len(diffs) > 1:
        text += f" (per seed {min(diffs):+.2f} to {max(diffs):+.2f}"
        text += "; not in every seed)" if min(diffs) <= 0 else ")"
    return text


def cost(per_seed: dict[int, dict[str, Any]]) -> str:
    """A method's training cost: mean seconds and forward MACs, where recorded."""
    rows = list(per_seed.values())
    walls = [r.get("train_wall_s") for r in rows]
    macs = [r.get("train_macs") for r in rows]
    parts = [f"{markdown.fmt_count(walls)} s" if all(walls) else "s not recorded"]
    if all(macs):
        parts.append(f"{markdown.fmt_count([m / 1e9 for m in macs])} G MACs")
    return ", ".join(parts)


def summary_row(target: float, cell: Cell, labels: dict[str, str], run: str = "") -> str:
    """One target's line: the winner, its top-1 and spread, its lead over the next, every method's cost."""
    order = ranking(cell)
    first = order[0]
    top1 = [r["top1"] for r in cell[first].values()]
    spread = markdown.fmt_top1(top1) + (": one seed, no spread yet" if len(top1) == 1 else "")
    ahead = f"{lead(cell, first, order[1])} over {labels[order[1]]}" if len(order) > 1 else "alone"
    each = "; ".join(f"{labels[k]} {_mean_top1(cell[k]):.2f}, {cost(cell[k])}" for k in order)
    prefix = f"| {run} " if run else ""
    return f"{prefix}| {target:g} | {labels[first]} | {spread} | {ahead} | {each} |"


def summary(table_a: dict[str, Any], table_b: list[dict[str, Any]]) -> str:
    """The answer a user looks for first, from Table A's results and Table B's (CIFAR) results files."""
    case = table_a["case"]
    seeds = len(case["runs"])
    lines = [
        "## Summary",
        "",
        f'**"I have a trained model"** (Table A: {case["model"]} at {case["runs"][0]["dense"]["top1"]:.2f} % '
        f"dense, {case['finetune_epochs']} fine-tuning epochs over {case['per_class']} images per class, "
        f"{seeds} seed{'s' if seeds > 1 else ''}; run {table_a['date'][:10]}). Wins: the best mean top-1; "
        "lead: its mean difference to the next, and the range of the differences paired by seed ('not in "
        "every seed' where a seed reverses the order); training s and MACs as the tables below count them.",
        "",
        "| Target | Wins | Top-1 % | Lead over the next | Each method: top-1 %, training s, training MACs (fwd) |",
        "|---|---|---|---|---|",
    ]
    lines += [summary_row(t, c, SHORT_A) for t, c in cells(case["runs"], table_a["targets"])]
    one = len(table_b) == 1  # one run: its rows share the dense models and seeds, no "Run" column
    where = (
        f"one run, {table_b[0]['date'][:10]}, every method from the same initial weights and dense models "
        "per seed"
        if one
        else "each run compared within itself, its own dense models and targets"
    )
    columns = (
        "Target | Wins | Top-1 % | Lead over the next | Each method: top-1 %, training s, training MACs (fwd)"
    )
    lines += [
        "",
        f'**"Train a small network from scratch"** (Table B: equal total epochs on the CIFAR-10 subset; {where}).',
        "",
        f"| {columns} |" if one else f"| Run | {columns} |",
        "|---|---|---|---|---|" if one else "|---|---|---|---|---|---|",
    ]
    for results in table_b:
        labels = SHORT_B | {m: f"`{m}`" for m in compare.contenders_of(results)}
        run = "" if one else f"`{results['method']}`, {results['date'][:10]}"
        for c in results["cases"]:
            for t, cell in cells(c["runs"], [t["target"] for t in c["runs"][0]["targets"]]):
                lines.append(summary_row(t, cell, labels, run))
    return "\n".join(lines) + "\n"


# --- sections ---


def demote(text: str) -> str:
    """Headings one level down (a benchmark's own section shown as a part of a larger one)."""
    return "\n".join("#" + line if line.startswith("##") else line for line in text.split("\n"))


def render_table_a(section: Section) -> str:
    results = table_a_results(section)
    body = trained.render(results, RESULTS_DIR / section.results[0])
    for name in section.results[1:]:
        extra = load(name)
        body += f"\nTarget {extra['target']:g}, seed {extra['seed']}: `{shown(name)}`. {extra['note']}\n"
    return body


def render_table_b(section: Section) -> str:
    """Table B's runs, CIFAR case only, each by ``bench.compare``'s render, between its own markers."""
    runs = [(name, load(name)) for name in section.results]
    dates = ", ".join(f"`{r['method']}` {r['date'][:10]} on {r['machine']['cpu']}" for _, r in runs)
    intro = (
        f"{len(runs)} separate `bench.compare` runs ({dates}): each table compares within its own run "
        "(its own dense models, targets and machine load), not across runs. Every method trains for the "
        "same total epochs (dense + fine-tune): the one-stage method and `magnitude` at the initial weights "
        "from the initial weights, dense-then-prune as dense training then pruning and fine-tuning. The "
        "same files hold a digits case too, where every method ends within about a point. One table for "
        "all three at the same targets: `python -m bench.compare --method s2h,psap-scratch,epi --targets "
        "0.5,0.3 --profile cpu --only cifar`."
        if len(runs) > 1
        else "Every method trains for the same total epochs (dense + fine-tune)."
    )
    parts = [section.title, "", intro, ""]
    for name, results in runs:
        body = demote(compare.render(cifar_only(results), RESULTS_DIR / name))
        parts.append(markdown._wrap(compare.section_of(results), body))
    return "\n".join(parts)


def _single_seed_cells(results: dict[str, Any]) -> list[tuple[float, Cell]]:
    """The validation runs' cells: ``bench.trained``'s case, or ``bench.compare``'s CIFAR case."""
    if "case" in results:
        return cells(results["case"]["runs"], results["targets"])
    (case,) = cifar_only(results)["cases"]
    return cells(case["runs"], [t["target"] for t in case["runs"][0]["targets"]])


def _given(results: dict[str, Any]) -> str:
    """The options a validation run was given on its command line (over that day's defaults)."""
    opts = results.get("options") or {}
    if results.get("format") == compare.FORMAT:  # bench.compare v2: each contender's options as it ran
        opts = {m: c["options"] for m, c in results["contenders"].items() if c["options"]}
    elif "case" not in results and opts:  # bench.compare v1: one method's options
        opts = {results["method"]: opts}
    return "; ".join(f"`{k}` `{json.dumps(v)}`" for k, v in opts.items()) or "that day's defaults"


def options_table(names: tuple[str, ...], labels: dict[str, str]) -> str:
    """One row per validation run and target: the options given, each method's top-1 (MACs ratio)."""
    runs = [(n, load(n)) for n in names]
    found = dict.fromkeys(k for _, r in runs for _, c in _single_seed_cells(r) for k in c)
    methods = sorted(found, key=lambda m: list(labels).index(m) if m in labels else len(labels))
    head = ["Results", "Options given", "Target", *(labels.get(m, f"`{m}`") for m in methods)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, results in runs:
        for target, cell in _single_seed_cells(results):
            shown_cells = [_one(cell.get(m)) for m in methods]
            lines.append(f"| `{name}` | {_given(results)} | {target:g} | " + " | ".join(shown_cells) + " |")
    return "\n".join(lines)


def _one(per_seed: dict[int, dict[str, Any]] | None) -> str:
    if not per_seed:
        return ""
    (row,) = per_seed.values()
    return f"{row['top1']:.2f} ({row['macs_ratio']:.3f})"


def render_val_trained(section: Section) -> str:
    first = load(section.results[0])
    return "\n".join(
        [
            section.title,
            "",
            f"`python -m bench.trained --validation {first['validation']} --seeds 1 [--methods M "
            "--no-baselines --options JSON]`, one seed, Table A's budget; top-1 on the last "
            f"{first['validation']} training images of each class, held out of the fine-tuning part (the "
            f"test split was not read); MACs ratio in brackets. Machine: {first['machine']['cpu']}, "
            f"{first['machine']['cores']} cores. The commands in full are in each file's `command`.",
            "",
            options_table(section.results, SHORT_A),
            "",
        ]
    )


def render_val_compare(section: Section) -> str:
    compared = tuple(n for n in section.results if (load(n).get("format") or "").startswith(COMPARE_FORMAT))
    first = load(compared[0])
    method = first["method"]
    parts = [
        section.title,
        "",
        f"`python -m bench.compare --method {method} --profile cpu --seeds 1 --only cifar --validation "
        f"{first['validation']} [--targets T] [--options JSON]`: seed 0, from scratch, top-1 on the last "
        f"{first['validation']} training images of each class, held out of training (the test split was not "
        "read); MACs ratio in brackets.",
        "",
        options_table(compared, SHORT_B | {method: f"`{method}`"}),
        "",
    ]
    for name in section.results:
        if name not in compared:
            parts += [variants_table(name, load(name)), ""]
    return "\n".join(parts)


def variants_table(name: str, results: dict[str, Any]) -> str:
    """A hand-run options search (``what``/``variants``/``results``: ``variant@target -> [top-1, MACs]``)."""
    targets = list(dict.fromkeys(k.split("@")[1] for k in results["results"]))
    head = ["Variant", *(f"Top-1 at {t} (MACs)" for t in targets)]
    lines = [
        f"From the dense weights (`{shown(name)}`, run by hand {results['date']}, {results['machine']}): "
        f"{results['what']} Dense: {results['dense_top1']:.2f}.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for key, what in results["variants"].items():
        vals = [results["results"].get(f"{key}@{t}") for t in targets]
        lines.append(
            f"| {what} | " + " | ".join(f"{v[0]:.2f} ({v[1]:.3f})" if v else "" for v in vals) + " |"
        )
    return "\n".join(lines)


def render_compare(section: Section) -> str:
    (name,) = section.results
    return compare.render(load(name), RESULTS_DIR / name)


def render_service(section: Section) -> str:
    """``bench.service``'s section (its own render writes the markers; they are the manifest's here)."""
    from . import service_markdown  # imported here: the other renderers do not need it

    (name,) = section.results
    text = service_markdown.render_section(load(name), RESULTS_DIR / name)
    return _inside(text, service_markdown.START, service_markdown.END)


def render_distributed(section: Section) -> str:
    """The first run in full, each further one (another batch size, say) by its command and table."""
    from . import distributed  # imported here: it loads the engine

    first, *more = section.results
    parts = [distributed.render(load(first), RESULTS_DIR / first)]
    for name in more:
        results = load(name)
        parts.append(
            f"`{results['command']}`, run {results['date']}; results `{name}`; load average "
            f"{results['load_1min']:g} at the end.\n\n{distributed.table(results)}\n"
        )
    return "\n".join(parts)


def render_run(section: Section) -> str:
    """``bench.run``'s profile section (engine ``magnitude``, the peer, the plain loop), its markers the
    manifest's."""
    (name,) = section.results
    results = load(name)
    return _inside(
        markdown.render_section(results, RESULTS_DIR / name), *markdown._markers(results["profile"])
    )


def _inside(text: str, start: str, end: str) -> str:
    """A section a benchmark rendered with its own markers, without them (the manifest adds its own)."""
    return text.removeprefix(start + "\n").removesuffix(end + "\n")


def _own(module: str) -> Callable[[Section], str]:
    """The renderer of a benchmark whose section is its own module's ``render(results, path)`` of one
    results file; the module is imported when used (``speed`` loads torchvision's models)."""

    def render(section: Section) -> str:
        (name,) = section.results
        return importlib.import_module(f"{__package__}.{module}").render(load(name), RESULTS_DIR / name)

    return render


RENDERERS: dict[str, Callable[[Section], str]] = {
    "table-a": render_table_a,
    "table-b": render_table_b,
    "val-trained": render_val_trained,
    "val-compare": render_val_compare,
    "compare": render_compare,
    "service": render_service,
    "speed": _own("speed"),
    "throughput": _own("throughput"),
    "run": render_run,
    "distributed": render_distributed,
    "scratch": _own("scratch"),
    "allocation": _own("allocation"),
}


def not_rerun() -> str:
    lines = [
        "## Not yet rerun",
        "",
        "These benchmarks' results files were never committed, so their figures cannot be checked or "
        f"regenerated here; the last ones are in `git show {LAST_FIGURES_AT}:BENCHMARKS.md`, each between "
        "its `<!-- bench:<name> -->` markers. Rerun one with its command and commit the results file to "
        "bring it back (its `--out` and `--markdown` left at their defaults).",
        "",
        "| Section | What it measures | Command | Last run |",
        "|---|---|---|---|",
    ]
    lines += [f"| `{n}` | {what} | `{cmd}` | {date} |" for n, what, cmd, date in NOT_RERUN]
    return "\n".join(lines) + "\n"


def note(section: Section) -> str:
    """The section's reading, ``bench/notes/<name>.md``. Its first line names the results files it reads
    (``<!-- reads: a.json b.json -->``): once the manifest shows other files the reading is left out
    (it describes figures no longer shown) until one is written for the new ones."""
    path = NOTES_DIR / f"{section.name}.md"
    if not path.is_file():
        return ""
    first, _, text = path.read_text().partition("\n")
    reads = first.removeprefix(READS).removesuffix("-->").split()
    if not first.startswith(READS) or not reads:
        raise ValueError(f"{path}: the first line must be {READS} <results files> -->")
    if stale := sorted(set(reads) - set(section.results)):
        print(f"bench.document: {path.name} left out, it reads {', '.join(stale)}", file=sys.stderr)
        return ""
    return "\n" + text


def document() -> str:
    """The whole BENCHMARKS.md, from the manifest's results files and the notes."""
    table_b = [cifar_only(load(n)) for n in TABLE_B.results]
    parts = [INTRO, markdown._wrap("summary", summary(table_a_results(TABLE_A), table_b))]
    for section in MANIFEST:
        parts.append(markdown._wrap(section.name, RENDERERS[section.kind](section)) + note(section))
    parts.append(markdown._wrap("not-rerun", not_rerun()))
    return "\n".join(parts)


def cited() -> list[Path]:
    """Every results file the manifest cites."""
    return [RESULTS_DIR / n for s in MANIFEST for n in s.results]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.document", description=__doc__.split("\n")[0])
    p.add_argument("--markdown", type=Path, default=REPO_DIR / "BENCHMARKS.md")
    p.add_argument("--check", action="store_true", help="exit 1 if the file differs; write nothing")
    args = p.parse_args(argv)
    text = document()
    if args.check:
        same = args.markdown.is_file() and args.markdown.read_text() == text
        print(f"{args.markdown}: {'up to date' if same else 'differs: run python -m bench.document'}")
        return 0 if same else 1
    args.markdown.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
