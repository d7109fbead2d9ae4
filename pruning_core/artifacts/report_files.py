"""A report's files in a directory: ``report.json``, its plots and ``report.html``.

Its own module because it joins ``report`` (the model), ``report_plots`` and ``report_html`` (which
read the model): none of them imports another's writer.
"""

from __future__ import annotations

from pathlib import Path

from .report import (
    MAX_METRIC_PANELS,
    REPORT_FILE,
    TRAINING_PLOT,
    WIDTHS_PLOT,
    Report,
    list_metric_file,
    list_metrics,
)
from .report_html import write_html
from .report_plots import plot_list_metric, plot_training, plot_widths


def write_report(report: Report, out_dir: Path) -> list[Path]:
    """Write ``report.json`` (indent 2), ``training.png``, ``widths.png``, a ``metric-<name>.png``
    per list-valued method metric (at most ``MAX_METRIC_PANELS``) and ``report.html`` (all of it, the
    plots embedded); return their paths in that order."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / REPORT_FILE
    json_path.write_text(report.model_dump_json(indent=2) + "\n", encoding="utf-8")
    paths = [
        json_path,
        plot_training(report, out_dir / TRAINING_PLOT),
        plot_widths(report, out_dir / WIDTHS_PLOT),
    ]
    for name in list_metrics(report.history)[:MAX_METRIC_PANELS]:
        paths.append(plot_list_metric(report, name, out_dir / list_metric_file(name)))
    paths.append(write_html(report, out_dir, paths[1:]))
    return paths
