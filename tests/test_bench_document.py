"""bench.document: BENCHMARKS.md is what the manifest's committed results regenerate (byte for byte), every
file it cites is tracked and not ignored, and the summary names the winner the figures say (no training)."""

from __future__ import annotations

import subprocess

import pytest

from bench import document
from bench.profiles import REPO_DIR


def test_benchmarks_md_is_regenerated_from_the_committed_results() -> None:
    committed = (REPO_DIR / "BENCHMARKS.md").read_text()
    assert document.document() == committed, "BENCHMARKS.md drifted: run `python -m bench.document`"


def test_every_cited_results_file_is_tracked_and_not_ignored() -> None:
    tracked = set(
        subprocess.run(
            ["git", "ls-files", "bench/results", "bench/notes"],
            cwd=REPO_DIR,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
    )
    for path in document.cited():
        rel = str(path.relative_to(REPO_DIR))
        assert rel in tracked, f"{rel} is not committed"
        ignored = subprocess.run(["git", "check-ignore", "-q", rel], cwd=REPO_DIR)
        assert ignored.returncode == 1, f"{rel} is matched by .gitignore"
    for note in document.NOTES_DIR.glob("*.md"):  # a note without a section would never be shown
        assert note.stem in {s.name for s in document.MANIFEST}, note.name


def _trained(rows_per_seed: list[dict[str, float]], target: float = 0.5) -> dict:
    """A tiny bench.trained results dict: per seed, method -> top-1 at one target."""
    runs = [
        {
            "seed": seed,
            "dense": {"top1": 90.0, "params": 1},
            "targets": [
                {
                    "target": target,
                    "rows": {
                        k: {
                            "top1": v,
                            "macs_ratio": target,
                            "params": 1,
                            "train_wall_s": 10.0,
                            "train_macs": 2e9,
                        }
                        for k, v in rows.items()
                    },
                }
            ],
        }
        for seed, rows in enumerate(rows_per_seed)
    ]
    case = {"model": "resnet20", "finetune_epochs": 1, "per_class": 5, "runs": runs}
    return {"targets": [target], "date": "2026-12-07T00:00:00+00:00", "case": case}


def _compare(rows_per_seed: list[dict[str, float]]) -> dict:
    """A tiny bench.compare (v1) results dict of the method `epi`, CIFAR case only."""
    runs = _trained(rows_per_seed)["case"]["runs"]
    return {
        "method": "epi",
        "one_stage": True,
        "date": "2026-12-06T00:00:00+00:00",
        "cases": [{"runs": runs}],
    }


def _row(text: str, target: float) -> str:
    (line,) = [x for x in text.splitlines() if f"| {target:g} |" in x]
    return line


def test_summary_names_the_winner_its_lead_and_spread() -> None:
    # tas wins on the mean (82 against 81) but not in every seed; epi wins Table B in every seed
    a = _trained([{"magnitude": 80.0, "tas": 83.0}, {"magnitude": 82.0, "tas": 81.0}])
    b = _compare([{"prune-at-init": 40.0, "epi": 41.0}, {"prune-at-init": 42.0, "epi": 44.0}])
    text = document.summary(a, [b])
    a_row = _row(text.split("Train a small network")[0], 0.5)
    assert a_row.startswith(
        "| 0.5 | `tas` | 82.00 ± 1.41 (83.00, 81.00) | +1.00 (per seed -1.00 to +3.00; not"
    )
    assert "over `magnitude` + KD" in a_row
    b_row = _row(text.split("Train a small network")[1], 0.5)
    assert (
        "| `epi` | 42.50 ± 2.12 (41.00, 44.00) | +1.50 (per seed +1.00 to +2.00) over `magnitude` at" in b_row
    )
    assert "10 s, 2 G MACs" in b_row


@pytest.mark.parametrize("winner", ["magnitude", "psap"])
def test_one_seed_says_so(winner: str) -> None:
    loser = "psap" if winner == "magnitude" else "magnitude"
    a = _trained([{winner: 70.0, loser: 60.0}])
    row = _row(document.summary(a, []), 0.5)
    assert row.startswith(
        f"| 0.5 | {document.SHORT_A[winner]} | 70.00 (n=1): one seed, no spread yet | +10.00 over"
    )


def test_a_reading_of_files_no_longer_shown_is_left_out(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(document, "NOTES_DIR", tmp_path)
    (tmp_path / "x.md").write_text("<!-- reads: a.json -->\n### Reading\n")
    assert document.note(document.Section("x", "compare", ("a.json",))) == "\n### Reading\n"
    assert document.note(document.Section("x", "compare", ("b.json",))) == ""


def test_a_validation_run_shows_the_options_it_was_given() -> None:
    from bench import compare

    ran = {
        "format": compare.FORMAT,
        "contenders": {"s2h": {"options": {"finetune_epochs": 3}}, "epi": {"options": {}}},
    }
    assert document._given(ran) == '`s2h` `{"finetune_epochs": 3}`'
    ran["contenders"]["s2h"]["options"] = {}
    assert document._given(ran) == "that day's defaults"
