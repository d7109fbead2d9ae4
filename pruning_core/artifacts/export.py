"""Export a (pruned) model as safetensors + architecture JSON, ``torch.export`` (.pt2), TorchScript and
ONNX; load it back.

The export directory always holds ``model.safetensors`` (the state dict) and ``architecture.json``
(``surgery.describe``): together they rebuild the pruned network with no pickled code
(``load_pruned``); a failure there raises ``ExportError``. ``model.pt2``, ``model.torchscript.pt`` and
``model.onnx`` are optional deployment artefacts: each is checked against the eager model's eval
output, and one that cannot be written or fails its check is left out and reported in
``ExportResult.failed`` (a job whose training is done is never failed for a deployment format). They
hold the network with BatchNorm folded into the convolutions before it (``inference.fold_batchnorm``):
fewer operators to run; the safetensors weights stay unfolded, so that the reloaded network is the
trainable zoo architecture.

Every format carries the job's ``InputContract`` (normalisation, size, channels, value range, class
names): ``architecture.json`` as its ``input`` object, ONNX as ``metadata_props``, TorchScript and .pt2
as the extra file ``input_contract.json``; ``read_contract`` reads it back from any of them.
TorchScript is deprecated in PyTorch: ``load_torchscript`` says so and points to ``load_exported``.

ONNX goes through the TorchScript-based exporter (``dynamo=False``): torch 2.14 still ships it, and the
default dynamo exporter needs ``onnxscript``, which is not a dependency.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import PruningError, WeightsError, one_line
from ..graph.surgery import rebuild
from ..models.zoo import load_weights
from .contract import CONTRACT_FILE, InputContract
from .inference import count_batchnorms, fold_batchnorm

WEIGHTS_FILE = "model.safetensors"
ARCH_FILE = "architecture.json"
TORCHSCRIPT_FILE = "model.torchscript.pt"
ONNX_FILE = "model.onnx"
TORCH_EXPORT_FILE = "model.pt2"
FORMATS = ("safetensors", "torch_export", "torchscript", "onnx")
ONNX_OPSET = 17
# A TorchScript/ONNX output passes when max|out - ref| <= CHECK_ATOL + CHECK_RTOL * max|ref| on the
# example batch. Relative, because float32 reordering (fused kernels, BatchNorm folded into convs) errs in
# proportion to the logits' scale: ONNX Runtime up to 2.3e-6 of it across the torchvision sweep (1.1e-3
# absolute on inception_v3's logits of ~600), and logits can reach 1e21. A wrong channel errs by O(1).
CHECK_RTOL = 1e-4
CHECK_ATOL = 1e-5  # floor for logits near zero


class ExportError(PruningError):
    code = "export_failed"


@dataclass(frozen=True)
class ExportResult:
    """What ``export_model`` wrote.

    ``paths``: artefact -> file, ``safetensors`` and ``architecture`` always, ``torch_export``,
    ``torchscript`` and ``onnx`` when written and checked. ``failed``: format -> one-line reason it was
    left out.
    """

    paths: dict[str, Path]
    failed: dict[str, str] = field(default_factory=dict)
    folded_batchnorms: int = 0  # BatchNorm layers folded away in the .pt2, TorchScript and ONNX networks


def export_model(
    model: nn.Module,
    arch: dict[str, Any],
    out_dir: Path,
    formats: Sequence[str],
    example: torch.Tensor,
    *,
    contract: InputContract | None = None,
    rtol: float = CHECK_RTOL,
    atol: float = CHECK_ATOL,
) -> ExportResult:
    """Write ``model`` to ``out_dir`` in the requested formats.

    ``example`` is an input batch (N x C x H x W, float) used to trace and to check the exports.
    ``contract``: the input contract and class names, stored in every format written (without one,
    ``architecture.json`` records only channels and size). safetensors + ``architecture.json`` are
    always written; a problem with them (or an unknown format) raises ``ExportError``. The .pt2,
    TorchScript and ONNX outputs must match torch's eval logits within
    ``atol + rtol * max|logits|`` (max abs difference); a format that fails to export or to match is
    reported in ``ExportResult.failed`` and its file is not left behind. The model is exported on the
    CPU in eval mode and returned to its original device and mode. Nothing is written outside
    ``out_dir``.
    """
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ExportError(f"unknown export format(s) {', '.join(unknown)}; known: {', '.join(FORMATS)}")
    out_dir = Path(out_dir)
    if contract is not None:  # a superset of describe()'s {channels, size}: old readers still work
        arch = {**arch, "input": contract.to_json()}
    with _on_cpu_eval(model):
        x = example.detach().to("cpu")
        state = _cpu_state(model)
        _check_arch(arch, state)
        reference = _eager_logits(model, x)
        out_dir.mkdir(parents=True, exist_ok=True)
        result = ExportResult({"safetensors": _save_weights(state, out_dir / WEIGHTS_FILE)})
        result.paths["architecture"] = _save_arch(arch, out_dir / ARCH_FILE)
        tol = atol + rtol * (reference.abs().max().item() if reference.numel() else 0.0)
        deployed = fold_batchnorm(model)  # checked below against the unfolded model's logits
        result = replace(result, folded_batchnorms=count_batchnorms(model) - count_batchnorms(deployed))
        savers = {
            "torch_export": (_save_torch_export, TORCH_EXPORT_FILE),
            "torchscript": (_save_torchscript, TORCHSCRIPT_FILE),
            "onnx": (_save_onnx, ONNX_FILE),
        }
        for fmt, (save, name) in savers.items():
            if fmt not in formats:
                continue
            try:
                result.paths[fmt] = save(deployed, x, reference, out_dir / name, tol, contract)
            except ExportError as err:  # a deployment format is optional: report it, keep the rest
                result.failed[fmt] = str(err)
    return result


def load_pruned(path: str | Path) -> nn.Module:
    """Rebuild a model written by ``export_model``, in eval mode on the CPU.

    ``path`` is the export directory, or its ``model.safetensors`` (with ``architecture.json`` beside
    it). A missing or broken architecture file raises ``ExportError``; missing, corrupt or mismatching
    weights raise ``WeightsError`` (one line each).
    """
    path = Path(path)
    if path.name == ARCH_FILE:
        path = path.parent
    weights = path / WEIGHTS_FILE if path.is_dir() or not path.suffix else path
    arch = read_architecture(weights.parent / ARCH_FILE)
    model = _rebuild(arch, ARCH_FILE)
    if not weights.is_file():
        raise WeightsError(f"weights file not found: {weights}")
    load_weights(model, weights)
    return model.eval()


def load_exported(path: str | Path) -> nn.Module:
    """The network of a ``model.pt2`` (``torch.export``; BatchNorm folded), as a callable module.

    ``path``: the file or its export directory. Inputs: float N x C x S x S, any N >= 1.
    """
    path = Path(path)
    path = path / TORCH_EXPORT_FILE if path.is_dir() else path
    try:
        return torch.export.load(str(path)).module()
    except Exception as err:  # a missing file, a corrupt archive, an opset mismatch
        raise ExportError(f"cannot load {path.name} with torch.export.load: {one_line(err)}") from None


def load_torchscript(path: str | Path) -> torch.jit.ScriptModule:
    """The network of a ``model.torchscript.pt`` (``path``: the file or its export directory).

    Warns (``DeprecationWarning``): TorchScript is deprecated in PyTorch; ``load_exported`` reads the
    same network from ``model.pt2``.
    """
    warnings.warn(
        "TorchScript is deprecated in PyTorch; load model.pt2 with pruning_core.artifacts.export.load_exported "
        "(export.formats: torch_export) or use model.onnx",
        DeprecationWarning,
        stacklevel=2,
    )
    path = Path(path)
    path = path / TORCHSCRIPT_FILE if path.is_dir() else path
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch's own notice; ours is above
            return torch.jit.load(str(path), map_location="cpu")
    except Exception as err:
        raise ExportError(f"cannot load {path.name} with torch.jit.load: {one_line(err)}") from None


def read_contract(path: str | Path) -> InputContract:
    """The input contract stored with an export: ``path`` is the export directory (its
    ``architecture.json``) or any one file: ``architecture.json``, ``model.onnx`` (metadata),
    ``model.pt2`` or ``model.torchscript.pt`` (extra file). An export without one raises ``ExportError``.
    """
    path = Path(path)
    if path.is_dir():
        path = path / ARCH_FILE
    readers = {
        ".json": _contract_from_arch,
        ".onnx": _contract_from_onnx,
        ".pt2": _contract_from_pt2,
        ".pt": _contract_from_torchscript,
    }
    if path.suffix not in readers:
        raise ExportError(f"{path.name}: no input contract is stored in {path.suffix or 'this'} files")
    if not path.is_file():
        raise ExportError(f"export file not found: {path}")
    try:
        return readers[path.suffix](path)
    except PruningError as err:
        raise ExportError(f"{path.name}: {err}") from None


def read_architecture(path: str | Path) -> dict[str, Any]:
    """Parse an ``architecture.json``; any problem is one ``ExportError`` line."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"architecture file not found: {path}")
    try:
        arch = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ExportError(f"{path.name} is not valid JSON ({one_line(err)})") from None
    if not isinstance(arch, dict):
        raise ExportError(f"{path.name} must hold a JSON object, got {type(arch).__name__}")
    return arch


# --- helpers ---


@contextmanager
def _on_cpu_eval(model: nn.Module) -> Iterator[None]:
    """Put ``model`` on the CPU in eval mode; restore its device and mode on exit."""
    device = next((t.device for t in (*model.parameters(), *model.buffers())), torch.device("cpu"))
    was_training = model.training
    try:
        model.to("cpu").eval()
        yield
    finally:
        model.to(device).train(was_training)


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as independent, contiguous CPU tensors (safetensors refuses shared storage)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def _rebuild(arch: dict[str, Any], source: str) -> nn.Module:
    """``surgery.rebuild`` with every failure turned into one ``ExportError`` line naming ``source``."""
    try:
        return rebuild(arch)
    except (PruningError, KeyError, TypeError, ValueError, AttributeError) as err:
        why = f"missing key {err}" if type(err) is KeyError else one_line(err)
        raise ExportError(f"{source} cannot rebuild a model: {why}") from None


def _check_arch(arch: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    """Refuse an architecture description that would not reload ``state`` strictly."""
    rebuilt = _rebuild(arch, "architecture description").state_dict()
    want = {k: tuple(v.shape) for k, v in state.items()}
    got = {k: tuple(v.shape) for k, v in rebuilt.items()}
    if want != got:
        diff = sorted(set(want.items()) ^ set(got.items()))[:3]
        raise ExportError(f"architecture description does not match the model; first differences: {diff}")


def _contract_from_arch(path: Path) -> InputContract:
    stored = read_architecture(path).get("input")
    if not isinstance(stored, dict) or "format" not in stored:
        raise ExportError("architecture.json records no input contract (exported before contracts were)")
    return InputContract.from_json(stored)


def _contract_from_onnx(path: Path) -> InputContract:
    import onnx

    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    if "format" not in props:
        raise ExportError("the ONNX metadata holds no input contract")
    return InputContract.from_metadata(props)


def _contract_from_pt2(path: Path) -> InputContract:
    extra = {CONTRACT_FILE: ""}
    try:
        torch.export.load(str(path), extra_files=extra)
    except Exception as err:
        raise ExportError(f"cannot read it with torch.export.load: {one_line(err)}") from None
    if not extra[CONTRACT_FILE]:
        raise ExportError(f"it holds no {CONTRACT_FILE}")
    return InputContract.from_text(extra[CONTRACT_FILE])


def _contract_from_torchscript(path: Path) -> InputContract:
    extra = {CONTRACT_FILE: ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
            torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except Exception as err:  # includes an archive without the extra file
        raise ExportError(f"cannot read its {CONTRACT_FILE}: {one_line(err)}") from None
    return InputContract.from_text(extra[CONTRACT_FILE])


@torch.inference_mode()
def _eager_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    if not isinstance(out, torch.Tensor):
        raise ExportError(f"the model must return one logits tensor to be exported, got {type(out).__name__}")
    return out.clone()


def _save_weights(state: dict[str, torch.Tensor], path: Path) -> Path:
    from safetensors.torch import save_file

    tmp = _tmp(path)
    save_file(state, str(tmp), metadata={"format": "pt"})
    return _commit(tmp, path)


def _save_arch(arch: dict[str, Any], path: Path) -> Path:
    tmp = _tmp(path)
    try:
        tmp.write_text(json.dumps(arch, indent=2) + "\n", encoding="utf-8")
    except (TypeError, ValueError) as err:
        tmp.unlink(missing_ok=True)
        raise ExportError(f"architecture description is not JSON-serialisable: {one_line(err)}") from None
    return _commit(tmp, path)


def _write_checked(
    label: str,
    compare_as: str,
    path: Path,
    ref: torch.Tensor,
    tol: float,
    write: Callable[[Path], torch.Tensor],
) -> Path:
    """Write ``path`` through a hidden temporary with ``write`` (which returns the logits of the file it
    wrote, loaded back), keep it only if they match ``ref`` within ``tol``; else ``ExportError`` with one
    line and no file. Warnings are silenced: exporters announce deprecations and tracer caveats."""
    tmp = _tmp(path)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            out = write(tmp)
    except Exception as err:  # exporters, checkers and runtimes each raise many types
        tmp.unlink(missing_ok=True)
        raise ExportError(f"{label} failed: {one_line(err)}") from None
    _compare(compare_as, out, ref, tol, tmp)
    return _commit(tmp, path)


def _save_torch_export(
    model: nn.Module,
    x: torch.Tensor,
    ref: torch.Tensor,
    path: Path,
    tol: float,
    contract: InputContract | None,
) -> Path:
    """``torch.export`` with a dynamic batch axis; checked by loading the file back and running it."""
    extra = {CONTRACT_FILE: contract.to_text()} if contract is not None else None

    def write(tmp: Path) -> torch.Tensor:
        batch = torch.export.Dim("batch", min=1)
        program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
        torch.export.save(program, str(tmp), extra_files=extra)
        return torch.export.load(str(tmp)).module()(x)

    return _write_checked("torch.export", "torch.export", path, ref, tol, write)


def _save_torchscript(
    model: nn.Module,
    x: torch.Tensor,
    ref: torch.Tensor,
    path: Path,
    tol: float,
    contract: InputContract | None,
) -> Path:
    extra = {CONTRACT_FILE: contract.to_text()} if contract is not None else {}

    def write(tmp: Path) -> torch.Tensor:
        # No check_trace: it traces a second time to compare graphs; the logits are compared instead.
        traced = torch.jit.trace(model, (x,), check_trace=False)
        torch.jit.save(traced, str(tmp), _extra_files=extra)
        return traced(x)

    return _write_checked("TorchScript export", "TorchScript", path, ref, tol, write)


def _save_onnx(
    model: nn.Module,
    x: torch.Tensor,
    ref: torch.Tensor,
    path: Path,
    tol: float,
    contract: InputContract | None,
) -> Path:
    def write(tmp: Path) -> torch.Tensor:
        import onnx
        import onnxruntime as ort

        torch.onnx.export(
            model,
            (x,),
            str(tmp),
            dynamo=False,
            opset_version=ONNX_OPSET,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            do_constant_folding=True,
        )
        proto = onnx.load(str(tmp))
        if contract is not None:  # readable with onnxruntime's get_modelmeta().custom_metadata_map
            onnx.helper.set_model_props(proto, contract.metadata())
            onnx.save(proto, str(tmp))
        onnx.checker.check_model(proto, full_check=True)
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(["logits"], {"input": x.numpy()})[0])

    return _write_checked("ONNX export", "ONNX Runtime", path, ref, tol, write)


def _compare(what: str, out: torch.Tensor, ref: torch.Tensor, tol: float, tmp: Path) -> None:
    """Raise (and drop ``tmp``) unless ``out`` matches ``ref`` within ``tol`` max abs difference."""
    if tuple(out.shape) != tuple(ref.shape):
        tmp.unlink(missing_ok=True)
        raise ExportError(f"{what} output shape {tuple(out.shape)} differs from torch's {tuple(ref.shape)}")
    diff = (out.float() - ref.float()).abs().max().item() if ref.numel() else 0.0
    if not diff <= tol:  # also catches NaN
        tmp.unlink(missing_ok=True)
        scale = ref.abs().max().item() if ref.numel() else 0.0
        raise ExportError(
            f"{what} logits differ from torch's by {diff:.3g} (max abs; allowed {tol:.3g} for logits "
            f"up to {scale:.3g})"
        )


def _tmp(path: Path) -> Path:
    """A hidden temporary beside ``path`` with the same suffix (``torch.export`` insists on .pt2)."""
    return path.with_name(f".{path.stem}.tmp{path.suffix}")


def _commit(tmp: Path, path: Path) -> Path:
    os.replace(tmp, path)
    return path
