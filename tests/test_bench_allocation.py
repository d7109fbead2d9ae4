"""``bench.allocation`` in miniature (ResNet-20 on a 3-class image folder, a few steps): both
allocations of a seed start from one dense training, and the table shows each with the allocation its
job kept. The figures' size is not under test."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from bench.allocation import SECTION, main


def _folder(root: Path, n_train: int = 6, n_test: int = 2, side: int = 16) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for c, name in enumerate(("cat", "dog", "owl")):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                base = np.full((side, side, 3), 60 * c, dtype=np.int16)
                pixels = np.clip(base + rng.integers(0, 80, (side, side, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i:03d}.png")
    return root


def test_both_allocations_prune_one_dense_training_and_the_table_shows_them(tmp_path: Path) -> None:
    data = _folder(tmp_path / "images")
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\nkept as is\n")
    args = ["--model", "resnet20", "--size", "16", "--data", str(data), "--per-class", "6"]
    args += ["--test-per-class", "2", "--dense-epochs", "1", "--epochs", "1", "--batch-size", "6"]
    args += ["--max-steps", "2", "--ratio", "0.5", "--latency-s", "0.5", "--device", "cpu"]
    jobs = tmp_path / "jobs"
    assert main([*args, "--workdir", str(jobs), "--out", str(tmp_path), "--markdown", str(md)]) == 0
    (path,) = tmp_path.glob("allocation-*.json")
    runs = json.loads(path.read_text())["runs"]
    assert [r["allocation"] for r in runs] == ["macs", "latency"]
    by_macs, by_latency = runs
    # the latency job resumed the macs job's finished dense phase (a copy with its time: training again
    # would have written a new checkpoint), so both pruned the same dense network
    first, second = (jobs / f"seed0-{a}" / "checkpoints" / "dense.pt" for a in ("macs", "latency"))
    assert first.stat().st_mtime_ns == second.stat().st_mtime_ns
    assert by_macs["dense_top1"] == by_latency["dense_top1"]
    assert by_macs["kept_allocation"] == "macs" and by_macs["check"] is None
    assert by_latency["kept_allocation"] in {"macs", "latency"} and by_latency["check"] is not None
    for r in runs:
        assert r["macs_ratio"] <= 0.52 and (r["train_images"], r["test_images"]) == (18, 6)
        assert set(r["latency"]) == {"b1", "b8"}
    text = md.read_text()
    assert text.startswith("# Benchmarks\n\nkept as is\n")
    section = text.split(f"<!-- bench:{SECTION} -->")[1].split(f"<!-- /bench:{SECTION} -->")[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    assert [row.split("|")[1].strip() for row in rows] == ["`macs`", "`latency`"]
    assert all(row.count("|") == 10 for row in rows) and "18 training and 6 test images" in section
