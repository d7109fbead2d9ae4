"""``MODEL_CARD.md``: what an exported network is, what it expects, what it outputs, how well it does
(the report's MACs, params, top-1 and latency) and how to load each file written beside it.

Torch-free: rendered from the ``Report`` and the ``InputContract``, both plain data.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from .contract import InputContract
from .report import Report, latency_line

CARD_FILE = "MODEL_CARD.md"
MAX_CLASSES_LISTED = 100  # a card lists at most this many class names (CIFAR-100 fits)

# How to load each file, keyed by file name; only files that were written are listed.
_LOADERS = {
    "model.onnx": (
        "ONNX (opset 17, dynamic batch): onnxruntime alone; the contract is in the metadata",
        "import json, onnxruntime as ort\n"
        'session = ort.InferenceSession("model.onnx")\n'
        "meta = {k: json.loads(v) for k, v in session.get_modelmeta().custom_metadata_map.items()}\n"
        'logits = session.run(None, {"input": x})[0]  # x: float32 N x C x S x S, preprocessed',
    ),
    "model.pt2": (
        "torch.export program (BatchNorm folded, dynamic batch)",
        'import torch\nmodel = torch.export.load("model.pt2").module()\nlogits = model(x)',
    ),
    "model.safetensors": (
        "weights + architecture.json: the trainable network, no pickles",
        "from pruning_core import load_pruned\n"
        'model = load_pruned(".")  # the folder holding model.safetensors and architecture.json\n'
        "logits = model(x)",
    ),
    "model.torchscript.pt": (
        "TorchScript (deprecated in PyTorch; prefer model.pt2 or model.onnx)",
        'import torch\nmodel = torch.jit.load("model.torchscript.pt")\nlogits = model(x)',
    ),
}

_CONTRACT_IN = {
    "model.onnx": "the ONNX metadata of `model.onnx`",
    "model.pt2": "`input_contract.json` inside `model.pt2`",
    "model.torchscript.pt": "`input_contract.json` inside `model.torchscript.pt`",
}


def render_card(report: Report, contract: InputContract, files: Iterable[str]) -> str:
    """The model card's Markdown. ``files``: names of the files exported beside it."""
    d, p = report.dense, report.pruned
    lines = [
        f"# {report.model}, pruned with {report.method}",
        "",
        f"A {report.model} network physically pruned by `{report.method}` to "
        f"{report.achieved_macs_ratio:.3f} of its MACs (target {report.target_macs_ratio:g}), trained and "
        f"evaluated on `{report.data}`. Numbers from `report.json`.",
        "",
        "| | dense | pruned |",
        "|---|---:|---:|",
        f"| MACs per image | {d.macs:,} | {p.macs:,} |",
        f"| parameters | {d.params:,} | {p.params:,} |",
        f"| top-1 (%){_test_split(report)} | {_pct(d.top1)} | {_pct(p.top1)} |",
    ]
    if report.latency is not None:
        lines += ["", f"Measured on {report.latency.device}: {latency_line(report.latency)}."]
    lines += ["", "## Input", "", contract.preprocessing() + ".", ""]
    lines += _contract_table(contract)
    lines += ["", "## Output", "", f"Logits, N x {len(contract.classes)} (softmax for probabilities):", ""]
    lines += _class_list(contract.classes)
    lines += ["", "## Files and how to load them", ""]
    written = sorted(set(files) & _LOADERS.keys())
    for name in written:
        what, code = _LOADERS[name]
        lines += [f"- `{name}`: {what}", "", "  ```python", *[f"  {c}" for c in code.splitlines()], "  ```"]
    where = ["`architecture.json` (its `input`)", *(_CONTRACT_IN[n] for n in written if n in _CONTRACT_IN)]
    places = ", ".join(where[:-1]) + " and " + where[-1] if len(where) > 1 else where[0]
    lines += ["", f"The same input contract is stored in {places}.", ""]
    return "\n".join(lines)


def write_card(report: Report, contract: InputContract, files: Iterable[str], out_dir: Path) -> Path:
    """Write ``MODEL_CARD.md`` into ``out_dir``; return its path."""
    path = Path(out_dir) / CARD_FILE
    path.write_text(render_card(report, contract, files), encoding="utf-8")
    return path


def _test_split(report: Report) -> str:
    s = report.data_summary
    return f", {s.test_images} {s.split} images" if s is not None else ""


def _pct(top1: float | None) -> str:
    return "-" if top1 is None else f"{top1:.2f}"


def _contract_table(c: InputContract) -> list[str]:
    rows = [
        ("channels", f"{c.channels} ({c.color or 'as trained'})"),
        ("size", f"{c.size} x {c.size} px"),
        ("value range", "not recorded" if c.value_range is None else f"{list(c.value_range)}"),
        ("mean", "not recorded" if c.mean is None else f"{[round(m, 4) for m in c.mean]}"),
        ("std", "not recorded" if c.std is None else f"{[round(s, 4) for s in c.std]}"),
        ("layout", c.layout),
    ]
    return ["| field | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]


def _class_list(classes: tuple[str, ...]) -> list[str]:
    shown = [f"{i}: {name}" for i, name in enumerate(classes[:MAX_CLASSES_LISTED])]
    more = len(classes) - MAX_CLASSES_LISTED
    return [", ".join(shown) + (f", ... ({more} more in architecture.json)" if more > 0 else "")]
