"""``report.html``: the report a person reads, one self-contained file beside ``report.json``.

No external assets: CSS inline, the plots embedded as PNG data URIs, no script (and a CSP that
allows none). Every string that comes from the job (model, data and class names, the spec, method
details, error reasons) goes through ``html.escape``, so a hostile name cannot inject markup. Torch-free, like ``report``.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable
from html import escape
from pathlib import Path
from typing import Any

from .report import BatchLatency, Estimate, Report, epoch_label, headline, pruning_marks, top1_interval

HTML_FILE = "report.html"
# Defence in depth beside the escaping: opened from disk or a browser, the page runs no script and
# loads nothing but its own inline style and data: images.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
MAX_CLASSES_SHOWN = 50

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:72em;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f4f4f4}td.l,th.l{text-align:left}.note{color:#555}.warn{color:#a40}
.headline{font-size:1.15em;font-weight:600}.faster{color:#070;font-weight:600}.slower{color:#a00;font-weight:600}.none{color:#a60;font-weight:600}
img{max-width:100%;border:1px solid #eee;margin:.5em 0}pre{background:#f7f7f7;padding:.8em;overflow:auto}
"""


def write_html(report: Report, out_dir: Path, plots: Iterable[Path]) -> Path:
    """Write ``report.html`` into ``out_dir`` with the PNG ``plots`` embedded; return its path."""
    images = {p.name: p.read_bytes() for p in plots}
    path = Path(out_dir) / HTML_FILE
    path.write_text(render_html(report, images), encoding="utf-8")
    return path


def render_html(report: Report, images: dict[str, bytes]) -> str:
    """The whole page for ``report``; ``images``: PNG file name -> bytes, embedded in that order."""
    r = report
    title = f"{r.model} pruned with {r.method} on {r.data}"
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        f'<p class="headline">{escape(headline(r))}</p>',
        f'<p class="note">Target {r.target_macs_ratio:g} of the dense MACs; achieved '
        f"{r.achieved_macs_ratio:.3f}. Trained and evaluated on {escape(r.device)}; input "
        f"{escape(' x '.join(map(str, r.input_shape)))} per sample.</p>",
        _speed_target(r),
        "<h2>Dense vs pruned</h2>",
        _summary(r),
        _latency(r),
        _files(r),
        _events(r),
        "<h2>Plots</h2>",
        *(_image(name, data) for name, data in images.items()),
        _history(r),
        _phases(r),
        _notes(r),
        _data(r),
        _spec(r),
        "<h2>Method details</h2>",
        f"<pre>{escape(json.dumps(r.method_details, indent=2, sort_keys=True, default=str))}</pre>",
        f'<p class="note">Format {escape(r.format)}; the same numbers are in report.json.</p>',
        "</body></html>",
    ]
    return "\n".join(p for p in parts if p)


# --- sections ---


def _summary(r: Report) -> str:
    split = r.data_summary
    top1_label = (
        f"top-1 on the {escape(split.split)} split, {split.test_images:,} images" if split else "top-1"
    )
    rows = [
        ("MACs per sample", _count(r.dense.macs), _count(r.pruned.macs), f"{r.achieved_macs_ratio:.3f}"),
        ("parameters", _count(r.dense.params), _count(r.pruned.params), f"{r.params_ratio:.3f}"),
        (
            "weights",
            _bytes(r.dense.weights_bytes),
            _bytes(r.pruned.weights_bytes),
            _ratio(r.pruned.weights_bytes, r.dense.weights_bytes),
        ),
        (
            top1_label,
            _top1(r.dense.top1, split),
            _top1(r.pruned.top1, split),
            _diff(r.pruned.top1, r.dense.top1),
        ),
    ]
    if (a := r.after_prune) is not None:
        when = escape(a.at) if a.at != "final" else "at the end"
        rows.append(
            (
                f"top-1 right after pruning ({when}; {a.epochs_after} epoch(s) of recovery after it)",
                "",
                _top1(a.top1, split),
                _diff(a.top1, r.dense.top1),
            ),
        )
    for b in r.latency.batches if r.latency else ():
        rows.append(
            (
                f"latency, batch {b.batch_size} (ms)",
                _interval(b.dense_ms),
                _interval(b.pruned_ms),
                _speedup(b),
            )
        )
    head = "<tr><th class=l></th><th>dense</th><th>pruned</th><th>pruned / dense</th></tr>"
    body = "".join(
        f"<tr><td class=l>{label}</td><td>{d}</td><td>{p}</td><td>{x}</td></tr>" for label, d, p, x in rows
    )
    return f"<table>{head}{body}</table>"


def _speed_target(r: Report) -> str:
    st = r.speed_target
    if st is None:
        return ""
    reached = (
        next((b for b in r.latency.batches if b.batch_size == st.batch_size), None) if r.latency else None
    )
    achieved = (
        f"achieved {reached.speedup.median:.2f}x [{reached.speedup.low:.2f}, {reached.speedup.high:.2f}] "
        f"({escape(reached.verdict)})"
        if reached
        else "achieved: not measured"
    )
    probes = ", ".join(f"{p.achieved_macs_ratio:.3f} of the MACs: {p.speedup:.2f}x" for p in st.probes)
    return (
        f'<p class="note">Speed target: {st.requested:g}x at batch {st.batch_size} on {escape(st.device)}, '
        f"{achieved}. The MAC target {st.macs_ratio:.3f} was chosen by timing candidate prunings "
        f"({probes}).</p>"
    )


def _latency(r: Report) -> str:
    lat = r.latency
    if lat is None:
        return '<p class="note">Latency was not measured.</p>'
    load = f"{lat.load_1min:.2f}" if lat.load_1min is not None else "unknown"
    busy = (
        f'<span class="warn">The machine was busy (1-minute load {load} on {lat.cpus} cores): the figures '
        "are noisier than on an idle machine.</span>"
        if lat.busy
        else f"1-minute load {load} on {lat.cpus} cores (not busy)."
    )
    rounds = ", ".join(
        f"batch {b.batch_size}: {b.rounds} rounds of {b.forwards[0]} dense + {b.forwards[1]} pruned forwards"
        for b in lat.batches
    )
    return (
        f'<p class="note">Latency: milliseconds per forward of the whole batch on {escape(lat.device)} '
        f"with {lat.threads} torch thread(s), median and 95 % interval (order statistics). Dense and pruned "
        f"were timed alternately in one process after a warm-up ({rounds}; {lat.wall_s:.1f} s of a "
        f"{lat.budget_s:g} s budget). The speed-up is dense / pruned over the paired rounds; it counts as "
        f"a gain only when its whole interval lies above {1 + lat.noise_floor:g} (slower: below "
        f"{1 - lat.noise_floor:g}); an interval of fewer than 6 rounds covers less than 95 % and decides "
        f"nothing. {busy}</p>"
    )


def _files(r: Report) -> str:
    if not r.files and not r.export_failures:
        return ""
    rows = "".join(f"<tr><td class=l>{escape(n)}</td><td>{_bytes(s)}</td></tr>" for n, s in r.files.items())
    failed = "".join(
        f"<li>{escape(fmt)}: {escape(why)}</li>" for fmt, why in sorted(r.export_failures.items())
    )
    return (
        "<h2>Exported pruned model</h2>"
        + (f"<table><tr><th class=l>file</th><th>size</th></tr>{rows}</table>" if rows else "")
        + (f"<p>Formats left out:</p><ul>{failed}</ul>" if failed else "")
    )


def _events(r: Report) -> str:
    """Where the network was pruned (as marked on the training plot), with what it cost."""
    items = [f"<li>{escape(text)}</li>" for _, text in pruning_marks(r.history)]
    for rec in r.history:
        if rec.event and rec.macs_before is not None:
            before = (
                f", top-1 {_pct(rec.top1_before)} &rarr; {_pct(rec.top1)}"
                if rec.top1_before is not None
                else ""
            )
            bn = " (BatchNorm statistics re-estimated)" if rec.bn_recalibrated else ""
            items.append(
                f"<li>{escape(epoch_label(rec.phase, rec.epoch))}: MACs {_count(rec.macs_before)} &rarr; "
                f"{_count(rec.macs)}{before}{bn}</li>"
            )
    if not items:
        return ""
    return "<h2>Where pruning happened</h2><ul>" + "".join(items) + "</ul>"


def _history(r: Report) -> str:
    if not r.history:
        return ""
    rows = "".join(
        f"<tr><td class=l>{escape(epoch_label(h.phase, h.epoch))}</td>"
        f"<td>{_num(h.train_loss, '.4f')}</td><td>{_pct(h.top1)}</td><td>{_count(h.macs)}</td>"
        f"<td>{_num(h.wall_s, '.1f')}</td><td class=l>{escape(h.event or '')}</td></tr>"
        for h in r.history
    )
    head = (
        "<tr><th class=l>epoch</th><th>train loss</th><th>top-1</th><th>MACs</th><th>seconds</th>"
        "<th class=l>event</th></tr>"
    )
    return f"<h2>Epochs</h2><details><summary>{len(r.history)} epochs</summary><table>{head}{rows}</table></details>"


PHASE_LABELS = {
    "analyse": "building the model's dependency graph",
    "allocation check": "checking the latency allocation",
    "latency timing": "timing dense against pruned",
    "export": "exporting the pruned model",
}


def _phase_label(name: str) -> str:
    """A phase as a reader names it: ``finetune:start`` is the pruning step before fine-tuning."""
    if name.endswith(":start"):
        return f"pruning step before {name.removesuffix(':start')}"
    if name in PHASE_LABELS:
        return PHASE_LABELS[name]
    return f"{name} (training steps)"


def _phases(r: Report) -> str:
    if not r.phases:
        return ""
    rows = "".join(
        f"<tr><td class=l>{escape(_phase_label(p.name))}</td><td>{p.epochs or ''}</td><td>{p.wall_s:.1f}</td></tr>"
        for p in r.phases
    )
    if r.total_wall_s is not None:  # what no phase counts: data loading, evaluation, checkpoints
        rest = r.total_wall_s - sum(p.wall_s for p in r.phases)
        rows += (
            "<tr><td class=l>the rest: loading data, evaluating, checkpoints, measuring</td><td></td>"
            f"<td>{max(0.0, rest):.1f}</td></tr>"
        )
    total = f'<p class="note">Whole job: {r.total_wall_s:.1f} s.</p>' if r.total_wall_s is not None else ""
    return (
        "<h2>Time</h2><table><tr><th class=l>phase</th><th>epochs</th><th>seconds</th></tr>"
        f"{rows}</table>{total}"
    )


def _spec(r: Report) -> str:
    """The spec as what differs from the defaults of its method, the whole of it folded below."""
    changed = spec_changes(r.spec)
    lines = "".join(f"<li><code>{escape(k)}</code>: {escape(json.dumps(v))}</li>" for k, v in changed)
    whole = escape(json.dumps(r.spec, indent=2, sort_keys=True))
    return (
        "<h2>Job spec</h2>"
        + (f"<p>Set by the job (the rest are defaults):</p><ul>{lines}</ul>" if changed else "")
        + f"<details><summary>the whole spec</summary><pre>{whole}</pre></details>"
    )


def spec_changes(spec: dict[str, Any]) -> list[tuple[str, Any]]:
    """``[("schedule.epochs", 10), ...]``: the dotted fields where ``spec`` differs from the defaults
    (its method's defaults for ``method``)."""
    from ..spec import JobSpec, method_options  # torch-free; here so that importing this module stays light

    default = JobSpec.model_construct().model_dump(mode="json")
    options = method_options().get((spec.get("method") or {}).get("name"))
    if options is not None:
        default["method"] = options.model_construct().model_dump(mode="json")
    return _changes(spec, default, "")


def _changes(actual: Any, default: Any, prefix: str) -> list[tuple[str, Any]]:
    if isinstance(actual, dict) and isinstance(default, dict):
        out: list[tuple[str, Any]] = []
        for k in sorted(actual):
            out += _changes(actual[k], default.get(k), f"{prefix}{k}.")
        return out
    return [] if actual == default else [(prefix.rstrip("."), actual)]


def _notes(r: Report) -> str:
    notes = []
    if r.excluded_groups:
        items = "".join(f"<li>{escape(k)}: {escape(v)}</li>" for k, v in sorted(r.excluded_groups.items()))
        notes.append(f"<p>Channel groups left unpruned:</p><ul>{items}</ul>")
    floored = [g for g in r.groups if g.on_floor]
    if floored:
        items = "".join(f"<li>{escape(g.root)}: {g.pruned} of {g.dense}</li>" for g in floored)
        notes.append(
            f"<p>Channel groups on the width floor (<code>target.min_width</code>):</p><ul>{items}</ul>"
        )
    if r.bn_recalibration:
        notes.append(f"<p>BatchNorm statistics re-estimated at: {escape(', '.join(r.bn_recalibration))}.</p>")
    if r.finalize_rel_diff is not None:
        notes.append(
            "<p>The physically pruned network's logits differ from the trained network's by "
            f"{r.finalize_rel_diff:.1e} of their scale.</p>"
        )
    return "<h2>Notes</h2>" + "".join(notes) if notes else ""


def _data(r: Report) -> str:
    d = r.data_summary
    if d is None:
        return ""
    shown = ", ".join(escape(c) for c in d.classes[:MAX_CLASSES_SHOWN])
    more = f" and {len(d.classes) - MAX_CLASSES_SHOWN} more" if len(d.classes) > MAX_CLASSES_SHOWN else ""
    return (
        f"<h2>Data</h2><p>{escape(r.data)}: {d.train_images:,} training images, {d.test_images:,} "
        f"{escape(d.split)} images, {len(d.classes)} classes ({shown}{more}).</p>"
    )


def _image(name: str, png: bytes) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<figure><img alt="{escape(name)}" src="data:image/png;base64,{data}"></figure>'


# --- numbers ---


def _interval(e: Estimate, fmt: str = ".3g") -> str:
    """``3.15 [2.75, 3.51]``, with the coverage appended when it falls short of 95 %."""
    short = f" ({e.confidence:.0%})" if e.confidence < 0.95 else ""
    return f"{e.median:{fmt}} [{e.low:{fmt}}, {e.high:{fmt}}]{short}"


def _speedup(b: BatchLatency) -> str:
    cls = {"faster": "faster", "slower": "slower"}.get(b.verdict, "none")
    return f'x{_interval(b.speedup, ".2f")} <span class="{cls}">{escape(b.verdict)}</span>'


def _count(n: int | None) -> str:
    if n is None:
        return "&ndash;"
    for size, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return str(n)


def _bytes(n: int | None) -> str:
    if n is None:
        return "&ndash;"
    for size, unit in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _top1(v: float | None, split: Any) -> str:
    """``87.17 % [86.50, 87.81]``: with Wilson's 95 % interval over the split's images when known."""
    if v is None or split is None or not split.test_images:
        return _pct(v)
    low, high = top1_interval(v, split.test_images)
    return f"{v:.2f} % [{low:.2f}, {high:.2f}]"


def _pct(v: float | None) -> str:
    return "&ndash;" if v is None else f"{v:.2f} %"


def _diff(pruned: float | None, dense: float | None) -> str:
    return "&ndash;" if pruned is None or dense is None else f"{pruned - dense:+.2f} points"


def _ratio(pruned: int | None, dense: int | None) -> str:
    return "&ndash;" if not pruned or not dense else f"{pruned / dense:.3f}"


def _num(v: Any, fmt: str) -> str:
    return "&ndash;" if v is None else format(v, fmt)
