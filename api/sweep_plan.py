"""A sweep request and its plan: the child JobSpecs (one per method and target) and the dense job.

Torch-free. A child is the base spec with its method (the base spec's own options when it names that
method, else the method's defaults, or the options given in ``methods``) and its target (the base
target's other fields kept); with ``schedule.dense_epochs`` the dense training is one job of its own
(``magnitude`` to a MAC ratio of 1.0 with no training after it: it prunes nothing and exports the
trained dense network) and every child starts from its ``model.safetensors`` with no dense epochs.
Without a dense phase every child builds the model under the same ``seed``, so methods that train from
scratch start from the same initial weights.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pruning_core.spec import METHODS, JobSpec, MethodSpec, stored_spec

RankBy = Literal["top1", "speedup", "pareto"]


class SweepTarget(BaseModel):
    """One budget to compare the methods at: a remaining-MAC ratio or a measured speed-up."""

    model_config = ConfigDict(extra="forbid")

    macs_ratio: float | None = Field(None, gt=0.0, le=1.0, description="Remaining MACs / dense MACs.")
    speedup: float | None = Field(None, gt=1.0, le=100.0, description="Measured speed-up to prune for.")

    @model_validator(mode="after")
    def _one(self) -> SweepTarget:
        if (self.macs_ratio is None) == (self.speedup is None):
            raise ValueError("give exactly one of macs_ratio and speedup")
        return self

    def as_dict(self) -> dict[str, float]:
        return {"macs_ratio": self.macs_ratio} if self.speedup is None else {"speedup": self.speedup}


class SweepIn(BaseModel):
    """``POST /v1/sweeps``: the base JobSpec, the methods to compare and the targets, and the ranking."""

    model_config = ConfigDict(extra="forbid")

    spec: JobSpec
    methods: list[Literal[METHODS] | MethodSpec] | None = Field(  # type: ignore[valid-type]
        None,
        min_length=1,
        max_length=len(METHODS) * 4,
        description="Method names, or method options objects (`{name, ...}`); default: every method.",
    )
    targets: list[SweepTarget] | None = Field(
        None, min_length=1, max_length=32, description="Default: the base spec's target."
    )
    rank_by: RankBy = Field(
        "top1",
        description="`top1`, `speedup` (measured), or `pareto`: the accuracy-latency front first; its "
        "winner the fastest network of the front within 1 point of the front's best top-1.",
    )


def child_count(body: SweepIn) -> int:
    """How many children ``body`` asks for: methods x targets."""
    return len(body.methods or METHODS) * len(body.targets or [None])


def _method(item: Any, base: JobSpec) -> dict[str, Any]:
    if isinstance(item, str):
        return base.method.model_dump(mode="json") if base.method.name == item else {"name": item}
    return item.model_dump(mode="json")


def _target(base: dict[str, Any], target: SweepTarget) -> dict[str, Any]:
    kept = {k: v for k, v in base.items() if k not in ("macs_ratio", "speedup")}
    return kept | target.as_dict()


def dense_phase(spec: JobSpec) -> bool:
    return spec.schedule.dense_epochs > 0


def plan(body: SweepIn) -> tuple[list[dict[str, Any]], dict[str, Any] | None, list[dict[str, str]]]:
    """(child specs, the dense job's spec or None, errors): specs as stored (JSON, defaults filled in);
    ``errors`` one ``{"field", "message"}`` per child that is no valid JobSpec or is asked twice."""
    base = body.spec
    raw = base.model_dump(mode="json")
    base_target = base.target.model_dump(mode="json", exclude_unset=True)
    targets = body.targets or [SweepTarget(**_base_target(base))]
    methods = body.methods or list(METHODS)
    dense = dense_phase(base)
    children, errors, seen = [], [], set()
    for mi, item in enumerate(methods):
        method = _method(item, base)
        for ti, target in enumerate(targets):
            where = f"methods[{mi}] x targets[{ti}]"
            key = (method["name"], tuple(sorted(target.as_dict().items())))
            if key in seen:
                errors.append({"field": where, "message": f"{method['name']} at this target is asked twice"})
                continue
            seen.add(key)
            child = raw | {"method": method, "target": _target(base_target, target)}
            if dense:
                child["schedule"] = raw["schedule"] | {"dense_epochs": 0}
            try:
                children.append(stored_spec(JobSpec.model_validate(child)))
            except ValidationError as err:
                for e in err.errors():
                    loc = ".".join(str(p) for p in e["loc"])
                    errors.append({"field": f"{where}: {loc}", "message": e["msg"]})
    return children, _dense_spec(raw) if dense else None, errors


def _base_target(base: JobSpec) -> dict[str, Any]:
    t = base.target
    return {"speedup": t.speedup} if t.speedup is not None else {"macs_ratio": t.macs_ratio}


def _dense_spec(raw: dict[str, Any]) -> dict[str, Any]:
    """The dense job: train ``dense_epochs``, prune nothing (magnitude to 1.0), train no further."""
    spec = raw | {
        "method": {"name": "magnitude"},
        "target": {"macs_ratio": 1.0},
        "schedule": raw["schedule"] | {"epochs": 0, "warmup_epochs": 0.0},
        "kd": raw["kd"] | {"enabled": False},
        "export": raw["export"] | {"formats": ["safetensors"]},
    }
    return stored_spec(JobSpec.model_validate(spec))
