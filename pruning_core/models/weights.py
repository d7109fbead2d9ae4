"""State-dict files: PyTorch ``.pt``/``.pth`` to safetensors, and one line naming every key a weights
file gets wrong.

The API never imports torch and never unpickles: it converts in a child process (``child.py``,
``python -m pruning_core.models.child convert SRC DST MAX_BYTES``).

A conversion never makes more than ``MAX_BYTES``: the archive's records (their uncompressed sizes, from
the zip directory: a deflate bomb is refused unread) and then every tensor's materialised size (from
its shape: an expanded, zero-stride tensor counts at its declared size) are summed before any tensor is
copied; the output is written one tensor at a time; and the child runs under an address-space limit
(``RLIMIT_AS``, set after torch's import, whose CUDA libraries reserve gigabytes of address space) as a
backstop.
``torch.load`` runs only with ``weights_only=True``: its unpickler knows tensors and plain containers
and refuses any other global before calling anything, so a pickle that would run code is refused
without running it.

Imports of torch are inside the functions, so that the torch-free mismatch helper can be imported
anywhere.
"""

from __future__ import annotations

import json
import re
import resource
import struct
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import WeightsError, one_line

# safetensors' names of the dtypes a state dict holds (torch name without "torch.")
SAFETENSORS_DTYPES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
}
# Address space the converter may use beyond what it holds after importing torch, besides the input
# file's size and twice the output cap (the loaded storages and one tensor's contiguous copy): bytes.
CONVERT_HEADROOM = 1024**3
# Address space a keys child may use beyond torch's import: a build on the meta device takes little; a
# builder that needs real weights for a huge model fails (bad_model) rather than grow the child.
KEYS_HEADROOM = 2 * 1024**3


class TooLargeError(WeightsError):
    """The file would be over the cap as safetensors (or its records alone are); ``needed`` in bytes."""

    code = "too_large"

    def __init__(self, needed: int, limit: int, what: str):
        super().__init__(f"{what} {needed} bytes, over the {limit} bytes this upload may take")
        self.needed = needed


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


def load_state(path: Path, *, mmap: bool = False) -> dict[str, Any]:
    """The state dict in a ``torch.save`` file, read with torch.load(weights_only=True) on the CPU
    (``mmap``: storages mapped from the file, not read; zip files with stored records only);
    WeightsError (one line) when refused."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about pickle protocols; the answer is the line
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except Exception as err:  # any failure of an untrusted file is a refusal, never a crash
            raise WeightsError(_load_refusal(err)) from None
    return state_dict_of(obj)


def zip_records(path: Path) -> tuple[int, bool] | None:
    """For a zip-format ``torch.save`` file: the uncompressed size of all its records (bytes, from the
    zip directory, nothing decompressed) and whether every record is stored uncompressed (then it can
    be memory-mapped); None for the legacy format (its storages are in the file as they are)."""
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError):
        return None
    return sum(i.file_size for i in infos), all(i.compress_type == zipfile.ZIP_STORED for i in infos)


def safetensors_header(state: Mapping[str, Any]) -> tuple[bytes, int]:
    """The safetensors header (length prefix and JSON, padded to 8 bytes) for ``state`` written in its
    order, and the whole file's size in bytes: each tensor counted at ``numel * element_size`` (what it
    takes once materialised, whatever its strides). WeightsError for a dtype safetensors lacks."""
    entries: dict[str, Any] = {}
    offset = 0
    for key, t in state.items():
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in SAFETENSORS_DTYPES:
            raise WeightsError(f"tensor {key!r} is {dtype}, which safetensors cannot hold")
        n = t.numel() * t.element_size()
        entries[key] = {
            "dtype": SAFETENSORS_DTYPES[dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, 8 + len(raw) + offset


def limit_address_space(extra_bytes: int) -> None:
    """Cap this process's address space at what it maps now plus ``extra_bytes``: an allocation past it
    fails (MemoryError, or torch's RuntimeError) instead of growing the process."""
    with open("/proc/self/statm") as f:
        mapped = int(f.read().split()[0]) * resource.getpagesize()
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    want = mapped + extra_bytes
    resource.setrlimit(
        resource.RLIMIT_AS, (want if hard == resource.RLIM_INFINITY else min(want, hard), hard)
    )


def convert(src: Path, dst: Path, max_bytes: int | None = None) -> int:
    """Read the state dict in ``src`` (``load_state``) and write it to ``dst`` as safetensors, one tensor
    at a time. ``max_bytes``: TooLargeError, before any tensor is materialised, when the archive's
    records or the output would be larger. Returns the number of tensors; WeightsError (one line) when
    refused."""
    import torch

    records = zip_records(src)
    if max_bytes is not None:
        if records is not None and records[0] > max_bytes:  # a deflate bomb: refused unread
            raise TooLargeError(records[0], max_bytes, "its records unpack to")
        limit_address_space(src.stat().st_size + 2 * max_bytes + CONVERT_HEADROOM)
    state = load_state(src, mmap=records is not None and records[1])
    header, size = safetensors_header(state)
    if max_bytes is not None and size > max_bytes:  # an expanded tensor counts at its declared size
        raise TooLargeError(size, max_bytes, "as safetensors it would be")
    try:
        with dst.open("wb") as f:
            f.write(header)
            for t in state.values():
                # safetensors holds little-endian bytes in row-major order: one contiguous copy at a time
                f.write(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
    except (MemoryError, RuntimeError) as err:
        dst.unlink(missing_ok=True)
        raise WeightsError(
            f"it could not be converted within this server's memory bound ({one_line(err)})"
        ) from None
    return len(state)
