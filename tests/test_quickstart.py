"""The README's Quick start as a newcomer types it: the submit line says what is wrong when no service
listens, and (slow) the whole block runs as written against `python -m api` in embedded mode."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.stack import free_port, process, wait_ready

ROOT = Path(__file__).parents[1]
DEFAULT_URL = "http://127.0.0.1:8000"


def quickstart_block() -> str:
    """The Quick start's second bash block (the one for the second terminal)."""
    section = ROOT.joinpath("README.md").read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    assert DEFAULT_URL in blocks[1], "the block names the service URL once, in PRUNE_URL"
    return blocks[1]


def sdk_example() -> str:
    """The Python block of the README's "SDK and CLI" section."""
    section = ROOT.joinpath("README.md").read_text().split("### SDK and CLI", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)[0]


def run_bash(script: str, cwd: Path) -> subprocess.CompletedProcess:
    """``script`` in bash; stdout and stderr decoded as they came (text mode would turn "\r" into "\n")."""
    env = {k: v for k, v in os.environ.items() if k not in ("PRUNE_URL", "PRUNE_API_KEY")}
    proc = subprocess.run(["bash", "-c", script], cwd=cwd, env=env, capture_output=True, timeout=600)
    proc.stdout, proc.stderr = proc.stdout.decode(), proc.stderr.decode()
    return proc


def test_submit_without_a_service_says_so(tmp_path: Path) -> None:
    block = quickstart_block()
    submit = block[: block.index(">&2") + len(">&2")]  # from `export PRUNE_URL` through the submit line
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    proc = run_bash(submit.replace(DEFAULT_URL, url) + '\necho "JOB=[$JOB]"', tmp_path)
    assert proc.stdout == "JOB=[]\n"
    lines = proc.stderr.splitlines()
    assert lines[-1] == f"no job submitted: is the service up at {url}? (make run)", proc.stderr
    assert "Failed to connect" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_quickstart_runs_as_written(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env |= {"STATE_DIR": str(tmp_path / "state"), "PORT": str(port), "AUTH_DISABLED": "1"}
    work = tmp_path / "work"
    (work / ".venv" / "bin").mkdir(parents=True)
    prune = work / ".venv" / "bin" / "prune"  # what `make run` installs, on this checkout
    prune.write_text(f'#!/bin/sh\nPYTHONPATH={ROOT} exec {sys.executable} -m pruning_client.cli "$@"\n')
    prune.chmod(0o755)
    url = f"http://127.0.0.1:{port}"
    with process([sys.executable, "-m", "api"], env, tmp_path / "api.log") as api:
        wait_ready(url, api, tmp_path / "api.log")
        proc = run_bash("set -e\n" + quickstart_block().replace(DEFAULT_URL, url), work)
        sdk_dir = tmp_path / "sdk"
        sdk_dir.mkdir()
        sdk = subprocess.run(
            [sys.executable, "-c", sdk_example()],
            cwd=sdk_dir,
            env=env | {"PRUNE_URL": url, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=600,
        )
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stdout, "piped, prune watch prints plain lines"
    (job_dir,) = [p for p in work.iterdir() if p.name != ".venv"]
    assert f"{job_dir.name} succeeded: MACs" in proc.stdout
    names = {"model.safetensors", "architecture.json", "model.onnx", "report.json", "report.html"}
    assert names <= {p.name for p in job_dir.iterdir()}, "every artifact downloaded"
    assert all(f"\n{n} " in proc.stdout for n in names), "prune artifacts listed them"

    assert sdk.returncode == 0, sdk.stderr
    lines = sdk.stdout.splitlines()
    assert lines[0].startswith("succeeded 0."), "wait() returned the ended job, its result typed"
    assert sum(line.startswith("pruned: MACs ") for line in lines) == 1, "one pruned event"
    assert "finetune epoch 3: " in sdk.stdout, "its 3 fine-tuning epochs counted from 1"
    assert "untrained" not in sdk.stdout, "the SDK example trains before it prunes"
    (sdk_job,) = list(sdk_dir.iterdir())
    assert names <= {p.name for p in sdk_job.iterdir()}


def sweep_block() -> str:
    """The bash block of the README's sweep section (it runs after the Quick start's, in its shell)."""
    section = ROOT.joinpath("README.md").read_text().split("### Which method for my model?", 1)[1]
    return re.findall(r"```bash\n(.*?)```", section.split("\n## ", 1)[0], re.S)[0]


@pytest.mark.slow
def test_the_sweep_block_runs_as_written(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env |= {"STATE_DIR": str(tmp_path / "state"), "PORT": str(port), "AUTH_DISABLED": "1"}
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    prune = tmp_path / ".venv" / "bin" / "prune"
    prune.write_text(f'#!/bin/sh\nPYTHONPATH={ROOT} exec {sys.executable} -m pruning_client.cli "$@"\n')
    prune.chmod(0o755)
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    url = f"http://127.0.0.1:{port}"
    with process([sys.executable, "-m", "api"], env, tmp_path / "api.log") as api:
        wait_ready(url, api, tmp_path / "api.log")
        proc = run_bash(f"set -e\nexport PRUNE_URL={url}\n" + sweep_block(), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "winner by top1:" in proc.stdout and "dense training once" in proc.stdout
    for method in ("magnitude", "s2h", "tas", "psap", "epi"):
        assert f" {method} " in proc.stdout
    html = (tmp_path / "sweep.html").read_text()
    assert "<svg" in html and 'class="winner"' in html
