"""Model zoo: CIFAR ResNet-20/32/56/110, VGG-16-BN, MobileNetV2 (CIFAR variants) and `tv:<name>`.

Every builder takes ``num_classes`` and ``in_channels``. Weights come only from safetensors files
(data, never code).
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError, PruningError, WeightsError
from ..registry import Registry, UnknownNameError
from ..spec import MODEL_ENTRY_POINTS, TIMM_PREFIX, TORCHVISION_PREFIX, plugin_models
from .weights import is_pytorch_file, load_state, mismatch


@dataclass(frozen=True)
class ZooEntry:
    build: Callable[[int, int], nn.Module]  # (num_classes, in_channels) -> module
    min_input_size: int  # smallest H = W the network accepts, in pixels


MODELS: Registry[ZooEntry] = Registry("model")


# --- CIFAR ResNet (He et al. 2016, 6n+2 layers; projection shortcuts where the shape changes) ---


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs: a 16-channel stem and three stages of n blocks (16, 32, 64 channels)."""

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6:
            raise ModelError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        widths, cin, stages = (16, 32, 64), 16, []
        for i, w in enumerate(widths):
            blocks = [BasicBlock(cin if j == 0 else w, w, 2 if (i > 0 and j == 0) else 1) for j in range(n)]
            stages.append(nn.Sequential(*blocks))
            cin = w
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(64, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# --- VGG-16-BN for CIFAR (Simonyan & Zisserman; the BN variant with one linear head) ---

_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)


class CifarVGG(nn.Module):
    def __init__(self, cfg=_VGG16, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [
                    nn.Conv2d(cin, v, 3, padding=1, bias=False),
                    nn.BatchNorm2d(v),
                    nn.ReLU(inplace=True),
                ]
                cin = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(cin, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


# --- MobileNetV2 for CIFAR (Sandler et al.; stride 1 in the stem and the first two stages) ---

_MBV2 = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _conv_bn(
    cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: bool = True
) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers = [] if expand == 1 else [_conv_bn(cin, hidden, 1)]
        layers += [_conv_bn(hidden, hidden, 3, stride, groups=hidden), _conv_bn(hidden, cout, 1, act=False)]
        self.conv = nn.Sequential(*layers)
        self.use_res = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class CifarMobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = [_conv_bn(in_channels, 32, 3)]
        cin = 32
        for t, c, n, s in _MBV2:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(_conv_bn(cin, 1280, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(1280, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


for _depth in (20, 32, 56, 110):
    MODELS.add(f"resnet{_depth}", ZooEntry(lambda nc, ic, d=_depth: CifarResNet(d, nc, ic), min_input_size=4))
MODELS.add("vgg16_bn", ZooEntry(lambda nc, ic: CifarVGG(num_classes=nc, in_channels=ic), min_input_size=16))
MODELS.add("mobilenet_v2", ZooEntry(lambda nc, ic: CifarMobileNetV2(nc, ic), min_input_size=8))


# --- torchvision ---


def _torchvision_entry(name: str) -> ZooEntry:
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        raise UnknownNameError(
            f"unknown torchvision model '{TORCHVISION_PREFIX}{name}'; known: {', '.join(TORCHVISION_PREFIX + k for k in known)}"
        )

    def build(num_classes: int, in_channels: int) -> nn.Module:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
        if in_channels != 3:
            _replace_first_conv(model, in_channels)
        return model

    return ZooEntry(build, min_input_size=max(32, _torchvision_min_size(name)))


def _torchvision_min_size(name: str) -> int:
    """The smallest input side (pixels) torchvision documents for any of the builder's weights."""
    import torchvision

    sizes = [w.meta.get("min_size", (1, 1)) for w in torchvision.models.get_model_weights(name)]
    return min((max(s) for s in sizes), default=1)


def _replace_first_conv(model: nn.Module, in_channels: int) -> None:
    """Swap the first 3-channel conv for one with ``in_channels`` inputs (same geometry)."""
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d) and child.in_channels == 3:
                new = nn.Conv2d(
                    in_channels,
                    child.out_channels,
                    child.kernel_size,
                    child.stride,
                    child.padding,
                    child.dilation,
                    child.groups if child.groups == 1 else in_channels,
                    child.bias is not None,
                )
                setattr(parent, child_name, new)
                return
    raise ModelError("could not find a 3-channel input convolution to adapt to the data's channels")


# --- timm (optional extra): built with random weights, never downloaded ---


def _timm_entry(name: str) -> ZooEntry:
    try:
        import timm
    except ImportError:
        raise ModelError(
            f"{TIMM_PREFIX}{name} needs timm, which is not installed here (the `timm` extra)"
        ) from None
    if not timm.is_model(name):
        raise UnknownNameError(f"unknown timm model '{TIMM_PREFIX}{name}' (timm.list_models() lists them)")

    def build(num_classes: int, in_channels: int) -> nn.Module:
        # timm adapts the stem to in_channels itself; pretrained=False: no download at run time
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels)

    return ZooEntry(build, min_input_size=32)


# --- models from installed packages (entry points), registered the first time a job names one ---


def _plugin_entry(name: str) -> ZooEntry:
    """Load plugin ``name``'s builder; every failure (import, not callable, raising, not a module) is
    one ModelError line naming the plugin."""
    from importlib.metadata import entry_points

    ep = next(iter(entry_points(group=MODEL_ENTRY_POINTS, name=name)), None)
    if ep is None:  # uninstalled since plugin_models() was cached
        raise ModelError(f"model plugin {name!r} is no longer installed")
    try:
        builder = ep.load()
    except Exception as err:  # whatever the plugin's import raises, the job fails with one line
        raise ModelError(f"model plugin {name!r} ({ep.value}) does not load: {_err_line(err)}") from None
    if not callable(builder):
        raise ModelError(f"model plugin {name!r} ({ep.value}) is not a builder: {type(builder).__name__}")

    def build(num_classes: int, in_channels: int) -> nn.Module:
        try:
            model = builder(num_classes, in_channels)
        except Exception as err:
            raise ModelError(f"model plugin {name!r}: its builder raised {_err_line(err)}") from None
        if not isinstance(model, nn.Module):
            raise ModelError(
                f"model plugin {name!r}: its builder returned a {type(model).__name__}, not a module"
            )
        return model

    return ZooEntry(build, min_input_size=1)


def get_entry(name: str) -> ZooEntry:
    """The zoo entry for a spec's model name (a zoo name, an installed plugin, ``tv:<builder>`` or
    ``timm:<model>``)."""
    if name.startswith(TORCHVISION_PREFIX):
        return _torchvision_entry(name[len(TORCHVISION_PREFIX) :])
    if name.startswith(TIMM_PREFIX):
        return _timm_entry(name[len(TIMM_PREFIX) :])
    if name not in MODELS and name in plugin_models():
        entry = _plugin_entry(name)
        with contextlib.suppress(ValueError):  # another thread registered it first: same entry point
            MODELS.add(name, entry)
    return MODELS.get(name)


def build_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    weights: str | Path | None = None,
    pretrained: bool = False,
) -> nn.Module:
    """Build a model by name; load safetensors weights when given, or (``pretrained``, ``tv:`` and
    ``timm:`` models) the library's published weights from its cache (``pretrained.load_pretrained``:
    a miss downloads only where ``ALLOW_DOWNLOAD`` is set)."""
    model = get_entry(name).build(num_classes, in_channels)
    if weights is not None:
        load_weights(model, weights)
    if pretrained:
        from ..settings import get_settings
        from .pretrained import load_pretrained

        model = load_pretrained(model, name, get_settings().allow_download)
    return model


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a state dict strictly from safetensors, or from a PyTorch ``.pt``/``.pth`` file read with
    ``torch.load(weights_only=True)``; every problem is one WeightsError line."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        if is_pytorch_file(path):
            try:
                state = load_state(path)
            except WeightsError as err:
                raise WeightsError(f"{path.name}: {err}") from None
        else:
            state = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise WeightsError(f"{path.name} is not a valid safetensors file ({_first_line(err)})") from None
    # safetensors keeps no per-module ``_metadata`` (state-dict versions); some modules (torchvision's
    # MNASNet) refuse a state dict without one. The file holds weights for this code's modules, so
    # their own versions apply.
    state_with_versions: dict[str, torch.Tensor] = OrderedDict(state)
    state_with_versions._metadata = model.state_dict()._metadata  # type: ignore[attr-defined]
    # every wrong key named (torch's own message is cut to a line here, and users fix all at once)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if diff := mismatch(want, {k: tuple(v.shape) for k, v in state.items()}):
        raise WeightsError(f"{path.name} does not match the model: {diff}")
    if bad := non_finite_keys(state):
        raise WeightsError(
            f"{path.name} holds NaN or infinite values in {len(bad)} tensor(s): {', '.join(bad[:10])}"
            f"{', ...' if len(bad) > 10 else ''}; these weights cannot be pruned or trained"
        )
    try:
        model.load_state_dict(state_with_versions, strict=True)
    except RuntimeError as err:
        raise WeightsError(f"{path.name} does not match the model: {_first_line(err, 2)}") from None


def non_finite_keys(state: Mapping[str, torch.Tensor]) -> list[str]:
    """The keys of ``state``'s floating-point tensors that hold a NaN or an infinity, in its order."""
    return [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def _err_line(err: Exception) -> str:
    return f"{type(err).__name__}: {_first_line(err)}"


def _first_line(err: Exception, lines: int = 1) -> str:
    text = " ".join(s.strip() for s in str(err).strip().splitlines()[:lines])
    return text[:300]


@contextmanager
def _weights_on_meta() -> Iterator[None]:
    """Every parameter and buffer a module registers goes to the meta device (shapes only), while the
    builder's own arithmetic stays on the CPU: for builders that compute with tensors and read them
    back (torchvision's RegNets derive their widths with ``.tolist()``), which a meta default device
    refuses. Tensors are created empty and moved at once, so no weights' memory is ever touched."""
    import torch
    from torch import nn

    register_parameter, register_buffer = nn.Module.register_parameter, nn.Module.register_buffer

    def parameter(self: nn.Module, name: str, param: Any) -> None:
        if param is not None:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register_parameter(self, name, param)

    def buffer(self: nn.Module, name: str, tensor: Any, persistent: bool = True) -> None:
        register_buffer(self, name, None if tensor is None else tensor.to("meta"), persistent)

    nn.Module.register_parameter, nn.Module.register_buffer = parameter, buffer  # type: ignore[method-assign]
    try:
        with torch.no_grad():
            yield
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = register_parameter, register_buffer  # type: ignore[method-assign]


def expected_keys(name: str, num_classes: int, in_channels: int) -> list[dict[str, Any]]:
    """``[{"key", "shape", "dtype"}]`` of the state dict that model ``name`` built for ``num_classes``
    classes and ``in_channels`` input channels expects, in the model's order. Built on the meta device
    (shapes only, no memory for weights); a builder that computes with tensors, with only its weights
    there (``_weights_on_meta``); one that needs real weights, for real (the child's limits bound it)."""
    import torch

    entry = get_entry(name)
    builds: tuple[Callable[[], Any], ...] = (lambda: torch.device("meta"), _weights_on_meta, nullcontext)
    for i, where in enumerate(builds):
        try:
            with where():
                model = entry.build(num_classes, in_channels)
            break
        except PruningError:
            raise
        except Exception as err:  # try the next way; the last one's error is the answer
            if i == len(builds) - 1:
                why = " ".join(str(err).split())[:300]
                raise ModelError(f"{name} cannot be built: {type(err).__name__}: {why}") from None
    return [
        {"key": k, "shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
        for k, v in model.state_dict().items()
    ]
