"""BENCHMARKS.md from a results JSON: one marked section per profile, regenerated in place.

Only the text between ``<!-- bench:<profile> -->`` and ``<!-- /bench:<profile> -->`` is rewritten, so a
CPU run keeps the GPU section (and the hand-written introduction) as they are.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shlex
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .profiles import PROFILES, REPO_DIR, RESULTS_DIR

METHODS = (
    ("dense", "dense"),
    ("magnitude", "`magnitude` (pruning_core)"),
    ("peer", "Torch-Pruning `BasePruner` (peer)"),
)

INTRO = """\
# Benchmarks

Dense vs the `magnitude` baseline vs Torch-Pruning's own pruner run directly (the external peer): same
model, same dense weights, target 0.5 of the dense MACs, same fine-tuning epochs, optimizer, LR schedule
and data order. Produced by `bench/run.py`; each section below is regenerated from a results JSON.

```bash
make bench       # python -m bench.run --profile cpu  (about 20 minutes on 2 CPU cores)
make bench-gpu   # python -m bench.run --profile gpu  (needs CUDA; refuses without it)
```

How to read the tables:

- **Top-1**: test split, percent; mean ± sample standard deviation over seeds, per-seed values in brackets.
  Each seed trains its own dense model, and both pruned models start from that seed's dense weights.
- **MACs** for every row, the peer's included, come from the one counter (`pruning_core.graph.macs.count_macs`:
  conv and linear multiply-accumulates per sample). The peer (`tp.pruner.BasePruner`, the former
  `MetaPruner`, with `GroupMagnitudeImportance(p=2)`, global pruning, classifier head ignored) takes a
  channel ratio, so that ratio is bisected until our counter gives the largest MACs <= the target; it is
  then fine-tuned with the plain loop below. `magnitude` runs through `runner.run` (KD off) and scores
  channels with the same Torch-Pruning importance, choosing globally to the MAC budget: where both land on
  the same channels their rows agree exactly. That makes the peer a check that the engine reproduces the
  reference implementation, not an independent second method.
- **Latency**: p50 of a forward pass (`pruning_core.speed.latency.measure_latency`) at batch 1 and 64, the three
  models timed back to back in the same process; "x" is dense p50 / pruned p50 within a seed, averaged over
  seeds. The MAC-implied speed-up (dense MACs / pruned MACs) stands beside it: the gap is what channel
  pruning does not turn into wall time (memory traffic, per-layer overhead, small-batch inefficiency).
- **Engine vs plain**: dense training of the same initial weights for the same epochs, once through the
  engine (`engine.fit`: per-epoch test pass, MAC count, checkpoint, progress) and once through a minimal
  PyTorch loop (`bench/plain.py`: same data order, optimizer and LR schedule, nothing else). Engine s/epoch
  is the whole `fit` wall time over the epochs; the test pass column is what one evaluation costs, and the
  column beside it takes it out. The engine reads a set held in memory as whole batches built and
  augmented on the device, the plain loop per item through a DataLoader; images/s puts both beside the
  compute bound (6 x forward MACs per image over a measured 3x3 convolution's FLOP/s, `bench/throughput.py`).
  The two loops do the same arithmetic, so on CPU their dense top-1 agree where nothing is augmented
  (digits); with augmentation they draw other crops and flips.

Caveats: the CIFAR-10 data is the JPEG re-encoding (lossy) and, on CPU, a small class-balanced subset
trained for few epochs, so absolute accuracies sit far below published CIFAR-10 figures: compare rows
within a table, not with papers. Digits saturates (every method ends near the same top-1), so the method
comparison rests on the CIFAR-10 subset. The CPU is shared and noisy: absolute times vary from run to run;
ratios and speed-ups are measured within one run.
"""


def _markers(profile: str) -> tuple[str, str]:
    return f"<!-- bench:{profile} -->", f"<!-- /bench:{profile} -->"


def _wrap(profile: str, body: str) -> str:
    start, end = _markers(profile)
    return f"{start}\n{body.rstrip()}\n{end}\n"


def placeholder(profile: str) -> str:
    """The section of a profile that has not been run yet."""
    p = PROFILES[profile]
    case = p.cases[-1]
    title = f"## {profile.upper()} profile (`python -m bench.run --profile {profile}`)"
    subset = (
        f"{case.data.per_class} train / {case.data.test_per_class} test images per class, "
        if case.data.per_class
        else ""
    )
    what = (
        f"{case.label} ({subset}{case.model}) on `{p.device}`, dense {case.dense_epochs} epochs, fine-tune "
        f"{case.finetune_epochs}, batch {case.batch_size}, seeds {', '.join(map(str, case.seeds))}"
    )
    if profile == "gpu":
        text = (
            f"Not run yet: no CUDA device was available in the session that wrote this file. `make bench-gpu` "
            f"runs the whole CIFAR-10 JPEG set (50,000 train / 10,000 test images) — {what}, AMP — and fills "
            f"this section; it refuses to start where CUDA is absent."
        )
    else:
        text = f"Not run yet at the published settings ({what}); `make bench` fills this section."
    return _wrap(profile, f"{title}\n\n{text}\n")


def update_markdown(path: Path, profile: str, section: str) -> Path:
    """Replace (or append) ``profile``'s section of ``path``; a missing file starts from the template."""
    text = (
        path.read_text() if path.exists() else INTRO + "\n" + placeholder("cpu") + "\n" + placeholder("gpu")
    )
    start, end = _markers(profile)
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end) + r"\n?", re.S)
    new = section if section.endswith("\n") else section + "\n"
    text = (
        pattern.sub(lambda _: new, text, count=1)
        if pattern.search(text)
        else text.rstrip("\n") + "\n\n" + new
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def write_section(path: Path, section: str, body: str) -> Path:
    """``body`` between ``section``'s markers, replacing (or appended to) that section of ``path``."""
    return update_markdown(path, section, _wrap(section, body))


def command(module: str, argv: Sequence[str] | None) -> str:
    """The command line a results file records: ``python -m <module> <its arguments>``, quoted as a
    shell would need them."""
    return f"python -m {module} " + shlex.join(sys.argv[1:] if argv is None else argv)


def results_path(out: Path, section: str, started: dt.datetime | None = None) -> Path:
    """``<out>/<section>-<UTC time>.json``: the name every benchmark gives its results file, so that the
    file a BENCHMARKS.md section cites says which section it fills."""
    started = started or dt.datetime.now(dt.UTC)
    return out / f"{section}-{started.astimezone(dt.UTC).strftime('%Y-%m-%dT%H%M%SZ')}.json"


def publish_results(
    results: dict[str, Any],
    path: Path,
    markdown: Path,
    section: str,
    render: Callable[[dict[str, Any], Path], str],
) -> None:
    """Write the results so far (JSON, with the load average at the end) and regenerate ``section`` of
    ``markdown`` from them (``render(results, path)``): a run stopped later keeps what it measured."""
    results["load_avg_end"] = os.getloadavg()[0]
    path.write_text(json.dumps(results, indent=1) + "\n")
    write_section(markdown, section, render(results, path))


# --- numbers ---


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def fmt_top1(values: Sequence[float]) -> str:
    mean, std = mean_std(values)
    per_seed = ", ".join(f"{v:.2f}" for v in values)
    return f"{mean:.2f} ± {std:.2f} ({per_seed})" if std is not None else f"{mean:.2f} (n=1)"


def fmt_range(values: Sequence[float], digits: int = 3) -> str:
    lo, hi = min(values), max(values)
    mean = statistics.fmean(values)
    return (
        f"{mean:.{digits}f}"
        if hi - lo < 10**-digits
        else f"{mean:.{digits}f} ({lo:.{digits}f}–{hi:.{digits}f})"
    )


def fmt_count(values: Sequence[float], unit: str = "") -> str:
    mean = statistics.fmean(values)
    if unit == "M":
        return f"{mean / 1e6:.2f}M"
    return f"{round(mean):,}"


# --- tables ---


def _row(label: str, key: str, runs: list[dict[str, Any]], lat_keys: list[str]) -> str:
    rows = [r["rows"][key] for r in runs]
    cells = [
        label,
        fmt_top1([r["top1"] for r in rows]),
        fmt_range([r["macs_ratio"] for r in rows]),
        fmt_count([r["macs"] for r in rows], "M"),
        fmt_count([r["params"] for r in rows]),
    ]
    for lk in lat_keys:
        p50 = [r["latency"][lk]["p50_ms"] for r in rows]
        speed = [
            run["rows"]["dense"]["latency"][lk]["p50_ms"] / r["latency"][lk]["p50_ms"]
            for run, r in zip(runs, rows, strict=True)
        ]
        cells.append(f"{statistics.fmean(p50):.2f} ({statistics.fmean(speed):.2f}×)")
    cells.append(f"{statistics.fmean(1 / r['macs_ratio'] for r in rows):.2f}×")
    return "| " + " | ".join(cells) + " |"


def _peer_gap(runs: list[dict[str, Any]]) -> str:
    """Whether the peer and ``magnitude`` ended with the same network (they share the importance score)."""
    gaps = [r["rows"]["peer"].get("weight_gap_to_magnitude") for r in runs]
    if all(g is None for g in gaps):
        return "Peer and `magnitude` kept different layer widths in every seed."
    if all(g == 0 for g in gaps):
        return (
            "In every seed the peer and `magnitude` kept the same channels and ended with bit-identical "
            "parameters: both rank channels by the same group-L2 score at the same budget, and the engine's "
            "fine-tuning does the plain loop's arithmetic (BatchNorm running statistics differ: `magnitude` "
            "re-estimates them after pruning, the peer does not)."
        )
    shown = ", ".join("different widths" if g is None else f"{g:.2g}" for g in gaps)
    return f"Largest parameter difference, peer vs `magnitude` after fine-tuning, per seed: {shown}."


def case_table(case: dict[str, Any], lat_keys: list[str]) -> str:
    lat_heads = [f"{k.replace('_b', ' b')} p50 ms (× dense)" for k in lat_keys]
    head = [
        "Method",
        "Top-1 % mean ± std (per seed)",
        "MACs ratio",
        "MACs",
        "Params",
        *lat_heads,
        "MAC-implied ×",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += [_row(label, key, case["runs"], lat_keys) for key, label in METHODS]
    ratios = ", ".join(f"{r['rows']['peer']['pruning_ratio']:.4f}" for r in case["runs"])
    tries = ", ".join(str(r["rows"]["peer"]["bisect_tries"]) for r in case["runs"])
    lines += [
        "",
        f"Peer `pruning_ratio` found by bisection, per seed: {ratios} ({tries} tries). {_peer_gap(case['runs'])}",
    ]
    return "\n".join(lines)


def settings_table(cases: list[dict[str, Any]]) -> str:
    head = [
        "Data set",
        "Model",
        "Input",
        "Train / test images",
        "Dense epochs",
        "Fine-tune epochs",
        "Batch",
        "Peak LR dense / fine-tune",
        "Seeds",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in cases:
        size = f"{c['in_channels']}×{c['image_size']}×{c['image_size']}"
        lines.append(
            f"| {c['label']} | {c['model']} | {size} | {c['train_images']:,} / {c['test_images']:,} | {c['dense_epochs']} | "
            f"{c['finetune_epochs']} | {c['batch_size']} | {c['lr']:g} / {c['finetune_lr']:g} | {', '.join(map(str, c['seeds']))} |"
        )
    return "\n".join(lines)


def timing_table(cases: list[dict[str, Any]]) -> str:
    head = [
        "Data set",
        "Seed",
        "Engine s/epoch",
        "Plain s/epoch",
        "Engine / plain",
        "Test pass s",
        "Engine / plain less the test pass",
        "Dense top-1 engine / plain",
        "Fine-tune s/epoch: magnitude (engine, with test pass) / peer (plain)",
        "Images/s: engine less the test pass / plain / compute bound",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in cases:
        for r in c["runs"]:
            t, s = r["timing"], r["stages"]
            engine = t["engine_total_s"] / max(1, c["dense_epochs"])
            plain = sum(t["plain_epoch_s"]) / max(1, c["dense_epochs"])
            mag_ft = (
                statistics.fmean(s["magnitude_finetune_epoch_s"]) if s["magnitude_finetune_epoch_s"] else 0.0
            )
            peer_ft = statistics.fmean(s["peer_finetune_epoch_s"]) if s["peer_finetune_epoch_s"] else 0.0
            lines.append(
                f"| {c['label']} | {r['seed']} | {engine:.2f} | {plain:.2f} | {engine / plain:.2f} | {t['test_pass_s']:.2f} | "
                f"{(engine - t['test_pass_s']) / plain:.2f} | "
                f"{r['rows']['dense']['top1']:.2f} / {t['plain_top1']:.2f} | {mag_ft:.2f} / {peer_ft:.2f} | "
                f"{_images_per_s(t, engine - t['test_pass_s'], plain)} |"
            )
    return "\n".join(lines)


def _images_per_s(t: dict[str, Any], engine_s: float, plain_s: float) -> str:
    """Training images per second of the engine, the plain loop and the compute bound (results files
    from before these were recorded: a dash)."""
    n, bound = t.get("images_per_epoch"), t.get("compute_bound_epoch_s")
    if not n or not bound:
        return "–"
    return f"{n / engine_s:,.0f} / {n / plain_s:,.0f} / {n / bound:,.0f}"


def _shown(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(REPO_DIR)) if path.is_relative_to(REPO_DIR) else str(path)


def render_section(results: dict[str, Any], source: Path) -> str:
    """The markdown section of one results file (its profile's markers included)."""
    m, lat = results["machine"], results["latency"]
    lat_keys = [f"{d}_b{b}" for d in lat["devices"] for b in lat["batches"]]
    gpu = f" ({m['gpu']})" if m.get("gpu") else ""
    parts = [
        f"## {results['profile'].upper()} profile (`{results['command']}`)",
        f"Run {results['date']}, {results['wall_s'] / 60:.1f} min in all; results file `{_shown(source)}`.  \n"
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads); torch {m['torch']}, "
        f"torch-pruning {m['torch_pruning']}, Python {m['python']}; training and top-1 on `{m['device']}`{gpu}, "
        f"latency on {', '.join(lat['devices'])} ({lat['iters']} timed forwards, at most {lat['max_s']:g} s each).  \n"
        f"Target: {results['target']:g} of the dense MACs.",
        settings_table(results["cases"]),
    ]
    for case in results["cases"]:
        parts += [f"### {case['label']} ({case['model']})", case_table(case, lat_keys)]
    parts += [
        "### Engine vs plain PyTorch loop (dense training, same epochs)",
        timing_table(results["cases"]),
    ]
    return _wrap(results["profile"], "\n\n".join(parts) + "\n")


def add_output_args(p: argparse.ArgumentParser) -> None:
    """``--out``, ``--markdown`` and ``--render``, as every benchmark that writes a section takes them."""
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="results JSON folder")
    p.add_argument("--markdown", type=Path, default=REPO_DIR / "BENCHMARKS.md")
    p.add_argument(
        "--render", type=Path, metavar="JSON", help="only regenerate the markdown from a results file"
    )


def render_file(
    args: argparse.Namespace,
    section_of: Callable[[dict[str, Any]], str],
    render: Callable[[dict[str, Any], Path], str],
) -> None:
    """``--render JSON``: the section that results file belongs to, regenerated from it."""
    results = json.loads(args.render.read_text())
    write_section(args.markdown, section_of(results), render(results, args.render.resolve()))
