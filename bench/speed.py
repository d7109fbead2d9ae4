"""``python -m bench.speed``: measured speed-up of pruned networks against the MAC-implied one.

Per model and remaining-MAC ratio, the dense network (random weights: speed does not depend on trained
values) is pruned with the engine's allocator (``budget.select_to_budget`` on ``importance.magnitude``
scores, i.e. the ``magnitude`` method's decision): with any width (channel step 1) and with the
device's channel step (``spec.CHANNEL_STEP_DEFAULTS``). Each network is timed as is and with BatchNorm
folded into the convolutions (``inference.fold_batchnorm``, what TorchScript/ONNX exports hold), against
the dense network in the same form. Timing: in one process, at a fixed thread count, after a warm-up, in
rounds that time every network of a model once (dense first, pruned after, rotating the pruned order); a
speed-up is the median over rounds of (dense time / pruned time) within the round, with a bootstrap 95%
interval, so load that drifts between rounds cancels. Each timed sample runs enough forwards to last
``--min-sample-ms``.

A third form times the folded networks in channels_last (``inference.prepare_for_inference``, what the
service's inference uses on CPU and CUDA); the goal is judged on it. On CUDA (``--device cuda``) every
forward runs under AMP (fp16 autocast) with cuDNN's autotuner on, and the timer synchronises the device.

A third variant (``--latency-allocation``, on by default) prunes in the device step with
``target.allocation: latency``: the dense network's layers are timed on the device at the largest batch
(``layer_times``) and each group's pruned share divided by its latency rate (``budget.select_by_rates``).
``--forms`` and ``--no-any-width`` time fewer networks per case (the goal needs only ``folded-cl``).

Writes ``<out>/<section>-<time>.json`` and regenerates the ``<!-- bench:speed-cpu -->`` (or ``--section``)
section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pruning_core.artifacts.inference import fold_batchnorm
from pruning_core.graph.budget import MIN_WIDTH_CHOICES, select_by_rates
from pruning_core.graph.groups import PruningGraph
from pruning_core.graph.importance import magnitude
from pruning_core.graph.macs import count_macs
from pruning_core.graph.surgery import remove_channels
from pruning_core.models.zoo import build_model
from pruning_core.spec import CHANNEL_STEP_DEFAULTS
from pruning_core.speed.layer_times import latency_rates, measure_layer_times

from .markdown import command, publish_results, results_path
from .profiles import REPO_DIR, RESULTS_DIR
from .stack import cpu_model

FORMAT = "pruning-core/bench-speed-v1"
SECTION = "speed-cpu"
MODELS: dict[str, int] = {  # model -> input side (pixels); the goal's 224 px models first
    "tv:mobilenet_v2": 224,
    "tv:efficientnet_b0": 224,
    "tv:resnet18": 224,
    "tv:resnet50": 224,
    "resnet20": 32,
    "resnet56": 32,
}
GOAL = 0.9  # measured / MAC-implied speed-up at the throughput batch, for every 224 px model
GOAL_BATCH = 8


def log(text: str) -> None:
    print(f"[speed {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def pruned_variants(
    name: str,
    side: int,
    ratio: float,
    steps: Sequence[int],
    num_classes: int = 1000,
    latency: tuple[int, str, int] | None = None,
) -> tuple[nn.Module, dict[str, nn.Module], int]:
    """The dense network and, per channel step (key ``"8"``), a copy physically pruned to ``ratio`` of its
    MACs by the magnitude allocator; with ``latency`` = (step, device, batch) also one allocated by
    latency (``target.allocation: latency``, key ``"8-latency"``: scores weighed by the rates of the
    dense network's layers timed on that device at that batch). Also the dense MACs per sample."""
    torch.manual_seed(0)
    classes = num_classes if name.startswith("tv:") else 10
    dense = build_model(name, classes, 3).eval()
    x = torch.randn(1, 3, side, side)
    dense_macs = count_macs(dense, x)
    plans = [(str(s), s, None) for s in steps]
    if latency is not None:
        step, device, batch = latency
        graph = PruningGraph(copy.deepcopy(dense), x, num_classes=classes)
        times = measure_layer_times(
            dense, (3, side, side), graph.cost.layer_names, device, batch_size=batch, amp=device == "cuda"
        )
        plans.append((f"{step}-latency", step, latency_rates(graph, times)))
    pruned = {}
    for key, step, rates in plans:
        graph = PruningGraph(copy.deepcopy(dense), x, num_classes=classes)
        keep = select_by_rates(graph, magnitude(graph), rates, int(ratio * dense_macs), round_to=step)
        pruned[key] = remove_channels(graph, keep).eval()
    return dense, pruned, dense_macs


def variant_step(key: str) -> int:
    """The channel step of a variant key (``"8"``, ``"8-latency"``)."""
    return int(key.split("-")[0])


def off_step_share(model: nn.Module, step: int) -> float:
    """Share of conv layers (ungrouped, at least ``MIN_WIDTH_CHOICES * step`` outputs, so from groups that
    take the whole step: ``budget.group_step``) whose output count is not a multiple of ``step``: 0 for a
    network pruned with that step, apart from layers the allocator keeps exact."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups == 1]
    wide = [m for m in convs if m.out_channels >= MIN_WIDTH_CHOICES * step]
    return sum(m.out_channels % step != 0 for m in wide) / max(1, len(wide))


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _sample(fn: Callable[[], Any], inner: int) -> float:
    _sync()
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    _sync()  # CUDA launches are asynchronous: the sample ends when the device is done
    return (time.perf_counter() - t0) / inner


def _inner(fn: Callable[[], Any], min_sample_s: float) -> int:
    """Forwards per timed sample so that one lasts at least ``min_sample_s`` (after a warm-up)."""
    for _ in range(3):
        fn()
    once = _sample(fn, 2)
    return max(1, math.ceil(min_sample_s / max(once, 1e-6)))


def median_interval(values: Sequence[float], rng: random.Random, n: int = 2000) -> tuple[float, float, float]:
    """Median of ``values`` and a percentile-bootstrap 95% interval for it."""
    med = statistics.median(values)
    if len(values) < 3:
        return med, min(values), max(values)
    boots = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(n))
    return med, boots[int(0.025 * n)], boots[int(0.975 * n) - 1]


@torch.inference_mode()
def time_alternating(
    nets: dict[str, nn.Module], x: torch.Tensor, repeats: int, min_sample_s: float
) -> dict[str, list[float]]:
    """Seconds per forward of each net, one sample per round, ``dense`` first in every round and the
    others in a rotating order (so none is always timed right after the dense one)."""
    fns = {k: (lambda m=m, x=x: m(x)) for k, m in nets.items()}
    inner = {k: _inner(f, min_sample_s) for k, f in fns.items()}
    others = [k for k in nets if k != "dense"]
    times: dict[str, list[float]] = {k: [] for k in nets}
    for r in range(repeats):
        order = ["dense", *others[r % len(others) :], *others[: r % len(others)]]
        for k in order:
            times[k].append(_sample(fns[k], inner[k]))
    return times


def measure_case(
    name: str,
    side: int,
    ratio: float,
    steps: Sequence[int],
    batches: Sequence[int],
    repeats: int,
    min_sample_s: float,
    seed: int = 0,
    device: str = "cpu",
    latency_step: int | None = None,
    forms: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Every variant of one (model, ratio): MACs, and per batch and form (default: every form of the
    device) the speed-ups. ``latency_step``: also the latency allocation in that step (layers timed at
    the largest batch)."""
    rng = random.Random(seed)
    latency = None if latency_step is None else (latency_step, device, max(batches))
    dense, pruned, dense_macs = pruned_variants(name, side, ratio, steps, latency=latency)
    x1 = torch.randn(1, 3, side, side)
    variants = {
        key: {
            "macs": count_macs(model, x1),
            "params": sum(p.numel() for p in model.parameters()),
            "off_step_share": off_step_share(model, variant_step(key)),
        }
        for key, model in pruned.items()
    }
    for v in variants.values():
        v["macs_ratio"] = v["macs"] / dense_macs
        v["implied_speedup"] = dense_macs / v["macs"]
        v["timing"] = {}
    for batch in batches:
        for form_name, (form, layout) in FORMS[device].items():
            if forms is not None and form_name not in forms:
                continue
            x = torch.randn(batch, 3, side, side, device=device).contiguous(memory_format=layout)
            nets = {"dense": form(dense), **{f"step{k}": form(m) for k, m in pruned.items()}}
            nets = {k: _on(m, device, layout) for k, m in nets.items()}
            with _autocast(device):
                times = time_alternating(nets, x, repeats, min_sample_s)
            for step, v in variants.items():
                ratios = [d / p for d, p in zip(times["dense"], times[f"step{step}"], strict=True)]
                med, lo, hi = median_interval(ratios, rng)
                v["timing"][f"b{batch}-{form_name}"] = {
                    "batch": batch,
                    "folded": form_name != "plain",
                    "form": form_name,
                    "dense_ms": 1e3 * statistics.median(times["dense"]),
                    "pruned_ms": 1e3 * statistics.median(times[f"step{step}"]),
                    "speedup": med,
                    "speedup_lo": lo,
                    "speedup_hi": hi,
                    "efficiency": med / v["implied_speedup"],
                }
    return {
        "model": name,
        "side": side,
        "ratio": ratio,
        "dense_macs": dense_macs,
        "variants": variants,
    }


def _on(model: nn.Module, device: str, layout: torch.memory_format) -> nn.Module:
    return model.to(device=device, memory_format=layout)


def _autocast(device: str) -> Any:
    """fp16 autocast on CUDA (the throughput setting the issue asks for), nothing on the CPU."""
    return torch.autocast("cuda", dtype=torch.float16) if device == "cuda" else contextlib.nullcontext()


# form name -> (network transform, memory format of inputs and weights), per device type
FORMS: dict[str, dict[str, tuple[Callable[[nn.Module], nn.Module], torch.memory_format]]] = {
    "cpu": {
        "plain": (lambda m: m, torch.contiguous_format),
        "folded": (fold_batchnorm, torch.contiguous_format),
        "folded-cl": (fold_batchnorm, torch.channels_last),
    },
    "cuda": {
        "plain": (lambda m: m, torch.contiguous_format),
        "folded": (fold_batchnorm, torch.contiguous_format),
        "folded-cl": (fold_batchnorm, torch.channels_last),
    },
}
FORM_TITLES = {"plain": "BN as is", "folded": "BN folded", "folded-cl": "BN folded, channels_last"}


def machine(threads: int, device: str = "cpu") -> dict[str, Any]:
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count(),
        "affinity": sorted(os.sched_getaffinity(0)),
        "threads": threads,
        "load_avg_1m": os.getloadavg()[0],
        "torch": torch.__version__,
        "python": platform.python_version(),
        "nice": os.nice(0),
    }


# --- BENCHMARKS.md ---


def _cell(t: dict[str, Any]) -> str:
    return f"{t['speedup']:.2f}× [{t['speedup_lo']:.2f}, {t['speedup_hi']:.2f}] ({t['efficiency']:.2f})"


def table(results: dict[str, Any]) -> str:
    """One row per model, ratio and batch; per channel step and folding: measured speed-up, its
    interval and (in parentheses) measured / MAC-implied."""
    keys = variant_keys(results)
    forms = results.get("forms", ["plain", "folded"])
    head = ["model", "px", "MACs kept", "batch"]
    for k in keys:
        head.append(f"MAC-implied, {variant_title(k)}")
        head += [f"{variant_title(k)}, {FORM_TITLES[f]}" for f in forms]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for case in results["cases"]:
        if "error" in case:
            lines.append(
                f"| `{case['model']}` | {case['side']} | {case['ratio']:g} | failed: {case['error']} |"
            )
            continue
        for batch in results["batches"]:
            row = [f"`{case['model']}`", str(case["side"]), f"{case['ratio']:g}", str(batch)]
            for k in keys:
                v = case["variants"][k]
                row.append(f"{v['implied_speedup']:.2f}× ({v['macs_ratio']:.3f})")
                row += [_cell(v["timing"][f"b{batch}-{form}"]) for form in forms]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def variant_keys(results: dict[str, Any]) -> list[str]:
    """The variants of a run, in table order: each channel step, then the latency allocation."""
    return [str(s) for s in results["steps"]] + (
        [f"{results['device_step']}-latency"] if results.get("latency_allocation") else []
    )


def variant_title(key: str) -> str:
    step, _, alloc = key.partition("-")
    return f"step {step}" + (f", {alloc} allocation" if alloc else "")


def goal_rows(results: dict[str, Any], key: str | None = None) -> list[dict[str, Any]]:
    """The goal's cells: 224 px models at the throughput batch, BatchNorm folded, in channels_last, of
    variant ``key`` (default: the device step, MAC allocation)."""
    step = key or str(results.get("device_step", max(results["steps"])))
    form = results.get("forms", ["plain", "folded"])[-1]
    batch = results.get("goal_batch", GOAL_BATCH)
    rows = []
    for case in results["cases"]:
        if "error" in case:
            continue
        v = case["variants"].get(step)
        t = None if v is None else v["timing"].get(f"b{batch}-{form}")
        if case["side"] >= 224 and t is not None:
            rows.append({"model": case["model"], "ratio": case["ratio"], **t})
    return rows


def _missing(results: dict[str, Any]) -> list[str]:
    """A line naming the planned cases the run did not reach (interrupted), if any."""
    done = {(c["model"], c["ratio"]) for c in results["cases"]}
    left = [f"`{m}` at {r:g}" for m, r in results.get("planned", []) if (m, r) not in done]
    return ["", "Not measured (the run stopped before them): " + ", ".join(left) + "."] if left else []


def verdict(results: dict[str, Any], key: str | None = None) -> str:
    """One line: the goal's cells of variant ``key`` (default: the device step), met and missed."""
    rows = goal_rows(results, key)
    met = [r for r in rows if r["efficiency"] >= GOAL]
    missed = [r for r in rows if r["efficiency"] < GOAL]
    form = FORM_TITLES[results.get("forms", ["plain", "folded"])[-1]]
    if not rows:
        return (
            f"No 224 px model in this run: the goal (≥ {GOAL} of the MAC-implied speed-up) is not assessed."
        )
    title = variant_title(key or str(results.get("device_step", max(results["steps"]))))
    return (
        f"Goal (≥ {GOAL} of the MAC-implied speed-up at batch {results.get('goal_batch', GOAL_BATCH)} for "
        f"every 224 px model, {title}, {form}): met in {len(met)} of {len(rows)} cells"
        + (
            "; missed: "
            + ", ".join(f"`{r['model']}` at {r['ratio']:g} ({r['efficiency']:.3f})" for r in missed)
            if missed
            else ""
        )
        + "."
    )


def render(results: dict[str, Any], source: Path) -> str:
    m = results["machine"]
    where = (
        f"on {m['device']}, fp16 autocast (AMP)"
        if m.get("device", "cpu") != "cpu"
        else f"on {m['cpu']} ({m['cores']} cores; pinned to CPUs {m['affinity']}, {m['threads']} torch "
        "thread(s))"
    )
    verdicts = [verdict(results)]
    if results.get("latency_allocation"):
        verdicts += ["", verdict(results, f"{results['device_step']}-latency")]
    return "\n".join(
        [
            "## Speed: measured vs MAC-implied speed-up (`python -m bench.speed`)",
            "",
            f"`{results['command']}` {where}, torch {m['torch']}, {results['finished'][:16]} UTC; 1-minute "
            f"load average {results['load_avg_start']:.2f} at the start and {results['load_avg_end']:.2f} at "
            f"the end; {results['repeats']} alternating rounds per cell. Results: `{source.name}`.",
            "",
            "Random weights, magnitude allocation (`budget.select_to_budget`) to the remaining-MAC ratio, "
            "physically pruned; the latency allocation divides each group's pruned share by its latency rate "
            "and rescales the shares to the budget (`budget.select_by_rates` with `layer_times.latency_rates`, "
            "the dense network's layers timed on the device at the largest batch, as "
            "`target.allocation: latency` does). Each cell: median over rounds of dense time / pruned time within the round, "
            "[bootstrap 95% interval], (measured / MAC-implied). Folded cells compare the folded pruned "
            "network with the folded dense one. MAC-implied: dense MACs / pruned MACs (the pruned share of "
            "dense MACs in parentheses).",
            "",
            table(results),
            "",
            *verdicts,
            *_missing(results),
            "",
        ]
    )


def publish(results: dict[str, Any], path: Path, markdown: Path, section: str = SECTION) -> None:
    """Write the results so far (JSON) and the BENCHMARKS.md section rendered from them."""
    results["finished"] = dt.datetime.now(dt.UTC).isoformat()
    publish_results(results, path, markdown, section, render)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.speed", description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), help=f"from {list(MODELS)}")
    p.add_argument("--ratios", nargs="+", type=float, default=[0.5, 0.3])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: AMP, synchronised timer")
    p.add_argument("--step", type=int, default=None, help="the device's channel step (default: its default)")
    p.add_argument("--extra-steps", nargs="*", type=int, default=[], help="more channel steps to compare")
    p.add_argument(
        "--latency-allocation",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also prune with target.allocation latency in the device step",
    )
    p.add_argument(
        "--any-width",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also prune in step 1 (any width), to compare with the device's step",
    )
    p.add_argument(
        "--forms", nargs="+", default=None, help="the forms to time (default: all of the device's)"
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--min-sample-ms", type=float, default=30.0)
    p.add_argument("--section", default=SECTION, help="the BENCHMARKS.md section (marker name) to write")
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    p.add_argument("--markdown", type=Path, default=REPO_DIR / "BENCHMARKS.md")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    unknown = sorted(set(args.models) - set(MODELS))
    if unknown:
        raise SystemExit(f"bench.speed: unknown model(s) {unknown}; known: {list(MODELS)}")
    threads, autotune = torch.get_num_threads(), torch.backends.cudnn.benchmark
    try:
        return _run(args, argv)
    finally:  # called in-process (its test): leave torch's settings as found
        torch.set_num_threads(threads)
        torch.backends.cudnn.benchmark = autotune


def _run(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    torch.set_num_threads(args.threads)
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True  # what a deployment sets: the fastest kernel per shape
    step = args.step if args.step is not None else CHANNEL_STEP_DEFAULTS[args.device]
    steps = sorted({step, *args.extra_steps, *([1] if args.any_width else [])})
    forms = args.forms or list(FORMS[args.device])
    if set(forms) - set(FORMS[args.device]):
        raise SystemExit(f"bench.speed: forms on {args.device}: {list(FORMS[args.device])}")
    results: dict[str, Any] = {
        "format": FORMAT,
        "command": command("bench.speed", argv),
        "machine": machine(args.threads, args.device),
        "load_avg_start": os.getloadavg()[0],
        "steps": steps,
        "device_step": step,
        "latency_allocation": args.latency_allocation,
        "forms": [f for f in FORMS[args.device] if f in forms],  # the goal reads the last
        "goal_batch": max(args.batches),
        "batches": args.batches,
        "repeats": args.repeats,
        "planned": [[name, ratio] for name in args.models for ratio in args.ratios],
        "cases": [],
    }
    path = results_path(args.out, args.section)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        for ratio in args.ratios:
            log(f"{name} at {ratio:g} (load {os.getloadavg()[0]:.2f})")
            try:
                case = measure_case(
                    name,
                    MODELS[name],
                    ratio,
                    steps,
                    args.batches,
                    args.repeats,
                    args.min_sample_ms / 1e3,
                    device=args.device,
                    latency_step=step if args.latency_allocation else None,
                    forms=results["forms"],
                )
            except Exception as err:  # one model that cannot be pruned must not lose the others' figures
                log(f"{name} at {ratio:g} failed: {err!r}")
                case = {"model": name, "side": MODELS[name], "ratio": ratio, "error": repr(err)[:300]}
            results["cases"].append(case)
            publish(
                results, path, args.markdown, args.section
            )  # after every case: an interrupted run keeps its figures
    log(f"wrote {path} and {args.markdown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
