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

from .errors import PruningError
from .registry import UnknownNameError
from .spec import SpecError, parse_spec, read_spec_mapping

# flag -> (spec path, type); one table instead of a chain of ifs
FLAGS: dict[str, tuple[tuple[str, ...], type]] = {
    "model": (("model", "name"), str),
    "weights": (("model", "weights"), str),
    "data": (("data", "name"), str),
    "data_root": (("data", "root"), str),
    "image_size": (("data", "image_size"), int),
    "per_class": (("data", "per_class"), int),
    "method": (("method", "name"), str),
    "target": (("target", "macs_ratio"), float),
    "speedup": (("target", "speedup"), float),
    "allocation": (("target", "allocation"), str),
    "epochs": (("schedule", "epochs"), int),
    "dense_epochs": (("schedule", "dense_epochs"), int),
    "batch_size": (("schedule", "batch_size"), int),
    "lr": (("schedule", "lr"), float),
    "seed": (("seed",), int),
    "device": (("device",), str),
}


def _flag_help(flag: str, path: tuple[str, ...]) -> str:
    """``sets model.name``, with the names it takes where they are a closed set."""
    from .spec import CIFAR_MODELS, DATASETS, METHODS

    known = {
        "method": ", ".join(METHODS),
        "data": ", ".join(DATASETS),
        "model": ", ".join(CIFAR_MODELS) + ", tv:<torchvision builder>, timm:<model> (prune models)",
        "allocation": "macs, latency",
        "device": "auto, cpu, cuda, cuda:N",
    }.get(flag)
    return f"sets {'.'.join(path)}" + (f": {known}" if known else "")


def add_spec_flags(p: argparse.ArgumentParser) -> None:
    """The spec file and the flags that override its fields (``prune run``, ``submit``, ``sweep``)."""
    p.add_argument("spec", nargs="?", help="a JobSpec as YAML or JSON")
    for flag, (path, typ) in FLAGS.items():
        p.add_argument(f"--{flag.replace('_', '-')}", dest=flag, type=typ, help=_flag_help(flag, path))
    p.add_argument("--kd", action="store_true", default=None, help="fine-tune with KD from the dense model")
    p.add_argument(
        "--formats", help="export formats, comma-separated (safetensors,torch_export,torchscript,onnx)"
    )
    p.add_argument(
        "--set",
        dest="set_fields",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="sets any spec field, e.g. --set method.ramp=0.25 --set schedule.warmup_epochs=1 "
        "(the value read as YAML: 0.25, true, [a, b]); repeatable, applied after the other flags",
    )


def version_line() -> str:
    """``prune 0.1.0 (pruning-service; torch 2.14.1 if installed)``, without importing torch."""
    from importlib.metadata import PackageNotFoundError, version

    def of(dist: str) -> str | None:
        try:
            return version(dist)
        except PackageNotFoundError:
            return None

    torch = of("torch")
    return f"prune {of('pruning-service') or 'unknown'}" + (f" (torch {torch})" if torch else "")


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


def build_spec(args: argparse.Namespace) -> dict[str, Any]:
    """The spec file's mapping (if any) with the flags applied on top, then every ``--set``."""
    data: dict[str, Any] = read_spec_mapping(args.spec) if args.spec else {}
    for flag, (path, _) in FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            _put(data, path, value)
    if args.kd:
        data.setdefault("kd", {})["enabled"] = True
    if args.formats:
        data.setdefault("export", {})["formats"] = [f.strip() for f in args.formats.split(",") if f.strip()]
    for item in getattr(args, "set_fields", None) or []:
        field, value = parse_set(item)
        _put(data, field, value)
    return data


def parse_set(item: str) -> tuple[tuple[str, ...], Any]:
    """``schedule.lr=0.1`` -> (("schedule", "lr"), 0.1); the value is read as YAML (a bad one stays a
    string, for the spec's own validation to judge). SpecError for a malformed item."""
    import yaml

    field, sep, text = item.partition("=")
    path = tuple(field.strip().split("."))
    if not sep or not all(path):
        raise SpecError([f"--set {item!r}: expected FIELD=VALUE, e.g. method.ramp=0.25"])
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    return path, value


def _put(data: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = data
    for key in path[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):  # e.g. --set model=x then --set model.name=y
            raise SpecError([f"{'.'.join(path)}: {key} is not a mapping in this spec"])
        node = child
    node[path[-1]] = value


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
    from .progress import TqdmReporter  # torch-heavy imports only once the spec is valid
    from .runner import run

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
    from .report import latency_line

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
    except SpecError as err:
        for line in err.problems:
            print(f"prune: invalid spec: {line}", file=sys.stderr)
        return 2
    except (PruningError, UnknownNameError, FileNotFoundError) as err:
        print(f"prune: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
