"""A sweep's leaderboard: one row per child job, its figures read from the child's own ``report.json``
(never recomputed another way, so they equal the child's report by construction), ranked by ``rank_by``,
and rendered as a self-contained ``sweep.html`` (table + an inline SVG of top-1 against latency with the
Pareto front marked). Pure functions over plain dicts: no database, no torch.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from typing import Any

RANK_BY = ("top1", "speedup", "pareto")
# rank_by "pareto": the winner is the fastest network of the front whose top-1 is at most this many
# points below the front's best (a user asking for the trade-off wants speed that costs little accuracy).
PARETO_TOP1_SLACK = 1.0


def report_figures(report: dict[str, Any]) -> dict[str, Any]:
    """The leaderboard's figures of one child, from its ``report.json`` (``pruning_core.artifacts.report.Report``
    as JSON). Latency is the throughput batch's (the largest batch timed), as the job's result gives it;
    training time and MACs sum the report's epochs (``wall_s``, ``train_macs``)."""
    latency = report.get("latency")
    at = max(latency["batches"], key=lambda b: b["batch_size"]) if latency else None
    history = report.get("history") or []
    return {
        "top1": report["pruned"].get("top1"),
        "dense_top1": report["dense"].get("top1"),
        "test_images": (report.get("data_summary") or {}).get("test_images"),
        "macs": report["pruned"]["macs"],
        "params": report["pruned"]["params"],
        "achieved_macs_ratio": report["achieved_macs_ratio"],
        "params_ratio": report["params_ratio"],
        # an implausible timing (beyond what the MAC count allows) ranks no one
        "speedup": None if (latency or {}).get("implausible") else report.get("latency_speedup"),
        "speedup_interval": [at["speedup"]["low"], at["speedup"]["high"]] if at else None,
        "latency_verdict": ("implausible" if latency.get("implausible") else at["verdict"]) if at else None,
        "latency_ms": at["pruned_ms"]["median"] if at else None,
        "latency_batch_size": at["batch_size"] if at else None,
        "training_s": sum(h["wall_s"] for h in history),
        "training_macs": sum(h.get("train_macs") or 0 for h in history),
    }


# A row without a report (failed, cancelled, never run) has every figure None.
EMPTY_FIGURES: dict[str, Any] = dict.fromkeys(
    report_figures(
        {"pruned": {"macs": 0, "params": 0}, "dense": {}, "achieved_macs_ratio": 0, "params_ratio": 0}
    )
)


def pareto_front(rows: Sequence[dict[str, Any]]) -> set[str]:
    """Job ids of the succeeded rows no other row beats on both top-1 (higher) and latency (lower)."""
    pts = [r for r in rows if r["status"] == "succeeded" and r["top1"] is not None and r["latency_ms"]]

    def dominated(r: dict[str, Any]) -> bool:
        return any(
            o["top1"] >= r["top1"]
            and o["latency_ms"] <= r["latency_ms"]
            and (o["top1"] > r["top1"] or o["latency_ms"] < r["latency_ms"])
            for o in pts
        )

    return {r["job_id"] for r in pts if not dominated(r)}


def _key(rank_by: str, front: set[str]):
    """Sort key of a succeeded row: smaller is better."""

    def key(r: dict[str, Any]) -> tuple:
        top1 = r["top1"] if r["top1"] is not None else -1.0
        speed = r["speedup"] if r["speedup"] is not None else 0.0
        if rank_by == "speedup":
            return (-speed, -top1, r["macs"])
        if rank_by == "pareto":
            return (r["job_id"] not in front, -top1, -speed)
        return (-top1, r["macs"], -speed)

    return key


def rank(rows: list[dict[str, Any]], rank_by: str) -> tuple[list[dict[str, Any]], str | None]:
    """Rows ordered best first (succeeded ones ranked 1, 2, ...; the others after, unranked) with
    ``pareto`` set on each, and the winner's job id (None when no child succeeded)."""
    front = pareto_front(rows)
    done = sorted((r for r in rows if r["status"] == "succeeded"), key=_key(rank_by, front))
    rest = [r for r in rows if r["status"] != "succeeded"]
    ordered = [r | {"rank": i + 1, "pareto": r["job_id"] in front} for i, r in enumerate(done)]
    ordered += [r | {"rank": None, "pareto": False} for r in rest]
    return ordered, _winner(done, front, rank_by)


def _winner(done: list[dict[str, Any]], front: set[str], rank_by: str) -> str | None:
    if not done:
        return None
    on_front = [r for r in done if r["job_id"] in front]
    if rank_by != "pareto" or not on_front:
        return done[0]["job_id"]
    best = max(r["top1"] for r in on_front)
    close = [r for r in on_front if r["top1"] >= best - PARETO_TOP1_SLACK]
    return min(close, key=lambda r: r["latency_ms"])["job_id"]


# --- sweep.html ---

COLUMNS = (
    ("rank", "#"),
    ("method", "method"),
    ("target", "target"),
    ("status", "status"),
    ("top1", "top-1 %"),
    ("test_images", "test images"),
    ("achieved_macs_ratio", "MACs ratio"),
    ("macs", "MACs"),
    ("params", "params"),
    ("speedup", "speed-up [95 %]"),
    ("latency_ms", "latency ms"),
    ("training_s", "training s"),
    ("training_macs", "training MACs"),
)


def target_text(target: dict[str, Any]) -> str:
    """``0.5 MACs`` or ``2x speed``."""
    if target.get("speedup") is not None:
        return f"{target['speedup']:g}x speed"
    return f"{target.get('macs_ratio', 0.5):g} MACs"


def cell(row: dict[str, Any], key: str) -> str:
    """One table cell's text."""
    v = row.get(key)
    if key == "target":
        return target_text(v or {})
    if key == "status" and row.get("error"):
        return f"{v}: {row['error'].get('code')}"
    if key == "speedup" and v is not None:
        lo, hi = row.get("speedup_interval") or (None, None)
        return f"{v:.2f}x [{lo:.2f}, {hi:.2f}]" if lo is not None else f"{v:.2f}x"
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if key != "top1" else f"{v:.2f}"
    return f"{v:,}" if isinstance(v, int) and key not in ("rank",) else str(v)


def _svg(rows: Sequence[dict[str, Any]], winner: str | None, w: int = 560, h: int = 320) -> str:
    """Top-1 against latency: each succeeded child a dot, the Pareto front joined, the winner ringed."""
    pts = [r for r in rows if r["status"] == "succeeded" and r["top1"] is not None and r["latency_ms"]]
    if not pts:
        return "<p>No child has both a top-1 and a measured latency to plot.</p>"
    pad = 50
    xs, ys = [r["latency_ms"] for r in pts], [r["top1"] for r in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    x0, x1 = (x0 * 0.9, x1 * 1.1) if x1 > x0 else (x0 * 0.5, x1 * 1.5)
    y0, y1 = (y0 - 1, y1 + 1) if y1 > y0 else (y0 - 5, y1 + 5)

    def px(r: dict[str, Any]) -> tuple[float, float]:
        x = pad + (r["latency_ms"] - x0) / (x1 - x0) * (w - 2 * pad)
        y = h - pad - (r["top1"] - y0) / (y1 - y0) * (h - 2 * pad)
        return round(x, 1), round(y, 1)

    front = sorted((r for r in pts if r.get("pareto")), key=lambda r: r["latency_ms"])
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img" '
        'aria-label="top-1 against latency">',
        f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="#444"/>',
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="#444"/>',
        f'<text x="{w / 2}" y="{h - 12}" text-anchor="middle">latency, ms per batch '
        "(pruned, throughput batch)</text>",
        f'<text x="14" y="{h / 2}" transform="rotate(-90 14 {h / 2})" text-anchor="middle">top-1 %</text>',
        f'<text x="{pad}" y="{h - pad + 16}" font-size="11">{x0:.3g}</text>',
        f'<text x="{w - pad}" y="{h - pad + 16}" font-size="11" text-anchor="end">{x1:.3g}</text>',
        f'<text x="{pad - 4}" y="{h - pad}" font-size="11" text-anchor="end">{y0:.3g}</text>',
        f'<text x="{pad - 4}" y="{pad + 4}" font-size="11" text-anchor="end">{y1:.3g}</text>',
    ]
    if len(front) > 1:
        line = " ".join(f"{x},{y}" for x, y in map(px, front))
        parts.append(
            f'<polyline class="front" points="{line}" fill="none" stroke="#c33" stroke-width="1.5"/>'
        )
    for r in pts:
        x, y = px(r)
        color = "#c33" if r.get("pareto") else "#36c"
        label = html.escape(f"{r['method']} @ {target_text(r['target'])}")
        parts.append(f'<circle cx="{x}" cy="{y}" r="4" fill="{color}"><title>{label}</title></circle>')
        parts.append(f'<text x="{x + 6}" y="{y - 6}" font-size="11">{label}</text>')
        if r["job_id"] == winner:
            parts.append(f'<circle class="winner" cx="{x}" cy="{y}" r="9" fill="none" stroke="#090"/>')
    parts.append("</svg>")
    return "\n".join(parts)


def render_html(board: dict[str, Any], root_path: str = "") -> str:
    """``sweep.html``: self-contained (no script, no external file), every value escaped."""
    rows = board["rows"]
    head = "".join(f"<th>{html.escape(t)}</th>" for _, t in COLUMNS) + "<th>report</th>"
    body = []
    for r in rows:
        cls = ' class="winner"' if board.get("winner") and r["job_id"] == board["winner"] else ""
        cells = "".join(f"<td>{html.escape(cell(r, k))}</td>" for k, _ in COLUMNS)
        link = f"{root_path}/v1/jobs/{r['job_id']}/artifacts/report.html"
        report = f'<a href="{html.escape(link)}">report</a>' if r["status"] == "succeeded" else ""
        err = html.escape((r.get("error") or {}).get("message") or "")
        body.append(f"<tr{cls}>{cells}<td>{report}</td></tr>")
        if err:
            body.append(f'<tr class="error"><td></td><td colspan="{len(COLUMNS)}">{err}</td></tr>')
    dense = board.get("dense")
    dense_line = (
        f"<p>Dense training, once for every child: job {html.escape(dense['job_id'])}, "
        f"{html.escape(dense['status'])}, {cell(dense, 'training_s')} s, "
        f"{cell(dense, 'training_macs')} training MACs, top-1 {cell(dense, 'top1')} %.</p>"
        if dense
        else ""
    )
    winner = next((r for r in rows if board.get("winner") and r["job_id"] == board["winner"]), None)
    title = f"Sweep {board['sweep_id']}"
    won = (
        f"<p>Winner by <b>{html.escape(board['rank_by'])}</b>: {html.escape(winner['method'])} @ "
        f"{html.escape(target_text(winner['target']))} (job {html.escape(winner['job_id'])}).</p>"
        if winner
        else "<p>No child succeeded: no winner.</p>"
    )
    total = f"<p>Training MACs, all jobs of the sweep: {board['training_macs_total']:,}.</p>"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}tr.winner{{background:#efe}}
tr.error td{{text-align:left;color:#a00;font-size:90%}}</style></head>
<body><h1>{html.escape(title)}</h1>
<p>Status: {html.escape(board["status"])}.</p>{won}{dense_line}{total}
<table><thead><tr>{head}</tr></thead><tbody>
{chr(10).join(body)}
</tbody></table>
<h2>Top-1 against latency (Pareto front in red)</h2>
{_svg(rows, board.get("winner"))}
</body></html>
"""


def dumps(board: dict[str, Any]) -> bytes:
    """``leaderboard.json``'s bytes."""
    return (json.dumps(board, indent=2, sort_keys=True) + "\n").encode()
