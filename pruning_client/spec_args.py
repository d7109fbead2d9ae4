"""A JobSpec mapping from a spec file and command-line flags (``prune run``, ``submit``, ``sweep``).

Only builds the mapping; validating it is the spec's (``pruning_core.spec``) or the service's job.
Needs neither torch nor the engine, so the SDK installed on its own keeps its flags.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

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


class SpecInputError(ValueError):
    """A spec file or flag that does not give a mapping; ``problems`` holds one line each."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


def _known_names() -> dict[str, str]:
    """The names a flag takes where they are a closed set; the model, method and data names come from
    the installed engine's spec (the SDK on its own leaves them to the service)."""
    known = {"allocation": "macs, latency", "device": "auto, cpu, cuda, cuda:N"}
    try:
        from pruning_core.spec import CIFAR_MODELS, DATASETS, METHODS
    except ImportError:
        return known
    models = ", ".join(CIFAR_MODELS) + ", tv:<torchvision builder>, timm:<model> (prune models)"
    return known | {"method": ", ".join(METHODS), "data": ", ".join(DATASETS), "model": models}


def add_spec_flags(p: argparse.ArgumentParser) -> None:
    """The spec file and the flags that override its fields."""
    known = _known_names()
    p.add_argument("spec", nargs="?", help="a JobSpec as YAML or JSON")
    for flag, (path, typ) in FLAGS.items():
        names = f": {known[flag]}" if flag in known else ""
        p.add_argument(
            f"--{flag.replace('_', '-')}", dest=flag, type=typ, help=f"sets {'.'.join(path)}{names}"
        )
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
    """``prune 0.1.0 (torch 2.14.1)``: the installed distribution's version, torch's where installed,
    without importing torch."""
    from importlib.metadata import PackageNotFoundError, version

    def of(dist: str) -> str | None:
        try:
            return version(dist)
        except PackageNotFoundError:
            return None

    torch = of("torch")
    own = of("pruning-service") or of("pruning-client") or "unknown"
    return f"prune {own}" + (f" (torch {torch})" if torch else "")


def read_spec_mapping(path: str | Path) -> dict[str, Any]:
    """The raw mapping in a YAML or JSON spec file (not validated yet)."""
    import yaml

    text = Path(path).read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise SpecInputError([f"{path}: not valid YAML/JSON ({err.__class__.__name__})"]) from None
    if not isinstance(data, dict):
        raise SpecInputError([f"{path}: expected a mapping at the top level"])
    return data


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
    string, for the spec's own validation to judge). SpecInputError for a malformed item."""
    import yaml

    field, sep, text = item.partition("=")
    path = tuple(field.strip().split("."))
    if not sep or not all(path):
        raise SpecInputError([f"--set {item!r}: expected FIELD=VALUE, e.g. method.ramp=0.25"])
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
            raise SpecInputError([f"{'.'.join(path)}: {key} is not a mapping in this spec"])
        node = child
    node[path[-1]] = value
