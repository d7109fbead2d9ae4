"""What can be asked for: methods with their option schemas, models, data sets (from the torch-free
pruning_core.spec, so the API lists them without importing the engine). Behind a key like all of
``/v1`` (api/auth.py says why)."""

from __future__ import annotations

import inspect
import typing
from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel

from pruning_core import spec

from ..auth import current_owner
from ..problems import PROBLEM_SCHEMA

router = APIRouter(tags=["catalog"], dependencies=[Depends(current_owner)], responses={"4XX": PROBLEM_SCHEMA})

DATASET_NOTES = {
    "digits": "scikit-learn's 8x8 digits, offline; the quickest smoke test.",
    "cifar10": "CIFAR-10 from the server's DATA_ROOT.",
    "cifar100": "CIFAR-100 from the server's DATA_ROOT.",
    "imagefolder": "Your images: data.root = upload:<id> of a dataset archive with train/ and test/ folders.",
    "synthetic": "Random images and labels, for plumbing tests.",
}


def method_options() -> dict[str, type[BaseModel]]:
    """Method name -> its options model, read off the discriminated union ``spec.MethodSpec``."""
    members = typing.get_args(spec.MethodSpec)[0]
    classes = typing.get_args(members) or (members,)
    return {cls.model_fields["name"].default: cls for cls in classes}


def _doc(cls: type) -> str:
    return inspect.cleandoc(cls.__doc__ or "")


@router.get("/v1/methods")
def methods() -> dict[str, Any]:
    """Pruning methods and the JSON schema of each one's options (the JobSpec's `method`)."""
    opts = method_options()
    return {
        "items": [
            {"name": name, "description": _doc(opts[name]), "options_schema": opts[name].model_json_schema()}
            for name in spec.METHODS
        ]
    }


@router.get("/v1/models")
def models() -> dict[str, Any]:
    """Zoo models by name, plus any torchvision classification builder as `tv:<name>`."""
    return {
        "items": [{"name": n, "family": "cifar"} for n in spec.CIFAR_MODELS],
        "torchvision": {
            "prefix": spec.TORCHVISION_PREFIX,
            "description": "Any torchvision classification model builder, e.g. tv:resnet18, tv:mobilenet_v3_small.",
            "example": f"{spec.TORCHVISION_PREFIX}resnet18",
        },
        "schema": spec.ModelSpec.model_json_schema(),
    }


@router.get("/v1/datasets")
def datasets() -> dict[str, Any]:
    """Data sets and the JSON schema of the JobSpec's `data`."""
    return {
        "items": [
            {"name": n, "needs_root": n == "imagefolder", "description": DATASET_NOTES.get(n, "")}
            for n in spec.DATASETS
        ],
        "schema": spec.DataSpec.model_json_schema(),
    }
