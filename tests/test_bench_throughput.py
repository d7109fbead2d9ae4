"""bench.throughput's smoke profile: every figure is measured and the table renders (no timing asserted)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import throughput
from pruning_core.settings import Settings


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    settings = Settings(decode_cache_dir=tmp_path_factory.mktemp("decoded"))
    return throughput.run_profile("smoke", settings, log=lambda _: None)


def test_every_loop_and_bound_is_timed(results: dict) -> None:
    (case,) = results["cases"]
    assert case["steps"] == 3 and case["images_per_epoch"] == 3 * 64 and case["held_in_memory"]
    for key in ("engine_epoch_s", "plain_epoch_s", "resident_epoch_s", "compute_bound_epoch_s"):
        assert case[key] > 0, key
    assert case["macs_per_image"] > 0 and results["conv_tflops"] > 0 and case["busy"] > 0


def test_the_table_shows_seconds_and_images_per_second(results: dict, tmp_path: Path) -> None:
    text = throughput.table(results)
    assert "| digits (resnet20, batch 64) | 192 |" in text and "TFLOP/s" in text
