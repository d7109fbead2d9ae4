"""State-dict files: PyTorch ``.pt``/``.pth`` to safetensors, the keys and shapes a model expects, and
one line naming every key a weights file gets wrong.

The API never imports torch and never unpickles: it runs this module in a child process,
``python -m pruning_core.weights convert SRC DST`` or ``... keys NAME CLASSES CHANNELS``, which prints
one JSON object on stdout (``{"error": "<one line>"}`` and exit status 2 for a refused input).
``torch.load`` runs only with ``weights_only=True``: its unpickler knows tensors and plain containers
and refuses any other global before calling anything, so a pickle that would run code is refused
without running it.

Imports of torch are inside the functions, so that the torch-free mismatch helper can be imported
anywhere.
"""

from __future__ import annotations

import json
import re
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import ModelError, PruningError, WeightsError

# Checkpoint dicts that wrap the state dict under one of these keys (training scripts, Lightning).
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
_GLOBAL = re.compile(r"GLOBAL ([A-Za-z_][\w.]*)")


def mismatch(expected: Mapping[str, Sequence[int]], got: Mapping[str, Sequence[int]]) -> str | None:
    """One line listing every missing key, unexpected key and wrong shape (all of them, none cut off),
    or None when ``got`` has exactly ``expected``'s keys and shapes. Shapes are tuples of ints."""
    missing = [k for k in expected if k not in got]
    extra = [k for k in got if k not in expected]
    shapes = [
        f"{k} {_shape(got[k])} (model: {_shape(expected[k])})"
        for k in expected
        if k in got and tuple(got[k]) != tuple(expected[k])
    ]
    parts = [
        f"{len(items)} {what}: {', '.join(items)}"
        for what, items in (("missing keys", missing), ("unexpected keys", extra), ("wrong shapes", shapes))
        if items
    ]
    return "; ".join(parts) or None


def _shape(shape: Sequence[int]) -> str:
    return "x".join(str(int(n)) for n in shape) or "scalar"


def _describe(obj: Any) -> str:
    t = type(obj)
    name = t.__name__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def state_dict_of(obj: Any) -> dict[str, Any]:
    """The name -> tensor mapping in what ``torch.load`` returned: the object itself, or the dict under
    one of WRAPPER_KEYS of a checkpoint. WeightsError (one line) for anything else."""
    import torch

    def tensors_only(d: Mapping[Any, Any]) -> bool:
        return bool(d) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items())

    if isinstance(obj, Mapping):
        if tensors_only(obj):
            return dict(obj)
        for key in WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and tensors_only(inner):
                return dict(inner)
        bad = next(
            (f"{k!r} holds {_describe(v)}" for k, v in obj.items() if not isinstance(v, torch.Tensor)),
            "it is empty",
        )
        raise WeightsError(
            f"not a state dict (names -> tensors): {bad}, and no {'/'.join(WRAPPER_KEYS)} entry holds one"
        )
    raise WeightsError(f"not a state dict (names -> tensors) but {_describe(obj)}; save model.state_dict()")


def _load_refusal(err: Exception) -> str:
    """One line for an exception of ``torch.load(weights_only=True)``."""
    import pickle

    text = str(err)
    if isinstance(err, pickle.UnpicklingError) and (m := _GLOBAL.search(text)):
        name = m.group(1)
        if name.startswith("torch.nn.") or "__main__" in name:
            return (
                f"it pickles an object ({name}), not a state dict; save model.state_dict() instead "
                "(nothing of it was run)"
            )
        return f"it pickles {name}, which is not a tensor or plain container: refused without running it"
    if isinstance(err, pickle.UnpicklingError):
        return "it uses pickle features a state dict does not need: refused without running it"
    first = " ".join(text.split())[:200]
    return f"not a PyTorch file torch.load can read ({type(err).__name__}: {first})"


def is_pytorch_file(path: Path) -> bool:
    """Whether ``path`` starts like ``torch.save`` output: a zip archive or a pickle stream."""
    with path.open("rb") as f:
        head = f.read(4)
    return head == b"PK\x03\x04" or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def load_state(path: Path) -> dict[str, Any]:
    """The state dict in a ``torch.save`` file, read with torch.load(weights_only=True) on the CPU;
    WeightsError (one line) when refused."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about pickle protocols; the answer is the line
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # any failure of an untrusted file is a refusal, never a crash
            raise WeightsError(_load_refusal(err)) from None
    return state_dict_of(obj)


def convert(src: Path, dst: Path) -> int:
    """Read the state dict in ``src`` (``load_state``) and write it to ``dst`` as safetensors.
    Returns the number of tensors; WeightsError (one line) when refused."""
    from safetensors.torch import save_file

    state = load_state(src)
    # safetensors refuses tensors that share storage (tied weights): independent contiguous copies
    save_file({k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}, str(dst))
    return len(state)


def expected_keys(name: str, num_classes: int, in_channels: int) -> list[dict[str, Any]]:
    """``[{"key", "shape", "dtype"}]`` of the state dict that model ``name`` built for ``num_classes``
    classes and ``in_channels`` input channels expects, in the model's order. Built on the meta device
    (shapes only, no memory for weights)."""
    import torch

    from .zoo import get_entry

    entry = get_entry(name)
    try:
        with torch.device("meta"):
            model = entry.build(num_classes, in_channels)
    except PruningError:
        raise
    except Exception:  # a builder that cannot run on meta tensors is built for real
        try:
            model = entry.build(num_classes, in_channels)
        except PruningError:
            raise
        except Exception as err:
            why = " ".join(str(err).split())[:300]
            raise ModelError(f"{name} cannot be built: {type(err).__name__}: {why}") from None
    return [
        {"key": k, "shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
        for k, v in model.state_dict().items()
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """The child-process entry: prints one JSON object; exit 0, or 2 with ``{"error": line}``."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args[:1] == ["convert"] and len(args) == 3:
            out: dict[str, Any] = {"tensors": convert(Path(args[1]), Path(args[2]))}
        elif args[:1] == ["keys"] and len(args) == 4:
            out = {"keys": expected_keys(args[1], int(args[2]), int(args[3]))}
        else:
            print(json.dumps({"error": "usage: convert SRC DST | keys NAME CLASSES CHANNELS"}))
            return 2
    except (PruningError, KeyError) as err:  # UnknownNameError is a KeyError
        print(json.dumps({"error": " ".join(str(err).split()), "code": getattr(err, "code", "unknown")}))
        return 2
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
