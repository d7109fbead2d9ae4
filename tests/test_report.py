"""report.json: derived ratios, JSON round trip, plots, and a torch-free import."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from html import escape
from pathlib import Path

import pytest
from pydantic import ValidationError

from pruning_core.artifacts.report import (
    Cost,
    EpochRecord,
    GroupWidth,
    LatencyReport,
    PhaseTime,
    Report,
    ReportError,
    epoch_label,
    epoch_line,
    epoch_tick,
    latency_line,
    layer_widths,
    phase_spans,
    pruning_marks,
    read_report,
)
from pruning_core.artifacts.report_files import write_report
from pruning_core.artifacts.report_html import render_html

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class _Est:  # the shapes of latency.Estimate / BatchTiming / LatencyComparison, without importing torch
    median: float
    low: float
    high: float
    confidence: float = 0.957


@dataclass(frozen=True)
class _Batch:
    batch_size: int
    dense_ms: _Est
    pruned_ms: _Est
    speedup: _Est
    rounds: int = 30
    forwards: tuple[int, int] = (2, 4)
    verdict: str = "faster"


@dataclass(frozen=True)
class _Comparison:
    batches: tuple[_Batch, ...]
    device: str = "cpu"
    threads: int = 2
    cpus: int = 2
    load_1min: float | None = 0.5
    busy: bool = False
    budget_s: float = 20.0
    wall_s: float = 3.1


LATENCY = _Comparison(
    (
        _Batch(1, _Est(4.0, 3.8, 4.3), _Est(2.5, 2.4, 2.7), _Est(1.6, 1.5, 1.7)),
        _Batch(8, _Est(20.0, 19.0, 21.0), _Est(11.0, 10.5, 11.6), _Est(1.8, 1.7, 1.9)),
    )
)


def _history() -> list[EpochRecord]:
    rows = [("dense", 0, 40.0, 1000), ("dense", 1, 55.0, 1000)]
    rows += [("finetune", e, 50.0 + e, 480) for e in range(3)]
    return [
        EpochRecord(phase=p, epoch=e, train_loss=1.0 / (e + 1), top1=t, macs=m, lr=0.1, wall_s=1.5)
        for p, e, t, m in rows
    ]


def _report(history=None, groups=None, **over) -> Report:
    args = dict(
        method="magnitude",
        model="resnet20",
        data="digits",
        device="cpu",
        input_shape=[3, 32, 32],
        target_macs_ratio=0.5,
        dense=Cost(macs=1000, params=400, top1=55.0, weights_bytes=1600),
        pruned=Cost(macs=480, params=100, top1=52.0, weights_bytes=400),
        latency=LATENCY,
        groups=[
            GroupWidth(root="conv1", dense=16, pruned=8),
            GroupWidth(root="layer2.0.conv1", dense=32, pruned=20),
        ]
        if groups is None
        else groups,
        phases=[
            PhaseTime(name="dense", wall_s=3.0, epochs=2),
            PhaseTime(name="finetune", wall_s=4.5, epochs=3),
        ],
        history=_history() if history is None else history,
        method_details={"p": 2},
        spec={"model": {"name": "resnet20"}},
    )
    args.update(over)
    return Report.build(**args)


def test_build_derives_the_ratios_from_the_costs():
    r = _report()
    assert r.achieved_macs_ratio == pytest.approx(0.48)
    assert r.params_ratio == pytest.approx(0.25)
    assert r.latency_speedup == 1.8  # the throughput batch's paired median
    assert r.format == "pruning-core/report-v2"
    assert isinstance(r.latency, LatencyReport) and r.latency.batches[1].dense_ms.high == 21.0
    assert latency_line(r.latency) == "latency x1.80 [1.70, 1.90] at batch 8 (faster)"
    no_latency = _report(pruned=Cost(macs=480, params=100), latency=None)
    assert no_latency.latency_speedup is None and no_latency.pruned.top1 is None


def test_ratios_cannot_be_claimed_by_hand():
    fields = _report().model_dump()
    fields["achieved_macs_ratio"] = 0.3
    with pytest.raises(ValidationError, match="achieved_macs_ratio"):
        Report(**fields)
    fields = _report().model_dump()
    fields["latency_speedup"] = None
    with pytest.raises(ValidationError, match="latency_speedup"):
        Report(**fields)


def test_invalid_costs_are_refused():
    # ValueError: pydantic's ValidationError is one too
    with pytest.raises(ValidationError):
        _report(latency=_Comparison(()))  # no batch timed
    with pytest.raises(ValidationError):
        _report(latency=_Comparison((LATENCY.batches[0],), threads=0))
    with pytest.raises(ValueError, match="positive MACs"):
        _report(dense=Cost(macs=0, params=400))
    with pytest.raises(ValidationError):
        Cost(macs=10, params=1, top1=101.0)  # top-1 is a percentage
    with pytest.raises(ValidationError):
        _report(target_macs_ratio=1.5)


def test_json_round_trip_and_plots(tmp_path):
    report = _report()
    paths = write_report(report, tmp_path / "out")
    assert [p.name for p in paths] == ["report.json", "training.png", "widths.png", "report.html"]
    assert json.loads(paths[0].read_text())["achieved_macs_ratio"] == pytest.approx(0.48)
    assert paths[0].read_text().startswith('{\n  "format"')  # indent 2
    assert read_report(paths[0]) == report
    assert read_report(tmp_path / "out") == report
    for png in paths[1:3]:
        data = png.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5_000


def test_empty_history_and_groups_still_plot(tmp_path):
    report = _report(history=[], groups=[], phases=[])
    paths = write_report(report, tmp_path)
    assert read_report(tmp_path) == report
    for png in paths[1:3]:
        data = png.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 2_000
    assert "no channel groups" not in paths[3].read_text()  # the HTML still renders, without rows


def test_engine_epoch_dicts_are_accepted(tmp_path):
    # The engine's history rows are plain dicts, with "event": "pruned" after a mid-training prune.
    rows = [r.model_dump() for r in _history()]
    rows[2]["event"] = "pruned"
    report = _report(history=rows)
    assert report.history[2].event == "pruned" and report.history[0].event is None
    write_report(report, tmp_path)
    assert read_report(tmp_path) == report
    with pytest.raises(ValidationError):
        _report(history=[{**rows[0], "typo_field": 1}])


def test_history_without_top1_plots(tmp_path):
    history = [r.model_copy(update={"top1": None}) for r in _history()]
    write_report(_report(history=history), tmp_path)
    assert (tmp_path / "training.png").read_bytes().startswith(PNG_MAGIC)


def test_read_report_errors_are_one_line(tmp_path):
    path = tmp_path / "report.json"
    cases = {
        "missing": None,
        "not json": "{",
        "wrong field": json.dumps({**_report().model_dump(), "achieved_macs_ratio": 0.9}),
        "unknown field": json.dumps({**_report().model_dump(), "surprise": 1}),
    }
    for text in cases.values():
        if text is not None:
            path.write_text(text)
        with pytest.raises(ReportError) as info:
            read_report(path)
        assert "\n" not in str(info.value) and info.value.code == "bad_report"


def test_phase_spans():
    assert phase_spans(_history()) == [("dense", 1, 2), ("finetune", 3, 5)]
    assert phase_spans([]) == []


def test_layer_widths_from_architectures():
    dense = {
        "layers": {
            "conv1": {"type": "Conv2d", "in_channels": 3, "out_channels": 16, "groups": 1},
            "bn1": {"type": "BatchNorm2d", "num_features": 16},
            "fc": {"type": "Linear", "in_features": 16, "out_features": 10},
        }
    }
    pruned = {
        "layers": {
            "conv1": {"type": "Conv2d", "in_channels": 3, "out_channels": 6, "groups": 1},
            "bn1": {"type": "BatchNorm2d", "num_features": 6},
            "fc": {"type": "Linear", "in_features": 6, "out_features": 10},
        }
    }
    rows = {w.name: w for w in layer_widths(dense, pruned)}
    assert set(rows) == {"conv1", "fc"}
    assert (rows["conv1"].dense_out, rows["conv1"].pruned_out) == (16, 6)
    assert (rows["fc"].dense_in, rows["fc"].pruned_in, rows["fc"].pruned_out) == (16, 6, 10)


def test_report_module_does_not_import_torch():
    code = "import sys, pruning_core.artifacts.report; assert 'torch' not in sys.modules, 'torch imported'"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")  # IHDR width, height


def test_method_numbers_views_and_prunes_reach_the_report_and_plot(tmp_path):
    rows = [r.model_dump() for r in _history()]
    for r in rows[2:]:
        r["metrics"] = {"indicator": 0.9 + r["epoch"] / 100, "ratios": [0.1, 0.2]}
        r["views"] = {"hard": r["top1"], "soft": r["top1"] + 1}
    rows[2].update(
        event="pruned", top1_before=54.0, macs_before=1000, bn_recalibrated=True, train_macs=12_345
    )
    report = _report(history=rows)
    paths = write_report(report, tmp_path)
    again = read_report(tmp_path)
    assert again.history[2].metrics["ratios"] == [0.1, 0.2] and again.history[3].views["soft"] == 52.0
    plain = write_report(_report(), tmp_path / "plain")[1]
    (w, h), (w0, h0) = _png_size(paths[1]), _png_size(plain)
    assert w == w0 and h == h0 + 160, "one more panel (1.6 in at 100 dpi) for the one scalar metric"


def test_a_list_metric_gets_a_plot_of_its_own(tmp_path):
    history = [
        EpochRecord(
            phase="s2h",
            epoch=e,
            top1=50.0 + e,
            macs=900 - 100 * e,
            wall_s=1.0,
            metrics={"expected_widths": [16.0 - e, 32.0 - 2 * e, 64.0 - 3 * e], "kl": 0.1},
        )
        for e in range(4)
    ]
    paths = write_report(_report(history=history), tmp_path)
    assert [p.name for p in paths] == [
        "report.json",
        "training.png",
        "widths.png",
        "metric-expected_widths.png",
        "report.html",
    ]
    assert paths[-2].read_bytes().startswith(PNG_MAGIC) and paths[-2].stat().st_size > 5_000


# --- epochs: one numbering for people ---


def test_epochs_are_numbered_alike_in_the_cli_the_events_the_plot_and_the_html():
    rows = [r.model_dump() for r in _history()]  # dense 0, 1; finetune 0, 1, 2 (0-based, as stored)
    rows[3].update(event="pruned", top1_before=54.0, macs_before=1000)
    report = _report(history=rows)
    event = rows[3]  # an "epoch" event's data is the engine's record itself
    assert epoch_line(event).startswith("finetune epoch 2:")  # prune run / prune watch
    assert epoch_label(report.history[3].phase, report.history[3].epoch) == "finetune epoch 2"
    assert [epoch_tick(report.history, x) for x in range(1, 6)] == ["1", "2", "1", "2", "3"]
    assert epoch_tick(report.history, 2.5) == "" and epoch_tick(report.history, 6) == ""
    marks = pruning_marks(report.history)
    assert marks == [(2.5, "pruned before finetune epoch 1"), (4.5, "pruned after finetune epoch 2")]
    page = render_html(report, {})
    assert "pruned after finetune epoch 2" in page and "<td class=l>finetune epoch 3</td>" in page
    assert "epoch 0" not in page


# --- report.html from a real run ---

HOSTILE = '"><img src=x onerror=alert(1)>&'


@pytest.fixture(scope="module")
def real_run(tmp_path_factory) -> tuple[Path, dict]:
    """A small imagefolder job whose class names and data root carry markup."""
    import numpy as np
    from PIL import Image

    from pruning_core.jobs.runner import run
    from pruning_core.spec import parse_spec

    root = tmp_path_factory.mktemp("data") / f"imgs{HOSTILE}"
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("test", 3)):
        for cls in ("cat", HOSTILE):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i}.png")
    spec = parse_spec(
        {
            "model": {"name": "resnet20"},
            "data": {"name": "imagefolder", "root": str(root), "image_size": 16},
            "target": {"macs_ratio": 0.5},
            "schedule": {"dense_epochs": 1, "epochs": 1, "batch_size": 8, "max_steps_per_epoch": 2},
            "export": {"formats": ["safetensors"], "latency_batch_size": 4, "latency_max_s": 1.0},
            "device": "cpu",
        }
    )
    out = tmp_path_factory.mktemp("job")
    result = run(spec, out)
    assert result.artifacts["report.html"] == out / "report.html"
    return out, json.loads((out / "report.json").read_text())


def test_html_of_a_real_run_holds_the_reports_numbers_inline(real_run):
    out, report = real_run
    page = (out / "report.html").read_text(encoding="utf-8")
    lat = report["latency"]
    assert [b["batch_size"] for b in lat["batches"]] == [1, 4] and lat["threads"] >= 1
    # the summary table: MACs, params, top-1 with its split and images, latency with intervals, files
    for cost in ("dense", "pruned"):
        assert f"{report[cost]['macs'] / 1e6:.2f} M" in page and f"{report[cost]['top1']:.2f} %" in page
    assert f"{report['dense']['params'] / 1e3:.2f} k" in page
    assert "top-1 on the test split, 6 images" in page
    for b in lat["batches"]:
        d, s = b["dense_ms"], b["speedup"]
        assert f"{d['median']:.3g} [{d['low']:.3g}, {d['high']:.3g}]" in page
        assert f"x{s['median']:.2f} [{s['low']:.2f}, {s['high']:.2f}]" in page and b["verdict"] in page
    assert "model.safetensors" in page and "pruned before finetune epoch 1" in page
    # self-contained: every image inline, nothing fetched
    assert page.count('src="data:image/png;base64,') == 2  # training.png, widths.png
    assert "://" not in page and "href=" not in page and "url(" not in page  # no link, no fetch
    assert "<link" not in page and "<script" not in page
    assert str(out) not in page


def test_html_escapes_what_the_user_controls(real_run):
    out, report = real_run
    page = (out / "report.html").read_text(encoding="utf-8")
    assert HOSTILE in report["data_summary"]["classes"] and HOSTILE in report["spec"]["data"]["root"]
    assert "<img src=x" not in page and "onerror=alert(1)>" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;&amp;" in page  # the class name, shown escaped
    assert "Content-Security-Policy\" content=\"default-src 'none'; img-src data:;" in page


def test_every_reader_shows_the_speedup_with_its_interval_and_verdict():
    from pruning_client.models import JobResult
    from pruning_client.render import result_line
    from worker.execute import summarize

    report = _report()
    result = summarize(report)
    assert result["latency_speedup_interval"] == [1.7, 1.9] and result["latency_verdict"] == "faster"
    assert result["dense"]["latency_ms"] == 20.0 and result["pruned"]["latency_ms"] == 11.0
    assert result_line(JobResult.model_validate(result)).endswith(
        "latency x1.80 [1.70, 1.90] at batch 8 (faster)"
    )
    assert result_line(JobResult(latency_speedup=1.5)) == "latency x1.50"  # a job finished before v2
    assert latency_line(report.latency) == "latency x1.80 [1.70, 1.90] at batch 8 (faster)"  # prune run
    busy = _report(latency=_Comparison(LATENCY.batches, busy=True, load_1min=7.5))
    assert latency_line(busy.latency).endswith("(faster, busy machine)")
    assert result_line(JobResult.model_validate(summarize(busy))).endswith("(faster, busy machine)")


def test_top1_has_a_binomial_interval_and_the_headline_reads_at_a_glance():
    from pruning_core.artifacts.report import headline, top1_change_margin, top1_interval

    low, high = top1_interval(50.0, 100)  # Wilson's interval, 95 %
    assert (round(low, 2), round(high, 2)) == (40.38, 59.62)
    low, high = top1_interval(100.0, 360)
    assert high == 100.0 and 98.9 < low < 99.0  # no interval past 100 %, none of width 0
    assert round(top1_change_margin(87.2, 86.8, 10_000), 2) == 0.93
    r = _report(data_summary={"split": "test", "train_images": 50, "test_images": 360, "classes": ["a", "b"]})
    line = headline(r)
    assert line.startswith("2.1x fewer MACs · 4.0x fewer params · top-1 -3.0 ± ")
    assert "(55.0 -> 52.0 %, 360 images)" in line and "speed-up x" in line and "on cpu, batch" in line


def test_the_html_leads_with_the_headline_and_shows_what_the_spec_changed():
    from pruning_core.artifacts.report import headline
    from pruning_core.artifacts.report_html import render_html, spec_changes

    spec = {"model": {"name": "resnet20"}, "method": {"name": "psap", "ramp": 0.5}, "schedule": {"epochs": 3}}
    assert spec_changes(spec) == [("method.ramp", 0.5)]  # epochs 3, resnet20, psap's other options: defaults
    r = _report(
        data_summary={"split": "test", "train_images": 50, "test_images": 360, "classes": ["a", "b"]},
        spec=spec,
    )
    page = render_html(r, {})
    assert page.index(escape(headline(r))) < page.index("<h2>")
    assert "<code>method.ramp</code>: 0.5" in page
    assert "52.00 % [" in page  # top-1 with its interval in the table
    # the phases add up to the job: what no phase counts is its own row
    r = _report(total_wall_s=10.0)
    page = render_html(r, {})
    assert "the rest: loading data, evaluating, checkpoints, measuring</td><td></td><td>2.5</td>" in page
    assert "finetune (training steps)" in page
