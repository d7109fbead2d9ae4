"""One job as several processes (``resources.gpus``): the split of each batch, gradients of every parameter
set averaged over the ranks, one job's numbers and decisions, a lost rank's attempt resumed.

On CPU with gloo and 2 processes. BatchNorm is not synchronised between ranks (``distributed.py``): a
network with BatchNorm normalises each rank's half batch by its own statistics, so a zoo job on 2
processes matches its 1-process run within ``LOSS_TOLERANCE`` only; without BatchNorm the 2 processes
train exactly the 1-process weights (float rounding aside).
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from pruning_core.jobs.launch import run_job
from pruning_core.methods.base import Method, MethodContext
from pruning_core.settings import Settings
from pruning_core.spec import JobSpec, Schedule, parse_spec, submit_problems
from pruning_core.training import distributed
from pruning_core.training.engine import StepContext, StepOutput, TrainContext, fit
from pruning_core.training.optim import ParamSet

# Relative gap of an epoch's train loss, 2 processes vs 1, on the digits job (BatchNorm over 32 images
# per rank instead of 64; measured up to 0.04 over 2 epochs)
LOSS_TOLERANCE = 0.08


# --- the split ---


def test_shard_gives_each_rank_a_contiguous_slice_of_every_batch() -> None:
    plan = [[list(range(10)), list(range(10, 17))], [list(range(20, 30)), list(range(30, 37))]]
    parts = [distributed.shard(plan, r, 3) for r in range(3)]
    for k, step in enumerate(plan):
        for b, batch in enumerate(step):
            assert [i for steps, _ in parts for i in steps[k][b]] == batch  # all of it, in order, once
        sizes = [sum(len(x) for x in steps[k]) for steps, _ in parts]
        assert max(sizes) - min(sizes) <= 2  # one sample at most per batch between ranks
    # positions: where each rank's items sit in the step's whole batches (the item seeds)
    assert parts[1][1][0] == [4, 5, 6, 13, 14]
    assert distributed.shard(plan, 0, 1) == (plan, [list(range(17))] * 2)


# --- the spec ---


def test_resources_default_validation_and_cap() -> None:
    assert JobSpec().resources.gpus == 1
    spec = parse_spec({"resources": {"gpus": 2}, "schedule": {"batch_size": 64}})
    assert spec.resources.gpus == 2
    for bad in (
        {"resources": {"gpus": 0}},
        {"resources": {"gpus": 3}, "schedule": {"batch_size": 64}},  # 64 does not split in 3
        {"resources": {"gpus": 2}, "target": {"speedup": 2.0}},  # timed on one device
        {"resources": {"gpus": 2}, "device": "cuda:1"},
    ):
        with pytest.raises(ValueError):
            parse_spec(bad)
    fields = [f for f, _ in submit_problems(spec, Settings(max_gpus=1))]
    assert fields == ["resources.gpus"]
    assert "resources" in JobSpec.model_json_schema()["properties"]


# --- the engine: exact on a network without BatchNorm ---


class Blobs(Dataset):
    """Class-dependent blobs with noise drawn per read from the global RNG (as augmentation is)."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, 3, (n,), generator=g)
        self.x = torch.randn(n, 2, 6, 6, generator=g) + self.y.view(-1, 1, 1, 1)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i] + 0.1 * torch.randn(2, 6, 6), self.y[i]


class Gated(Method):
    """Weights and an extra parameter set (per-class gates on the logits, SGD of their own) trained the
    way S2H trains its mask logits: two backward passes, the gates' gradients taken out and put back."""

    name = "gated"

    def __init__(self) -> None:
        spec = JobSpec()
        super().__init__(spec.method, MethodContext(spec, torch.zeros(1, 2, 6, 6), 3, torch.device("cpu"), 1))
        self.gate = torch.ones(3, requires_grad=True)

    def param_sets(self, model: nn.Module) -> list[ParamSet]:
        return [*super().param_sets(model), ParamSet("gates", [self.gate])]

    def training_step(self, model: nn.Module, batch: Any, ctx: StepContext) -> StepOutput:
        x, y = batch
        logits = model(x) * self.gate
        loss = F.cross_entropy(logits, y)
        ctx.backward(loss, retain_graph=True)
        taken = ctx.take_grads("gates")
        ctx.backward((self.gate - 1).pow(2).sum(), "gates")
        self.gate.grad = self.gate.grad + 2 * taken[0]  # depends on the averaged gradient
        return StepOutput(loss.detach(), {"gate_mean": self.gate.detach().mean()})


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 6, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3)
    )


def _fit_tiny(out: Path) -> None:
    method = Gated()
    ctx = TrainContext(device=torch.device("cpu"), seed=5, train=Blobs(48, 0), test=Blobs(12, 1))
    result = fit(_tiny(), method, Schedule(epochs=2, batch_size=12, lr=0.1), ctx)
    state = {**result.model.state_dict(), "gate": method.gate.detach()}
    torch.save({"state": state, "losses": [r["train_loss"] for r in result.history]}, out)


def _rank(rank: int, world: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    try:
        _fit_tiny(Path(tmp) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_train_the_weights_and_an_extra_set_as_one_process(tmp_path: Path) -> None:
    _fit_tiny(tmp_path / "one.pt")
    mp.spawn(_rank, args=(2, str(tmp_path)), nprocs=2)
    one, r0, r1 = (torch.load(tmp_path / n, weights_only=True) for n in ("one.pt", "rank0.pt", "rank1.pt"))
    for k, v in one["state"].items():
        assert torch.equal(r0["state"][k], r1["state"][k]), k  # the ranks never drift apart
        assert torch.allclose(r0["state"][k], v, atol=1e-5), k
    assert not torch.equal(one["state"]["gate"], torch.ones(3))  # the extra set did train
    assert r0["losses"] == pytest.approx(one["losses"], rel=1e-5)


# --- whole jobs ---


def digits(method: dict[str, Any], gpus: int, epochs: int = 2) -> JobSpec:
    return parse_spec(
        {
            "model": {"name": "resnet20"},
            "data": {"name": "digits"},
            "method": method,
            "target": {"macs_ratio": 0.5},
            "schedule": {
                "epochs": epochs,
                "batch_size": 64,
                "max_steps_per_epoch": 4,
                "bn_recalibration_batches": 2,
            },
            "export": {"formats": ["safetensors"], "latency": False},
            "device": "cpu",
            "resources": {"gpus": gpus},
        }
    )


def _widths(result) -> list[int]:
    return [g.pruned for g in result.report.groups]


@pytest.mark.parametrize("method", [{"name": "magnitude"}, {"name": "s2h", "fit_epochs": 1}])
def test_a_digits_job_on_two_processes_matches_one(method: dict[str, Any], tmp_path: Path) -> None:
    one = run_job(digits(method, 1), tmp_path / "one")
    two = run_job(digits(method, 2), tmp_path / "two")
    assert _widths(two) == _widths(one)
    losses = [
        (a.train_loss, b.train_loss) for a, b in zip(one.report.history, two.report.history, strict=True)
    ]
    for a, b in losses:
        assert abs(a - b) <= LOSS_TOLERANCE * a, losses
    assert two.report.achieved_macs_ratio == pytest.approx(one.report.achieved_macs_ratio)
    # rank 0 alone wrote: one checkpoint per phase, the artifacts
    assert (tmp_path / "two" / "model.safetensors").exists()


def _rank_pids(workdir: Path) -> list[int]:
    """The processes of the ranks other than 0 started for ``workdir`` (their command line names it)."""
    pids = []
    for d in Path("/proc").iterdir():
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if b"pruning_core.jobs.launch" in cmd and str(workdir).encode() in cmd:
            pids.append(int(d.name))
    return pids


def test_a_killed_rank_fails_the_attempt_and_the_job_resumes(
    sqlite_url: str, tmp_path: Path, monkeypatch
) -> None:
    from faultkit import get, submit

    from store import repo
    from store.db import make_engine, migrate, session_scope
    from worker.execute import execute
    from worker.reporter import StoreReporter

    migrate(sqlite_url)
    settings = Settings(
        database_url=sqlite_url, state_dir=tmp_path / "state", lease_s=30, heartbeat_s=0.2, redis_url=None
    )
    engine = make_engine(settings.sqlalchemy_url)
    spec = json.loads(digits({"name": "magnitude"}, 2, epochs=3).model_dump_json(exclude={"notify"}))
    job_id = submit(engine, spec)
    real_step = StoreReporter.step
    killed: list[int] = []

    def kill_in_second_epoch(self: StoreReporter, phase: str, epoch: int, step: int, loss: float) -> None:
        real_step(self, phase, epoch, step, loss)
        if epoch >= 1 and not killed:  # the first epoch is checkpointed by now
            killed.extend(_rank_pids(settings.artifacts_dir / job_id / "attempt-1"))
            for pid in killed:
                os.kill(pid, signal.SIGKILL)

    monkeypatch.setattr(StoreReporter, "step", kill_in_second_epoch)
    assert execute(job_id, worker_name="w", settings=settings) is None
    assert len(killed) == 1
    job = get(engine, job_id)
    assert (job.status, job.attempt) == ("queued", 1)

    assert execute(job_id, worker_name="w", settings=settings) == "succeeded"
    job = get(engine, job_id)
    assert (job.status, job.attempt) == ("succeeded", 2)
    with session_scope(engine) as s:
        events = [(e.kind, e.data) for e in repo.events_after(s, job_id, 0, limit=10_000)]
    texts = [d["text"] for k, d in events if k == "message"]
    assert any("a process of the job ended: rank 1 ended" in t for t in texts), texts
    assert any("resuming at epoch 2" in t for t in texts), texts
    assert [d["epoch"] for k, d in events if k == "epoch"] == [1, 2, 3]  # each epoch trained once
    engine.dispose()


# --- a rank's own error, raised by rank 0 ---


def test_a_rank_that_fails_alone_has_its_error_raised_not_a_lost_rank(tmp_path: Path, monkeypatch) -> None:
    """Rank 1 alone is given weights that do not exist: rank 0, which sees only a peer gone, raises rank
    1's own ``WeightsError`` (code ``bad_weights``: not retried), not ``RankLost``; no rank is left."""
    from pruning_core.errors import PruningError, RankLost
    from pruning_core.jobs import launch

    real_start = launch._start_rank

    def start(rank: int, world: int, port: int, spec: JobSpec, workdir: Path, job_id: str | None):
        if rank == 1:
            spec = spec.model_copy(update={"model": spec.model.model_copy(update={"weights": "/no/such.pt"})})
        return real_start(rank, world, port, spec, workdir, job_id)

    monkeypatch.setattr(launch, "_start_rank", start)
    with pytest.raises(PruningError) as caught:
        run_job(digits({"name": "magnitude"}, 2), tmp_path / "job")
    assert not isinstance(caught.value, RankLost)
    assert caught.value.code == "bad_weights" and str(caught.value).startswith("rank 1: "), caught.value
    assert _rank_pids(tmp_path / "job") == []


def test_rank_failures_keep_their_kind() -> None:
    """What a rank left in the store becomes rank 0's error: a PruningError by its code, an out-of-memory
    error as one (the worker then says what to lower), anything else ``RankLost``; nothing, None."""
    from pruning_core.errors import DataError, DivergedError, RankLost
    from pruning_core.jobs.launch import _failure, _stored_failure

    store = dist.HashStore()
    assert _stored_failure(store, 2) is None  # a rank killed without a word: the caller's RankLost
    cases = [
        (DataError("corrupt image x.png"), DataError, "rank 1: corrupt image x.png"),
        (DivergedError("loss is nan"), DivergedError, "rank 1: loss is nan"),
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"), torch.OutOfMemoryError, None),
        (MemoryError("host"), MemoryError, None),
        (ValueError("a bug"), RankLost, "rank 1: a bug"),
    ]
    for err, kind, text in cases:
        store.set("error/1", json.dumps(_failure(err)))
        raised = _stored_failure(store, 2)
        assert type(raised) is kind, (err, raised)
        assert text is None or text in str(raised), raised
