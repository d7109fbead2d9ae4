"""``python -m bench.speed_target``: whole jobs with ``target.speedup`` on a device, real timing.

Each case is one job (synthetic 224 px images, a few training steps: the speed target is under test,
not accuracy) and prints one JSON line: the speed-up requested, the remaining-MAC ratio the search chose,
its probes (ratio, measured speed-up), the achieved MAC ratio and the achieved speed-up with its interval
and verdict (the report's latency at the throughput batch).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from pruning_core.jobs.runner import run
from pruning_core.spec import parse_spec

# (model, method, requested speed-up): the goal's 224 px models, and a paper method beside magnitude
CASES: tuple[tuple[str, str, float], ...] = (
    ("tv:resnet50", "magnitude", 1.5),
    ("tv:resnet50", "s2h", 1.5),
    ("tv:mobilenet_v2", "magnitude", 1.3),
)


def case_spec(model: str, method: str, speedup: float, device: str, batch: int, side: int) -> dict[str, Any]:
    return {
        "model": {"name": model},
        "data": {
            "name": "synthetic",
            "num_classes": 10,
            "per_class": 16,
            "test_per_class": 4,
            "image_size": side,
        },
        "method": {"name": method, **({"mask_lr_scale": 40.0} if method == "s2h" else {})},
        "target": {"speedup": speedup, "speedup_search_s": 20},
        "schedule": {
            "epochs": 2 if method == "s2h" else 1,
            "batch_size": 16,
            "max_steps_per_epoch": 4,
            "amp": device.startswith("cuda"),
            "bn_recalibration_batches": 1,
        },
        "export": {"formats": ["safetensors"], "latency_batch_size": batch, "latency_max_s": 10},
        "device": device,
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.speed_target", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=256, help="the throughput batch the speed-up is asked at")
    p.add_argument("--side", type=int, default=224)
    args = p.parse_args(argv)
    for model, method, speedup in CASES:
        spec = parse_spec(case_spec(model, method, speedup, args.device, args.batch, args.side))
        t0 = time.perf_counter()
        try:
            r = run(spec, tempfile.mkdtemp(prefix="speed-target-")).report
        except Exception as err:  # an unreachable target is a result too
            print(json.dumps({"model": model, "method": method, "requested": speedup, "error": str(err)}))
            continue
        st, thr = r.speed_target, r.latency.batches[-1] if r.latency else None
        assert st is not None and thr is not None
        line = {
            "model": model,
            "method": method,
            "requested": speedup,
            "batch": args.batch,
            "chosen_macs_ratio": round(st.macs_ratio, 4),
            "achieved_macs_ratio": round(r.achieved_macs_ratio, 4),
            "probes": [(round(q.macs_ratio, 3), round(q.speedup, 3)) for q in st.probes],
            "achieved_speedup": [
                round(thr.speedup.median, 3),
                round(thr.speedup.low, 3),
                round(thr.speedup.high, 3),
            ],
            "verdict": thr.verdict,
            "wall_s": round(time.perf_counter() - t0, 1),
        }
        print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
