"""Infrastructure settings from the environment (one Settings object; per-job choices live in JobSpec)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", extra="ignore")

    data_root: Path = Field(Path("data"), description="Where cifar10/cifar100 live (DATA_ROOT).")
    allow_download: bool = Field(
        False, description="Let torchvision download missing data sets (ALLOW_DOWNLOAD)."
    )
    archive_max_bytes: int = Field(2 * 1024**3, description="Cap on the unpacked size of a dataset archive.")
    archive_max_members: int = Field(200_000, description="Cap on the number of files in a dataset archive.")
    archive_max_ratio: float = Field(200.0, description="Cap on unpacked/packed size (zip bombs).")
    graph_timeout_s: float = Field(120.0, description="Bound on building a model's dependency graph.")


@lru_cache
def get_settings() -> Settings:
    return Settings()
