"""The benchmark's smoke profile end to end (digits, seconds), and the pieces its figures rest on."""

import json
from pathlib import Path

import pytest
import torch

from bench import markdown  # noqa: E402
from bench.peer import RATIO_TOL, prune_to_macs, tp_prune  # noqa: E402
from bench.run import main  # noqa: E402
from pruning_core.graph.macs import count_macs, count_params  # noqa: E402
from pruning_core.models.zoo import build_model  # noqa: E402

PRUNED = ("magnitude", "peer")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[dict, str, Path]:
    out = tmp_path_factory.mktemp("bench")
    assert main(["--profile", "smoke", "--out", str(out)]) == 0
    (results,) = out.glob("smoke-*.json")
    return json.loads(results.read_text()), (out / "BENCHMARKS-smoke.md").read_text(), out


def _runs(results: dict) -> list[dict]:
    return [run for case in results["cases"] for run in case["runs"]]


def test_results_file_describes_the_run(smoke):
    results, _, out = smoke
    assert results["format"] == "pruning-core/bench-v1" and results["profile"] == "smoke"
    assert results["command"].startswith("python -m bench.run --profile smoke")
    assert results["machine"]["torch"] == torch.__version__
    assert [c["label"] for c in results["cases"]] == ["digits"]
    assert not list(out.glob(".work-*"))  # scratch files removed


def test_pruned_rows_meet_the_target_and_are_smaller(smoke):
    results, _, _ = smoke
    for run in _runs(results):
        dense = run["rows"]["dense"]
        assert dense["macs_ratio"] == 1.0
        for name in PRUNED:
            row = run["rows"][name]
            assert 0.48 <= row["macs_ratio"] <= 0.5, (name, row["macs_ratio"])
            assert row["macs"] <= int(results["target"] * dense["macs"])
            assert row["params"] < dense["params"]
            assert 0 <= row["top1"] <= 100
            for lat in row["latency"].values():
                assert lat["p50_ms"] > 0 and lat["device"] == "cpu"


def test_plain_loop_does_the_engines_arithmetic(smoke):
    """Same initial weights, data order, optimizer and LR schedule: on CPU the same dense network."""
    results, _, _ = smoke
    for run in _runs(results):
        assert run["timing"]["plain_top1"] == run["rows"]["dense"]["top1"]
        assert (
            len(run["timing"]["engine_epoch_s"])
            == len(run["timing"]["plain_epoch_s"])
            == results["cases"][0]["dense_epochs"]
        )


def test_markdown_has_a_row_per_method(smoke):
    _, text, _ = smoke
    section = text.split("<!-- bench:smoke -->")[1].split("<!-- /bench:smoke -->")[0]
    for _, label in markdown.METHODS:
        assert sum(line.startswith(f"| {label} |") for line in section.splitlines()) == 1, label
    assert "| digits | 0 |" in section  # the engine vs plain table
    assert "<!-- bench:gpu -->" in text and "Not run yet" in text


def test_peer_macs_come_from_our_counter_and_fit_the_target():
    example = torch.zeros(1, 1, 8, 8)
    torch.manual_seed(0)
    state = build_model("resnet20", 10, 1).state_dict()

    def build() -> torch.nn.Module:
        model = build_model("resnet20", 10, 1)
        model.load_state_dict(state)
        return model

    dense = count_macs(build(), example)
    target = dense // 2
    peer = prune_to_macs(build, example, 10, target)
    assert peer.macs == count_macs(peer.model, example) <= target
    assert count_params(peer.model) < count_params(build())
    assert peer.model.fc.out_features == 10  # the head is never pruned
    # the largest MACs that fit: pruning a little less overshoots the target
    assert count_macs(tp_prune(build(), example, 10, peer.pruning_ratio - RATIO_TOL), example) > target


def test_update_markdown_replaces_only_its_own_section(tmp_path):
    path = tmp_path / "B.md"
    markdown.update_markdown(path, "cpu", "<!-- bench:cpu -->\nfirst\n<!-- /bench:cpu -->\n")
    text = path.read_text()
    assert text.startswith("# Benchmarks") and "first" in text and "<!-- bench:gpu -->" in text
    markdown.update_markdown(path, "cpu", "<!-- bench:cpu -->\nsecond\n<!-- /bench:cpu -->\n")
    after = path.read_text()
    assert "first" not in after and "second" in after
    assert after.split("<!-- bench:gpu -->")[1] == text.split("<!-- bench:gpu -->")[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_profile_refuses_without_cuda(tmp_path):
    with pytest.raises(SystemExit, match="CUDA"):
        main(["--profile", "gpu", "--out", str(tmp_path)])
    assert not list(tmp_path.iterdir())


def test_cifar_archive_resolves_to_an_extracted_folder(tmp_path, monkeypatch):
    """The CIFAR cases name a .tar.gz: ``resolve_data`` extracts the spec's per-class share once and hands
    the engine that folder (a signature drift here once stopped every CIFAR benchmark)."""
    import tarfile

    from PIL import Image

    import bench.run as run
    from pruning_core.spec import DataSpec

    tree = tmp_path / "tree"
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            (tree / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tree / split / cls / f"{i}.jpg")
    archive = tmp_path / "tiny.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tree, arcname="tiny")
    monkeypatch.setattr(run, "CACHE_DIR", tmp_path / "cache")

    data = DataSpec(name="imagefolder", root=str(archive), per_class=2, test_per_class=1)
    folder = Path(run.resolve_data(data).root)
    assert folder.is_dir() and folder.is_relative_to(tmp_path / "cache")
    assert sorted(p.relative_to(folder).parts[-3] for p in folder.rglob("*.jpg")).count("train") == 4
    assert run.resolve_data(data).root == str(folder)  # extracted once, the same folder again
