"""Data sets for pruning jobs: a registry of loaders that turn a :class:`DataSpec` into train/test sets.

Every loader returns :class:`Datasets` whose items are ``(image, label)``: a normalised float tensor
``C x S x S`` and an ``int``. Images are held in memory as uint8 ``N x C x H x W`` when they fit
``DECODE_MAX_BYTES`` (an image folder decoded once, ``decoded.py``) and decoded from files on access
otherwise. Resizing, augmentation (training set only) and normalisation happen per item, drawing from
torch's global RNG (the engine's loader seeds it per item, ``batches.item_seed``), or, for the
in-memory sets, per batch on the training device (``ImageTensorDataset.batch``: the same
distributions, drawn from the engine's own generator, whose state the checkpoint keeps). Dataset
archives are extracted under the job's cache directory only, and only after
every member has been checked: names, types, member count, unpacked bytes and compression ratio.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from ..errors import DataError, one_line
from ..registry import Registry, UnknownNameError
from ..settings import Settings, get_settings
from ..spec import DataSpec
from .archive import extract_archive
from .decoded import cache_key, cached_images, files_digest

Item = tuple[torch.Tensor, int]


@dataclass
class Datasets:
    """Train and test sets of one job and what a model needs to know about them."""

    train: Dataset[Item]  # items (float C x S x S normalised, int label)
    test: Dataset[Item]
    num_classes: int
    in_channels: int
    image_size: int  # S: H == W of the tensors the model sees
    classes: list[str]
    mean: tuple[float, ...] = ()  # per-channel normalisation, in [0, 1] pixel units
    std: tuple[float, ...] = ()


@dataclass(frozen=True)
class LoadContext:
    """What a loader may use besides the spec: a private cache directory, the job seed, settings."""

    cache_dir: Path
    seed: int
    settings: Settings


Loader = Callable[[DataSpec, LoadContext], Datasets]
DATASETS: Registry[Loader] = Registry("data set")


def load_data(
    spec: DataSpec, *, cache_dir: Path, seed: int = 0, settings: Settings | None = None
) -> Datasets:
    """Build the train/test sets a spec names; every user-facing problem is a one-line DataError."""
    try:
        loader = DATASETS.get(spec.name)
    except UnknownNameError as err:
        raise DataError(str(err)) from None
    return loader(spec, LoadContext(Path(cache_dir), seed, settings or get_settings()))


# --------------------------------------------------------------------------------------------------
# Torch datasets and the per-item transform


class ImageTransform:
    """uint8 ``C x H x W`` -> float ``C x S x S``: bilinear resize, optional pad-crop + h-flip, normalise."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float], augment: bool):
        self.size = size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.augment = augment
        self.pad = max(1, round(4 * size / 32))  # CIFAR's 4 px at 32 px, scaled

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        x = image.float().div_(255)
        if tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(x[None], size=(self.size, self.size), mode="bilinear", antialias=True)[0]
        if self.augment:
            x = self._crop_flip(x)
        return x.sub_(self.mean).div_(self.std)

    def batch(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The same transform on a batch, on the images' device: uint8 ``B x C x H x W`` -> float
        ``B x C x S x S``. Crops and flips (same distributions as per item) come from ``generator``,
        which must live on that device; without augmentation nothing is drawn."""
        x = images.float().div_(255)
        if tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True)
        if self.augment:
            x = self._crop_flip_batch(x, generator)
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        return x.sub_(mean).div_(std)

    def _crop_flip(self, x: torch.Tensor) -> torch.Tensor:
        """Random ``S x S`` crop of the zero-padded image, then a coin-flip mirror (global torch RNG)."""
        p, s = self.pad, self.size
        dy, dx = torch.randint(0, 2 * p + 1, (2,)).tolist()
        flip = bool(torch.rand(()) < 0.5)
        x = F.pad(x, (p, p, p, p))[:, dy : dy + s, dx : dx + s]
        return x.flip(-1) if flip else x.contiguous()

    def _crop_flip_batch(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Per image, an ``S x S`` crop of the zero-padded image at offsets uniform in ``[0, 2 pad]``,
        mirrored with probability 1/2: one gather for the whole batch (``B x C x S x S`` in and out)."""
        p, s, b, dev = self.pad, self.size, x.shape[0], x.device
        offsets = torch.randint(0, 2 * p + 1, (b, 2), generator=generator, device=dev)
        flips = torch.rand(b, generator=generator, device=dev) < 0.5
        ramp = torch.arange(s, device=dev)
        rows = offsets[:, :1] + ramp  # B x S: source row of each output row
        cols = offsets[:, 1:] + torch.where(flips[:, None], ramp.flip(0), ramp)  # a flip reads backwards
        padded = F.pad(x, (p, p, p, p))
        n = torch.arange(b, device=dev)[:, None, None]
        return padded[n, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)  # B x S x S x C -> BCSS


class ImageTensorDataset(Dataset[Item]):
    """In-memory uint8 images ``N x C x H x W`` with labels; items ``(float C x S x S, int)``, or whole
    batches transformed on a device (``batch``: the engine's path, no loader processes)."""

    def __init__(self, images: torch.Tensor, labels: Sequence[int] | np.ndarray, transform: ImageTransform):
        self.images = images
        self.labels = [int(y) for y in labels]
        self.transform = transform
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # copies per device

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Item:
        return self.transform(self.images[index]), self.labels[index]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_on": {}}  # loader workers get the CPU array, never a GPU copy

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images ``N x C x H x W`` and int64 labels ``N`` on ``device``, copied there once."""
        device = torch.device(device)
        if device not in self._on:
            labels = torch.tensor(self.labels, dtype=torch.int64)
            self._on[device] = (self.images.to(device), labels.to(device))
        return self._on[device]

    def batch(
        self, indices: torch.Tensor, device: torch.device, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Items ``indices`` (int64 ``B``) as one batch on ``device``: float ``B x C x S x S`` (through
        ``ImageTransform.batch``, augmentation drawn from ``generator``) and int64 labels ``B``."""
        images, labels = self.on(device)
        idx = indices.to(images.device)
        return self.transform.batch(images[idx], generator), labels[idx]


class ImageFileDataset(Dataset[Item]):
    """Image files decoded on access (sets too large for memory); items ``(float C x S x S, int)``."""

    def __init__(
        self, files: list[Path], labels: list[int], channels: int, fit: int | None, transform: ImageTransform
    ):
        self.files = files
        self.labels = labels
        self.channels = channels
        self.fit = fit  # resize at decode time (data.image_size), else the files' own size
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Item:
        pixels = _pixels(_load_image(self.files[index]), self.channels, self.fit)
        return self.transform(_chw(pixels)), self.labels[index]


def _make_datasets(
    train: tuple[torch.Tensor, np.ndarray],
    test: tuple[torch.Tensor, np.ndarray],
    classes: list[str],
    size: int,
    augment: bool,
    stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
    validation: int | None = None,
) -> Datasets:
    """Wrap uint8 ``N x C x H x W`` train/test tensors and labels; stats default to the train set's.
    ``validation``: the last that many training images of each class replace ``test`` (``holdout``)."""
    if validation:
        keep, held = holdout(train[1], validation)
        train, test = (train[0][keep], train[1][keep]), (train[0][held], train[1][held])
    mean, std = stats or _channel_stats(train[0])
    return Datasets(
        train=ImageTensorDataset(train[0], train[1], ImageTransform(size, mean, std, augment)),
        test=ImageTensorDataset(test[0], test[1], ImageTransform(size, mean, std, False)),
        num_classes=len(classes),
        in_channels=train[0].shape[1],
        image_size=size,
        classes=classes,
        mean=tuple(mean),
        std=tuple(std),
    )


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 ``N x C x H x W`` images, in [0, 1] units (std >= 1e-3)."""
    n, c, h, w = images.shape
    total, total_sq = torch.zeros(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)
    for chunk in images.split(max(1, 2**24 // (c * h * w))):
        x = chunk.float().div_(255)
        total += x.sum((0, 2, 3), dtype=torch.float64)
        total_sq += x.square().sum((0, 2, 3), dtype=torch.float64)
    mean = total / (n * h * w)
    std = (total_sq / (n * h * w) - mean.square()).clamp_min(0).sqrt().clamp_min(1e-3)
    return tuple(mean.tolist()), tuple(std.tolist())


def _first_per_class(labels: np.ndarray, n: int | None) -> np.ndarray:
    """Indices (ascending) of the first ``n`` items of each class, in the given order; all when None."""
    if n is None:
        return np.arange(len(labels))
    return np.flatnonzero(_class_rank(labels) < n)


def _class_rank(labels: np.ndarray) -> np.ndarray:
    """Per item, how many items of its class come before it (0 for each class's first)."""
    order = np.argsort(labels, kind="stable")
    ordered = labels[order]
    rank = np.empty(len(labels), dtype=np.int64)
    rank[order] = np.arange(len(labels)) - np.searchsorted(ordered, ordered, side="left")
    return rank


def holdout(labels: Sequence[int] | np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) positions (ascending) into ``labels``: the last ``n`` items of each class,
    in the given order, are held out; a class with ``n`` items or fewer is a DataError (it would leave
    no training image)."""
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    short = classes[counts <= n]
    if len(short):
        raise DataError(
            f"data.validation {n} leaves no training image in class {short[0]} ({counts[counts <= n][0]} "
            "images); hold out fewer or take more with data.per_class"
        )
    left = counts[np.searchsorted(classes, labels)] - _class_rank(labels)  # this one to the class's last
    return np.flatnonzero(left > n), np.flatnonzero(left <= n)


# --------------------------------------------------------------------------------------------------
# digits: scikit-learn's 1,797 8x8 grayscale digits, a fixed stratified split

_DIGITS_SPLIT_SEED = 0  # fixed, independent of the job seed: the test set never changes


@lru_cache(maxsize=1)
def _digits_arrays() -> tuple[torch.Tensor, np.ndarray]:
    """All digits as uint8 ``1797 x 1 x 8 x 8`` (0..16 scaled to 0..255) and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)
    return torch.from_numpy(pixels[:, None]), digits.target.astype(np.int64)


def digits_split() -> tuple[np.ndarray, np.ndarray]:
    """The fixed stratified ~80/20 split of sklearn digits: sorted (train, test) index arrays."""
    from sklearn.model_selection import train_test_split

    labels = _digits_arrays()[1]
    train, test = train_test_split(
        np.arange(len(labels)), test_size=0.2, stratify=labels, random_state=_DIGITS_SPLIT_SEED
    )
    return np.sort(train), np.sort(test)


@DATASETS.register("digits")
def _load_digits(spec: DataSpec, ctx: LoadContext) -> Datasets:
    """1 x S x S digits (S = image_size or 8, bilinear); never flipped or cropped."""
    images, labels = _digits_arrays()
    train, test = digits_split()
    stats = _channel_stats(images[train])  # of the whole split: independent of per_class
    train = train[_first_per_class(labels[train], spec.per_class)]
    test = test[_first_per_class(labels[test], spec.test_per_class)]
    return _make_datasets(
        (images[train], labels[train]),
        (images[test], labels[test]),
        classes=[str(d) for d in range(10)],
        size=spec.image_size or 8,
        augment=False,
        stats=stats,
        validation=spec.validation,
    )


# --------------------------------------------------------------------------------------------------
# cifar10 / cifar100 through torchvision (the "python version" files)

_CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
_CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))


def _load_cifar(
    name: str,
    builder: str,
    stats: tuple[tuple[float, ...], tuple[float, ...]],
    spec: DataSpec,
    ctx: LoadContext,
) -> Datasets:
    """3 x S x S CIFAR images (S = image_size or 32) from ``spec.root`` or ``DATA_ROOT``."""
    root = Path(spec.root).expanduser() if spec.root else Path(ctx.settings.data_root)
    train, test = (
        _torchvision_cifar(name, builder, root, t, ctx.settings.allow_download) for t in (True, False)
    )
    parts = []
    for ds, per_class in ((train, spec.per_class), (test, spec.test_per_class)):
        labels = np.asarray(ds.targets, dtype=np.int64)
        keep = _first_per_class(labels, per_class)
        images = torch.from_numpy(np.ascontiguousarray(ds.data[keep].transpose(0, 3, 1, 2)))
        parts.append((images, labels[keep]))
    return _make_datasets(
        parts[0], parts[1], list(train.classes), spec.image_size or 32, spec.augment, stats, spec.validation
    )


def _torchvision_cifar(name: str, builder: str, root: Path, train: bool, download: bool) -> Dataset:
    """One split of a torchvision CIFAR data set, its failures turned into DataError."""
    from torchvision import datasets

    try:
        return getattr(datasets, builder)(str(root), train=train, download=download)
    except RuntimeError:  # torchvision: "Dataset not found or corrupted"
        if not download:
            raise DataError(
                f"{name} not found under {root}; put the python version there or set ALLOW_DOWNLOAD=1"
            ) from None
        raise DataError(f"{name} under {root} is missing or corrupt after downloading") from None
    except OSError as err:  # URLError, no network, disk
        raise DataError(f"could not download {name} to {root}: {one_line(err)}") from None
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError) as err:
        raise DataError(f"{name} under {root} is corrupt: {one_line(err)}") from None


DATASETS.add("cifar10", partial(_load_cifar, "cifar10", "CIFAR10", _CIFAR10_STATS))
DATASETS.add("cifar100", partial(_load_cifar, "cifar100", "CIFAR100", _CIFAR100_STATS))


# --------------------------------------------------------------------------------------------------
# synthetic: deterministic from the seed, a smooth class pattern under uniform noise


@DATASETS.register("synthetic")
def _load_synthetic(spec: DataSpec, ctx: LoadContext) -> Datasets:
    """``3 x S x S`` images (S = image_size or 32): 0.6 * class pattern + 0.4 * noise; ~400 / ~100."""
    k, size = spec.num_classes or 10, spec.image_size or 32
    train_n = min(max(20, -(-400 // k)), spec.per_class or 10**9)
    test_n = min(max(5, -(-100 // k)), spec.test_per_class or 10**9)
    patterns = torch.rand(k, 3, 4, 4, generator=_generator(ctx.seed, 0))
    patterns = F.interpolate(patterns, size=(size, size), mode="bilinear", align_corners=False)
    return _make_datasets(
        _synthetic_split(patterns, train_n, _generator(ctx.seed, 1)),
        _synthetic_split(patterns, test_n, _generator(ctx.seed, 2)),
        classes=[f"class{i}" for i in range(k)],
        size=size,
        augment=spec.augment,
        validation=spec.validation,
    )


def _generator(seed: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 3 + stream)


def _synthetic_split(
    patterns: torch.Tensor, per_class: int, gen: torch.Generator
) -> tuple[torch.Tensor, np.ndarray]:
    """``per_class`` uint8 images per class (``patterns``: k x 3 x S x S in [0, 1]), labels interleaved."""
    k, c, s, _ = patterns.shape
    labels = torch.arange(per_class * k) % k
    x = 0.6 * patterns[labels] + 0.4 * torch.rand(len(labels), c, s, s, generator=gen)
    return x.mul_(255).round_().to(torch.uint8), labels.numpy()


# --------------------------------------------------------------------------------------------------
# imagefolder: train/<class>/* and test/<class>/* in a directory or an archive

_IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)
_GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_STATS_SAMPLE = 512  # images decoded for mean/std when decoding lazily
_LAYOUT_HINT = "expected train/<class>/* and test/<class>/* images"


@dataclass
class _Layout:
    """The files a job uses: paths relative to the tree's root, with their class index."""

    classes: list[str]
    train: list[tuple[str, int]]
    test: list[tuple[str, int]]


@DATASETS.register("imagefolder")
def _load_imagefolder(spec: DataSpec, ctx: LoadContext) -> Datasets:
    """Images from a folder tree or an archive of one (extracted under cache_dir), RGB unless all gray."""
    root = Path(spec.root or "").expanduser()
    folder = root if root.is_dir() else extract_imagefolder(root, spec, ctx)
    layout = _plan_layout(_list_files(folder), root.name, spec.per_class, spec.test_per_class)
    if spec.validation:
        layout = _hold_out(layout, spec.validation)
    n, cap = len(layout.train) + len(layout.test), ctx.settings.max_images
    if n > cap:
        raise DataError(
            f"{root.name} has {n} images, over this server's {cap} (MAX_IMAGES); set data.per_class and "
            "data.test_per_class to use fewer"
        )
    return _folder_datasets(folder, layout, spec, ctx.settings)


def extract_imagefolder(archive: Path, spec: DataSpec, ctx: LoadContext) -> Path:
    """The archive's files that an imagefolder ``spec`` uses (its per-class caps), extracted once under
    ``ctx.cache_dir/imagefolder``; the folder."""

    def choose(names: list[str]) -> list[str]:
        layout = _plan_layout(names, archive.name, spec.per_class, spec.test_per_class)
        return [rel for rel, _ in layout.train + layout.test]

    selection = f"{spec.per_class or 'all'}-{spec.test_per_class or 'all'}"
    return extract_archive(archive, ctx.cache_dir / "imagefolder", selection, ctx.settings, choose)


def _list_files(folder: Path) -> list[str]:
    """Relative posix paths of the files under ``folder`` (hidden files and folders skipped)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not _hidden(d)]
        rel = Path(dirpath).relative_to(folder)
        found += [(rel / f).as_posix() for f in filenames if not _hidden(f)]
    return found


def _hidden(part: str) -> bool:
    return part.startswith(".") or part == "__MACOSX"


def _visible(path: str) -> bool:
    """No component of the posix ``path`` is hidden (``.name``) or macOS's ``__MACOSX``."""
    wrapped = f"/{path}/"
    return "/." not in wrapped and "/__MACOSX/" not in wrapped


def _plan_layout(files: list[str], where: str, per_class: int | None, test_per_class: int | None) -> _Layout:
    """Find ``[wrapper/]train|test/<class>/...`` among ``files`` and pick the first N sorted per class."""
    images = [f for f in files if os.path.splitext(f)[1].lower() in _IMAGE_SUFFIXES and _visible(f)]
    if not images:
        raise DataError(f"no images found in {where} ({_LAYOUT_HINT})")
    prefix = _tree_prefix(images)
    train, test = (_class_files(images, f"{prefix}{split}/", where, split) for split in ("train", "test"))
    if set(train) != set(test):
        only_train, only_test = sorted(set(train) - set(test))[:5], sorted(set(test) - set(train))[:5]
        raise DataError(
            f"train/ and test/ classes differ in {where}: only in train: {only_train}; only in test: {only_test}"
        )
    classes = sorted(train)
    return _Layout(classes, _take(train, classes, per_class), _take(test, classes, test_per_class))


def _hold_out(layout: _Layout, n: int) -> _Layout:
    """The last ``n`` training files of each class become the evaluation split (``holdout``)."""
    keep, held = holdout([y for _, y in layout.train], n)
    return _Layout(layout.classes, [layout.train[i] for i in keep], [layout.train[i] for i in held])


def _tree_prefix(images: list[str]) -> str:
    """``""`` when train/ and test/ are at the top, else the single wrapper folder (``"name/"``)."""
    if any(f.startswith(("train/", "test/")) for f in images):
        return ""
    tops = {f.split("/", 1)[0] for f in images if "/" in f}
    return f"{tops.pop()}/" if len(tops) == 1 else ""


def _class_files(images: list[str], base: str, where: str, split: str) -> dict[str, list[str]]:
    """Class name -> sorted image paths under ``base`` (``[wrapper/]split/``), at any depth."""
    groups: dict[str, list[str]] = {}
    for f in images:
        rest = f[len(base) :] if f.startswith(base) else ""
        if "/" in rest:
            groups.setdefault(rest.split("/", 1)[0], []).append(f)
    if not groups:
        raise DataError(f"no {split}/<class>/ image folders in {where} ({_LAYOUT_HINT})")
    return {c: sorted(files) for c, files in groups.items()}


def _take(groups: dict[str, list[str]], classes: list[str], n: int | None) -> list[tuple[str, int]]:
    return [(f, label) for label, c in enumerate(classes) for f in groups[c][:n]]


def _folder_datasets(folder: Path, layout: _Layout, spec: DataSpec, settings: Settings) -> Datasets:
    """The chosen files decoded once (``decoded.cached_images``: shared by the host's jobs) and held in
    memory when ``DECODE_MAX_BYTES`` holds them, else wrapped for decoding per image."""
    entries = layout.train + layout.test
    files = [folder / rel for rel, _ in entries]
    labels = [y for _, y in entries]
    size = spec.image_size or _square_size(files[0], settings.max_image_size)
    n_train = len(layout.train)
    if len(files) * 3 * size * size > settings.decode_max_bytes:
        return _lazy_datasets(files, labels, n_train, layout.classes, size, spec)
    digest = files_digest((rel, y, folder / rel) for rel, y in entries)
    images, _ = cached_images(
        settings.decoded_dir,
        cache_key(digest, size, spec.image_size),
        lambda: _decode_all(files, size, spec.image_size),
    )
    split = (images[:n_train], np.asarray(labels[:n_train])), (images[n_train:], np.asarray(labels[n_train:]))
    return _make_datasets(*split, classes=layout.classes, size=size, augment=spec.augment)


def _lazy_datasets(
    files: list[Path], labels: list[int], n_train: int, classes: list[str], size: int, spec: DataSpec
) -> Datasets:
    """File-backed datasets; channels and sizes come from a scan of the headers, stats from a sample."""
    heads = _parallel(lambda i: _header(files[i]), len(files))
    channels = 1 if all(gray for gray, _ in heads) else 3
    if not spec.image_size:
        for (_, wh), path in zip(heads, files, strict=True):
            _check_size(wh, size, path)
    sample = files[:n_train][:: max(1, n_train // _STATS_SAMPLE)][:_STATS_SAMPLE]
    mean, std = _channel_stats(
        torch.stack([_chw(_pixels(_load_image(p), channels, spec.image_size)) for p in sample])
    )

    def part(lo: int, hi: int, augment: bool) -> ImageFileDataset:
        transform = ImageTransform(size, mean, std, augment)
        return ImageFileDataset(files[lo:hi], labels[lo:hi], channels, spec.image_size, transform)

    return Datasets(
        train=part(0, n_train, spec.augment),
        test=part(n_train, len(files), False),
        num_classes=len(classes),
        in_channels=channels,
        image_size=size,
        classes=classes,
        mean=mean,
        std=std,
    )


def _decode_all(files: list[Path], size: int, fit: int | None) -> torch.Tensor:
    """uint8 ``N x C x S x S`` of all files; C = 1 when every image is grayscale, else 3."""
    out = torch.empty((len(files), 3, size, size), dtype=torch.uint8)
    gray = np.zeros(len(files), dtype=bool)

    def decode(i: int) -> None:
        image = _load_image(files[i])
        gray[i] = image.mode in _GRAY_MODES
        pixels = _pixels(image, 1 if gray[i] else 3, fit)
        _check_size(pixels.shape[1::-1], size, files[i])
        out[i, : pixels.shape[2]] = _chw(pixels)

    _parallel(decode, len(files))
    if gray.all():
        return out[:, :1].clone()
    rows = torch.from_numpy(np.flatnonzero(gray))
    out[rows, 1:] = out[rows, :1]
    return out


def _parallel(fn: Callable[[int], object], n: int) -> list:
    """``[fn(i) for i in range(n)]`` on a few threads (PIL decodes without the GIL)."""
    workers = min(8, os.cpu_count() or 1)
    if n < 64 or workers == 1:
        return [fn(i) for i in range(n)]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, range(n)))


def _load_image(path: Path) -> Image.Image:
    """Fully decode one image file; a DataError names the file when it cannot be read."""
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DataError(f"cannot decode image {path.parent.name}/{path.name}: {one_line(err)}") from None


def _header(path: Path) -> tuple[bool, tuple[int, int]]:
    """(is grayscale, (width, height)) from an image's header, without decoding its pixels."""
    try:
        with Image.open(path) as image:
            return image.mode in _GRAY_MODES, image.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DataError(f"cannot decode image {path.parent.name}/{path.name}: {one_line(err)}") from None


def _square_size(path: Path, max_side: int) -> int:
    """The side of the first image, which must be square and at most ``max_side`` (MAX_IMAGE_SIZE) when
    data.image_size is not set (the others must match it)."""
    _, (w, h) = _header(path)
    if w != h:
        raise DataError(f"images are {w}x{h}, not square; set data.image_size to resize them")
    if w > max_side:
        raise DataError(
            f"images are {w}x{h}, larger than this server's {max_side} px (MAX_IMAGE_SIZE); set "
            "data.image_size to resize them"
        )
    return w


def _check_size(wh: Sequence[int], size: int, path: Path) -> None:
    if tuple(wh) != (size, size):
        raise DataError(
            f"images differ in size ({path.parent.name}/{path.name} is {wh[0]}x{wh[1]}, others {size}x{size}); "
            "set data.image_size to resize them"
        )


def _pixels(image: Image.Image, channels: int, fit: int | None) -> np.ndarray:
    """uint8 ``H x W x channels`` (L or RGB), resized to ``fit x fit`` first when given."""
    image = image.convert("L" if channels == 1 else "RGB")
    if fit and image.size != (fit, fit):
        image = _fit(image, fit)
    pixels = np.array(image, dtype=np.uint8)
    return pixels[:, :, None] if pixels.ndim == 2 else pixels


def _fit(image: Image.Image, size: int) -> Image.Image:
    """Bilinear resize of the shorter side to ``size``, then a centre crop to ``size x size``."""
    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((nw, nh), Image.Resampling.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    return image.crop((left, top, left + size, top + size))


def _chw(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels).permute(2, 0, 1)
