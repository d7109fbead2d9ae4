"""The one job specification: what to prune, on which data, how, to which budget.

Torch-free on purpose: the API, the CLI and the job store validate with it without importing torch.
Defaults live on the fields. Unknown fields are refused everywhere (``extra="forbid"``) so a typo
never silently falls back to a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

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
DATASETS: tuple[str, ...] = ("digits", "cifar10", "cifar100", "imagefolder", "synthetic")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    """The dense network to prune."""

    name: str = Field("resnet20", description=f"A zoo model {CIFAR_MODELS} or `tv:<torchvision builder>`.")
    weights: str | None = Field(None, description="Path to a safetensors file with the dense weights.")
    num_classes: int | None = Field(None, ge=2, description="Output classes; default: the data set's.")
    in_channels: int | None = Field(None, ge=1, description="Input channels; default: the data set's.")

    @field_validator("name")
    @classmethod
    def _known_name(cls, v: str) -> str:
        if v in CIFAR_MODELS or (v.startswith(TORCHVISION_PREFIX) and len(v) > len(TORCHVISION_PREFIX)):
            return v
        raise ValueError(
            f"unknown model {v!r}; known: {', '.join(CIFAR_MODELS)}, or tv:<torchvision builder> "
            "such as tv:resnet18"
        )


class DataSpec(_Strict):
    """Where the training and test images come from."""

    name: str = Field("digits", description=f"One of {DATASETS}.")
    root: str | None = Field(
        None, description="Data root (cifar*) or a directory / .tar.gz / .zip archive (imagefolder)."
    )
    image_size: int | None = Field(None, ge=8, le=1024, description="Resize images to this many pixels.")
    per_class: int | None = Field(None, ge=1, description="Take at most this many training images per class.")
    test_per_class: int | None = Field(
        None, ge=1, description="Take at most this many test images per class."
    )
    augment: bool = Field(True, description="Random crop and flip on training images (not on digits).")
    num_classes: int | None = Field(None, ge=2, description="synthetic only: number of classes.")
    num_workers: int = Field(0, ge=0, le=32, description="DataLoader worker processes.")

    @field_validator("name")
    @classmethod
    def _known_name(cls, v: str) -> str:
        if v not in DATASETS:
            raise ValueError(f"unknown data set {v!r}; known: {', '.join(DATASETS)}")
        return v

    @model_validator(mode="after")
    def _root_when_needed(self) -> DataSpec:
        if self.name == "imagefolder" and not self.root:
            raise ValueError("imagefolder needs `root`: a directory or a .tar.gz / .zip archive")
        return self


class MagnitudeOptions(_Strict):
    """One-shot global group-L2 magnitude pruning, then fine-tuning (the baseline)."""

    name: Literal["magnitude"] = "magnitude"
    p: int = Field(2, ge=1, le=2, description="Norm of the group magnitude (1 or 2).")
    round_to: int = Field(1, ge=1, description="Keep channel counts a multiple of this (hardware-friendly).")


class S2HOptions(_Strict):
    """S2HPruner (NeurIPS 2024): soft and hard networks trained together in one stage, the hard one
    distilled from the soft one with a decoupled gap loss; the result is the hard network, no fine-tuning.

    Per coupled channel group: width candidates d, 2d, ..., C with one learnable logit each; the soft mask
    is their softmax's reverse cumulative sum, the hard mask keeps the expected width's most important
    (L1) channels. Defaults marked [ours] are our choices where the official configuration was not
    released. The performance loss is cross-entropy, or KD from the dense teacher when `kd.enabled`.
    """

    name: Literal["s2h"] = "s2h"
    temperature: float = Field(1.0, gt=0.0, le=100.0, description="T in softmax(u / T) over width logits.")
    gap_weight: float = Field(
        1.0, ge=0.0, le=100.0, description="Weight of the soft-hard gap (KL) losses; 0 turns them off."
    )
    resource_weight: float = Field(
        1.0, gt=0.0, le=1e6, description="c in the MAC loss c * (MACs / dense MACs - target)^2."
    )
    flops_relax: float = Field(
        0.02,
        ge=0.0,
        lt=1.0,
        description="Within this distance of the target MAC ratio the MAC gradient fades out.",
    )
    mask_lr_scale: float = Field(
        1.0,
        gt=0.0,
        le=1e4,
        description="Mask logits train with SGD at the weights' current LR times this [ours: 1].",
    )
    balance: Literal["norms", "sum"] = Field(
        "norms",
        description="`norms` (the official code): per group, the task gradient is scaled to the gap "
        "gradient's norm and the MAC gradient balanced against both; `sum`: gap_weight and "
        "resource_weight alone weigh a plain sum.",
    )
    width_divisor: int | None = Field(
        None,
        ge=1,
        description="d, the width step of each group's candidates (channels; rounded to a divisor of "
        "the group's width); default: about 8-16 candidates per group.",
    )
    max_init: bool = Field(
        True, description="Start near full width: the full-width candidate's probability is (C - d) / C."
    )
    finetune_epochs: int = Field(
        0, ge=0, le=10_000, description="Optional fine-tuning of the pruned network afterwards (off)."
    )


class TASOptions(_Strict):
    """TAS (NeurIPS 2019): a differentiable search of width per coupled channel group and depth per stage
    of residual blocks (Gumbel-softmax over two sampled widths joined by channel-wise interpolation, a
    piecewise expected-MAC loss), weights and architecture updated in turn on the two halves of the
    training data; then the argmax network is built for real (fewer channels and blocks), initialised
    at random or from the teacher, and trained `schedule.epochs` with KD from the dense teacher.
    Defaults are the official code's CIFAR settings.
    """

    name: Literal["tas"] = "tas"
    search_epochs: int = Field(10, ge=1, le=10_000, description="Epochs of the architecture search.")
    width_ratios: tuple[float, ...] = Field(
        (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
        min_length=1,
        description="Width candidates of a group: int(ratio * channels), deduplicated (1.0 always added).",
    )
    depth: bool = Field(True, description="Search the depth of every stage of residual blocks (ResNets).")
    tau_max: float = Field(5.0, gt=0.0, le=100.0, description="Gumbel-softmax temperature at the start.")
    tau_min: float = Field(0.1, gt=0.0, le=100.0, description="... and at the end (cosine decay).")
    cost_weight: float = Field(2.0, ge=0.0, le=1000.0, description="lambda of the expected-MAC loss.")
    tolerance: float = Field(
        0.05, ge=0.0, lt=1.0, description="t: the argmax MACs may lie in [target - t, target] (of dense)."
    )
    arch_lr: float = Field(1e-3, gt=0.0, le=10.0, description="Adam LR (constant) of the architecture.")
    arch_betas: tuple[float, float] = Field((0.5, 0.999), description="Adam betas of the architecture.")
    arch_weight_decay: float = Field(1e-3, ge=0.0, le=1.0)
    init: Literal["random", "teacher"] = Field(
        "random",
        description="The found network's weights: random (the paper) or the teacher's first channels "
        "and blocks (the `w/ Init` variant).",
    )
    kd: bool = Field(True, description="Train the found network with KD (`kd.temperature`, `kd.weight`).")

    @model_validator(mode="after")
    def _valid(self) -> TASOptions:
        if any(not 0.0 < r <= 1.0 for r in self.width_ratios):
            raise ValueError("width_ratios must lie in (0, 1]")
        if self.tau_min > self.tau_max:
            raise ValueError("tau_min cannot exceed tau_max")
        return self


class PSAPOptions(_Strict):
    """PSAP (arXiv 2303.11881): iterative soft filter pruning within training. Every `interval` epochs
    a prune step zeroes the lowest-norm filters of each coupled group, at per-group ratios proportional
    to the group's weight sparsity and scaled so that the step's MAC target is met; zeroed filters stay
    at zero unless their (scale-free) gradient pulses above `pulse_factor` times that of the group's
    kept filters, which protects them: they regrow and are spared at the next step. The step targets
    tighten from the dense MACs to the job's target over the first `ramp` of the steps. The last step is
    the final cut: the zeroed filters are removed physically, BatchNorm is re-estimated, and the pruned
    network trains for the last `settle` of the epochs (then `finetune_epochs`, if any).
    From scratch: give no `model.weights` and `schedule.dense_epochs: 0`; from given weights: the job's
    `model.weights` (or dense epochs first). The paper's text is not public: which rules follow its
    abstract and which are ours is in the method's docstring.
    """

    name: Literal["psap"] = "psap"
    interval: int = Field(1, ge=1, le=1000, description="Epochs between prune steps.")
    schedule: Literal["geometric", "linear"] = Field(
        "geometric",
        description="How step targets tighten: remaining MACs target**(k/K) (geometric) or "
        "1 - (1 - target) * k/K (linear) at step k of the K ramp steps.",
    )
    ramp: float = Field(
        0.7, gt=0.0, le=1.0, description="Share of the prune steps over which the target tightens."
    )
    adaptive: bool = Field(
        True, description="Per-group ratios from weight sparsity; false: one ratio for every group."
    )
    sparsity_eps: float = Field(
        0.1, gt=0.0, lt=1.0, description="A weight is sparse below this times its group's mean |w|."
    )
    max_ratio: float = Field(
        0.8, gt=0.0, lt=1.0, description="The largest share of a group pruned (at any step)."
    )
    protect: bool = Field(True, description="Protect zeroed filters whose gradient pulses.")
    pulse_factor: float = Field(
        2.0, gt=0.0, le=1000.0, description="A pulse: gradient EMA above this times the kept filters' mean."
    )
    grad_ema: float = Field(0.9, ge=0.0, lt=1.0, description="EMA decay of the gradient signal, per step.")
    settle: float = Field(
        0.2,
        ge=0.0,
        lt=1.0,
        description="Share of `schedule.epochs` that the physically pruned network trains after the final "
        "cut (at least one epoch); 0: the last step is at the very end, with no training after it.",
    )
    finetune_epochs: int = Field(
        0, ge=0, le=10_000, description="Epochs of a separate fine-tuning phase after the removal."
    )


EPI_THRESHOLDS = {"magnitude": 0.983, "taylor": 0.944}  # one re-implementation's values (unverified)


class EPIOptions(_Strict):
    """EPI (CVPR 2022): dense training that prunes as soon as the dominant sub-network stabilises. At the
    end of every epoch the sub-network that pruning to the target would keep now (the engine's global
    allocator on `criterion` scores) is found without pruning; the indicator is its mean structural
    similarity to the last `window` ones; the first epoch whose indicator reaches `threshold` and is not
    below the last `window` values (or the `deadline`) prunes physically, and the pruned network trains
    for the rest of `schedule.epochs`. From scratch unless the job gives weights or dense epochs.
    """

    name: Literal["epi"] = "epi"
    criterion: Literal["magnitude", "taylor"] = Field(
        "magnitude",
        description="Neuron importance: group L2 magnitude, or first-order Taylor summed over the epoch.",
    )
    window: int = Field(5, ge=1, le=100, description="r: the indicator averages over the last r epochs.")
    threshold: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="tau: prune once the indicator reaches it; default per criterion "
        f"({EPI_THRESHOLDS['magnitude']} magnitude, {EPI_THRESHOLDS['taylor']} taylor).",
    )
    min_epochs: int | None = Field(
        None,
        ge=1,
        le=10_000,
        description="Never prune before this many epochs (unless the schedule ends first: then at its "
        "second-to-last epoch); default: window + 1, the first epoch with an indicator.",
    )
    deadline: float = Field(
        0.5,
        gt=0.0,
        le=1.0,
        description="Prune at the end of this share of `schedule.epochs` at the latest (not before min_epochs, "
        "not after the second-to-last epoch), so every job prunes.",
    )

    @property
    def tau(self) -> float:
        return self.threshold if self.threshold is not None else EPI_THRESHOLDS[self.criterion]


# A discriminated union on `name`.
MethodSpec = Annotated[
    MagnitudeOptions | S2HOptions | TASOptions | PSAPOptions | EPIOptions, Field(discriminator="name")
]
METHODS: tuple[str, ...] = ("magnitude", "s2h", "tas", "psap", "epi")


class TargetSpec(_Strict):
    """The budget: the fraction of the dense model's MACs that remains after pruning."""

    macs_ratio: float = Field(0.5, gt=0.0, le=1.0, description="Remaining MACs / dense MACs, in (0, 1].")
    min_channels: int = Field(1, ge=1, description="Never keep fewer channels than this in a group.")


class Schedule(_Strict):
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
    warmup_epochs: float = Field(0.0, ge=0.0, description="Linear warm-up, in epochs (fractions allowed).")
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    amp: bool = Field(True, description="Mixed precision on CUDA (ignored on CPU).")
    max_steps_per_epoch: int | None = Field(None, ge=1, description="Cap on steps per epoch (smoke runs).")
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


class KDSpec(_Strict):
    """Knowledge distillation from a teacher (the dense model by default)."""

    enabled: bool = False
    teacher: Literal["dense"] | str = Field("dense", description="`dense`, or a path to teacher weights.")
    temperature: float = Field(4.0, gt=0.0, le=100.0)
    weight: float = Field(0.9, ge=0.0, le=1.0, description="a in (1-a)·CE + a·T²·KL.")


ExportFormat = Literal["safetensors", "torchscript", "onnx"]


class ExportSpec(_Strict):
    formats: tuple[ExportFormat, ...] = ("safetensors", "torchscript", "onnx")
    latency_batch_size: int = Field(
        8, ge=1, le=4096, description="Throughput batch of the latency comparison; batch 1 is timed too."
    )
    latency_max_s: float = Field(
        20.0, ge=0.0, le=600.0, description="Seconds the dense-vs-pruned latency comparison may take."
    )

    @field_validator("formats")
    @classmethod
    def _safetensors_first(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        # safetensors + architecture JSON is what load_pruned() reads back, so it is always written.
        return tuple(dict.fromkeys(("safetensors", *v)))


class JobSpec(_Strict):
    """A whole pruning job. Validates API bodies, CLI files and stored rows alike."""

    model: ModelSpec = ModelSpec()
    data: DataSpec = DataSpec()
    method: MethodSpec = MagnitudeOptions()
    target: TargetSpec = TargetSpec()
    schedule: Schedule = Schedule()
    kd: KDSpec = KDSpec()
    export: ExportSpec = ExportSpec()
    seed: int = Field(0, ge=0, le=2**31 - 1)
    device: str = Field("auto", description="`auto`, `cpu`, `cuda` or `cuda:N`.")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        ok = v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit())
        if not ok:
            raise ValueError("device must be `auto`, `cpu`, `cuda` or `cuda:N`")
        return v

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
        lines.append(f"{loc or '(spec)'}: {msg}")
    return lines


def parse_spec(data: dict[str, Any]) -> JobSpec:
    """Validate a mapping into a JobSpec, raising SpecError with one line per problem."""
    try:
        return JobSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(describe_errors(err)) from None


def read_spec_mapping(path: str | Path) -> dict[str, Any]:
    """The raw mapping in a YAML or JSON spec file (not validated yet)."""
    import yaml

    text = Path(path).read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise SpecError([f"{path}: not valid YAML/JSON ({err.__class__.__name__})"]) from None
    if not isinstance(data, dict):
        raise SpecError([f"{path}: expected a mapping at the top level"])
    return data


def load_spec_file(path: str | Path) -> JobSpec:
    """Read and validate a JobSpec from a YAML or JSON file."""
    return parse_spec(read_spec_mapping(path))
