"""The torch work the API hands to a child process (``api/torch_child.py``), one JSON object on stdout.

    python -m pruning_core.models.child convert SRC DST [MAX_BYTES]   # .pt/.pth -> safetensors
    python -m pruning_core.models.child keys NAME CLASSES CHANNELS    # the state dict a model expects
    python -m pruning_core.models.child pretrained NAME               # its published weights cached?

A refused input prints ``{"error": "<one line>", "code": ...}`` and exits 2; a file that would be over
``MAX_BYTES`` as safetensors also gives ``"bytes"``, its size. The child runs under an address-space
limit (``weights.limit_address_space``), set after torch's import.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import PruningError
from .pretrained import published
from .weights import KEYS_HEADROOM, TooLargeError, convert, limit_address_space
from .zoo import expected_keys


def main(argv: Sequence[str] | None = None) -> int:
    """The child-process entry: prints one JSON object; exit 0, or 2 with ``{"error": line}``."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args[:1] == ["convert"] and len(args) in (3, 4):
            cap = int(args[3]) if len(args) == 4 else None
            out: dict[str, Any] = {"tensors": convert(Path(args[1]), Path(args[2]), cap)}
        elif args[:1] == ["keys"] and len(args) == 4:
            import torchvision  # noqa: F401  (mapped before the limit is measured, like torch)

            limit_address_space(KEYS_HEADROOM)
            out = {"keys": expected_keys(args[1], int(args[2]), int(args[3]))}
        elif args[:1] == ["pretrained"] and len(args) == 2:
            where = published(args[1])
            out = {"cached": where.found is not None, "refusal": where.refusal()}
        else:
            usage = "usage: convert SRC DST [MAX_BYTES] | keys NAME CLASSES CHANNELS | pretrained NAME"
            print(json.dumps({"error": usage}))
            return 2
    except (PruningError, KeyError) as err:  # UnknownNameError is a KeyError
        refused = {"error": " ".join(str(err).split()), "code": getattr(err, "code", "unknown")}
        if isinstance(err, TooLargeError):
            refused["bytes"] = err.needed
        print(json.dumps(refused))
        return 2
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
