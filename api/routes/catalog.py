"""What can be asked for: methods with their option schemas, models, data sets (from the torch-free
pruning_core.spec, so the API lists them without importing the engine), with this server's limits in
the schemas (as in the OpenAPI document) and only the torchvision models it allows. Behind a key like
all of ``/v1`` (api/auth.py says why)."""

from __future__ import annotations

import importlib.util
import inspect
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel

from pruning_core import spec

from .. import torch_child
from ..auth import OwnerDep, current_owner
from ..deps import SettingsDep
from ..problems import PROBLEM_SCHEMA, Problem
from ..schemas import echo

router = APIRouter(tags=["catalog"], dependencies=[Depends(current_owner)], responses={"4XX": PROBLEM_SCHEMA})

DATASET_NOTES = {
    "digits": "scikit-learn's 8x8 digits, offline; the quickest smoke test.",
    "cifar10": "CIFAR-10 from the server's DATA_ROOT.",
    "cifar100": "CIFAR-100 from the server's DATA_ROOT.",
    "imagefolder": "Your images: data.root = upload:<id> of a dataset archive with train/ and test/ folders.",
    "synthetic": "Random images and labels, for plumbing tests.",
}


def _doc(cls: type) -> str:
    return inspect.cleandoc(cls.__doc__ or "")


def _schema(cls: type[BaseModel], settings: Any) -> dict[str, Any]:
    """``cls``'s JSON schema with this server's limits written in."""
    schema = cls.model_json_schema()
    spec.schema_limits({cls.__name__: schema}, settings)
    return schema


@router.get("/v1/methods")
def methods(settings: SettingsDep) -> dict[str, Any]:
    """Pruning methods and the JSON schema of each one's options (the JobSpec's `method`)."""
    opts = spec.method_options()
    return {
        "items": [
            {"name": name, "description": _doc(opts[name]), "options_schema": _schema(opts[name], settings)}
            for name in spec.METHODS
        ]
    }


@router.get("/v1/models")
def models(settings: SettingsDep) -> dict[str, Any]:
    """Zoo models and models from installed plugin packages by name, plus the torchvision classification
    builders this server allows as `tv:<name>`."""
    allowed = list(settings.allowed_torchvision_models)
    plugins = [{"name": n, "family": "plugin", "entry_point": v} for n, v in spec.plugin_models().items()]
    return {
        "items": [*({"name": n, "family": "cifar"} for n in spec.CIFAR_MODELS), *plugins],
        "torchvision": {
            "prefix": spec.TORCHVISION_PREFIX,
            "description": "The torchvision classification model builders this server allows "
            "(ALLOWED_TORCHVISION_MODELS), e.g. tv:resnet18.",
            "example": f"{spec.TORCHVISION_PREFIX}{allowed[0] if allowed else 'resnet18'}",
            "allowed": allowed,
        },
        "timm": {
            "prefix": spec.TIMM_PREFIX,
            "description": "The timm models this server allows (ALLOWED_TIMM_MODELS), with random weights; "
            "`installed` says whether the timm extra is installed beside the API.",
            "installed": importlib.util.find_spec("timm") is not None,  # found, not imported (torch)
            "allowed": list(settings.allowed_timm_models),
        },
        "schema": _schema(spec.ModelSpec, settings),
    }


class StateKey(BaseModel):
    key: str
    shape: list[int]
    dtype: str


class ModelKeys(BaseModel):
    name: str
    num_classes: int
    in_channels: int
    keys: list[StateKey]


@router.get(
    "/v1/models/{model_name}", response_model=ModelKeys, responses={404: PROBLEM_SCHEMA, 503: PROBLEM_SCHEMA}
)
async def model_keys(
    request: Request,
    model_name: str,
    owner: OwnerDep,
    settings: SettingsDep,
    num_classes: Annotated[int, Query(ge=2, le=100_000, description="Output classes")] = 10,
    in_channels: Annotated[int, Query(ge=1, le=64, description="Input channels")] = 3,
) -> ModelKeys:
    """The state dict that weights for `model_name` must hold, built for `num_classes` classes and
    `in_channels` input channels: every key with its shape and dtype, in the model's order (a file
    with a missing or extra key, or another shape, fails the job with all of them listed). Answered by
    a separate process when not kept: 503 with Retry-After when none is free within a few seconds, 429
    when you already have a few such requests waiting."""
    if model_name not in spec.allowed_models(settings):
        raise Problem(
            404,
            f"Model {echo(model_name)} is not one this server offers (GET /v1/models).",
            slug="model-not-found",
        )
    try:
        keys = await torch_child.run_watched(
            request,
            lambda cancel: torch_child.expected_keys(
                model_name, num_classes, in_channels, settings, owner, cancel
            ),
        )
    except (torch_child.Busy, torch_child.Gone) as err:
        raise torch_child.problem(err) from None
    except torch_child.Refused as err:
        raise Problem(422, f"{model_name} cannot be built: {err}", slug="bad-model") from None
    except torch_child.ChildFailed as err:
        raise Problem(503, f"Listing the keys failed: the model builder {err}.", slug="unavailable") from None
    return ModelKeys(
        name=model_name,
        num_classes=num_classes,
        in_channels=in_channels,
        keys=[StateKey.model_validate(k) for k in keys],
    )


@router.get("/v1/datasets")
def datasets(settings: SettingsDep) -> dict[str, Any]:
    """Data sets and the JSON schema of the JobSpec's `data`."""
    return {
        "items": [
            {"name": n, "needs_root": n == "imagefolder", "description": DATASET_NOTES.get(n, "")}
            for n in spec.DATASETS
        ],
        "schema": _schema(spec.DataSpec, settings),
    }
