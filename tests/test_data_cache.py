"""Decode once: the decoded-image cache (exact, atomic, locked, rebuilt when corrupt, never stale)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from pruning_core.data import loaders as D
from pruning_core.data.decoded import FORMAT, cache_key, cached_images, files_digest, read_array, write_array
from pruning_core.data.loaders import ImageTensorDataset, load_data
from pruning_core.settings import Settings
from pruning_core.spec import DataSpec
from tests.test_data import SHARED_CIFAR, _image, _tree, _write_dir


def _settings(tmp_path: Path, **overrides: object) -> Settings:
    return Settings(decode_cache_dir=tmp_path / "decoded", **overrides)


def _load(tmp_path: Path, **spec: object):
    return load_data(DataSpec(**spec), cache_dir=tmp_path / "job", settings=_settings(tmp_path))


def _cache_files(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "decoded").glob("*.u8"))


def test_array_round_trips_exactly_and_a_corrupt_or_short_file_reads_as_missing(tmp_path: Path) -> None:
    images = torch.randint(0, 256, (5, 3, 7, 7), dtype=torch.uint8)
    path = tmp_path / "a.u8"
    write_array(path, images)
    assert torch.equal(read_array(path), images)
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF  # one flipped pixel: the checksum catches it
    path.write_bytes(bytes(raw))
    assert read_array(path) is None
    path.write_bytes(bytes(raw[:-10]))
    assert read_array(path) is None
    path.write_bytes(b"garbage")
    assert read_array(path) is None
    assert read_array(tmp_path / "missing.u8") is None


def test_cached_images_are_built_once_and_a_corrupt_file_is_rebuilt(tmp_path: Path) -> None:
    images = torch.arange(2 * 1 * 4 * 4, dtype=torch.uint8).view(2, 1, 4, 4)
    builds: list[int] = []

    def build() -> torch.Tensor:
        builds.append(1)
        return images.clone()

    first, built = cached_images(tmp_path, "k", build)
    again, built_again = cached_images(tmp_path, "k", build)
    assert built and not built_again and len(builds) == 1
    assert torch.equal(first, images) and torch.equal(again, images)
    path = tmp_path / "k.u8"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    path.write_bytes(bytes(raw))
    rebuilt, built = cached_images(tmp_path, "k", build)
    assert built and len(builds) == 2 and torch.equal(rebuilt, images)
    assert torch.equal(read_array(path), images), "the rebuilt file replaced the corrupt one"
    assert not list(tmp_path.glob(".k.u8.*")), "no temporary file is left behind"


def test_two_jobs_building_the_same_array_at_once_decode_it_once(tmp_path: Path) -> None:
    started, builds = threading.Barrier(2), []

    def build() -> torch.Tensor:
        builds.append(1)
        threading.Event().wait(0.2)  # the other job arrives while this one builds
        return torch.ones(3, 1, 2, 2, dtype=torch.uint8)

    results: list[torch.Tensor] = []

    def job() -> None:
        started.wait()
        results.append(cached_images(tmp_path, "shared", build)[0])

    threads = [threading.Thread(target=job) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and len(results) == 2 and torch.equal(results[0], results[1])


def test_the_key_changes_with_content_size_and_format(tmp_path: Path) -> None:
    root = _write_dir(tmp_path / "tree", _tree())
    entries = [("train/dog/000.png", 0, root / "train/dog/000.png")]
    digest = files_digest(entries)
    assert files_digest(entries) == digest
    assert files_digest([("train/dog/000.png", 1, entries[0][2])]) != digest, "labels count"
    (root / "train/dog/000.png").write_bytes(_image(99))
    assert files_digest(entries) != digest, "a changed file is other data: never served stale"
    assert cache_key(digest, 12, None) != cache_key(digest, 16, None) != cache_key(digest, 16, 16)
    assert cache_key(digest, 12, None).endswith(f"-v{FORMAT}")


def test_imagefolder_images_come_from_the_cache_exactly_as_decoded(tmp_path: Path) -> None:
    root = _write_dir(tmp_path / "tree", _tree(size=(16, 16)))
    first = _load(tmp_path, name="imagefolder", root=str(root), image_size=12, augment=False)
    assert isinstance(first.train, ImageTensorDataset) and len(_cache_files(tmp_path)) == 1
    files = sorted(root.glob("train/*/*.png")) + sorted(root.glob("test/*/*.png"))
    direct = D._decode_all(files, 12, 12)
    cached = torch.cat([first.train.images, first.test.images])
    assert torch.equal(cached, direct), "the cached array is the decoded images, bit for bit"
    second = _load(tmp_path, name="imagefolder", root=str(root), image_size=12, augment=False)
    assert torch.equal(second.train.images, first.train.images) and len(_cache_files(tmp_path)) == 1
    _load(tmp_path, name="imagefolder", root=str(root), image_size=8, augment=False)
    assert len(_cache_files(tmp_path)) == 2, "another size is another array"


def test_a_changed_image_is_decoded_again(tmp_path: Path) -> None:
    root = _write_dir(tmp_path / "tree", _tree())
    before = _load(tmp_path, name="imagefolder", root=str(root))
    (root / "train/cat/001.png").write_bytes(_image(1234))
    after = _load(tmp_path, name="imagefolder", root=str(root))
    assert not torch.equal(before.train.images, after.train.images)
    assert len(_cache_files(tmp_path)) == 2


def test_a_corrupt_cache_file_is_rebuilt_by_the_next_job(tmp_path: Path) -> None:
    root = _write_dir(tmp_path / "tree", _tree())
    before = _load(tmp_path, name="imagefolder", root=str(root))
    (path,) = _cache_files(tmp_path)
    path.write_bytes(path.read_bytes()[:-5])
    after = _load(tmp_path, name="imagefolder", root=str(root))
    assert torch.equal(before.train.images, after.train.images)
    assert torch.equal(read_array(path), torch.cat([after.train.images, after.test.images]))


@pytest.mark.skipif(not SHARED_CIFAR.exists(), reason="shared CIFAR-10 JPEG archive not present")
def test_cifar10_jpeg_subset_is_cached_exactly(tmp_path: Path) -> None:
    spec = {"name": "imagefolder", "root": str(SHARED_CIFAR), "per_class": 20, "test_per_class": 5}
    first = _load(tmp_path, **spec)
    (path,) = _cache_files(tmp_path)
    folder = next((tmp_path / "job" / "imagefolder").iterdir())
    files = sorted(folder.glob("cifar10-jpeg/train/*/*.jpg"))
    assert len(files) == 200
    direct = D._decode_all(files, 32, None)
    assert torch.equal(first.train.images, direct)
    second = _load(tmp_path, **spec)
    assert torch.equal(second.train.images, first.train.images) and _cache_files(tmp_path) == [path]
