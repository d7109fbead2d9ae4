"""``prune``: run a pruning job locally with a progress bar.

    prune run spec.yaml [--out DIR]
    prune run --model resnet20 --data digits --method magnitude --target 0.5 --epochs 3 --out runs/x

Flags override the spec file's fields. Ctrl-C leaves a checkpoint; the same command again resumes.
Errors are one line (one per bad field for a bad spec), exit status 2.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from pruning_client.spec_args import SpecInputError, add_spec_flags, build_spec, version_line

from .errors import PruningError
from .registry import UnknownNameError
from .spec import SpecError, parse_spec


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prune", description="Structured pruning jobs.")
    p.add_argument("--version", action="version", version=version_line())
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run a job locally and write its artifacts")
    add_spec_flags(r)
    r.add_argument("--out", type=Path, help="output directory (default: runs/<model>-<method>-<target>)")
    r.add_argument("--fresh", action="store_true", help="discard checkpoints in --out instead of resuming")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _out_dir(args: argparse.Namespace, spec) -> Path:
    if args.out:
        return args.out
    if args.spec:
        return Path("runs") / Path(args.spec).stem
    goal = f"x{spec.target.speedup:g}" if spec.target.speedup else f"{spec.target.macs_ratio:g}"
    return Path("runs") / f"{spec.model.name.replace(':', '_')}-{spec.method.name}-{goal}"


def _claim_out_dir(out: Path, spec_json: dict[str, Any], fresh: bool) -> bool:
    """Write spec.json; refuse a directory that holds another job. Returns True when resuming."""
    saved = out / "spec.json"
    if fresh and out.exists():
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        saved.unlink(missing_ok=True)
    if saved.exists():
        if json.loads(saved.read_text()) != spec_json:
            raise PruningError(f"{out} holds a different job; choose another --out or pass --fresh")
        return (out / "checkpoints").exists()
    out.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(spec_json, indent=2))
    return False


def cmd_run(args: argparse.Namespace) -> int:
    spec = parse_spec(build_spec(args))
    out = _out_dir(args, spec)
    resuming = _claim_out_dir(out, spec.model_dump(mode="json"), args.fresh)
    from .jobs.progress import TqdmReporter  # torch-heavy imports only once the spec is valid
    from .jobs.runner import run

    reporter = TqdmReporter(enabled=not args.quiet, bar=sys.stderr.isatty())  # tqdm draws on stderr
    if resuming:
        reporter.message(f"resuming from {out / 'checkpoints'}")
    try:
        result = run(spec, out, reporter)
    except KeyboardInterrupt:
        reporter.close()
        print(
            f"prune: interrupted; checkpoint kept in {out / 'checkpoints'}; run the same command to resume",
            file=sys.stderr,
        )
        return 130
    reporter.close()
    r = result.report
    from .artifacts.report import latency_line

    print(
        f"{r.model} {r.method}: MACs {r.dense.macs / 1e6:.2f}M -> {r.pruned.macs / 1e6:.2f}M "
        f"(ratio {r.achieved_macs_ratio:.3f}, target {r.target_macs_ratio:g}), params {r.dense.params:,} -> "
        f"{r.pruned.params:,}, top-1 {r.dense.top1:.2f}% -> {r.pruned.top1:.2f}%"
        + (f", {latency_line(r.latency)}" if r.latency is not None else "")
    )
    print(f"artifacts in {out}: {', '.join(sorted(result.artifacts))}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"run": cmd_run}[args.command](args)
    except (SpecError, SpecInputError) as err:
        for line in err.problems:
            print(f"prune: invalid spec: {line}", file=sys.stderr)
        return 2
    except (PruningError, UnknownNameError, FileNotFoundError) as err:
        print(f"prune: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
