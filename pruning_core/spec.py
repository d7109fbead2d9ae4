"""The one job specification: what to prune, on which data, how, to which budget.

Torch-free on purpose: the API, the CLI and the job store validate with it without importing torch.
Defaults live on the fields. Unknown fields are refused everywhere (``extra="forbid"``) so a typo
never silently falls back to a default.
"""

from __future__ import annotations

import math
import re
from functools import lru_cache
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_args
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .methods.epi.options import EPIOptions
from .methods.magnitude.options import MagnitudeOptions
from .methods.psap.options import PSAPOptions
from .methods.s2h.options import S2HOptions
from .methods.tas.options import TASOptions
from .schema import Strict

if TYPE_CHECKING:
    from .settings import Settings

# The catalogs below are the torch-free mirror of the registries in zoo.py and data.py; a test keeps
# them equal, so the API can list what can be asked for without importing torch.
CIFAR_MODELS: tuple[str, ...] = (
    "resnet20",
    "resnet32",
    "resnet56",
    "resnet110",
    "vgg16_bn",
    "mobilenet_v2",
)
TORCHVISION_PREFIX = "tv:"
TORCHVISION_NAME = re.compile(r"tv:[a-z][a-z0-9_]{0,63}")
DATASETS: tuple[str, ...] = ("digits", "cifar10", "cifar100", "imagefolder", "synthetic")
# timm (the optional extra `timm`) classifiers as `timm:<name>`; which a server allows is a setting.
TIMM_PREFIX = "timm:"
TIMM_NAME = re.compile(r"timm:[a-z][a-z0-9_.]{0,61}")
# Models from installed packages: each entry point in this group names a builder
# ``(num_classes, in_channels) -> nn.Module``. Only the names are read here (importlib.metadata reads
# them from the packages' metadata without importing anything); zoo.py loads a builder when a job runs.
MODEL_ENTRY_POINTS = "pruning_service.models"
PLUGIN_NAME = re.compile(r"[a-z][a-z0-9_.-]{0,63}")
# A module or data set handed to pruning_core.prune() in a Python process, registered for that call
# only: valid in a JobSpec (the engine runs it), refused by a server (submit_problems).
PYTHON_PREFIX = "python:"
PYTHON_NAME = re.compile(r"python:[A-Za-z_][A-Za-z0-9_.-]{0,59}")
DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]{1,2})?")


@lru_cache
def plugin_models() -> dict[str, str]:
    """Installed model plugins: entry-point name -> ``module:builder``, sorted by name. A name that is
    not a plain lower-case name, or that a zoo model already holds, is left out. Cached: call
    ``plugin_models.cache_clear()`` after installing a package into a running process."""
    from importlib.metadata import entry_points

    eps = entry_points(group=MODEL_ENTRY_POINTS)
    return {
        ep.name: ep.value
        for ep in sorted(eps, key=lambda e: e.name)
        if PLUGIN_NAME.fullmatch(ep.name) and ep.name not in CIFAR_MODELS
    }


def known_model(name: str) -> bool:
    """Whether a JobSpec may name ``name``: a zoo model, an installed plugin, ``tv:<builder>``,
    ``timm:<model>`` or a ``python:`` module (which tv/timm models a server allows is checked at submit)."""
    return (
        name in CIFAR_MODELS
        or name in plugin_models()
        or bool(TORCHVISION_NAME.fullmatch(name) or TIMM_NAME.fullmatch(name) or PYTHON_NAME.fullmatch(name))
    )


def _plain_text(v: str) -> str:
    """Refuse control characters (NUL above all: PostgreSQL cannot store it) and lone surrogates."""
    if any(ord(c) < 32 or ord(c) == 127 or 0xD800 <= ord(c) <= 0xDFFF for c in v):
        raise ValueError("must be plain text: no control characters or lone surrogates")
    return v


# A file: `upload:<id>` from HTTP clients (api.refs checks which), a path in CLI specs.
FileRef = Annotated[str, Field(min_length=1, max_length=4096), AfterValidator(_plain_text)]


class ModelSpec(Strict):
    """The dense network to prune."""

    name: str = Field(
        "resnet20",
        max_length=67,
        description=f"A zoo model {CIFAR_MODELS}, a model from an installed plugin package (entry-point "
        f"group `{MODEL_ENTRY_POINTS}`), `tv:<torchvision builder>` or `timm:<timm model>` (the server "
        "lists the ones it accepts: GET /v1/models).",
        json_schema_extra={
            "anyOf": [
                {"enum": list(CIFAR_MODELS)},
                {"pattern": f"^{TORCHVISION_NAME.pattern}$"},
                {"pattern": f"^{TIMM_NAME.pattern}$"},
            ]
        },
    )
    weights: FileRef | None = Field(None, description="Path to a safetensors file with the dense weights.")
    pretrained: bool = Field(
        False,
        description="tv: and timm: models: start from the library's own published weights (torchvision's "
        "default weights, timm's default tag), read from the server's cache (TORCH_HOME, the Hugging Face "
        "cache); a miss downloads them only where the operator allows downloads (ALLOW_DOWNLOAD), else the "
        "job is refused at submit naming the file and where to place it. Other classes than the "
        "weights': a new classifier head.",
    )
    num_classes: int | None = Field(
        None, ge=2, le=100_000, description="Output classes; default: the data set's."
    )
    in_channels: int | None = Field(None, ge=1, le=64, description="Input channels; default: the data set's.")

    @field_validator("name")
    @classmethod
    def _known_name(cls, v: str, info: ValidationInfo) -> str:
        # A client checking a spec before sending it cannot see the server's plugins: it lets any
        # plugin-shaped name through, and the server decides.
        if known_model(v) or ((info.context or {}).get("remote_models") and PLUGIN_NAME.fullmatch(v)):
            return v
        raise ValueError(
            f"unknown model {v!r}; known: {', '.join([*CIFAR_MODELS, *plugin_models()])}, or "
            "tv:<torchvision builder> such as tv:resnet18, or timm:<timm model> such as timm:resnet18"
        )

    @model_validator(mode="after")
    def _pretrained(self) -> ModelSpec:
        if self.pretrained and not self.name.startswith((TORCHVISION_PREFIX, TIMM_PREFIX)):
            raise ValueError(
                f"model.pretrained is for tv: and timm: models (their published weights); {self.name} has "
                "none: give model.weights"
            )
        if self.pretrained and self.weights is not None:
            raise ValueError("give model.weights or model.pretrained, not both")
        return self


class DataSpec(Strict):
    """Where the training and test images come from."""

    name: str = Field("digits", description=f"One of {DATASETS}.", json_schema_extra={"enum": list(DATASETS)})
    root: FileRef | None = Field(
        None, description="Data root (cifar*) or a directory / .tar.gz / .zip archive (imagefolder)."
    )
    image_size: int | None = Field(None, ge=8, le=4096, description="Resize images to this many pixels.")
    per_class: int | None = Field(
        None, ge=1, le=10**8, description="Take at most this many training images per class."
    )
    test_per_class: int | None = Field(
        None, ge=1, le=10**8, description="Take at most this many test images per class."
    )
    validation: int | None = Field(
        None,
        ge=1,
        le=10**8,
        description="Hold out the last this many of each class's training images (after per_class) and "
        "evaluate on them instead of the test split, which is then never read: for choosing options "
        "without touching the test set.",
    )
    augment: bool = Field(True, description="Random crop and flip on training images (not on digits).")
    num_classes: int | None = Field(None, ge=2, le=100_000, description="synthetic only: number of classes.")
    num_workers: int | None = Field(
        None,
        ge=0,
        le=64,
        description="DataLoader worker processes, for an image folder too large to hold in memory (one "
        "held in memory is cropped and flipped on the training device, with none). Default: none on CPU "
        "(the cores train), the host's cores on CUDA (at most MAX_DATA_WORKERS). Resume is exact either way: "
        "each image's crop and flip has a seed of its own.",
    )

    @field_validator("name")
    @classmethod
    def _known_name(cls, v: str) -> str:
        if v not in DATASETS and not PYTHON_NAME.fullmatch(v):
            raise ValueError(f"unknown data set {v!r}; known: {', '.join(DATASETS)}")
        return v

    @model_validator(mode="after")
    def _root_when_needed(self) -> DataSpec:
        if self.name == "imagefolder" and not self.root:
            raise ValueError("imagefolder needs `root`: a directory or a .tar.gz / .zip archive")
        return self


# A discriminated union on `name`.
MethodSpec = Annotated[
    MagnitudeOptions | S2HOptions | TASOptions | PSAPOptions | EPIOptions, Field(discriminator="name")
]
METHODS: tuple[str, ...] = ("magnitude", "s2h", "tas", "psap", "epi")


def method_options() -> dict[str, type[BaseModel]]:
    """Method name -> its options model, read off the discriminated union ``MethodSpec``."""
    members = get_args(MethodSpec)[0]
    classes = get_args(members) or (members,)
    return {cls.model_fields["name"].default: cls for cls in classes}


# The channel step per device type when `target.round_to` is not given (a group narrower than four steps
# takes a finer one: `budget.group_step`). Measured with `python -m bench.speed` (BENCHMARKS.md, "Speed").
# CPU: oneDNN's convolutions work in blocks of 8 channels (AVX2); on an idle machine widths in multiples
# of 8 brought MobileNetV2 at half the MACs from 0.81 to 0.99 of its MAC-implied speed-up and ResNet-18
# from 0.76 to 0.82 (issue 12). CUDA (H200, fp16 AMP, batch 256, channels_last): step 1 wastes most of
# pruning (ResNet-50 at 0.3 of the MACs: 1.15x; step 8: 1.70x; step 16: 1.80x), and 16 beat 8 by 0-6 %
# on every 224 px model ("speed-cuda").
CHANNEL_STEP_DEFAULTS: dict[str, int] = {"cpu": 8, "cuda": 16}


# Methods whose allocation takes per-group latency rates (``layer_times.latency_rates``): the global
# allocator's (magnitude, EPI: ``budget.select_by_rates``) and PSAP's per-group ratios. S2H's and TAS's budgets are differentiable MAC
# losses of their own.
LATENCY_ALLOCATION_METHODS = frozenset({"magnitude", "epi", "psap"})


# The width floor (`target.min_width`). Without one, a global ranking whose scores differ in scale from
# layer to layer can leave a group 1 channel wide (EPI's unnormalised criterion at initialisation gave
# ResNet-20 `[..., 1, 64, 1, 1]` at 0.5 of the MACs), a bottleneck no training recovers from.
MIN_WIDTH_DEFAULT = 0.1


class TargetSpec(Strict):
    """The budget: the fraction of the dense model's MACs that remains after pruning, or a measured
    speed-up on the job's device that the runner turns into that fraction (``speed_target``)."""

    macs_ratio: float = Field(0.5, gt=0.0, le=1.0, description="Remaining MACs / dense MACs, in (0, 1].")
    speedup: float | None = Field(
        None,
        gt=1.0,
        le=100.0,
        description="Instead of `macs_ratio`: the measured speed-up (dense / pruned time at "
        "`export.latency_batch_size`, on the job's device) to prune for. The MAC ratio is found by timing "
        "candidate prunings before training; the report gives the requested and the achieved speed-up.",
    )
    speedup_search_s: float = Field(
        30.0, gt=0.0, le=600.0, description="Seconds the timing of candidates for `speedup` may take."
    )
    min_channels: int = Field(
        1, ge=1, le=65_536, description="Never keep fewer channels than this in a group."
    )
    min_width: float = Field(
        MIN_WIDTH_DEFAULT,
        ge=0.0,
        le=1.0,
        description="The width floor of every method's allocation: no coupled group keeps less than this "
        "share of its dense width (rounded up to the channel step). The report lists the groups on it.",
    )
    round_to: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="Channel step: every method keeps channel counts a multiple of this in groups at "
        f"least this wide (grouped convolutions keep their own step); default per device type "
        f"{CHANNEL_STEP_DEFAULTS}; 1: any width.",
    )

    allocation: Literal["macs", "latency"] = Field(
        "macs",
        description="How the budget is spent across layers. `macs`: by the channels' scores alone. "
        "`latency`: each group's pruned share is divided by the MACs its channels cost per second they "
        "take on the job's device, relative to the network (each layer timed once in the dense network "
        "before pruning), and the shares rescaled to the budget: groups that cost more time than their "
        "MACs suggest are pruned more, in proportion. The same MACs, a faster network (BENCHMARKS.md), "
        "kept only where it times faster than the MAC allocation on the job's device; else the job "
        "allocates by MACs (`method_details.allocation`). For methods "
        f"{sorted(LATENCY_ALLOCATION_METHODS)}.",
    )

    @model_validator(mode="after")
    def _one_target(self) -> TargetSpec:
        if self.speedup is not None and "macs_ratio" in self.model_fields_set:
            raise ValueError("give target.macs_ratio or target.speedup, not both")
        return self


class Schedule(Strict):
    """Training schedule shared by every phase that trains (dense pre-training, fine-tuning, ...)."""

    epochs: int = Field(3, ge=0, le=10_000, description="Epochs of the method's training phase.")
    dense_epochs: int = Field(
        0, ge=0, le=10_000, description="Train the dense model this many epochs first (when no weights)."
    )
    batch_size: int = Field(64, ge=1, le=65_536)
    lr: float = Field(0.05, gt=0.0, le=10.0, description="Peak learning rate.")
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum.")
    nesterov: bool = Field(True, description="Nesterov momentum (SGD only; needs momentum > 0).")
    weight_decay: float = Field(5e-4, ge=0.0, le=1.0)
    warmup_epochs: float = Field(
        0.0, ge=0.0, le=10_000, description="Linear warm-up, in epochs (fractions allowed)."
    )
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    amp: bool = Field(True, description="Mixed precision on CUDA (ignored on CPU).")
    amp_dtype: Literal["auto", "bfloat16", "float16"] = Field(
        "auto",
        description="The autocast type of `amp`: `auto` is bfloat16 where the GPU has it (no loss scaling), "
        "else float16 with the gradient scaler.",
    )
    channels_last: bool | None = Field(
        None,
        description="Weights and inputs in channels_last (NHWC) memory format while training; default: "
        "on CUDA only (tensor cores read NHWC; CPU training stays as it was).",
    )
    compile: bool = Field(
        False,
        description="torch.compile the network's forward for training where the method allows it (one "
        "plain forward per step: dense training and `magnitude`); off by default until measured faster "
        "per method.",
    )
    max_steps_per_epoch: int | None = Field(
        None, ge=1, le=10**9, description="Cap on steps per epoch (smoke runs)."
    )
    bn_recalibration_batches: int = Field(
        20,
        ge=0,
        le=10_000,
        description="Training batches that re-estimate BatchNorm statistics after any physical pruning "
        "or architecture change, before the network is evaluated or exported; 0 turns it off.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> Schedule:
        if self.epochs and self.warmup_epochs > self.epochs:
            raise ValueError("warmup_epochs cannot exceed epochs")
        if self.optimizer == "sgd" and self.nesterov and self.momentum == 0:
            raise ValueError("nesterov needs momentum > 0; set nesterov to false or give a momentum")
        return self


class KDSpec(Strict):
    """Knowledge distillation from a teacher (the dense model by default)."""

    enabled: bool = False
    teacher: FileRef = Field("dense", description="`dense`, or a path to teacher weights.")
    temperature: float = Field(4.0, gt=0.0, le=100.0)
    weight: float = Field(0.9, ge=0.0, le=1.0, description="a in (1-a)·CE + a·T²·KL.")


ExportFormat = Literal["safetensors", "torch_export", "torchscript", "onnx"]


class ExportSpec(Strict):
    formats: tuple[ExportFormat, ...] = Field(
        ("safetensors", "torch_export", "torchscript", "onnx"),
        max_length=8,
        description="`torch_export` writes model.pt2 (torch.export); TorchScript is deprecated in PyTorch.",
    )
    latency_batch_size: int = Field(
        8, ge=1, le=4096, description="Throughput batch of the latency comparison; batch 1 is timed too."
    )
    latency_max_s: float = Field(
        20.0, ge=0.0, le=600.0, description="Seconds the dense-vs-pruned latency comparison may take."
    )
    latency: bool = Field(
        True,
        description="Time dense against pruned (the report's `latency`); false skips it: no measured "
        "speed-up in the report, `latency_max_s` saved. A `target.speedup` job measures it regardless.",
    )
    latency_threads: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="CPU threads of the latency timing; default: measured on the machine as it is, the "
        "count (1 or the process's torch threads) at which the pruned network runs fastest, so a busy "
        "machine's cores are not oversubscribed.",
    )
    tensorboard: bool = Field(
        True,
        description="Write TensorBoard event files of the per-epoch numbers (loss, top-1, MACs, LR, the "
        "method's own) as the artifact `tensorboard.tar.gz`; false writes none.",
    )

    @field_validator("formats")
    @classmethod
    def _safetensors_first(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        # safetensors + architecture JSON is what load_pruned() reads back, so it is always written.
        return tuple(dict.fromkeys(("safetensors", *v)))


NOTIFY_SCHEMES = ("http", "https")


class NotifySpec(Strict):
    """Where the service POSTs the job resource once the job has ended (succeeded, failed, cancelled),
    signed with ``secret`` (docs/webhooks.md). The secret is write-only: never stored in the spec nor
    shown again. Only a server delivers; a local run ignores it."""

    url: str = Field(
        max_length=2048,
        description="An http(s) URL; its host must resolve to global addresses unless the operator "
        "allows others (WEBHOOK_ALLOW).",
        json_schema_extra={"pattern": "^https?://"},
    )
    secret: SecretStr | None = Field(
        None,
        min_length=16,
        max_length=256,
        description="The HMAC-SHA256 key of the signature header (required at submit; a rerun keeps the "
        "first job's unless given). Write-only.",
    )

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        _plain_text(v)
        parts = urlsplit(v)
        if parts.scheme not in NOTIFY_SCHEMES or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        if parts.username is not None or parts.password is not None:
            raise ValueError("must not carry credentials (sign with `secret` instead)")
        try:
            parts.port  # noqa: B018  (raises on a port out of range)
        except ValueError as err:
            raise ValueError(f"has a bad port: {err}") from None
        return v


class ResourcesSpec(Strict):
    """What one job runs on. ``gpus`` > 1: that many processes on one host, one per GPU (or, on a host
    without CUDA, per CPU process with gloo), each training on a slice of every batch
    (``pruning_core.training.distributed``); ``schedule.batch_size`` stays the global batch."""

    gpus: int = Field(
        1,
        ge=1,
        le=64,
        description="Processes (one per GPU of the worker's host) that train this job together; "
        "schedule.batch_size is split between them.",
    )


class JobSpec(Strict):
    """A whole pruning job. Validates API bodies, CLI files and stored rows alike."""

    model: ModelSpec = ModelSpec()
    data: DataSpec = DataSpec()
    method: MethodSpec = MagnitudeOptions()
    target: TargetSpec = TargetSpec()
    schedule: Schedule = Schedule()
    kd: KDSpec = KDSpec()
    export: ExportSpec = ExportSpec()
    seed: int = Field(0, ge=0, le=2**31 - 1)
    notify: NotifySpec | None = Field(None, description="A webhook called once the job has ended.")
    resources: ResourcesSpec = ResourcesSpec()
    device: str = Field(
        "auto",
        max_length=16,
        description="`auto`, `cpu`, `cuda` or `cuda:N`.",
        json_schema_extra={"pattern": f"^({DEVICE.pattern})$"},
    )

    def channel_step(self, device_type: str) -> int:
        """The channel step (channels) of this job on a device of ``device_type`` (``cpu``, ``cuda``):
        ``target.round_to``, else magnitude's deprecated ``round_to``, else the device type's default."""
        if self.target.round_to is not None:
            return self.target.round_to
        legacy = getattr(self.method, "round_to", None)
        return legacy if legacy is not None else CHANNEL_STEP_DEFAULTS.get(device_type, 1)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not DEVICE.fullmatch(v):
            raise ValueError("device must be `auto`, `cpu`, `cuda` or `cuda:N`")
        return v

    @model_validator(mode="after")
    def _speedup_is_timed(self) -> JobSpec:
        if self.target.speedup is not None and not self.export.latency:
            raise ValueError(
                "export.latency: a target.speedup job is judged by its measured latency; it cannot be off"
            )
        return self

    @model_validator(mode="after")
    def _latency_allocation(self) -> JobSpec:
        if self.target.allocation == "latency" and self.method.name not in LATENCY_ALLOCATION_METHODS:
            raise ValueError(
                f"target.allocation: `latency` is for methods {sorted(LATENCY_ALLOCATION_METHODS)}; "
                f"{self.method.name} spends its budget through its own MAC loss"
            )
        return self

    @model_validator(mode="after")
    def _splits_between_gpus(self) -> JobSpec:
        gpus = self.resources.gpus
        if gpus == 1:
            return self
        if self.schedule.batch_size % gpus:
            raise ValueError(
                f"schedule.batch_size: {self.schedule.batch_size} does not split evenly between "
                f"resources.gpus {gpus}; use a multiple of {gpus}"
            )
        if self.target.speedup is not None or self.target.allocation == "latency":
            raise ValueError(
                "resources.gpus: a target.speedup or latency allocation times the network on one device; "
                "run it with gpus: 1"
            )
        if self.device.startswith("cuda:"):
            raise ValueError(f"device: {self.device} names one GPU; with resources.gpus {gpus} use `auto`")
        return self

    @model_validator(mode="after")
    def _prunes_while_training(self) -> JobSpec:
        if self.method.name == "psap" and self.schedule.epochs < 1 + (self.method.settle > 0):
            raise ValueError(
                "schedule.epochs: psap prunes while training and then trains the pruned network (settle); "
                "it needs at least 2 epochs (1 with settle: 0)"
            )
        if self.method.name == "epi" and self.schedule.epochs < 2:
            raise ValueError(
                "schedule.epochs: epi trains dense, prunes, then trains the pruned network; it needs at "
                "least 2 epochs"
            )
        return self


# --- what a server accepts: the operator's limits (Settings), checked by the API at submit ---

# Settings field -> the (section, options class, field) it caps. The API's OpenAPI schema shows each cap
# as the field's `maximum` (schema_limits), and submit_problems refuses a spec beyond one: one table, so
# the schema and the check cannot disagree.
_Limited = tuple[tuple[str, type[BaseModel], str], ...]
LIMITS: dict[str, _Limited] = {
    "max_epochs": (
        ("schedule", Schedule, "epochs"),
        ("schedule", Schedule, "dense_epochs"),
        ("schedule", Schedule, "warmup_epochs"),
        ("method", S2HOptions, "finetune_epochs"),
        ("method", TASOptions, "search_epochs"),
        ("method", PSAPOptions, "finetune_epochs"),
        ("method", EPIOptions, "min_epochs"),
    ),
    "max_batch_size": (("schedule", Schedule, "batch_size"), ("export", ExportSpec, "latency_batch_size")),
    "max_image_size": (("data", DataSpec, "image_size"),),
    "max_num_classes": (("model", ModelSpec, "num_classes"), ("data", DataSpec, "num_classes")),
    "max_data_workers": (("data", DataSpec, "num_workers"),),
    "max_gpus": (("resources", ResourcesSpec, "gpus"),),
    "max_images": (("data", DataSpec, "per_class"), ("data", DataSpec, "test_per_class")),
}

# The fewest MACs each zoo model can keep, as a share of its dense MACs (every group at one channel;
# 2 classes, 1 input channel: the lowest floor of any data), rounded down. A lower target can never be
# reached; tests/test_input.py recomputes them with the engine.
ZOO_MIN_MACS_RATIO: dict[str, float] = {
    "resnet20": 0.002,
    "resnet32": 0.0018,
    "resnet56": 0.0018,
    "resnet110": 0.0017,
    "vgg16_bn": 0.00008,
    "mobilenet_v2": 0.00065,
}
# The side of a data set's images when data.image_size is not given (imagefolder: the files' own).
NATIVE_IMAGE_SIZE: dict[str, int] = {"digits": 8, "cifar10": 32, "cifar100": 32, "synthetic": 32}
# (classes, channels) of the data sets whose shape is known before loading them (pruning_core.data.loaders).
NATIVE_SHAPE: dict[str, tuple[int, int]] = {"digits": (10, 1), "cifar10": (10, 3), "cifar100": (100, 3)}


def model_shape(spec: JobSpec) -> tuple[int, int] | None:
    """(classes, input channels) the job's model is built for, when known without loading the data
    (an imagefolder's classes are its folders): the model's own fields, else the data set's."""
    data = spec.data
    native = (data.num_classes or 10, 3) if data.name == "synthetic" else NATIVE_SHAPE.get(data.name)
    classes = spec.model.num_classes or (native[0] if native else None)
    channels = spec.model.in_channels or (native[1] if native else None)
    return (classes, channels) if classes and channels else None


def synthetic_images(data: DataSpec) -> int:
    """How many images (train + test) the synthetic loader makes for ``data`` (data.py's formula)."""
    k = data.num_classes or 10
    train = min(max(20, -(-400 // k)), data.per_class or 10**9)
    test = min(max(5, -(-100 // k)), data.test_per_class or 10**9)
    return k * (train + test)


def submit_problems(spec: JobSpec, settings: Settings) -> list[tuple[str, str]]:
    """``(field, message)``, at most one per field, for each way ``spec`` goes beyond what this server
    accepts: a size over one of ``settings``' limits, a torchvision model it does not allow, a target
    the model can never reach."""
    problems: dict[str, str] = {}

    def refuse(field: str, message: str) -> None:
        problems.setdefault(field, message)

    for limit, fields in LIMITS.items():
        cap = getattr(settings, limit)
        for section, cls, name in fields:
            part = getattr(spec, section)
            value = getattr(part, name) if isinstance(part, cls) else None
            if value is not None and value > cap:
                refuse(f"{section}.{name}", f"must be at most {cap} on this server ({limit.upper()})")
    for field, name in (("model.name", spec.model.name), ("data.name", spec.data.name)):
        if name.startswith(PYTHON_PREFIX):
            refuse(
                field,
                f"{name} names an object given to pruning_core.prune() in Python; a server cannot load it",
            )
    model = spec.model.name
    if model.startswith(TORCHVISION_PREFIX) and model[3:] not in settings.allowed_torchvision_models:
        refuse(
            "model.name", f"{model} is not one of the torchvision models this server allows (GET /v1/models)"
        )
    if model.startswith(TIMM_PREFIX) and model[len(TIMM_PREFIX) :] not in settings.allowed_timm_models:
        refuse("model.name", f"{model} is not one of the timm models this server allows (GET /v1/models)")
    floor = ZOO_MIN_MACS_RATIO.get(model)
    if floor is not None and spec.target.speedup is None and spec.target.macs_ratio < floor:
        refuse(
            "target.macs_ratio",
            f"{spec.target.macs_ratio:g} is unreachable: {model} keeps at least {floor:g} of its MACs with "
            "one channel in every group",
        )
    side = spec.data.image_size or NATIVE_IMAGE_SIZE.get(spec.data.name)
    batch = spec.schedule.batch_size
    if side and batch * side * side > settings.max_batch_pixels:
        refuse(
            "schedule.batch_size",
            f"a batch of {batch} images of {side}x{side} px is over this server's {settings.max_batch_pixels} "
            "pixels (MAX_BATCH_PIXELS); lower schedule.batch_size or data.image_size",
        )
    if spec.data.name == "synthetic" and side:
        n = synthetic_images(spec.data)
        nbytes = n * 3 * side * side * 4  # generated as float32
        field = "data.image_size" if spec.data.image_size else "data.num_classes"
        if n > settings.max_images:
            refuse(field, f"{n} synthetic images are over this server's {settings.max_images} (MAX_IMAGES)")
        elif nbytes > settings.max_dataset_bytes:
            refuse(
                field,
                f"{n} synthetic images of {side}x{side} px take {nbytes / 2**30:.1f} GiB to generate, over this "
                f"server's {settings.max_dataset_bytes / 2**30:.1f} GiB (MAX_DATASET_BYTES)",
            )
    return list(problems.items())


def _set_maximum(prop: dict[str, Any], cap: int) -> None:
    """Lower a JSON schema property's maximum to ``cap`` (inside ``anyOf`` for optional fields)."""
    for branch in prop.get("anyOf", [prop]):
        if branch.get("type") in ("integer", "number"):
            branch["maximum"] = min(branch.get("maximum", math.inf), cap)


def schema_limits(schemas: dict[str, dict[str, Any]], settings: Settings) -> None:
    """Write ``settings``' caps into JSON schemas keyed by model class name (OpenAPI components), and
    list the allowed model names as ``model.name``'s enum."""
    for limit, fields in LIMITS.items():
        for _, cls, name in fields:
            prop = schemas.get(cls.__name__, {}).get("properties", {}).get(name)
            if prop is not None:
                _set_maximum(prop, getattr(settings, limit))
    name = schemas.get(ModelSpec.__name__, {}).get("properties", {}).get("name")
    if name is not None:
        name.pop("anyOf", None)
        name["enum"] = allowed_models(settings)


def allowed_models(settings: Settings) -> list[str]:
    return [
        *CIFAR_MODELS,
        *plugin_models(),
        *(TORCHVISION_PREFIX + n for n in settings.allowed_torchvision_models),
        *(TIMM_PREFIX + n for n in settings.allowed_timm_models),
    ]


class SpecError(ValueError):
    """A job specification that failed validation; ``problems`` holds one line per bad field."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid job spec:\n" + "\n".join(f"  {p}" for p in problems))


def describe_errors(err: ValidationError) -> list[str]:
    """One human-readable line per bad field: ``schedule.epochs: Input should be ...``."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-after"))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "union_tag_invalid":  # the method's name (a tagged union): say which are known
            known = e["ctx"]["expected_tags"].replace("'", "")
            loc, msg = f"{loc}.name", f"unknown {loc} {e['ctx']['tag']!r}; known: {known}"
        elif e["type"] == "union_tag_not_found":
            loc, msg = f"{loc}.name", f"required; one of {', '.join(METHODS)}"
        lines.append(f"{loc or '(spec)'}: {msg}")
    return lines


def stored_spec(spec: JobSpec) -> dict[str, Any]:
    """The spec as a job row keeps it and the API shows it: JSON, defaults filled in, without the
    webhook's secret (write-only), and without `notify` when there is none (so that specs stored before
    it existed compare equal, e.g. for an Idempotency-Key)."""
    exclude: Any = {"notify"} if spec.notify is None else {"notify": {"secret"}}
    return spec.model_dump(mode="json", exclude=exclude)


def parse_spec(data: dict[str, Any], *, remote_models: bool = False) -> JobSpec:
    """Validate a mapping into a JobSpec, raising SpecError with one line per problem.
    ``remote_models``: a client's check, which accepts any plugin-shaped model name (the server's
    plugins are not installed here)."""
    try:
        return JobSpec.model_validate(data, context={"remote_models": remote_models})
    except ValidationError as err:
        raise SpecError(describe_errors(err)) from None
