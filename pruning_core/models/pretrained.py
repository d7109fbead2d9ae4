"""``model.pretrained``: a ``tv:`` or ``timm:`` model's own published weights, from the library's cache.

Where each library keeps them: torchvision, its builder's default weights under
``torch.hub.get_dir()/checkpoints/<file name of the weights' URL>`` (``TORCH_HOME``, else
``XDG_CACHE_HOME/torch``, else ``~/.cache/torch``, then ``hub``); timm, the default tag's files in the
Hugging Face cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``) or, for
weights published at a URL, the same torch hub folder. A cache miss downloads only where the operator
allows downloads (``ALLOW_DOWNLOAD``, the setting that also lets torchvision fetch data sets);
otherwise it is refused in one line that names the file and the folder to place it in (the API asks a
torch child, ``python -m pruning_core.models.child pretrained NAME``, at submit).

The published weights are for the library's own classes and 3 input channels: a job with other
classes gets a new classifier head (randomly initialised; timm's and torchvision's alike), and other
input channels a first convolution adapted from the RGB filters (their sum spread evenly over the
channels, so a grey image gives the same response).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from ..errors import ModelError, WeightsError
from ..spec import TIMM_PREFIX, TORCHVISION_PREFIX

HF_FILE = "model.safetensors"  # what timm's Hugging Face repositories hold


@dataclass(frozen=True)
class Published:
    """Where ``model``'s published weights live in the library's cache (``found``: the first of
    ``places`` that exists, else None) and where they come from (``origin``: a URL or a hub repo)."""

    model: str
    origin: str
    places: tuple[Path, ...]
    found: Path | None

    def refusal(self) -> str:
        """The one line that says what to place where (downloads off, nothing in the cache)."""
        where = " or ".join(str(p) for p in self.places)
        if "<revision>" in where:
            where += " (<revision>: the commit named in the repository's refs/main, huggingface_hub's layout)"
        return (
            f"{self.model}'s pretrained weights are not in this server's cache and downloads are off: place "
            f"them ({self.origin}) at {where}, or let the operator allow downloads (ALLOW_DOWNLOAD=true)"
        )


def published(name: str) -> Published:
    """Where the published weights of ``tv:<name>`` or ``timm:<name>`` live; ModelError for another
    model or one the library publishes no weights for."""
    if name.startswith(TORCHVISION_PREFIX):
        return _torchvision(name)
    if name.startswith(TIMM_PREFIX):
        return _timm(name)
    raise ModelError(f"model.pretrained is for tv: and timm: models; {name} has no published weights")


def hub_checkpoints() -> Path:
    """torch hub's checkpoint folder, as ``torch.hub.get_dir()`` resolves it now."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def hf_cache() -> Path:
    """The Hugging Face hub cache, as huggingface_hub resolves it from the environment now."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "huggingface"
    return Path(home).expanduser() / "hub"


def _torchvision(name: str) -> Published:
    import torchvision

    builder = name[len(TORCHVISION_PREFIX) :]
    try:
        weights = torchvision.models.get_model_weights(builder).DEFAULT
    except (ValueError, KeyError, AttributeError):
        raise ModelError(f"torchvision publishes no weights for {name}") from None
    path = hub_checkpoints() / Path(urlparse(weights.url).path).name
    return Published(name, weights.url, (path,), path if path.is_file() else None)


def _timm(name: str) -> Published:
    try:
        from timm.models import get_pretrained_cfg
    except ImportError:
        raise ModelError(f"{name} needs timm, which is not installed here (the `timm` extra)") from None
    cfg = get_pretrained_cfg(name[len(TIMM_PREFIX) :])
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise ModelError(f"timm publishes no weights for {name}")
    places: list[Path] = []
    if cfg.hf_hub_id:
        places += _hf_places(cfg.hf_hub_id)
    if cfg.url:
        places.append(hub_checkpoints() / Path(urlparse(cfg.url).path).name)
    origin = f"hf-hub:{cfg.hf_hub_id}" if cfg.hf_hub_id else cfg.url
    return Published(name, origin, tuple(places), next((p for p in places if p.is_file()), None))


def _hf_places(repo: str) -> list[Path]:
    """The weights file of Hugging Face repository ``repo`` as the cache holds it (its ``main``
    revision's snapshot, ``<cache>/models--<org>--<name>/snapshots/<revision>/model.safetensors``)."""
    root = hf_cache() / f"models--{repo.replace('/', '--')}"
    ref = root / "refs" / "main"
    revision = ref.read_text().strip() if ref.is_file() else "<revision>"
    return [root / "snapshots" / revision / HF_FILE]


def load_pretrained(model: nn.Module, name: str, allow_download: bool) -> nn.Module:
    """``model`` (built by the zoo for the job's classes and channels) with ``name``'s published
    weights; for timm a new model built by timm with them. ModelError, one line, on a cache miss with
    downloads off (``Published.refusal``)."""
    where = published(name)
    if where.found is None and not allow_download:
        raise ModelError(where.refusal())
    if name.startswith(TIMM_PREFIX):
        return _timm_model(model, name, where)
    import torchvision

    # torchvision's own builder loads them (through the same cache, downloading only on a miss) and
    # applies its fixes of old checkpoints (DenseNet's key names)
    source = torchvision.models.get_model(name[len(TORCHVISION_PREFIX) :], weights="DEFAULT")
    _load_adapted(model, source.state_dict(), name)
    return model


def _timm_model(model: nn.Module, name: str, where: Published) -> nn.Module:
    import timm

    classes = _classes(model)
    channels = _first_conv(model).in_channels
    overlay = {"file": str(where.found)} if where.found is not None else None
    return timm.create_model(
        name[len(TIMM_PREFIX) :],
        pretrained=True,
        num_classes=classes,
        in_chans=channels,
        pretrained_cfg_overlay=overlay,
    )


def _load_adapted(model: nn.Module, state: dict[str, torch.Tensor], name: str) -> None:
    """Load ``state`` into ``model``; the classifier head (other classes) keeps its initialisation and
    the first convolution (other input channels) gets the RGB filters' sum spread evenly. Any other
    difference is a WeightsError naming it."""
    own = model.state_dict()
    first = next((k for k, m in model.named_modules() if m is _first_conv(model)), "")
    loaded = {}
    for key, target in own.items():
        w = state.get(key)
        if w is None:
            raise WeightsError(f"{name}'s published weights lack {key}")
        if w.shape == target.shape:
            loaded[key] = w
        elif key == f"{first}.weight" and w.shape[0] == target.shape[0] and w.shape[2:] == target.shape[2:]:
            loaded[key] = w.sum(1, keepdim=True).repeat(1, target.shape[1], 1, 1) / target.shape[1]
        elif w.shape[1:] == target.shape[1:] and target.shape[0] == _classes(model):
            continue  # the classifier, for the job's classes: initialised as the model's own
        else:
            raise WeightsError(
                f"{name}'s published {key} is {tuple(w.shape)}, the model's {tuple(target.shape)}"
            )
    model.load_state_dict({**own, **loaded}, strict=True)


def _classes(model: nn.Module) -> int:
    """Output width of the model's last conv/linear layer (its classifier)."""
    last = [m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)][-1]
    return last.out_features if isinstance(last, nn.Linear) else last.out_channels


def _first_conv(model: nn.Module) -> nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))
