"""The one Settings object: infrastructure from the environment (per-job choices live in JobSpec).

The engine reads the data/graph fields; the service packages (store, api, worker, client) read the rest.
Nothing here imports a service framework, so the engine's layering holds.
"""

from __future__ import annotations

from functools import lru_cache
from ipaddress import ip_network
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# torchvision classifiers a job may name as `tv:<name>` unless ALLOWED_TORCHVISION_MODELS says otherwise:
# the CNNs that tests/test_torchvision_models.py shows pruning. Left out: the attention models and
# ShuffleNet (refused by the engine anyway) and regnet_y_128gf (644M parameters).
DEFAULT_TORCHVISION_MODELS: tuple[str, ...] = (
    *("alexnet", "googlenet", "inception_v3", "squeezenet1_0", "squeezenet1_1"),
    *(f"vgg{d}{bn}" for d in (11, 13, 16, 19) for bn in ("", "_bn")),
    *("resnet18", "resnet34", "resnet50", "resnet101", "resnet152"),
    *("resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2"),
    *("densenet121", "densenet161", "densenet169", "densenet201"),
    *("mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large"),
    *("mnasnet0_5", "mnasnet0_75", "mnasnet1_0", "mnasnet1_3"),
    *(f"efficientnet_b{i}" for i in range(8)),
    *("efficientnet_v2_s", "efficientnet_v2_m", "efficientnet_v2_l"),
    *(f"regnet_x_{s}" for s in ("400mf", "800mf", "1_6gf", "3_2gf", "8gf", "16gf", "32gf")),
    *(f"regnet_y_{s}" for s in ("400mf", "800mf", "1_6gf", "3_2gf", "8gf", "16gf", "32gf")),
    *("convnext_tiny", "convnext_small", "convnext_base", "convnext_large"),
)

# timm models a job may name as `timm:<name>` (with the `timm` extra installed) unless
# ALLOWED_TIMM_MODELS says otherwise: one or two small members of each family that
# tests/test_timm_models.py shows pruning.
DEFAULT_TIMM_MODELS: tuple[str, ...] = (
    *("resnet18", "resnet50", "efficientnet_b0", "mobilenetv3_small_100", "mobilenetv3_large_100"),
    *("regnetx_002", "regnety_002", "convnext_atto"),
)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", extra="ignore")

    # --- engine ---
    data_root: Path = Field(Path("data"), description="Where cifar10/cifar100 live (DATA_ROOT).")
    allow_download: bool = Field(
        False,
        description="Let torchvision download missing data sets, and torchvision and timm the published "
        "weights `model.pretrained` asks for when their cache (TORCH_HOME, HF_HOME) lacks them "
        "(ALLOW_DOWNLOAD).",
    )
    archive_max_bytes: int = Field(2 * 1024**3, description="Cap on the unpacked size of a dataset archive.")
    archive_max_members: int = Field(200_000, description="Cap on the number of files in a dataset archive.")
    archive_max_ratio: float = Field(200.0, description="Cap on unpacked/packed size (zip bombs).")
    graph_timeout_s: float = Field(120.0, description="Bound on building a model's dependency graph.")
    divergence_factor: float = Field(
        100.0,
        gt=1.0,
        description="A training step whose loss is above this many times its phase's first step's loss "
        "(at least 1) stops the job as failed / diverged, not retried (DIVERGENCE_FACTOR).",
    )
    decode_max_bytes: int = Field(
        1024**3,
        ge=0,
        description="An image folder whose decoded uint8 images (N x C x S x S bytes) fit in this many bytes "
        "is decoded once, cached on disk (DECODE_CACHE_DIR) and held in memory, on the GPU for CUDA jobs, "
        "where it is augmented in batches; a larger one is decoded from its files per image by DataLoader "
        "workers (DECODE_MAX_BYTES).",
    )
    decode_cache_dir: Path | None = Field(
        None,
        description="Decoded image arrays, shared by the jobs of this host and keyed by the data's digest "
        "and image size; default STATE_DIR/cache/decoded (DECODE_CACHE_DIR).",
    )
    mlflow_tracking_uri: str | None = Field(
        None,
        description="Log every job as an MLflow run there (params: the spec; per-epoch metrics; the "
        "report and model files as artifacts); unset: no MLflow. Needs the `mlflow` extra "
        "(MLFLOW_TRACKING_URI).",
    )
    mlflow_experiment_name: str = Field(
        "pruning-service", description="The MLflow experiment of the jobs' runs (MLFLOW_EXPERIMENT_NAME)."
    )

    # --- service ---
    state_dir: Path = Field(
        Path("var"), description="Home of the SQLite file, artifacts and uploads by default."
    )
    database_url: str | None = Field(None, description="SQLAlchemy URL; default: SQLite under STATE_DIR.")
    redis_url: str | None = Field(None, description="Celery broker; unset = embedded mode (local runner).")
    artifact_root: Path | None = Field(None, description="Job artifacts; default STATE_DIR/artifacts.")
    upload_root: Path | None = Field(None, description="Uploaded files; default STATE_DIR/uploads.")
    max_upload_bytes: int = Field(1024**3, description="Cap on one upload, in bytes.")
    upload_cache_max_bytes: int = Field(
        20 * 1024**3,
        ge=0,
        description="With OBJECT_STORE_URL: a worker keeps the uploads it downloaded (under UPLOAD_ROOT) up to "
        "this many bytes, the least recently used removed first (never the one a job just asked for).",
    )
    object_store_url: str | None = Field(
        None,
        description="Keep artifacts and uploads in an S3-compatible bucket, `s3://bucket/prefix` (under "
        "`<prefix>/artifacts/` and `<prefix>/uploads/`), so that the API and workers on other hosts share "
        "them; credentials from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_DEFAULT_REGION. Unset: "
        "the local directories ARTIFACT_ROOT and UPLOAD_ROOT. With a bucket those directories are only "
        "this host's scratch: a worker trains there and uploads what the job keeps, and caches the "
        "uploads its jobs name (OBJECT_STORE_URL).",
    )
    s3_endpoint_url: str | None = Field(
        None,
        description="The S3 API's address, for MinIO or another S3-compatible server (e.g. "
        "`http://minio:9000`); unset: AWS's own (S3_ENDPOINT_URL).",
    )
    s3_presign: bool = Field(
        False,
        description="With OBJECT_STORE_URL: answer an artifact download with a 307 redirect to a presigned "
        "URL of the bucket (valid S3_PRESIGN_EXPIRES_S), so the bytes do not pass through the API; the "
        "client must reach S3_PUBLIC_URL (default S3_ENDPOINT_URL) then. False: the API streams them "
        "(S3_PRESIGN).",
    )
    s3_public_url: str | None = Field(
        None,
        description="The object store's address as clients reach it, for presigned URLs (e.g. "
        "`https://files.example.com` where S3_ENDPOINT_URL is compose's internal `http://minio:9000`); "
        "unset: S3_ENDPOINT_URL (S3_PUBLIC_URL).",
    )
    s3_presign_expires_s: int = Field(
        300,
        ge=1,
        le=7 * 24 * 3600,
        description="How long a presigned download URL stays valid, in seconds (S3_PRESIGN_EXPIRES_S).",
    )
    torch_child_timeout_s: float = Field(
        300.0,
        gt=0,
        description="Bound on the child process that converts a .pt/.pth upload to safetensors or lists "
        "a model's state-dict keys (the API itself never imports torch), in seconds.",
    )
    torch_children: int = Field(
        2, ge=1, description="Such child processes (torch loaded in each) the API runs at once."
    )
    torch_child_wait_s: float = Field(
        5.0,
        gt=0,
        description="How long a request waits for a free torch child before a 503 with Retry-After, in "
        "seconds (TORCH_CHILD_WAIT_S).",
    )
    torch_child_per_owner: int = Field(
        2,
        ge=1,
        description="An owner's requests waiting for or running a torch child at once; more get a 429 "
        "(TORCH_CHILD_PER_OWNER).",
    )
    lease_s: float = Field(120.0, description="A running job whose heartbeat is older than this is stale.")
    heartbeat_s: float = Field(10.0, description="How often a running job writes its heartbeat.")
    max_attempts: int = Field(3, description="Attempts before a job that keeps losing its worker fails.")
    job_time_limit_s: int = Field(24 * 3600, description="Hard time limit of one job attempt.")
    db_retry_s: float = Field(
        120.0,
        description="How long a worker retries a write (event, finish) while the database is unreachable.",
    )
    unqueued_after_s: float = Field(
        30.0, description="The reaper enqueues a queued job the broker never got after this many seconds."
    )
    bootstrap_api_key: str | None = Field(
        None, description="An API key accepted for owner `admin` (BOOTSTRAP_API_KEY)."
    )
    auth_disabled: bool = Field(
        False, description="Embedded mode on loopback only: accept requests without a key."
    )

    # --- per-owner quotas and fairness (api/quotas.py, store/repo.py); 0 turns a limit off ---
    quota_queued_jobs: int = Field(
        100, ge=0, description="Jobs one owner may have waiting (queued); past it POST /v1/jobs is a 429."
    )
    quota_running_jobs: int = Field(
        2, ge=0, description="Jobs of one owner that may run at once; the others wait queued (not a 429)."
    )
    quota_upload_bytes: int = Field(
        10 * 1024**3,
        ge=0,
        description="Total bytes of one owner's uploads; past it POST /v1/uploads is a 429.",
    )
    max_sweep_jobs: int = Field(
        20,
        ge=1,
        description="Child jobs (methods x targets) one sweep may have; past it POST /v1/sweeps is a 422.",
    )
    rate_per_s: float = Field(
        20.0, ge=0, description="Requests per second one API key may sustain (token bucket refill)."
    )
    rate_burst: int = Field(100, ge=1, description="Requests one API key may send at once (bucket size).")

    # --- job life: webhooks (worker/webhooks.py) and retention (worker/retention.py) ---
    webhook_allow: Annotated[tuple[str, ...], NoDecode] = Field(
        (),
        description="Networks (CIDR, comma-separated) a job's `notify.url` may reach though they are not "
        "global (loopback, private, link-local, ...); empty: only global addresses (WEBHOOK_ALLOW).",
    )
    webhook_max_attempts: int = Field(
        8, ge=1, le=50, description="Deliveries tried per ended job before giving up (WEBHOOK_MAX_ATTEMPTS)."
    )
    webhook_backoff_s: float = Field(
        10.0,
        gt=0,
        description="Wait before the second delivery attempt, doubled after each failure up to an hour, in "
        "seconds (WEBHOOK_BACKOFF_S).",
    )
    webhook_timeout_s: float = Field(
        10.0, gt=0, le=120, description="Bound on one delivery attempt, in seconds (WEBHOOK_TIMEOUT_S)."
    )
    job_retention_days: float | None = Field(
        None,
        gt=0,
        description="Ended jobs older than this (by their end), with their events, artifacts and files, "
        "are deleted by the reaper; unset: kept (JOB_RETENTION_DAYS).",
    )

    # --- job limits: the largest job a spec may ask for. The API refuses a spec beyond them at submit
    # (422, one item per field, and its OpenAPI schema shows them); the worker refuses what only the data
    # tells (images larger than MAX_IMAGE_SIZE, more than MAX_IMAGES). Within the spec's own hard bounds.
    max_epochs: int = Field(1000, ge=1, description="Cap on the epochs of each training phase.")
    max_batch_size: int = Field(4096, ge=1, description="Cap on schedule.batch_size and the latency batch.")
    max_batch_pixels: int = Field(
        2**28, ge=1, description="Cap on batch_size x image_size^2 (one input batch, in pixels)."
    )
    max_image_size: int = Field(
        1024, ge=8, description="Cap on data.image_size, and on images used at their own size."
    )
    max_num_classes: int = Field(10_000, ge=2, description="Cap on model.num_classes and data.num_classes.")
    max_data_workers: int = Field(16, ge=0, description="Cap on data.num_workers (DataLoader processes).")
    max_gpus: int = Field(8, ge=1, description="Cap on resources.gpus (processes, one per GPU, of one job).")
    max_images: int = Field(
        2_000_000, ge=1, description="Cap on the images one job loads (train + test), and on per_class."
    )
    max_dataset_bytes: int = Field(
        8 * 1024**3, ge=1, description="Cap on a generated (synthetic) data set's size in memory."
    )
    allowed_torchvision_models: Annotated[tuple[str, ...], NoDecode] = Field(
        DEFAULT_TORCHVISION_MODELS,
        description="The torchvision builders a job may name as tv:<name> (comma-separated).",
    )

    allowed_timm_models: Annotated[tuple[str, ...], NoDecode] = Field(
        DEFAULT_TIMM_MODELS,
        description="The timm models a job may name as timm:<name> (comma-separated; needs the timm extra).",
    )

    @field_validator("allowed_torchvision_models", "allowed_timm_models", mode="before")
    @classmethod
    def _comma_separated(cls, v: object) -> object:
        if isinstance(v, str):
            names = (n.strip() for n in v.split(","))
            return tuple(n.removeprefix("tv:").removeprefix("timm:") for n in names if n)
        return v

    @field_validator("webhook_allow", mode="before")
    @classmethod
    def _networks(cls, v: object) -> object:
        """A comma-separated string or a sequence of CIDRs; each must parse (``10.0.0.0/8``, ``::1/128``)."""
        items = [n.strip() for n in v.split(",")] if isinstance(v, str) else list(v)  # type: ignore[call-overload]
        return tuple(str(ip_network(n, strict=False)) for n in items if n)

    @field_validator(
        "job_retention_days", "object_store_url", "s3_endpoint_url", "s3_public_url", mode="before"
    )
    @classmethod
    def _empty_is_unset(cls, v: object) -> object:
        """``JOB_RETENTION_DAYS=`` (compose passes an unset variable on as empty): unset (keep every job;
        no object store)."""
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("object_store_url")
    @classmethod
    def _bucket_url(cls, v: str | None) -> str | None:
        """``s3://bucket`` or ``s3://bucket/prefix``: refused at start-up rather than at the first upload."""
        if v is not None and not (v.startswith("s3://") and v[5:].split("/", 1)[0]):
            raise ValueError(f"OBJECT_STORE_URL must look like s3://bucket/prefix, not {v!r}")
        return v

    @property
    def job_soft_time_limit_s(self) -> int:
        """Seconds after which a job is asked to stop (Celery's soft limit, the local runner's SIGALRM): 5 %
        below the hard limit, 10 s to 5 min, so the job reaches its next training step and records its
        failure before the kill (5 s was too little on a loaded 2-core machine)."""
        hard = self.job_time_limit_s
        return max(1, hard - min(300, max(10, hard // 20)))

    @property
    def sqlalchemy_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.state_dir / 'pruning.db').resolve()}"

    @property
    def artifacts_dir(self) -> Path:
        return (self.artifact_root or self.state_dir / "artifacts").resolve()

    @property
    def decoded_dir(self) -> Path:
        return (self.decode_cache_dir or self.state_dir / "cache" / "decoded").resolve()

    @property
    def uploads_dir(self) -> Path:
        return (self.upload_root or self.state_dir / "uploads").resolve()


@lru_cache
def get_settings() -> Settings:
    return Settings()
