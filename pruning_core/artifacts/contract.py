"""The input contract of an exported network: what to feed it and what its outputs mean.

One ``InputContract`` is built from the job's data sets (``from_datasets``: the same mean, std, size,
channels and class names the data pipeline used to train and evaluate the network) and written into
every export format: ``architecture.json`` (its ``input`` object and ``classes``), ONNX
``metadata_props``, TorchScript and ``torch.export`` extra files, and ``MODEL_CARD.md``. Torch-free,
so that whoever reads a contract (a deployment script, the API) needs only the standard library.

Preprocessing, as ``data.py`` does it: decode to RGB (3 channels) or grayscale (1); resize the shorter
side to ``size`` (bilinear) and centre-crop ``size x size`` (the identity for square images already
that size); scale the uint8 pixels to ``value_range`` (``/ 255`` for ``[0, 1]``); subtract ``mean`` and
divide by ``std`` per channel; lay out as float32 ``N x C x size x size``. The output is logits
``N x len(classes)``; ``classes[i]`` names logit ``i``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ..errors import PruningError

CONTRACT_FORMAT = "pruning-core/input-contract-v1"
CONTRACT_FILE = "input_contract.json"  # its name inside TorchScript and .pt2 archives
RESIZE = "shorter side to size (bilinear), then centre crop size x size"
LAYOUT = "NCHW float32"
# The keys of ``to_json``, which are also the ONNX metadata keys.
FIELDS = ("format", "channels", "size", "color", "mean", "std", "value_range", "resize", "layout", "classes")


class ContractError(PruningError):
    """A stored contract that cannot be read (missing keys, wrong types)."""

    code = "bad_contract"


class _DataLike(Protocol):
    in_channels: int
    image_size: int
    classes: Sequence[str]
    mean: Sequence[float]
    std: Sequence[float]


@dataclass(frozen=True)
class InputContract:
    """What an exported network expects (``channels`` x ``size`` x ``size`` pixels, normalised) and the
    names of its ``len(classes)`` outputs.

    ``mean`` / ``std``: per channel, in ``value_range`` units; ``None`` when the pipeline is not known
    (a Python-API job whose caller normalised the data), as is ``value_range`` then.
    """

    channels: int
    size: int  # pixels, H == W
    classes: tuple[str, ...]
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    value_range: tuple[float, float] | None = (0.0, 1.0)
    resize: str = RESIZE
    layout: str = LAYOUT

    @classmethod
    def from_datasets(cls, data: _DataLike) -> InputContract:
        """The contract of a job's ``data.Datasets``: the pipeline's own mean, std, size and names."""
        known = bool(data.mean) and bool(data.std)
        return cls(
            channels=int(data.in_channels),
            size=int(data.image_size),
            classes=tuple(str(c) for c in data.classes),
            mean=tuple(float(m) for m in data.mean) if known else None,
            std=tuple(float(s) for s in data.std) if known else None,
            value_range=(0.0, 1.0) if known else None,
        )

    @property
    def color(self) -> str | None:
        """The Pillow mode to convert images to: ``RGB``, ``L`` (grayscale), or None (other channels)."""
        return {3: "RGB", 1: "L"}.get(self.channels)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (lists for tuples), the form stored in every format."""
        return {
            "format": CONTRACT_FORMAT,
            "channels": self.channels,
            "size": self.size,
            "color": self.color,
            "mean": list(self.mean) if self.mean is not None else None,
            "std": list(self.std) if self.std is not None else None,
            "value_range": list(self.value_range) if self.value_range is not None else None,
            "resize": self.resize,
            "layout": self.layout,
            "classes": list(self.classes),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> InputContract:
        """Inverse of ``to_json``; a missing or mistyped field raises ``ContractError``."""
        if d.get("format") != CONTRACT_FORMAT:
            raise ContractError(f"unsupported input contract format {d.get('format')!r}")
        try:
            return cls(
                channels=int(d["channels"]),
                size=int(d["size"]),
                classes=tuple(str(c) for c in d["classes"]),
                mean=_floats(d["mean"]),
                std=_floats(d["std"]),
                value_range=_floats(d["value_range"]),  # type: ignore[arg-type]
                resize=str(d["resize"]),
                layout=str(d["layout"]),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ContractError(f"input contract is incomplete or mistyped: {err!r}") from None

    def to_text(self) -> str:
        """The contract as one JSON document (TorchScript / .pt2 extra file)."""
        return json.dumps(self.to_json(), indent=2) + "\n"

    @classmethod
    def from_text(cls, text: str | bytes) -> InputContract:
        try:
            return cls.from_json(json.loads(text))
        except json.JSONDecodeError as err:
            raise ContractError(f"input contract is not valid JSON ({err.msg})") from None

    def metadata(self) -> dict[str, str]:
        """ONNX ``metadata_props``: one key per field, each value JSON (``json.loads`` reads it back)."""
        return {k: json.dumps(v) for k, v in self.to_json().items()}

    @classmethod
    def from_metadata(cls, props: Mapping[str, str]) -> InputContract:
        """Inverse of ``metadata`` (other keys are ignored)."""
        try:
            return cls.from_json({k: json.loads(props[k]) for k in FIELDS if k in props})
        except json.JSONDecodeError as err:
            raise ContractError(f"input contract metadata is not valid JSON ({err.msg})") from None

    def preprocessing(self) -> str:
        """One sentence a person can follow to feed the network."""
        if self.mean is None or self.std is None:
            return (
                f"{self.layout} tensors of {self.channels} x {self.size} x {self.size}, preprocessed as "
                "the caller's training data was (not recorded)"
            )
        lo, hi = self.value_range or (0.0, 1.0)
        return (
            f"{self.color or f'{self.channels}-channel'} image; resize {self.resize} ({self.size} px); "
            f"scale pixels to [{lo:g}, {hi:g}]; subtract mean {_fmt(self.mean)} and divide by std "
            f"{_fmt(self.std)} per channel; {self.layout}, N x {self.channels} x {self.size} x {self.size}"
        )


def _floats(v: Any) -> tuple[float, ...] | None:
    return None if v is None else tuple(float(x) for x in v)


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.4f}" for v in values) + ")"
