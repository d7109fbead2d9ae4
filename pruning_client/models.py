"""The resources the SDK returns, typed (pydantic), as the service's /v1 API sends them.

Fields a newer server adds are kept (``extra="allow"``: ``job.model_extra``), and every field a server
may leave out has a default, so an older client keeps reading a newer server. ``model_dump(mode="json")``
gives back the JSON the server sent.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, SerializeAsAny, ValidationError

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})


class Resource(BaseModel):
    model_config = ConfigDict(extra="allow")


class Cost(Resource):
    """One network: MACs and params per sample, test top-1 (%), median latency at the timed batch."""

    macs: int | None = None
    params: int | None = None
    top1: float | None = None
    latency_ms: float | None = None


class JobResult(Resource):
    """A finished job's summary (the whole report is its ``report.json`` artifact). Ratios are
    pruned / dense; read ``latency_speedup`` with its interval and verdict, never alone."""

    method: str | None = None
    model: str | None = None
    data: str | None = None
    device: str | None = None
    target_macs_ratio: float | None = None
    achieved_macs_ratio: float | None = None
    params_ratio: float | None = None
    latency_speedup: float | None = None
    latency_speedup_interval: list[float] | None = None
    latency_verdict: str | None = None
    latency_batch_size: int | None = None
    latency_busy: bool | None = None
    latency_implausible: str | None = None
    dense: Cost | None = None
    pruned: Cost | None = None


class JobError(Resource):
    code: str = "error"
    message: str | None = None
    retryable: bool | None = None


class Job(Resource):
    id: str
    status: str
    method: str | None = None
    spec: dict[str, Any] = {}
    progress: float = 0.0
    phase: str | None = None
    attempt: int = 0
    max_attempts: int | None = None
    cancel_requested: bool = False
    error: JobError | None = None
    result: JobResult | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    sweep_id: str | None = None
    rerun_of: str | None = None
    urls: dict[str, str] = {}

    @property
    def ended(self) -> bool:
        """Succeeded, failed or cancelled."""
        return self.status in TERMINAL


class DeliveryAttempt(Resource):
    at: datetime | None = None
    status_code: int | None = None
    error: str | None = None


class Delivery(Resource):
    """One webhook call of an ended job (``notify`` in its spec): ``status`` pending, delivered or
    failed, with every attempt in ``log``."""

    id: str
    event: str = ""
    url: str = ""
    status: str = "pending"
    attempts: int = 0
    next_attempt_at: datetime | None = None
    created_at: datetime | None = None
    finished_at: datetime | None = None
    log: list[DeliveryAttempt] = []


class Artifact(Resource):
    name: str
    size: int = 0
    sha256: str | None = None
    media_type: str = ""
    attempt: int | None = None
    created_at: datetime | None = None
    url: str | None = None


class Upload(Resource):
    """``ref`` (``upload:<id>``) goes into a spec's ``model.weights``, ``kd.teacher`` or ``data.root``;
    ``reused``: the SDK found this earlier upload of the same bytes instead of sending them again."""

    id: str
    ref: str = ""
    kind: str | None = None
    filename: str | None = None
    size: int | None = None
    sha256: str | None = None
    source_sha256: str | None = None
    media_type: str | None = None
    created_at: datetime | None = None
    reused: bool = False


class StateKey(Resource):
    key: str
    shape: list[int]
    dtype: str


class ModelKeys(Resource):
    """The state dict that weights for model ``name`` must hold, in the model's order."""

    name: str
    num_classes: int
    in_channels: int
    keys: list[StateKey]


class SweepJob(Resource):
    id: str
    role: str | None = None  # "dense" (the dense training, once) or "child"
    method: str | None = None
    target: dict[str, float] = {}
    status: str | None = None
    progress: float = 0.0
    phase: str | None = None
    error: dict[str, Any] | None = None
    url: str | None = None


class SweepState(Resource):
    """What a sweep's event snapshots and the sweep resource share: its status and jobs."""

    status: str | None = None
    progress: float = 0.0
    counts: dict[str, int] = {}
    jobs: list[SweepJob] = []
    winner: str | None = None


class Sweep(SweepState):
    """``leaderboard`` (once it ended): ``{rank_by, winner, rows: [...], dense, ...}``."""

    id: str
    status: str
    stage: str | None = None
    rank_by: str | None = None
    request: dict[str, Any] = {}
    cancel_requested: bool = False
    leaderboard: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    created_at: datetime | None = None
    finished_at: datetime | None = None
    urls: dict[str, str] = {}


# --- events ---


class EventData(Resource):
    """An event's data: the fields of its kind; an unknown kind's data as extra fields."""


class StatusData(EventData):
    status: str | None = None
    error: JobError | None = None


class PhaseData(EventData):
    name: str | None = None
    epochs: int | None = None
    steps_per_epoch: int | None = None


class ProgressData(EventData):
    """``epoch`` counts from 1 within ``phase``, as every epoch a person reads; ``step`` within it."""

    progress: float = 0.0
    phase: str | None = None
    epoch: int | None = None
    step: int | None = None
    loss: float | None = None


class EpochData(EventData):
    """One epoch's record: ``epoch`` counts from 1 within ``phase`` (as the CLI and the report show it);
    ``top1`` (%) and ``macs`` are the method's network at the epoch's end; ``text``: the line the CLI
    prints for it."""

    phase: str | None = None
    epoch: int | None = None
    train_loss: float | None = None
    top1: float | None = None
    test_loss: float | None = None
    macs: int | None = None
    event: str | None = None
    text: str | None = None


class PrunedData(EventData):
    """The network physically pruned: MACs (per sample) and params before and after, ratios after /
    before; ``text``: the line the CLI prints for it."""

    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    macs_ratio: float
    params_ratio: float
    text: str | None = None


class MessageData(EventData):
    text: str = ""


class Event(Resource):
    """One event of a job: ``seq`` numbers it within the job (the SSE id; resume after it)."""

    id: int | str | None = None
    seq: int | str | None = None
    kind: str
    data: SerializeAsAny[EventData]
    created_at: datetime | None = None


DATA_TYPES: dict[str, type[EventData]] = {
    "status": StatusData,
    "phase": PhaseData,
    "progress": ProgressData,
    "epoch": EpochData,
    "pruned": PrunedData,
    "message": MessageData,
}


def parse_event(raw: dict[str, Any]) -> Event:
    """An event (a dict with ``kind`` and ``data``) with its data typed by kind; an unknown kind's, or
    data its kind's model refuses, stays as ``EventData`` with every field kept."""
    data = raw.get("data")
    data = data if isinstance(data, dict) else {"text": data}
    model = DATA_TYPES.get(str(raw.get("kind")), EventData)
    try:
        typed = model.model_validate(data)
    except ValidationError:
        typed = EventData.model_validate(data)
    return Event.model_validate({**raw, "data": typed})


class SweepEvent(Resource):
    """A whole snapshot of a sweep (``kind`` ``progress``, then ``status`` once it ended)."""

    kind: str
    data: SweepState
