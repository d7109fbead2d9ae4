"""Checks on a JobSpec that only the service can make: file references.

From HTTP clients the fields that name files (``model.weights``, ``kd.teacher``, ``data.root``) accept
only ``upload:<id>`` of the caller's own upload of the right kind, or null: never a server path (the
cifar loaders unpickle whatever lies under a root). The worker resolves the reference to the file.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from pruning_core.models.weights import mismatch
from pruning_core.settings import Settings
from pruning_core.spec import JobSpec, model_shape
from store import repo

from . import torch_child
from .schemas import UPLOAD_PREFIX, echo, is_id

# data sets whose loader reads a client-supplied root (an uploaded archive)
ROOT_DATASETS = ("imagefolder",)


def _check_ref(s: Session, owner: str, field: str, value: str, kind: str) -> str | None:
    """An error message for one reference, or None if it is the caller's upload of ``kind``."""
    if not value.startswith(UPLOAD_PREFIX):
        return f"only an upload reference `upload:<id>` (POST /v1/uploads?kind={kind}) is accepted here"
    upload_id = value.removeprefix(UPLOAD_PREFIX)
    up = repo.get_upload(s, upload_id, owner=owner) if is_id(upload_id) else None
    if up is None:
        return f"upload '{echo(value)}' does not exist"
    if up.kind != kind:
        return f"upload {value!r} is a {up.kind} upload; {field} needs a {kind} upload"
    return None


def spec_errors(s: Session, owner: str, spec: JobSpec) -> list[dict[str, str]]:
    """One ``{"field", "message"}`` per unacceptable file reference in ``spec``."""
    errors: list[dict[str, str]] = []

    def check(field: str, value: str | None, kind: str) -> None:
        if value is not None and (msg := _check_ref(s, owner, field, value, kind)):
            errors.append({"field": field, "message": msg})

    check("model.weights", spec.model.weights, "weights")
    if spec.kd.teacher != "dense":
        check("kd.teacher", spec.kd.teacher, "weights")
    if spec.data.root is not None and spec.data.name not in ROOT_DATASETS:
        errors.append(
            {
                "field": "data.root",
                "message": f"{spec.data.name} reads the server's own data root; a root can only be given "
                f"for {', '.join(ROOT_DATASETS)} (an uploaded dataset archive)",
            }
        )
    else:
        check("data.root", spec.data.root, "dataset")
    return errors


def _weights_refs(spec: JobSpec) -> dict[str, str]:
    refs = {"model.weights": spec.model.weights}
    if spec.kd.teacher != "dense":  # the teacher is the same architecture
        refs["kd.teacher"] = spec.kd.teacher
    return {f: v for f, v in refs.items() if v and v.startswith(UPLOAD_PREFIX)}


def weights_to_check(s: Session, owner: str, spec: JobSpec) -> dict[str, tuple[str, dict[str, Any]]]:
    """field -> (reference, tensor name -> shape) for the spec's weights uploads whose header the API
    read at upload (large headers are left to the worker)."""
    found = {}
    for field, ref in _weights_refs(spec).items():
        up = repo.get_upload(s, ref.removeprefix(UPLOAD_PREFIX), owner=owner)
        if up is not None and up.tensors is not None:
            found[field] = (ref, up.tensors)
    return found


def pretrained_errors(spec: JobSpec, settings: Settings, owner: str) -> list[dict[str, str]]:
    """``model.pretrained`` with downloads off (``ALLOW_DOWNLOAD``): one item when the model's published
    weights are not in the cache (or it has none), naming the file and where to place it. A child that
    cannot answer now leaves it to the worker, which refuses the same in one line."""
    if not spec.model.pretrained or settings.allow_download:
        return []
    try:
        line = torch_child.pretrained_refusal(spec.model.name, settings, owner)
    except torch_child.Refused as err:
        line = str(err)
    except (torch_child.ChildFailed, torch_child.Busy, torch_child.Gone):
        return []
    return [] if line is None else [{"field": "model.pretrained", "message": line}]


def weights_errors(
    spec: JobSpec, known: dict[str, tuple[str, dict[str, Any]]], settings: Settings, owner: str
) -> list[dict[str, str]]:
    """One ``{"field", "message"}`` per weights upload whose tensors do not match the model, naming
    every missing, unexpected and misshapen key. Only when the model's classes and channels are known
    before the data is loaded; a model that cannot be built here, or not now (every child busy), is
    left to the worker to report."""
    shape = model_shape(spec)
    if not known or shape is None:
        return []
    try:
        expected = torch_child.expected_keys(spec.model.name, *shape, settings, owner)
    except (torch_child.Refused, torch_child.ChildFailed, torch_child.Busy, torch_child.Gone):
        return []
    want = {k["key"]: k["shape"] for k in expected}
    what = f"{spec.model.name} ({shape[0]} classes, {shape[1]} input channels)"
    return [
        {"field": field, "message": f"{ref} does not match {what}: {diff}"}
        for field, (ref, tensors) in known.items()
        if (diff := mismatch(want, tensors))
    ]
