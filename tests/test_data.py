"""Data sets: shapes, splits, selection, normalisation, augmentation, and safe archive extraction."""

from __future__ import annotations

import io
import pickle
import stat
import tarfile
import tempfile
import zipfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pruning_core.data import loaders as D
from pruning_core.data.loaders import (
    DATASETS,
    Datasets,
    ImageFileDataset,
    ImageTensorDataset,
    digits_split,
    load_data,
)
from pruning_core.errors import DataError
from pruning_core.settings import Settings
from pruning_core.spec import DATASETS as SPEC_DATASETS
from pruning_core.spec import DataSpec

DECODED = Path(tempfile.mkdtemp(prefix="decoded-"))  # this session's decoded-image cache
SHARED_CIFAR = Path(__file__).resolve().parents[1].parent / "shared/datasets/cifar10-jpeg.tar.gz"


def _settings(**overrides: object) -> Settings:
    values: dict[str, object] = {
        "data_root": Path("/nonexistent-data-root"),
        "allow_download": False,
        "decode_cache_dir": DECODED,
    }
    return Settings(**(values | overrides))


def _load(tmp_path: Path, *, seed: int = 0, settings: Settings | None = None, **spec: object) -> Datasets:
    return load_data(
        DataSpec(**spec), cache_dir=tmp_path / "cache", seed=seed, settings=settings or _settings()
    )


def _stack(ds: torch.utils.data.Dataset) -> tuple[torch.Tensor, list[int]]:
    items = [ds[i] for i in range(len(ds))]
    return torch.stack([x for x, _ in items]), [y for _, y in items]


def _raw(ds: Datasets, x: torch.Tensor) -> torch.Tensor:
    """Undo the normalisation: pixel values in [0, 1]."""
    mean = torch.tensor(ds.mean).view(-1, 1, 1)
    std = torch.tensor(ds.std).view(-1, 1, 1)
    return x * std + mean


# ------------------------------------------------------------------------------------------------
# image-tree fixtures


def _image(seed: int, size: tuple[int, int] = (12, 12), mode: str = "RGB", fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(buf, fmt)
    return buf.getvalue()


def _tree(
    classes: tuple[str, ...] = ("dog", "cat"),
    n_train: int = 4,
    n_test: int = 2,
    prefix: str = "",
    mode: str = "RGB",
    size: tuple[int, int] = (12, 12),
) -> dict[str, bytes]:
    """name -> PNG bytes for ``{prefix}{train,test}/<class>/NNN.png``."""
    files = {}
    for c, cls in enumerate(classes):
        for s, (split, n) in enumerate((("train", n_train), ("test", n_test))):
            for i in range(n):
                files[f"{prefix}{split}/{cls}/{i:03d}.png"] = _image(1000 * c + 100 * s + i, size, mode)
    return files


def _write_dir(root: Path, files: dict[str, bytes]) -> Path:
    for name, payload in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(payload)
    return root


def _file_info(name: str, payload: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    return info


def _write_tar(path: Path, files: dict[str, bytes], extra: tuple[tarfile.TarInfo, ...] = ()) -> Path:
    mode = "w" if path.name.endswith(".tar") else "w:gz"
    with tarfile.open(path, mode, format=tarfile.GNU_FORMAT) as tar:
        for name, payload in files.items():
            tar.addfile(_file_info(name, payload), io.BytesIO(payload))
        for info in extra:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
    return path


def _write_zip(path: Path, files: dict[str, bytes], extra: tuple[zipfile.ZipInfo, ...] = ()) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, payload in files.items():
            zf.writestr(name, payload)
        for info in extra:
            zf.writestr(info, b"/etc/passwd" if stat.S_ISLNK(info.external_attr >> 16) else b"evil")
    return path


def _snapshot(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


# ------------------------------------------------------------------------------------------------
# registry, digits


def test_registry_matches_spec_catalog() -> None:
    assert DATASETS.names() == sorted(SPEC_DATASETS)


def test_unknown_name_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown data set 'nope'; known: cifar10"):
        load_data(DataSpec.model_construct(name="nope"), cache_dir=tmp_path)


def test_digits_shapes_and_normalisation(tmp_path: Path) -> None:
    ds = _load(tmp_path, name="digits")
    assert (ds.num_classes, ds.in_channels, ds.image_size) == (10, 1, 8)
    assert ds.classes == [str(d) for d in range(10)]
    assert len(ds.train) + len(ds.test) == 1797
    assert 0.18 < len(ds.test) / 1797 < 0.22
    x, y = _stack(ds.train)
    assert x.shape == (len(ds.train), 1, 8, 8) and x.dtype == torch.float32
    assert set(y) == set(range(10))
    assert abs(x.mean().item()) < 1e-3 and abs(x.std().item() - 1) < 1e-2  # normalised with train stats


def test_digits_split_is_fixed_stratified_and_disjoint(tmp_path: Path) -> None:
    from sklearn.datasets import load_digits

    train, test = digits_split()
    again_train, again_test = digits_split()
    assert np.array_equal(train, again_train) and np.array_equal(test, again_test)
    assert not set(train) & set(test)
    assert sorted(np.concatenate([train, test])) == list(range(1797))
    digits = load_digits()
    for cls, count in Counter(digits.target.tolist()).items():
        assert abs((digits.target[test] == cls).sum() - 0.2 * count) <= 1

    ds = _load(tmp_path, name="digits")
    x, label = ds.train[0]
    assert label == digits.target[train[0]]
    expected = torch.from_numpy(digits.images[train[0]] / 16).float()
    assert torch.allclose(_raw(ds, x)[0], expected, atol=1 / 255)
    # the job seed never changes the test set
    other = _load(tmp_path, name="digits", seed=7)
    assert torch.equal(_stack(other.test)[0], _stack(ds.test)[0])


def test_digits_per_class_takes_the_first_of_each_class(tmp_path: Path) -> None:
    ds = _load(tmp_path, name="digits", per_class=3, test_per_class=2)
    assert (len(ds.train), len(ds.test)) == (30, 20)
    _, y = _stack(ds.train)
    assert Counter(y) == {c: 3 for c in range(10)}
    train, _ = digits_split()
    labels = D._digits_arrays()[1]
    firsts = [i for c in range(10) for i in train[labels[train] == c][:3]]
    full = _load(tmp_path, name="digits")
    full_x = {int(i): full.train[k][0] for k, i in enumerate(train)}
    got = sorted(_stack(ds.train)[0].flatten(1).tolist())
    want = sorted(torch.stack([full_x[int(i)] for i in firsts]).flatten(1).tolist())
    assert np.allclose(got, want, atol=1e-5)
    assert ds.mean == full.mean and ds.std == full.std  # normalisation does not depend on per_class


def test_holdout_takes_the_last_n_of_each_class_in_order() -> None:
    labels = np.array([2, 0, 2, 1, 0, 2, 1, 0, 2])
    train, val = D.holdout(labels, 1)
    assert val.tolist() == [6, 7, 8]  # the last 1, 0 and 2
    assert train.tolist() == [0, 1, 2, 3, 4, 5]
    train, val = D.holdout(labels[labels != 1], 2)  # [2, 0, 2, 0, 2, 0, 2]
    assert val.tolist() == [3, 4, 5, 6] and train.tolist() == [0, 1, 2]
    with pytest.raises(DataError, match="no training image in class 1"):
        D.holdout(labels, 2)  # class 1 has only two


def test_digits_validation_is_carved_from_the_training_images(tmp_path: Path) -> None:
    ds = _load(tmp_path, name="digits", per_class=20, validation=5)
    whole = _load(tmp_path, name="digits", per_class=20)
    assert (len(ds.train), len(ds.test)) == (150, 50)
    assert Counter(_stack(ds.test)[1]) == {c: 5 for c in range(10)}
    train_rows = {tuple(x.flatten().tolist()) for x in _stack(whole.train)[0]}
    kept = {tuple(x.flatten().tolist()) for x in _stack(ds.train)[0]}
    held = {tuple(x.flatten().tolist()) for x in _stack(ds.test)[0]}
    test_rows = {tuple(x.flatten().tolist()) for x in _stack(whole.test)[0]}
    assert kept | held <= train_rows and not kept & held  # both from the training images, disjoint
    assert not held & test_rows  # the test split is never used
    x_test, _ = ds.test[0]
    assert x_test.shape == (1, 8, 8)


def test_imagefolder_validation_reads_no_test_file(tmp_path: Path) -> None:
    root = _write_dir(tmp_path / "tree", _tree(n_train=5, n_test=3))
    ds = _load(tmp_path, name="imagefolder", root=str(root), validation=2, augment=False)
    assert (len(ds.train), len(ds.test)) == (6, 4)
    # the held-out images are the last two training files of each class (sorted), not test files
    x, label = ds.test[1]
    expected = torch.from_numpy(np.array(Image.open(root / "train/cat/004.png"))).permute(2, 0, 1) / 255
    assert label == 0 and torch.allclose(_raw(ds, x), expected, atol=1e-5)
    with pytest.raises(DataError, match="data.validation 5 leaves no training image"):
        _load(tmp_path, name="imagefolder", root=str(root), validation=5)


def test_digits_upscaled_and_never_augmented(tmp_path: Path) -> None:
    ds = _load(tmp_path, name="digits", image_size=16, augment=True)
    assert ds.image_size == 16 and ds.train[0][0].shape == (1, 16, 16)
    torch.manual_seed(0)
    a = _stack(ds.train)[0][:20]
    torch.manual_seed(1)
    b = _stack(ds.train)[0][:20]
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# synthetic


def test_synthetic_shapes_and_determinism(tmp_path: Path) -> None:
    ds = _load(tmp_path, name="synthetic", augment=False)
    assert (ds.num_classes, ds.in_channels, ds.image_size) == (10, 3, 32)
    assert 200 <= len(ds.train) <= 1000 and 50 <= len(ds.test) <= 200
    assert ds.train[0][0].shape == (3, 32, 32)
    same = _load(tmp_path, name="synthetic", augment=False)
    other = _load(tmp_path, name="synthetic", augment=False, seed=1)
    assert torch.equal(_stack(ds.train)[0], _stack(same.train)[0])
    assert not torch.equal(_stack(ds.train)[0], _stack(other.train)[0])

    small = _load(tmp_path, name="synthetic", num_classes=4, image_size=16, per_class=5, test_per_class=3)
    assert (small.num_classes, small.image_size, len(small.train), len(small.test)) == (4, 16, 20, 12)
    assert set(_stack(small.train)[1]) == {0, 1, 2, 3} and small.train[0][0].shape == (3, 16, 16)


def test_synthetic_signal_is_learnable(tmp_path: Path) -> None:
    ds = _load(tmp_path, name="synthetic", augment=False)
    x, y = _stack(ds.train)
    tx, ty = _stack(ds.test)
    centroids = torch.stack([x[torch.tensor(y) == c].mean(0) for c in range(ds.num_classes)])
    pred = torch.cdist(tx.flatten(1), centroids.flatten(1)).argmin(1)
    assert (pred == torch.tensor(ty)).float().mean() > 0.9


# ------------------------------------------------------------------------------------------------
# cifar10 / cifar100 (torchvision); a tiny fake "python version" for the happy path


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_missing_without_download_is_a_clear_error(tmp_path: Path, name: str) -> None:
    root = tmp_path / "nowhere"
    with pytest.raises(DataError, match=f"{name} not found under {root}.*ALLOW_DOWNLOAD=1"):
        _load(tmp_path, name=name, root=str(root))
    with pytest.raises(DataError, match=f"{name} not found under {root}"):  # DATA_ROOT when no root
        _load(tmp_path, name=name, settings=_settings(data_root=root))


def _fake_cifar(root: Path, name: str, n_train: int, n_test: int) -> tuple[np.ndarray, list[int]]:
    """Write tiny pickled batches in torchvision's layout; returns the train pixels (HWC) and labels."""
    rng = np.random.default_rng(0)
    k = 10 if name == "cifar10" else 100
    folder, batches, meta, key, names = (
        (
            "cifar-10-batches-py",
            [f"data_batch_{i}" for i in range(1, 6)],
            "batches.meta",
            "labels",
            "label_names",
        )
        if name == "cifar10"
        else ("cifar-100-python", ["train"], "meta", "fine_labels", "fine_label_names")
    )
    (root / folder).mkdir(parents=True)
    per_batch = n_train // len(batches)
    pixels, labels = [], []
    for fname, n in [(b, per_batch) for b in batches] + [
        ("test_batch" if name == "cifar10" else "test", n_test)
    ]:
        data = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 3, n)]
        (root / folder / fname).write_bytes(pickle.dumps({"data": data, key: y}))
        if fname in batches:
            pixels.append(data)
            labels += y
    (root / folder / meta).write_bytes(pickle.dumps({names: [f"c{i}" for i in range(k)]}))
    return np.concatenate(pixels).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_loads_from_a_fake_python_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    import torchvision.datasets.cifar

    # the fake batches cannot match the real md5s: skip torchvision's integrity check, in this test only
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    root = tmp_path / "data"
    pixels, labels = _fake_cifar(root, name, n_train=30, n_test=12)

    ds = _load(tmp_path, name=name, settings=_settings(data_root=root), augment=False)
    assert (len(ds.train), len(ds.test), ds.in_channels, ds.image_size) == (30, 12, 3, 32)
    assert ds.num_classes == (10 if name == "cifar10" else 100) and ds.classes[:2] == ["c0", "c1"]
    x, y = ds.train[3]
    assert y == labels[3]
    assert torch.allclose(_raw(ds, x), torch.from_numpy(pixels[3]).permute(2, 0, 1) / 255, atol=1e-5)

    small = _load(tmp_path, name=name, root=str(root), per_class=2, test_per_class=1, image_size=40)
    assert Counter(_stack(small.train)[1]) == {0: 2, 1: 2, 2: 2}
    assert len(small.test) <= 3 and small.train[0][0].shape == (3, 40, 40)


# ------------------------------------------------------------------------------------------------
# imagefolder from a directory


def test_imagefolder_directory_layout_and_per_class(tmp_path: Path) -> None:
    root = _write_dir(tmp_path / "tree", _tree(n_train=5, n_test=3))
    (root / "train" / "dog" / "notes.txt").write_text("not an image")
    (root / "train" / "dog" / ".hidden.png").write_bytes(b"junk")
    ds = _load(tmp_path, name="imagefolder", root=str(root), augment=False)
    assert (ds.classes, ds.num_classes, ds.in_channels, ds.image_size) == (["cat", "dog"], 2, 3, 12)
    assert (len(ds.train), len(ds.test)) == (10, 6)

    few = _load(tmp_path, name="imagefolder", root=str(root), per_class=2, test_per_class=1, augment=False)
    assert (len(few.train), len(few.test)) == (4, 2)
    assert Counter(_stack(few.train)[1]) == {0: 2, 1: 2}
    # the first files in sorted order: train/dog/001.png is the 2nd dog (label 1) image
    x, label = few.train[3]
    expected = torch.from_numpy(np.array(Image.open(root / "train/dog/001.png"))).permute(2, 0, 1) / 255
    assert label == 1 and torch.allclose(_raw(few, x), expected, atol=1e-5)


def test_imagefolder_accepts_one_wrapping_folder(tmp_path: Path) -> None:
    root = _write_dir(tmp_path / "tree", _tree(prefix="mydata/"))
    ds = _load(tmp_path, name="imagefolder", root=str(root))
    assert (len(ds.train), len(ds.test), ds.classes) == (8, 4, ["cat", "dog"])


def test_imagefolder_channels_gray_unless_any_colour(tmp_path: Path) -> None:
    gray = _write_dir(tmp_path / "gray", _tree(mode="L"))
    ds = _load(tmp_path, name="imagefolder", root=str(gray))
    assert ds.in_channels == 1 and ds.train[0][0].shape == (1, 12, 12)

    mixed = _tree(mode="L")
    mixed["train/cat/000.png"] = _image(5, mode="RGB")
    ds = _load(tmp_path, name="imagefolder", root=str(_write_dir(tmp_path / "mixed", mixed)), augment=False)
    assert ds.in_channels == 3
    g = _raw(ds, ds.train[1][0])  # train/cat/001.png, grayscale, replicated over RGB
    assert torch.allclose(g[0], g[1], atol=1e-5) and torch.allclose(g[0], g[2], atol=1e-5)


def test_imagefolder_sizes(tmp_path: Path) -> None:
    files = _tree()
    files["train/cat/001.png"] = _image(1, size=(16, 16))
    root = _write_dir(tmp_path / "sizes", files)
    with pytest.raises(DataError, match="image_size"):
        _load(tmp_path, name="imagefolder", root=str(root))
    ds = _load(tmp_path, name="imagefolder", root=str(root), image_size=20)
    assert ds.image_size == 20 and _stack(ds.train)[0].shape[1:] == (3, 20, 20)

    wide = _write_dir(tmp_path / "wide", _tree(size=(24, 12)))
    with pytest.raises(DataError, match="not square.*image_size"):
        _load(tmp_path, name="imagefolder", root=str(wide))
    assert _load(tmp_path, name="imagefolder", root=str(wide), image_size=12).test[0][0].shape == (3, 12, 12)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda f: {k: v for k, v in f.items() if not k.startswith("test/")}, "no test/"),
        (lambda f: {k: v for k, v in f.items() if not k.startswith("train/")}, "no train/"),
        (lambda f: f | {"test/bird/000.png": _image(9)}, "classes differ"),
        (lambda f: {"train/cat/readme.txt": b"x", "test/cat/readme.txt": b"x"}, "no images"),
        (lambda f: f | {"train/cat/000.png": b"not a png at all"}, "cannot decode image cat/000.png"),
    ],
    ids=["no-test", "no-train", "class-mismatch", "no-images", "corrupt-image"],
)
def test_imagefolder_bad_trees_are_clear_errors(
    tmp_path: Path, mutate: Callable[[dict[str, bytes]], dict[str, bytes]], message: str
) -> None:
    root = _write_dir(tmp_path / "tree", mutate(_tree()))
    with pytest.raises(DataError, match=message) as err:
        _load(tmp_path, name="imagefolder", root=str(root))
    assert "\n" not in str(err.value)


def test_imagefolder_root_must_exist_and_be_a_known_kind(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        _load(tmp_path, name="imagefolder", root=str(tmp_path / "missing"))
    (tmp_path / "data.rar").write_bytes(b"x")
    with pytest.raises(DataError, match="not a directory or a"):
        _load(tmp_path, name="imagefolder", root=str(tmp_path / "data.rar"))


def test_imagefolder_lazy_decoding_matches_eager(tmp_path: Path) -> None:
    files = _tree(mode="L") | {"train/cat/000.png": _image(5, size=(16, 16))}
    root = _write_dir(tmp_path / "tree", files)
    eager = _load(tmp_path, name="imagefolder", root=str(root), image_size=12, augment=False)
    lazy = _load(
        tmp_path,
        name="imagefolder",
        root=str(root),
        image_size=12,
        augment=False,
        settings=_settings(decode_max_bytes=0),
    )
    assert isinstance(eager.train, ImageTensorDataset) and isinstance(lazy.train, ImageFileDataset)
    assert (lazy.in_channels, lazy.classes, lazy.mean) == (3, eager.classes, pytest.approx(eager.mean))
    for a, b in ((eager.train, lazy.train), (eager.test, lazy.test)):
        assert torch.allclose(_stack(a)[0], _stack(b)[0], atol=1e-5) and _stack(a)[1] == _stack(b)[1]


def test_augmentation_is_reproducible_under_manual_seed(tmp_path: Path) -> None:
    root = _write_dir(tmp_path / "tree", _tree(n_train=6))
    ds = _load(tmp_path, name="imagefolder", root=str(root), augment=True)
    plain = _load(tmp_path, name="imagefolder", root=str(root), augment=False)

    def epoch(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return next(iter(torch.utils.data.DataLoader(ds.train, batch_size=12, shuffle=True)))[0]

    first, again, other = epoch(0), epoch(0), epoch(1)
    assert first.shape == (12, 3, 12, 12)
    assert torch.equal(first, again) and not torch.equal(first, other)
    torch.manual_seed(3)
    assert torch.equal(_stack(ds.test)[0], _stack(plain.test)[0])  # never the test set

    # each training item is a zero-padded crop (2 px of padding at 12 px), maybe mirrored, of the image
    torch.manual_seed(0)
    moves = [
        _crop_flip_of(_raw(ds, ds.train[i][0]), _raw(plain, plain.train[i][0]), pad=2) for i in range(12)
    ]
    assert all(m is not None for m in moves)
    assert {m[:2] for m in moves if m} != {(2, 2)} and {m[2] for m in moves if m} == {False, True}


def _crop_flip_of(x: torch.Tensor, image: torch.Tensor, pad: int) -> tuple[int, int, bool] | None:
    """(dy, dx, flipped) such that x is that crop of the zero-padded image, or None."""
    size = image.shape[-1]
    for flip in (False, True):
        padded = torch.nn.functional.pad(image, (pad,) * 4)
        for dy in range(2 * pad + 1):
            for dx in range(2 * pad + 1):
                crop = padded[:, dy : dy + size, dx : dx + size]
                if torch.allclose(crop.flip(-1) if flip else crop, x, atol=1e-5):
                    return dy, dx, flip
    return None


# ------------------------------------------------------------------------------------------------
# imagefolder from archives


@pytest.mark.parametrize("suffix", [".tar.gz", ".tgz", ".tar", ".zip"])
def test_imagefolder_archives_load_like_the_directory(tmp_path: Path, suffix: str) -> None:
    files = _tree(n_train=5, n_test=3, prefix="wrapped/")
    directory = _load(
        tmp_path, name="imagefolder", root=str(_write_dir(tmp_path / "dir", files)), per_class=3
    )
    archive = tmp_path / f"data{suffix}"
    (_write_zip if suffix == ".zip" else _write_tar)(archive, files)

    ds = _load(tmp_path, name="imagefolder", root=str(archive), per_class=3, augment=False)
    assert (ds.classes, len(ds.train), len(ds.test)) == (directory.classes, 6, 6)
    torch.manual_seed(0)
    assert torch.allclose(_stack(ds.test)[0], _stack(directory.test)[0])
    cache = tmp_path / "cache"
    extracted = [p for p in cache.rglob("*") if p.is_file()]
    assert len(extracted) == 12  # only the members used: 3 + 3 per class
    assert all(p.resolve().is_relative_to(cache.resolve()) for p in extracted)
    again = _load(tmp_path, name="imagefolder", root=str(archive), per_class=3)  # reuses the extraction
    assert len(again.train) == 6 and len(list((cache / "imagefolder").iterdir())) == 1


@pytest.mark.skipif(not SHARED_CIFAR.exists(), reason="shared CIFAR-10 JPEG archive not present")
def test_shared_cifar10_jpeg_archive_subset_loads_quickly(tmp_path: Path) -> None:
    ds = _load(tmp_path, name="imagefolder", root=str(SHARED_CIFAR), per_class=5, test_per_class=2)
    assert (len(ds.train), len(ds.test), ds.num_classes, ds.in_channels, ds.image_size) == (50, 20, 10, 3, 32)
    assert ds.classes[:3] == ["airplane", "automobile", "bird"]
    assert Counter(_stack(ds.train)[1]) == {c: 5 for c in range(10)}
    assert ds.train[0][0].shape == (3, 32, 32)
    assert sum(p.is_file() for p in (tmp_path / "cache").rglob("*")) == 70  # not all 60,000: quick


def _sym(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info


def _hard(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.LNKTYPE, target
    return info


def _device(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.CHRTYPE
    return info


def _zip_link(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


def _evil_archive(kind: str, tmp_path: Path) -> tuple[Path, Settings]:
    """A valid tree plus one malicious member (or a cap it exceeds); evil writes would land in tmp_path."""
    good = _tree()
    src = tmp_path / "src"
    src.mkdir()
    settings = _settings()
    if kind == "tar-dotdot":
        path = _write_tar(src / "a.tar.gz", good, (_file_info("train/cat/../../../../evil.txt", b"x"),))
    elif kind == "tar-absolute":
        path = _write_tar(src / "a.tar.gz", good, (_file_info(str(tmp_path / "abs-evil.txt"), b"x"),))
    elif kind == "tar-symlink":
        path = _write_tar(src / "a.tar", good, (_sym("train/cat/link.png", str(tmp_path / "evil.txt")),))
    elif kind == "tar-hardlink":
        path = _write_tar(src / "a.tar", good, (_hard("train/cat/hard.png", "/etc/passwd"),))
    elif kind == "tar-device":
        path = _write_tar(src / "a.tar", good, (_device("train/cat/dev"),))
    elif kind == "zip-dotdot":
        path = _write_zip(src / "a.zip", good, (zipfile.ZipInfo("../../../evil.txt"),))
    elif kind == "zip-absolute":
        path = _write_zip(src / "a.zip", good, (zipfile.ZipInfo(str(tmp_path / "abs-evil.txt")),))
    elif kind == "zip-symlink":
        path = _write_zip(src / "a.zip", good, (_zip_link("train/cat/link.png"),))
    elif kind in ("tar-members", "zip-members"):
        settings = _settings(archive_max_members=len(good) - 1)
        path = (_write_zip if kind == "zip-members" else _write_tar)(src / f"a.{kind[:3]}", good)
    elif kind == "tar-bytes":
        settings = _settings(archive_max_bytes=sum(map(len, good.values())) - 1)
        path = _write_tar(src / "a.tgz", good)
    else:  # zip bomb: 8 MiB of zeros packs into a few KiB
        assert kind == "zip-ratio"
        path = _write_zip(src / "a.zip", good | {"train/cat/zeros.bmp": bytes(8 << 20)})
    return path, settings


@pytest.mark.parametrize(
    "kind",
    [
        "tar-dotdot",
        "tar-absolute",
        "tar-symlink",
        "tar-hardlink",
        "tar-device",
        "zip-dotdot",
        "zip-absolute",
        "zip-symlink",
        "tar-members",
        "zip-members",
        "tar-bytes",
        "zip-ratio",
    ],
)
def test_malicious_archives_are_refused_and_nothing_is_written(tmp_path: Path, kind: str) -> None:
    path, settings = _evil_archive(kind, tmp_path)
    before = _snapshot(tmp_path)
    with pytest.raises(DataError, match="refusing archive") as err:
        _load(tmp_path, name="imagefolder", root=str(path), settings=settings)
    assert "\n" not in str(err.value)
    assert _snapshot(tmp_path) == before  # nothing anywhere: not even under cache_dir
    assert not (tmp_path / "abs-evil.txt").exists() and not (tmp_path.parent / "evil.txt").exists()


def test_ratio_cap_lets_ordinary_archives_through(tmp_path: Path) -> None:
    path = _write_zip(tmp_path / "a.zip", _tree())
    ds = _load(tmp_path, name="imagefolder", root=str(path), settings=_settings(archive_max_ratio=2.0))
    assert len(ds.train) == 8


def _truncated_at_header(tmp_path: Path) -> Path:
    """A plain tar cut cleanly before its last member: tarfile alone would list it as complete."""
    path = _write_tar(tmp_path / "full.tar", _tree())
    with tarfile.open(path) as tar:
        cut = tar.getmembers()[-1].offset
    out = tmp_path / "cut.tar"
    out.write_bytes(path.read_bytes()[:cut])
    return out


def _truncated(tmp_path: Path, suffix: str) -> Path:
    path = tmp_path / f"full{suffix}"
    (_write_zip if suffix == ".zip" else _write_tar)(path, _tree())
    out = tmp_path / f"cut{suffix}"
    out.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return out


def _random(tmp_path: Path, suffix: str) -> Path:
    out = tmp_path / f"random{suffix}"
    out.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return out


@pytest.mark.parametrize(
    "make",
    [
        lambda t: _random(t, ".tar.gz"),
        lambda t: _random(t, ".tar"),
        lambda t: _random(t, ".zip"),
        lambda t: _truncated(t, ".tar.gz"),
        lambda t: _truncated(t, ".tar"),
        lambda t: _truncated(t, ".zip"),
        _truncated_at_header,
    ],
    ids=["random-tgz", "random-tar", "random-zip", "cut-tgz", "cut-tar", "cut-zip", "cut-tar-at-header"],
)
def test_corrupt_archives_are_clear_errors(tmp_path: Path, make: Callable[[Path], Path]) -> None:
    path = make(tmp_path)
    with pytest.raises(DataError, match="cannot read archive|no train/|no test/") as err:
        _load(tmp_path, name="imagefolder", root=str(path))
    assert "\n" not in str(err.value)
    cache = tmp_path / "cache"
    assert not cache.exists() or not [p for p in cache.rglob("*") if p.is_file()]  # no partial extraction


def test_archive_missing_test_folder(tmp_path: Path) -> None:
    files = {k: v for k, v in _tree(prefix="wrap/").items() if "/test/" not in k}
    with pytest.raises(DataError, match="no test/"):
        _load(tmp_path, name="imagefolder", root=str(_write_tar(tmp_path / "a.tar.gz", files)))
    assert not (tmp_path / "cache").exists()


def test_dataloader_batches_with_int_labels(tmp_path: Path) -> None:
    ds = _load(tmp_path, name="synthetic", per_class=4)
    x, y = next(iter(torch.utils.data.DataLoader(ds.train, batch_size=8)))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert not (tmp_path / "cache").exists()  # only archives use the cache
