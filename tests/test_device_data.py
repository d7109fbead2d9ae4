"""Augment on the device, batched: the per-item transform's distributions, seeded by the engine's
generator, whose state the checkpoint keeps (exact resume without loader processes)."""

from __future__ import annotations

import math
import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pruning_core.data.loaders import Datasets, ImageTensorDataset, ImageTransform, load_data
from pruning_core.errors import Cancelled
from pruning_core.settings import Settings
from pruning_core.spec import DataSpec, Schedule
from pruning_core.training.batches import DeviceBatches, ItemLoader, default_workers
from pruning_core.training.engine import NullReporter, TrainContext, fit
from pruning_core.training.evaluation import evaluate
from tests.test_engine import NoisyBlobs, StopAt, _method, _model, _untimed, _weights

SIZE = 8  # tests.test_engine's networks


def _load(tmp_path: Path, **spec: object) -> Datasets:
    settings = Settings(decode_cache_dir=tmp_path / "decoded")
    return load_data(DataSpec(**spec), cache_dir=tmp_path / "job", settings=settings)


def _stack(ds: ImageTensorDataset) -> torch.Tensor:
    return torch.stack([ds[i][0] for i in range(len(ds))])


@pytest.mark.parametrize(
    "spec",
    [
        {"name": "digits", "per_class": 5},
        {"name": "digits", "per_class": 5, "image_size": 13},  # resized on the fly (antialiased)
        {"name": "synthetic", "per_class": 3, "augment": False},
    ],
)
def test_unaugmented_batches_equal_the_per_item_transform(tmp_path: Path, spec: dict) -> None:
    ds = _load(tmp_path, **spec)
    for part in (ds.train, ds.test):
        assert isinstance(part, DeviceBatches)
        x, y = part.batch(torch.arange(len(part)), torch.device("cpu"))
        assert torch.equal(x, _stack(part)), "batched and per-item transforms agree bit for bit"
        assert y.tolist() == part.labels and y.dtype == torch.int64


def test_each_augmented_image_is_the_drawn_crop_and_flip_of_the_padded_image(tmp_path: Path) -> None:
    ds = _load(tmp_path, name="synthetic", per_class=3, image_size=16)
    train, plain = ds.train, ds.test.transform  # the test transform: same statistics, no augmentation
    g = torch.Generator().manual_seed(5)
    draws = torch.Generator().manual_seed(5)
    x, _ = train.batch(torch.arange(len(train)), torch.device("cpu"), g)
    p, s = train.transform.pad, 16
    offsets = torch.randint(0, 2 * p + 1, (len(train), 2), generator=draws)
    flips = torch.rand(len(train), generator=draws) < 0.5
    for i in range(len(train)):
        (dy, dx), flip = offsets[i].tolist(), bool(flips[i])
        image = train.images[i].float().div(255)
        crop = F.pad(image, (p,) * 4)[:, dy : dy + s, dx : dx + s]
        expected = (crop.flip(-1) if flip else crop).sub(plain.mean).div(plain.std)
        assert torch.equal(x[i], expected), f"image {i}: offsets {(dy, dx)}, flip {flip}"
    assert {bool(f) for f in flips} == {False, True}


def _position_images(n: int, size: int) -> torch.Tensor:
    """uint8 ``n x 2 x size x size``: channel 0 holds row + 1, channel 1 column + 1 (0 is padding)."""
    ramp = torch.arange(1, size + 1, dtype=torch.uint8)
    rows = ramp.view(-1, 1).expand(size, size)
    return torch.stack([rows, rows.T]).expand(n, 2, size, size).contiguous()


def test_crop_offsets_are_uniform_and_flips_fair(tmp_path: Path) -> None:
    """Offsets and flips read back from the crops themselves, over 8,100 crops of 32 px (pad 4)."""
    n, size = 8100, 32
    transform = ImageTransform(size, (0.0, 0.0), (1.0, 1.0), augment=True)
    x = transform.batch(_position_images(n, size), torch.Generator().manual_seed(0))
    pixels = x.mul(255).round().long()  # back to the stored values
    p = transform.pad
    dy = pixels[:, 0, p, size // 2] - 1  # output row p reads source row dy
    step = pixels[:, 1, size // 2, size // 2 + 1] - pixels[:, 1, size // 2, size // 2]
    flipped = step == -1
    assert bool(((step == 1) | flipped).all()), "every crop reads one row forwards or backwards"
    col = torch.where(flipped, size - 1 - p, p)
    dx = pixels[torch.arange(n), 1, size // 2, col] - 1  # that output column reads source column dx
    k = int(flipped.sum())
    assert abs(k - n / 2) < 4 * math.sqrt(n / 4), f"{k} flips of {n}"
    cells = 2 * p + 1
    counts = torch.bincount((dy * cells + dx).flatten(), minlength=cells * cells).double()
    assert counts.numel() == cells * cells and dy.min() == 0 and dy.max() == 2 * p
    expected = n / cells**2
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 124.8, f"chi-square {chi2:.1f} over {cells**2 - 1} degrees of freedom (p < 0.001)"
    both = torch.bincount(flipped.long() * 2 + (dx > p).long(), minlength=4).double()
    assert both.min() > 0.8 * both.max() * (p / (p + 1)), "flips independent of the column offset"


def test_augmentation_repeats_from_the_generator_state(tmp_path: Path) -> None:
    ds = _load(tmp_path, name="synthetic", per_class=4)
    idx, cpu = torch.arange(16), torch.device("cpu")
    g = torch.Generator().manual_seed(1)
    first = ds.train.batch(idx, cpu, g)[0]
    state = g.get_state()
    second, third = ds.train.batch(idx, cpu, g)[0], ds.train.batch(idx, cpu, g)[0]
    assert not torch.equal(first, second)
    g.set_state(state)
    assert torch.equal(ds.train.batch(idx, cpu, g)[0], second)
    assert torch.equal(ds.train.batch(idx, cpu, g)[0], third)
    again = ds.train.batch(idx, cpu, torch.Generator().manual_seed(1))[0]
    assert torch.equal(again, first), "the same seed, the same crops and flips"
    before = torch.get_rng_state()
    ds.train.batch(idx, cpu, g)
    assert torch.equal(torch.get_rng_state(), before), "the global RNG is never drawn from"


def test_evaluation_on_device_batches_equals_the_dataloader(tmp_path: Path) -> None:
    ds = _load(tmp_path, name="digits", per_class=5, test_per_class=7, image_size=SIZE)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(SIZE * SIZE, 10))
    fast = evaluate(model, ds.test, torch.device("cpu"), batch_size=16)
    slow = evaluate(model, torch.utils.data.Subset(ds.test, range(len(ds.test))), torch.device("cpu"), 16)
    assert fast == slow


# ------------------------------------------------------------------------------------------------
# the engine: device batches by default, exact resume from the checkpointed generator state

SCHEDULE = Schedule(epochs=2, batch_size=16, lr=0.05, warmup_epochs=0.5)


def _ctx(data: Datasets, tmp: Path | None, reporter=None, device_data: bool = True) -> TrainContext:
    ctx = TrainContext(torch.device("cpu"), 3, data.train, data.test, checkpoint_dir=tmp)
    ctx.device_data = device_data
    if reporter is not None:
        ctx.reporter = reporter
    return ctx


@pytest.fixture(scope="module")
def blobs(tmp_path_factory: pytest.TempPathFactory) -> Datasets:
    """Synthetic 3 x 8 x 8 images in 4 classes, augmented (1 px padding at 8 px)."""
    tmp = tmp_path_factory.mktemp("blobs")
    return _load(tmp, name="synthetic", num_classes=4, per_class=24, test_per_class=8, image_size=SIZE)


@pytest.fixture(scope="module")
def straight(blobs: Datasets) -> tuple[dict[str, torch.Tensor], list[dict]]:
    result = fit(_model(), _method(), SCHEDULE, _ctx(blobs, None))
    return _weights(result.model), result.history


def test_the_engine_reads_in_memory_sets_on_the_device_without_the_global_rng(blobs: Datasets) -> None:
    assert isinstance(blobs.train, ImageTensorDataset) and blobs.train.transform.augment
    seen: list[torch.Tensor] = []
    original = ImageTensorDataset.batch

    def spy(self, indices, device, generator=None):
        seen.append(generator)
        return original(self, indices, device, generator)

    ImageTensorDataset.batch = spy  # type: ignore[method-assign]
    try:
        fit(_model(), _method(), Schedule(epochs=1, batch_size=16, max_steps_per_epoch=2), _ctx(blobs, None))
    finally:
        ImageTensorDataset.batch = original  # type: ignore[method-assign]
    assert sum(g is not None for g in seen) == 2, "two training steps, augmented from the engine's generator"


class StopAfterEpoch(NullReporter):
    """Cancels at the first step boundary after an epoch's end: the checkpoint of an epoch boundary."""

    def __init__(self) -> None:
        self.ended = False

    def epoch(self, record: dict) -> None:
        self.ended = True

    def cancelled(self) -> bool:
        return self.ended


@pytest.mark.parametrize(("epoch", "step"), [(1, 0), (0, 3), (1, 2)])
def test_interrupted_and_resumed_equals_two_epochs_straight(
    tmp_path: Path, blobs: Datasets, straight, epoch: int, step: int
) -> None:
    """(1, 0): one epoch, checkpoint, then a new process resumes for the second; the others stop
    mid-epoch."""
    weights, history = straight
    stop = StopAfterEpoch() if step == 0 else StopAt(epoch, step)
    with pytest.raises(Cancelled):
        fit(_model(), _method(), SCHEDULE, _ctx(blobs, tmp_path, stop))
    torch.manual_seed(12345)  # the resumed process starts from an unrelated RNG state
    resumed = fit(_model(), _method(), SCHEDULE, _ctx(blobs, tmp_path))
    assert resumed.resumed_from == epoch
    assert _untimed(resumed.history) == _untimed(history)
    for k, v in _weights(resumed.model).items():
        assert torch.equal(v, weights[k]), f"{k} differs after resume"


def test_the_dataloader_path_stays_for_sets_that_ask_for_it(blobs: Datasets, straight) -> None:
    result = fit(_model(), _method(), SCHEDULE, _ctx(blobs, None, device_data=False))
    assert result.history[-1]["top1"] >= 0  # trains; other augmentation draws, so other weights
    assert not all(torch.equal(v, straight[0][k]) for k, v in _weights(result.model).items())


# ------------------------------------------------------------------------------------------------
# sets too large to hold: per item through one DataLoader per phase


def test_loader_workers_default_to_none_on_cpu_and_the_cores_on_cuda() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert default_workers(None, cpu, 16) == 0
    assert default_workers(3, cpu, 16) == default_workers(3, cuda, 16) == 3, "as asked"
    cores = len(os.sched_getaffinity(0))
    assert default_workers(None, cuda, 64) == cores and default_workers(None, cuda, 1) == 1


def test_the_item_loader_keeps_its_workers_across_epochs_and_draws_the_same_with_any_number() -> None:
    data = NoisyBlobs(40, 0)  # draws from the global RNG per item, as random augmentation does
    plans = [[[[3, 1], [7, 9]], [[0, 2], [4, 5]]], [[[11, 12], [13, 14]]]]
    items = ItemLoader(data, 2, torch.device("cpu"))
    first = list(items(plans[0], seed=5))
    workers = items.loader._iterator
    second = list(items(plans[1], seed=6))
    assert items.loader._iterator is workers, "the same worker processes read the next epoch"
    plain = ItemLoader(data, 0, torch.device("cpu"))
    before = torch.get_rng_state()
    for got, want in ((first, list(plain(plans[0], 5))), (second, list(plain(plans[1], 6)))):
        for a, b in zip(got, want, strict=True):
            assert all(torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v) in zip(a, b, strict=True))
    assert torch.equal(torch.get_rng_state(), before), "the global RNG is never drawn from"
    assert [y.tolist() for _, y in first[0]] == [data.y[[3, 1]].tolist(), data.y[[7, 9]].tolist()]
    resumed = list(plain(plans[0][1:], 5, first_step=1))
    assert torch.equal(resumed[0][0][0], first[1][0][0]), "a resumed epoch reads what it would have"
    assert not torch.equal(list(plain(plans[0], 7))[0][0][0], first[0][0][0]), "another epoch, other draws"


def _one_worker(blobs: Datasets, tmp: Path | None, reporter=None) -> TrainContext:
    ctx = _ctx(blobs, tmp, reporter, device_data=False)
    ctx.num_workers = 1
    return ctx


def test_the_dataloader_path_with_a_worker_resumes_exactly(tmp_path: Path, blobs: Datasets) -> None:
    reference = fit(_model(), _method(), SCHEDULE, _one_worker(blobs, None))
    with pytest.raises(Cancelled):
        fit(_model(), _method(), SCHEDULE, _one_worker(blobs, tmp_path, StopAt(0, 3)))
    torch.manual_seed(12345)
    resumed = fit(_model(), _method(), SCHEDULE, _one_worker(blobs, tmp_path))
    assert resumed.resumed_from == 0 and _untimed(resumed.history) == _untimed(reference.history)
    for k, v in _weights(resumed.model).items():
        assert torch.equal(v, _weights(reference.model)[k]), f"{k} differs after resume"


def test_the_images_are_copied_to_a_device_once_and_never_pickled_from_there(tmp_path: Path) -> None:
    ds = _load(tmp_path, name="digits", per_class=3)
    images, labels = ds.train.on(torch.device("cpu"))
    assert ds.train.on(torch.device("cpu"))[0] is images and images.dtype == torch.uint8
    assert labels.tolist() == ds.train.labels
    clone = pickle.loads(pickle.dumps(ds.train))  # what a loader worker receives
    assert clone._on == {} and torch.equal(clone.images, ds.train.images)


def test_cropped_batches_reach_the_network_in_its_layout(blobs: Datasets) -> None:
    """A batch cropped on the device comes NHWC-strided; on CPU the network still sees NCHW."""
    from tests.test_acceleration import Probe

    probe = Probe()
    schedule = Schedule(epochs=1, batch_size=16, max_steps_per_epoch=2)
    fit(_model(), probe, schedule, _ctx(blobs, None))
    assert probe.seen and not any(nhwc for nhwc, *_ in probe.seen)
    x, _ = blobs.train.batch(torch.arange(4), torch.device("cpu"), torch.Generator().manual_seed(0))
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
